#!/usr/bin/env python
"""One measured TPC-H query in a fresh process (used by ``bench_tpch.py``).

Runs under either interpreter: the main env (duckdb 2.0.x, Shoal) or the
duckdb 1.5.5 side env (``.venv-duckdb155``, httpfs loaded by path), so it
imports only duckdb and pyarrow at the top and Shoal only for Shoal modes.

Usage (the config is one JSON object, never a pickle)::

    python benchmarks/tpch_runner.py '{"mode": "duckdb_local", "query": "q01", ...}'

Modes:

* ``duckdb_local``  DuckDB over ``data_dir/<table>/*.parquet`` on local disk;
* ``duckdb_httpfs`` DuckDB httpfs over ``s3://bucket/prefix/<table>/*.parquet``
  through ``endpoint`` (path style, plain HTTP);
* ``shoal``         a Shoal ``Session`` over the same S3 URLs (``cache_enabled``,
  ``cache_dir``, ``workers``, ``executor``).

The timed region ("query_s") is what a user waits for once the client exists:
for DuckDB, creating the table views (httpfs lists the files and reads a footer
here) plus running the query to an Arrow table; for Shoal, registering the
tables plus ``Session.sql``.  Creating the client (imports, pyarrow included,
which DuckDB would otherwise import inside the first query; DuckDB connection,
LOAD httpfs, SETs; Shoal ``Session`` and its S3 client object, no network) is
"setup_s".  For Shoal, ``close_s`` is ``Session.close()``, which waits for
cache write-behind to reach the SSD.

Prints one line ``RESULT <json>`` on stdout; the result table goes to
``result_path`` as an Arrow IPC file for the orchestrator's row check.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TPCH_TABLES = ("lineitem", "orders", "partsupp", "part", "customer", "supplier", "nation", "region")


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _write_result(table: Any, path: str | None) -> None:
    if not path:
        return
    import pyarrow as pa

    with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def run_duckdb(spec: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    t0 = time.perf_counter()
    import duckdb
    import pyarrow  # noqa: F401 - DuckDB imports it on the first Arrow result (~0.1-0.2 s): not query time

    if spec["mode"] == "duckdb_httpfs":
        sys.path.insert(0, str(HERE))
        from duckdb155_ext import extension_path

        con = duckdb.connect()
        con.execute("SET autoinstall_known_extensions = false")
        con.execute("SET autoload_known_extensions = false")
        con.execute(f"LOAD {_literal(extension_path('httpfs'))}")
        host = spec["endpoint"].split("://", 1)[1].rstrip("/")
        for name, value in (("s3_endpoint", host), ("s3_url_style", "path"), ("s3_use_ssl", False),
                            ("s3_access_key_id", spec["access_key"]),
                            ("s3_secret_access_key", spec["secret_key"]), ("s3_region", spec["region"])):
            con.execute(f"SET {name} = {_literal(value) if isinstance(value, str) else str(value).lower()}")
        base = f"s3://{spec['bucket']}/{spec['prefix']}"
    else:
        con = duckdb.connect()
        base = str(Path(spec["data_dir"]).resolve())
    con.execute("SET enable_external_file_cache = false")
    con.execute(f"SET threads = {int(spec['threads'])}")
    setup = time.perf_counter() - t0

    cpu0 = _cpu()
    t1 = time.perf_counter()
    for table in TPCH_TABLES:
        glob = f"{base}/{table}/*.parquet"
        con.execute(f"CREATE VIEW {table} AS SELECT * FROM read_parquet({_literal(glob)})")
    t2 = time.perf_counter()
    table = con.sql(spec["sql"]).to_arrow_table()
    t3 = time.perf_counter()
    cpu1 = _cpu()
    con.close()
    out = {"setup_s": setup, "query_s": t3 - t1, "views_s": t2 - t1, "execute_s": t3 - t2,
           "cpu_query_s": cpu1 - cpu0, "duckdb_version": duckdb.__version__}
    return table, out


def _start_py_spy() -> Any:
    """With ``SHOAL_BENCH_PERF=<path>``: ``perf record -a -g`` of the timed region
    (whole machine: the peer worker too) into ``<path>``.  With ``SHOAL_BENCH_PY_SPY=<path>``: sample this process's timed region
    (all threads, DuckDB's included where they call the cached filesystem;
    Python frames only, without pausing the process: native unwinding pauses
    it and made a 0.3 s query take 5-8 s) with py-spy into ``<path>`` (speedscope JSON; ``{pid}`` and
    ``{peers}``, "peer" or "local", are filled in). Diagnosis only."""
    perf_out = os.environ.get("SHOAL_BENCH_PERF")
    if perf_out:
        # System-wide (the peer worker's CPU counts too), kernel and native frames.
        import subprocess

        perf_out = perf_out.replace("{pid}", str(os.getpid())).replace(
            "{peers}", "peer" if os.environ.get("SHOAL_PEERS") else "local")
        perf = subprocess.Popen(["perf", "record", "-a", "-g", "-F", "2000", "-o", perf_out],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
        return perf
    out = os.environ.get("SHOAL_BENCH_PY_SPY")
    if not out:
        return None
    out = out.replace("{pid}", str(os.getpid())).replace("{peers}", "peer" if os.environ.get("SHOAL_PEERS") else "local")
    import shutil
    import subprocess

    spy = subprocess.Popen([shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy"), "record",
                            "--pid", str(os.getpid()), "--rate", "1000", "--threads", "--idle",
                            "--format", "speedscope", "--output", out, "--nonblocking"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.5)  # attached and sampling before the timed region starts
    return spy


def _stop_py_spy(spy: Any) -> None:
    if spy is not None:
        import signal

        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=60)


def run_shoal(spec: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    t0 = time.perf_counter()
    if spec.get("code_dir"):  # the orchestrator's frozen copy of Shoal (a regular package named shoal)
        sys.path.insert(0, spec["code_dir"])
    import duckdb
    from shoal.cache import CacheConfig, StoreConfig
    from shoal.engine import Session  # imports pyarrow too

    cache = CacheConfig(directory=spec["cache_dir"], enabled=bool(spec["cache_enabled"]),
                        **spec.get("cache_options", {}))
    store = StoreConfig(endpoint_url=spec["endpoint"], access_key=spec["access_key"],
                        secret_key=spec["secret_key"], region=spec["region"])
    session = Session(cache=cache, store=store, workers=int(spec["threads"]), executor=spec["executor"])
    # The S3 client object (botocore models, no network): built here as DuckDB's
    # httpfs client is built by LOAD/SET, outside the timed region.
    session.fs.source("s3").fs.connect()
    # Setup ends with a DuckDB statement, as the DuckDB runners' does (their SETs):
    # on this VM, code and memory left untouched for a few hundred ms are slow to
    # touch again (measured: a DuckDB statement after 1 s idle takes 20-50 ms
    # instead of 1 ms, pure DuckDB, no Shoal), and building the S3 client above
    # leaves DuckDB idle that long after the Session made its connection.
    session.planner.con.execute("SELECT 1").fetchall()
    setup = time.perf_counter() - t0

    spy = _start_py_spy()
    cpu0 = _cpu()
    t1 = time.perf_counter()
    for table in TPCH_TABLES:
        session.register(table, f"s3://{spec['bucket']}/{spec['prefix']}/{table}/*.parquet")
    result = session.sql(spec["sql"])
    t2 = time.perf_counter()
    cpu1 = _cpu()
    _stop_py_spy(spy)
    stats = session.fs.stats()
    session.close()
    t3 = time.perf_counter()
    cpu2 = _cpu()
    profile = result.profile
    out = {
        "setup_s": setup, "query_s": t2 - t1, "close_s": t3 - t2,
        "cpu_query_s": cpu1 - cpu0, "cpu_close_s": cpu2 - cpu1,
        "duckdb_version": duckdb.__version__,
        "stages_s": dict(profile.stages),
        "profile": {"bytes_from_store": profile.bytes_from_store, "store_requests": profile.store_requests,
                    "bytes_from_cache": profile.bytes_from_cache,
                    "tables": {name: vars(io) for name, io in profile.tables.items()}},
        "cache_stats": {k: v for k, v in stats.items() if isinstance(v, (int, float, bool)) or v is None},
    }
    return result.table, out


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    spec = json.loads(argv[0])
    if spec.get("sql") is None:
        spec["sql"] = Path(spec["sql_path"]).read_text()
    runner = run_shoal if spec["mode"] == "shoal" else run_duckdb
    table, out = runner(spec)
    _write_result(table, spec.get("result_path"))
    out.update(rows=table.num_rows, cpu_process_s=_cpu(), peak_rss=_peak_rss(), pid=os.getpid())
    if "shoal.engine" in sys.modules:
        out["shoal_engine_file"] = sys.modules["shoal.engine"].__file__
    sys.stdout.write("RESULT " + json.dumps(out) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
