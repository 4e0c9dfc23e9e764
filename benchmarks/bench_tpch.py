#!/usr/bin/env python
"""TPC-H over S3 with realistic latency: Shoal against DuckDB local and DuckDB httpfs (issue 4).

One command::

    .venv/bin/python benchmarks/bench_tpch.py                 # SF 1, 22 queries, 5 reps
    .venv/bin/python benchmarks/bench_tpch.py --quick         # SF 0.1, 5 queries, 3 reps, no 1.5.5-local (< 3 min)
    .venv/bin/python benchmarks/bench_tpch.py --sf 1 --reps 3 --queries q01,q18

What it does:

1. TPC-H Parquet from ``benchmarks/tpch_data.py`` (DuckDB 1.5.5's tpch extension,
   several files per large table) under ``benchmarks/data/tpch-sf<SF>``;
   generated with the 1.5.5 side env when missing.
2. A loopback SeaweedFS (``tests/s3servers.py``); the files are uploaded to it.
3. The latency proxy ``benchmarks/s3proxy.py`` as a separate process in front of
   it: profile ``s3-standard`` (TTFB lognormal, median 27 ms, tail), fixed
   60 MiB/s per connection, error rate 0, seed printed.  Its own overhead at
   profile ``none`` is measured with ``s3proxy.py --measure-overhead``.
4. Every query in every mode, ``--reps`` times, each measurement a fresh
   process (``benchmarks/tpch_runner.py``, config as JSON on the command line):

   * ``local``     DuckDB (main env, 2.0.x) on the local Parquet files;
   * ``local155``  DuckDB 1.5.5 on the local files (reference only);
   * ``httpfs``    DuckDB 1.5.5 httpfs through the proxy;
   * ``cold``      Shoal, empty SSD cache directory;
   * ``warm``      Shoal, SSD cache filled by the first cold run of the query;
   * ``nocache``   Shoal, ``CacheConfig(enabled=False)``.

   Shoal runs import a copy of ``engine/``, ``cache/`` and ``transport/`` taken
   when the benchmark starts (``--no-freeze-code`` to use the working tree), so
   edits made during a long run cannot mix code versions within one run.

   All with 2 threads (Shoal: ``workers=2``, executor ``local``) and DuckDB's
   in-memory external file cache off.  The modes of one repetition run back to
   back (interleaved), so drift in machine load hits them alike.  Proxy
   counters are reset before every run (GETs, bytes sent); CPU (user+sys) and
   peak RSS come from the runner's ``getrusage``; proxy and SeaweedFS CPU from
   ``/proc``.  Every run's rows are compared with the first DuckDB-local run's
   (``tpch_answers.rows_difference``).
5. Target ratios from the issue with PASS/FAIL; ``benchmarks/results/
   tpch-sf<SF>.json``, ``.md``, ``.png``; and (full runs, or
   ``--update-results``) the "TPC-H (issue 4)" section of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

MiB = 1 << 20
GiB = 1 << 30
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS_DIR = HERE / "results"
RUNNER = HERE / "tpch_runner.py"
SECTION = "## TPC-H (issue 4)"
BUCKET = "shoal-tpch"
TPCH_TABLES = ("lineitem", "orders", "partsupp", "part", "customer", "supplier", "nation", "region")
QUICK_QUERIES = ("q01", "q03", "q06", "q13", "q18")

# Targets (issue 4), same run, this machine.
TARGET_WARM_GEOMEAN = 1.15
TARGET_WARM_MAX = 1.5
TARGET_COLD_OVER_HTTPFS = 0.4
TARGET_BYTES_OVER_HTTPFS = 1.2
TARGET_FILL_PENALTY = 1.05

MODES = ("local", "local155", "httpfs", "cold", "warm", "nocache")
CHART_MODES = ("local", "httpfs", "cold", "warm", "nocache")
PROXY_MODES = ("httpfs", "cold", "warm", "nocache")
COLORS = {"local": "#4d4d4d", "local155": "#9e9e9e", "httpfs": "#d95f02", "cold": "#1b9e77",
          "warm": "#7570b3", "nocache": "#66a61e"}


def _label(mode: str, versions: dict[str, str]) -> str:
    main, side = versions.get("duckdb", "?"), versions.get("duckdb_side", "?")
    return {
        "local": f"DuckDB {main} local",
        "local155": f"DuckDB {side} local",
        "httpfs": f"DuckDB {side} httpfs",
        "cold": "Shoal cold",
        "warm": "Shoal warm",
        "nocache": "Shoal no cache",
    }[mode]


# --------------------------------------------------------------------------- helpers


SNAPSHOT_PACKAGES = ("engine", "cache", "transport")


def _tree_sha1(root: Path) -> str:
    import hashlib

    h = hashlib.sha1()
    for f in sorted(root.rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:12]


def _proc_cpu(pid: int | None) -> float:
    """user+sys CPU seconds of a live process (all its threads), from /proc."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _find_pid(needle: str, name: str) -> int | None:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if name in cmd.split(" ", 1)[0] and needle in cmd:
                return int(entry.name)
    return None


def _mmm(values: list[float]) -> dict[str, float] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def _geomean(values: list[float]) -> float:
    return math.exp(statistics.fmean(math.log(v) for v in values)) if values else float("nan")


class Proxy:
    """benchmarks/s3proxy.py as its own process (its CPU is not our GIL's)."""

    def __init__(self, upstream: str, *, profile: str, seed: int, bandwidth_mib_s: float, error_rate: float) -> None:
        self.args = ["--upstream", upstream, "--listen", "127.0.0.1:0", "--profile", profile, "--seed", str(seed),
                     "--bandwidth-mib-s", f"{bandwidth_mib_s:g}", "--error-rate", f"{error_rate:g}"]
        self.proc = subprocess.Popen([sys.executable, str(HERE / "s3proxy.py"), *self.args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        line = self.proc.stdout.readline()
        if not line.startswith("LISTENING"):
            self.proc.kill()
            raise RuntimeError(f"s3proxy did not start: {line!r} {self.proc.stderr.read()[-2000:]}")
        self.banner = self.proc.stderr.readline().strip()
        self.port = int(line.split()[1])
        self.url = f"http://127.0.0.1:{self.port}"

    def _call(self, method: str, name: str) -> dict[str, Any]:
        req = urllib.request.Request(f"{self.url}/__shoal_proxy__/{name}", method=method,
                                     data=b"{}" if method == "POST" else None)
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    def stats(self) -> dict[str, Any]:
        return self._call("GET", "stats")

    def reset(self) -> None:
        self._call("POST", "reset")

    def cpu(self) -> float:
        return _proc_cpu(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _load_answers() -> Any:
    sys.path.insert(0, str(HERE))
    import tpch_answers

    return tpch_answers


def _read_rows(path: Path) -> list[tuple]:
    import pyarrow as pa

    with pa.memory_map(str(path), "r") as source:
        table = pa.ipc.open_file(source).read_all()
    return [tuple(row.values()) for row in table.to_pylist()]


# --------------------------------------------------------------------------- the benchmark


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.sf: float = args.sf
        self.reps: int = args.reps
        self.threads: int = args.threads
        #: A command every runner process starts under (``taskset`` when a benchmark pins CPUs).
        self.runner_prefix: list[str] = []
        self.side_python = Path(args.side_venv) / "bin" / "python"
        self.data_dir = HERE / "data" / f"tpch-sf{self.sf:g}"
        self.prefix = f"tpch/sf{self.sf:g}"
        self.log_lines: list[str] = []
        self.weed_pid: int | None = None
        self.proxy: Proxy | None = None
        self.modes = [m for m in MODES if m in set(args.modes.split(","))]
        self.code_dir: Path | None = None
        self.cache_options: dict[str, Any] = json.loads(args.cache_options) if args.cache_options else {}
        answers = _load_answers()
        self.answers = answers
        all_queries = answers.load_queries()
        names = args.queries.split(",") if args.queries else (list(QUICK_QUERIES) if args.quick else list(all_queries))
        unknown = [n for n in names if n not in all_queries]
        if unknown:
            raise SystemExit(f"unknown queries: {unknown}")
        self.queries = {n: all_queries[n] for n in names}
        self.query_paths = {n: answers.QUERIES_DIR / f"{n}.sql" for n in names}

    def log(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, file=sys.stderr, flush=True)
        self.log_lines.append(line)

    # -- setup ---------------------------------------------------------------------

    def ensure_side_env(self) -> None:
        if not self.side_python.exists():
            self.log(f"creating the duckdb 1.5.5 side env ({self.side_python.parent.parent})")
            subprocess.run(["bash", str(HERE / "duckdb155_env.sh")], check=True,
                           env={**os.environ, "SHOAL_DUCKDB155_VENV": str(self.side_python.parent.parent)})

    def ensure_data(self) -> dict[str, Any]:
        manifest = self.data_dir / "_manifest.json"
        if not manifest.exists():
            self.log(f"generating TPC-H SF {self.sf:g} into {self.data_dir} (duckdb 1.5.5 tpch extension)")
            subprocess.run([str(self.side_python), str(HERE / "tpch_data.py"), "--sf", f"{self.sf:g}",
                            "--out", str(self.data_dir)], check=True)
        return json.loads(manifest.read_text())

    def setup(self, workdir: Path) -> None:
        sys.path.insert(0, str(ROOT / "tests"))
        from s3servers import create_bucket, start_seaweedfs

        self.workdir = workdir
        self.log(f"starting SeaweedFS in {workdir / 'weed'}")
        self.endpoint, self.stop_weed = start_seaweedfs(workdir / "weed")
        self.weed_pid = _find_pid(str(workdir / "weed"), "weed")
        client = self.endpoint.boto3_client()
        create_bucket(client, BUCKET)
        from boto3.s3.transfer import TransferConfig

        # Single-part uploads (plain MD5 ETags) for files up to 256 MiB.
        tc = TransferConfig(multipart_threshold=256 * MiB, multipart_chunksize=256 * MiB, max_concurrency=4)
        t0 = time.perf_counter()
        files = sorted(self.data_dir.rglob("*.parquet"))
        total = 0
        for path in files:
            key = f"{self.prefix}/{path.relative_to(self.data_dir).as_posix()}"
            client.upload_file(str(path), BUCKET, key, Config=tc)
            total += path.stat().st_size
        listed = sum(o["Size"] for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=BUCKET, Prefix=self.prefix + "/") for o in page.get("Contents", []))
        if listed != total:
            raise RuntimeError(f"uploaded {total} bytes but the bucket lists {listed}")
        self.log(f"uploaded {len(files)} files, {total / MiB:.1f} MiB in {time.perf_counter() - t0:.1f}s")
        self.uploaded = {"files": len(files), "bytes": total}
        self.proxy = Proxy(self.endpoint.endpoint_url, profile=self.args.profile, seed=self.args.seed,
                           bandwidth_mib_s=self.args.bandwidth_mib_s, error_rate=0.0)
        self.log(f"s3proxy at {self.proxy.url}: {self.proxy.banner}")

    def measure_overhead(self) -> dict[str, Any]:
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.endpoint.access_key,
               "AWS_SECRET_ACCESS_KEY": self.endpoint.secret_key}
        n = 10 if self.args.quick else 30
        self.log(f"proxy overhead at profile none ({n} x 1 MiB GETs each side)")
        proc = subprocess.run(
            [sys.executable, str(HERE / "s3proxy.py"), "--upstream", self.endpoint.endpoint_url,
             "--measure-overhead", "--n", str(n), "--size", str(MiB), "--seed", str(self.args.seed)],
            capture_output=True, text=True, env=env, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"--measure-overhead failed: {proc.stderr[-2000:]}")
        return json.loads(proc.stdout)

    def snapshot_code(self, workdir: Path) -> Path:
        """Copy Shoal's packages as they are now; every Shoal run imports this copy, so
        edits to the working tree during a long run cannot mix code versions."""
        code = workdir / "code"
        pkg = code / "shoal"
        pkg.mkdir(parents=True, exist_ok=True)
        (pkg / "__init__.py").write_text("")  # a regular package: found before the editable finder's mapping
        for name in SNAPSHOT_PACKAGES:
            if (ROOT / name).is_dir():
                shutil.copytree(ROOT / name, pkg / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        return code

    # -- one run -------------------------------------------------------------------

    def _spec(self, mode: str, query: str, result_path: Path, cache_dir: Path | None) -> tuple[Path, dict[str, Any]]:
        spec: dict[str, Any] = {"query": query, "sql_path": str(self.query_paths[query]), "threads": self.threads,
                                "result_path": str(result_path)}
        s3 = {"endpoint": self.proxy.url if self.proxy else None, "access_key": self.endpoint.access_key,
              "secret_key": self.endpoint.secret_key, "region": self.endpoint.region, "bucket": BUCKET,
              "prefix": self.prefix}
        if mode == "local":
            return Path(sys.executable), {**spec, "mode": "duckdb_local", "data_dir": str(self.data_dir)}
        if mode == "local155":
            return self.side_python, {**spec, "mode": "duckdb_local", "data_dir": str(self.data_dir)}
        if mode == "httpfs":
            return self.side_python, {**spec, **s3, "mode": "duckdb_httpfs"}
        if self.code_dir is not None:
            spec["code_dir"] = str(self.code_dir)
        return Path(sys.executable), {**spec, **s3, "mode": "shoal", "executor": self.args.executor,
                                      "cache_enabled": mode != "nocache", "cache_options": self.cache_options,
                                      "cache_dir": str(cache_dir or (self.workdir / "cache-none"))}

    def run_one(self, mode: str, query: str, rep: int, cache_dir: Path | None) -> dict[str, Any]:
        result_path = self.workdir / "results" / f"{query}-{mode}-{rep}.arrow"
        result_path.parent.mkdir(exist_ok=True)
        python, spec = self._spec(mode, query, result_path, cache_dir)
        via_proxy = mode in PROXY_MODES
        if via_proxy:
            self.proxy.reset()
        load = os.getloadavg()[0]
        pcpu0, wcpu0 = (self.proxy.cpu() if self.proxy else 0.0), _proc_cpu(self.weed_pid)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([*self.runner_prefix, str(python), str(RUNNER), json.dumps(spec)],
                                  capture_output=True, text=True,
                                  cwd=ROOT, timeout=self.args.timeout)
        except subprocess.TimeoutExpired:
            return {"mode": mode, "query": query, "rep": rep, "error": f"timeout after {self.args.timeout}s"}
        wall = time.perf_counter() - t0
        out: dict[str, Any] = {"mode": mode, "query": query, "rep": rep, "process_wall_s": wall, "loadavg_1m": load,
                               "proxy_cpu_s": (self.proxy.cpu() - pcpu0) if self.proxy else 0.0,
                               "server_cpu_s": _proc_cpu(self.weed_pid) - wcpu0}
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            out["error"] = f"rc={proc.returncode}: {proc.stderr[-3000:]}"
            return out
        out.update(json.loads(lines[-1][len("RESULT "):]))
        if spec.get("code_dir") and not str(out.get("shoal_engine_file", "")).startswith(spec["code_dir"]):
            out["error"] = f"Shoal was imported from {out.get('shoal_engine_file')}, not the frozen copy"
            return out
        if via_proxy:
            st = self.proxy.stats()
            out["proxy"] = {"gets": st["gets"], "requests": st["requests"],
                            "requests_by_method": st["requests_by_method"], "bytes_sent": st["bytes_sent"],
                            "bytes_from_upstream": st["bytes_from_upstream"],
                            "connections_opened": st["connections_opened"],
                            "responses_by_status": st["responses_by_status"],
                            "faults": {k: v for k, v in st["faults"].items() if v}}
        out["result_path"] = str(result_path)
        return out

    def check_rows(self, run: dict[str, Any], reference: list[tuple] | None) -> None:
        if "error" in run:
            return
        rows = _read_rows(Path(run.pop("result_path")))
        if reference is None:
            run["rows_match"] = None
            return
        diff = self.answers.rows_difference(rows, reference)
        run["rows_match"] = diff is None
        if diff is not None:
            run["rows_difference"] = diff[:2000]
            self.log(f"!!! MISMATCH {run['query']} {run['mode']} rep {run['rep']}: {diff[:500]}")

    # -- all runs ------------------------------------------------------------------

    def run_query(self, query: str) -> list[dict[str, Any]]:
        runs: list[dict[str, Any]] = []
        reference: list[tuple] | None = None
        warm_dir = self.workdir / f"cache-warm-{query}"
        for rep in range(self.reps):
            for mode in self.modes:
                cache_dir = None
                if mode == "cold":
                    # The first cold run fills the cache that the warm runs use.
                    cache_dir = warm_dir if rep == 0 else self.workdir / f"cache-cold-{query}-{rep}"
                    shutil.rmtree(cache_dir, ignore_errors=True)
                elif mode == "warm":
                    if not (warm_dir.exists()):
                        self.log(f"{query}: no filled cache for warm (cold mode not run); skipping warm")
                        continue
                    cache_dir = warm_dir
                run = self.run_one(mode, query, rep, cache_dir)
                if mode == "local" and reference is None and "error" not in run:
                    reference = _read_rows(Path(run["result_path"]))
                self.check_rows(run, reference)
                if mode == "cold" and rep > 0 and cache_dir is not None:
                    shutil.rmtree(cache_dir, ignore_errors=True)
                runs.append(run)
                self._log_run(run)
        shutil.rmtree(warm_dir, ignore_errors=True)
        return runs

    def _log_run(self, r: dict[str, Any]) -> None:
        if "error" in r:
            self.log(f"!!! {r['query']} {r['mode']:8s} rep {r['rep']}: ERROR {r['error'][-800:]}")
            return
        extra = ""
        if "proxy" in r:
            extra = f" GETs {r['proxy']['gets']:4d} {r['proxy']['bytes_sent'] / MiB:7.1f} MiB"
        if "stages_s" in r:
            st = r["stages_s"]
            extra += f" plan {st.get('plan', 0):.3f}s scan+finish {st.get('scan+finish', st.get('scan', 0)):.3f}s"
        ok = "" if r.get("rows_match") in (True, None) else " ROWS DIFFER"
        self.log(f"{r['query']} {r['mode']:8s} rep {r['rep']}: {r['query_s']:7.3f}s cpu {r['cpu_query_s']:6.2f}s "
                 f"rss {r['peak_rss'] / MiB:5.0f} MiB{extra}{ok}")

    def run(self) -> dict[str, Any]:
        started = time.time()
        load_start = os.getloadavg()
        self.ensure_side_env()
        env = environment(self.side_python)  # the code under test as it is when the run starts
        manifest = self.ensure_data()
        own_workdir = self.args.workdir is None
        workdir = Path(tempfile.mkdtemp(prefix="shoal-tpch-")) if own_workdir else Path(self.args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self.code_dir = self.snapshot_code(workdir) if self.args.freeze_code else None
        if self.code_dir is not None:
            env["code_snapshot"] = {"packages": list(SNAPSHOT_PACKAGES), "sha1": _tree_sha1(self.code_dir / "shoal")}
            self.log(f"Shoal code frozen for this run: {self.code_dir} (sha1 {env['code_snapshot']['sha1']})")
        try:
            self.setup(workdir)
            overhead = self.measure_overhead()
            self.log(f"proxy overhead: 1 MiB GET median direct {overhead['median_s']['direct'] * 1000:.1f} ms, "
                     f"proxied {overhead['median_s']['proxy'] * 1000:.1f} ms (x{overhead['ratio_median']:.2f})")
            runs: list[dict[str, Any]] = []
            for query in self.queries:
                runs.extend(self.run_query(query))
            proxy_args = self.proxy.args if self.proxy else []
        finally:
            if self.proxy is not None:
                self.proxy.stop()
            if getattr(self, "stop_weed", None):
                self.stop_weed()
            if own_workdir and not self.args.keep:
                shutil.rmtree(workdir, ignore_errors=True)
        finished = time.time()
        env["loadavg_start"] = list(load_start)
        env["loadavg_end"] = list(os.getloadavg())
        res: dict[str, Any] = {
            "command": self.args.command,
            "sf": self.sf, "reps": self.reps, "threads": self.threads, "executor": self.args.executor,
            "shoal_cache_options": self.cache_options,
            "quick": self.args.quick, "queries": list(self.queries), "modes": self.modes,
            "labels": {m: _label(m, env["versions"]) for m in MODES},
            "s3_server": f"SeaweedFS {env['versions'].get('seaweedfs')} on loopback",
            "proxy": {"profile": self.args.profile, "seed": self.args.seed,
                      "bandwidth_mib_s_per_connection": self.args.bandwidth_mib_s, "error_rate": 0.0,
                      "args": proxy_args, "overhead_profile_none": overhead},
            "data": {"dir": str(self.data_dir.relative_to(ROOT)), "uploaded": self.uploaded,
                     "files_per_table": {t: len(v["files"]) for t, v in manifest["tables"].items()},
                     "bytes_per_table": {t: v["bytes"] for t, v in manifest["tables"].items()},
                     "generator": f"duckdb {manifest.get('duckdb_version')} tpch {manifest.get('tpch_extension_version')}",
                     "row_group_size": manifest.get("row_group_size"), "compression": manifest.get("compression")},
            "environment": env,
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
            "runtime_s": finished - started,
            "runs": runs,
        }
        res["per_query"] = aggregate(runs, self.queries, self.modes)
        res["targets"] = targets(res["per_query"], self.modes)
        res["errors"] = [f"{r['query']} {r['mode']} rep {r['rep']}: {r['error'][-300:]}" for r in runs if "error" in r]
        res["mismatches"] = [f"{r['query']} {r['mode']} rep {r['rep']}: {r['rows_difference'][:300]}"
                             for r in runs if r.get("rows_match") is False]
        res["log"] = self.log_lines
        return res


# --------------------------------------------------------------------------- aggregation


def aggregate(runs: list[dict[str, Any]], queries: dict[str, str], modes: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for q in queries:
        out[q] = {}
        for mode in modes:
            rs = [r for r in runs if r["query"] == q and r["mode"] == mode and "error" not in r]
            if not rs:
                continue
            e: dict[str, Any] = {
                "n": len(rs),
                "query_s": _mmm([r["query_s"] for r in rs]),
                "setup_s": _mmm([r["setup_s"] for r in rs]),
                "process_wall_s": _mmm([r["process_wall_s"] for r in rs]),
                "cpu_query_s": _mmm([r["cpu_query_s"] for r in rs]),
                "cpu_process_s": _mmm([r["cpu_process_s"] for r in rs]),
                "peak_rss_MiB": _mmm([r["peak_rss"] / MiB for r in rs]),
                "proxy_cpu_s": _mmm([r["proxy_cpu_s"] for r in rs]),
                "server_cpu_s": _mmm([r["server_cpu_s"] for r in rs]),
                "rows": rs[0]["rows"],
                "rows_match": all(r.get("rows_match") in (True, None) for r in rs),
                "loadavg_1m": _mmm([r["loadavg_1m"] for r in rs]),
            }
            if rs[0].get("proxy") is not None:
                e["gets"] = _mmm([r["proxy"]["gets"] for r in rs])
                e["proxy_requests"] = _mmm([r["proxy"]["requests"] for r in rs])
                e["bytes_fetched"] = _mmm([r["proxy"]["bytes_sent"] for r in rs])
                methods: dict[str, list[int]] = {}
                for r in rs:
                    for k, v in r["proxy"]["requests_by_method"].items():
                        methods.setdefault(k, []).append(v)
                e["requests_by_method_median"] = {k: statistics.median(v + [0] * (len(rs) - len(v)))
                                                  for k, v in methods.items()}
            if "stages_s" in rs[0]:
                keys = sorted({k for r in rs for k in r["stages_s"]})
                e["stages_s"] = {k: _mmm([r["stages_s"].get(k) for r in rs]) for k in keys}
                e["close_s"] = _mmm([r["close_s"] for r in rs])
                e["query_plus_close_s"] = _mmm([r["query_s"] + r["close_s"] for r in rs])
                e["profile_bytes_from_store"] = _mmm([r["profile"]["bytes_from_store"] for r in rs])
                e["profile_store_requests"] = _mmm([r["profile"]["store_requests"] for r in rs])
                e["profile_bytes_from_cache"] = _mmm([r["profile"]["bytes_from_cache"] for r in rs])
                hit = sum(r["cache_stats"].get("bytes_from_cache", 0) for r in rs)
                miss = sum(r["cache_stats"].get("bytes_from_store", 0) for r in rs)
                e["hit_ratio_bytes"] = hit / (hit + miss) if hit + miss else None
                hb = sum(r["cache_stats"].get("hits", 0) for r in rs)
                mb = sum(r["cache_stats"].get("misses", 0) for r in rs)
                e["hit_ratio_blocks"] = hb / (hb + mb) if hb + mb else None
            out[q][mode] = e
    return out


def _med(e: dict[str, Any] | None, key: str) -> float | None:
    if not e or not e.get(key):
        return None
    return e[key]["median"]


def targets(per_query: dict[str, Any], modes: list[str]) -> dict[str, Any]:
    t: dict[str, Any] = {}

    def pairs(a: str, b: str, key: str = "query_s") -> dict[str, tuple[float, float]]:
        out = {}
        for q, e in per_query.items():
            x, y = _med(e.get(a), key), _med(e.get(b), key)
            if x is not None and y is not None:
                out[q] = (x, y)
        return out

    wl = pairs("warm", "local")
    if wl:
        ratios = {q: x / y for q, (x, y) in wl.items()}
        worst = max(ratios, key=ratios.get)
        t["warm_over_local_geomean"] = {"value": _geomean(list(ratios.values())), "target": TARGET_WARM_GEOMEAN,
                                        "op": "<=", "n_queries": len(ratios)}
        t["warm_over_local_max"] = {"value": ratios[worst], "query": worst, "target": TARGET_WARM_MAX, "op": "<="}
        t["warm_over_local_per_query"] = ratios
    ch = pairs("cold", "httpfs")
    if ch:
        t["cold_over_httpfs_total"] = {"value": sum(x for x, _ in ch.values()) / sum(y for _, y in ch.values()),
                                       "target": TARGET_COLD_OVER_HTTPFS, "op": "<=",
                                       "cold_total_s": sum(x for x, _ in ch.values()),
                                       "httpfs_total_s": sum(y for _, y in ch.values()), "n_queries": len(ch)}
        t["cold_over_httpfs_per_query"] = {q: x / y for q, (x, y) in ch.items()}
    cb = pairs("cold", "httpfs", "bytes_fetched")
    if cb:
        t["cold_bytes_over_httpfs_bytes"] = {"value": sum(x for x, _ in cb.values()) / sum(y for _, y in cb.values()),
                                             "target": TARGET_BYTES_OVER_HTTPFS, "op": "<=",
                                             "cold_bytes": sum(x for x, _ in cb.values()),
                                             "httpfs_bytes": sum(y for _, y in cb.values())}
        t["cold_bytes_over_httpfs_per_query"] = {q: (x / y if y else None) for q, (x, y) in cb.items()}
    cn = pairs("cold", "nocache")
    if cn:
        t["cold_over_nocache_total"] = {"value": sum(x for x, _ in cn.values()) / sum(y for _, y in cn.values()),
                                        "target": TARGET_FILL_PENALTY, "op": "<=", "n_queries": len(cn)}
        cnc = pairs("cold", "nocache", "query_plus_close_s")
        t["cold_over_nocache_incl_close_total"] = {
            "value": sum(x for x, _ in cnc.values()) / sum(y for _, y in cnc.values()),
            "target": TARGET_FILL_PENALTY, "op": "<=", "informational": True}
        t["cold_over_nocache_per_query"] = {q: x / y for q, (x, y) in cn.items()}
    for v in t.values():
        if isinstance(v, dict) and "target" in v:
            v["pass"] = bool(v["value"] <= v["target"])
    return t


# --------------------------------------------------------------------------- environment


def _side_versions(side_python: Path) -> dict[str, str]:
    code = ("import json, duckdb, pyarrow; print(json.dumps({'duckdb': duckdb.__version__, "
            "'pyarrow': pyarrow.__version__}))")
    try:
        out = subprocess.run([str(side_python), "-c", code], capture_output=True, text=True, timeout=60)
        return json.loads(out.stdout)
    except (OSError, ValueError, subprocess.SubprocessError):
        return {}


def _weed_version() -> str:
    weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed") or "weed"
    try:
        out = subprocess.run([weed, "version"], capture_output=True, text=True, timeout=30).stdout
        return out.strip().splitlines()[0].replace("version ", "")
    except (OSError, IndexError, subprocess.SubprocessError):
        return "unknown"


def environment(side_python: Path) -> dict[str, Any]:
    import importlib.metadata as md

    versions: dict[str, Any] = {"python": platform.python_version()}
    for pkg in ("duckdb", "pyarrow", "s3fs", "fsspec", "aiobotocore", "botocore", "diskcache", "xxhash", "matplotlib"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    side = _side_versions(side_python)
    versions["duckdb_side"] = side.get("duckdb")
    versions["pyarrow_side"] = side.get("pyarrow")
    versions["seaweedfs"] = _weed_version()
    cpu_model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True, cwd=ROOT).stdout.strip()  # noqa: E731
    import hashlib

    changed = git("status", "--porcelain", "--", "engine", "cache").splitlines()
    diff = subprocess.run(["git", "diff", "HEAD", "--", "engine", "cache"], capture_output=True, cwd=ROOT).stdout
    for line in changed:  # untracked files are not in the diff: hash their contents too
        if line.startswith("??"):
            path = ROOT / line[3:].strip()
            for f in sorted([path] if path.is_file() else path.rglob("*.py")):
                diff += f.read_bytes()
    return {"engine_cache_changes": [l.strip() for l in changed],
            "engine_cache_diff_sha1": hashlib.sha1(diff).hexdigest()[:12] if changed else None,
"versions": versions, "nproc": os.cpu_count(), "memory_GiB": round(mem / GiB, 1), "cpu_model": cpu_model,
            "kernel": platform.release(), "git_commit": git("rev-parse", "--short", "HEAD"),
            "engine_cache_modified": bool(git("status", "--porcelain", "--", "engine", "cache"))}


# --------------------------------------------------------------------------- reporting


def _mm(d: dict[str, float] | None, nd: int = 2, scale: float = 1.0) -> str:
    if not d:
        return "—"
    if d["n"] == 1:
        return f"{d['median'] * scale:.{nd}f}"
    return f"{d['median'] * scale:.{nd}f} ({d['min'] * scale:.{nd}f}–{d['max'] * scale:.{nd}f})"


def _num(x: float | None, nd: int = 2) -> str:
    return "—" if x is None else f"{x:.{nd}f}"


def render_markdown(res: dict[str, Any], chart_name: str | None) -> str:
    env, v, px = res["environment"], res["environment"]["versions"], res["proxy"]
    labels, pq, t = res["labels"], res["per_query"], res["targets"]
    modes = res["modes"]
    ok = lambda x: "**PASS**" if x else "**FAIL**"  # noqa: E731
    L: list[str] = []
    L.append(f"Command: `{res['command']}` — SF {res['sf']:g}, {len(res['queries'])} queries, {res['reps']} reps "
             f"per query and mode, every run a fresh process; median (min–max). Runtime "
             f"{res['runtime_s'] / 60:.1f} min, started {res['started']}.")
    L.append("")
    L.append("**Summary (targets of issue 4)**")
    L.append("")
    L.append("| Target | Measured | Target | Result |")
    L.append("|---|---|---|---|")
    if "warm_over_local_geomean" in t:
        g, m = t["warm_over_local_geomean"], t["warm_over_local_max"]
        L.append(f"| Shoal warm / {labels['local']}: geometric mean over {g['n_queries']} queries | "
                 f"{g['value']:.2f}× | ≤ {g['target']}× | {ok(g['pass'])} |")
        L.append(f"| Shoal warm / {labels['local']}: worst query | {m['value']:.2f}× ({m['query']}) | "
                 f"≤ {m['target']}× | {ok(m['pass'])} |")
    if "cold_over_httpfs_total" in t:
        c = t["cold_over_httpfs_total"]
        L.append(f"| Shoal cold / {labels['httpfs']}: total time ({c['cold_total_s']:.1f} s / "
                 f"{c['httpfs_total_s']:.1f} s) | {c['value']:.2f}× | ≤ {c['target']}× | {ok(c['pass'])} |")
    if "cold_bytes_over_httpfs_bytes" in t:
        b = t["cold_bytes_over_httpfs_bytes"]
        L.append(f"| Bytes fetched, Shoal cold / httpfs ({b['cold_bytes'] / MiB:.0f} MiB / "
                 f"{b['httpfs_bytes'] / MiB:.0f} MiB) | {b['value']:.2f}× | ≤ {b['target']}× | {ok(b['pass'])} |")
    if "cold_over_nocache_total" in t:
        c, ci = t["cold_over_nocache_total"], t["cold_over_nocache_incl_close_total"]
        L.append(f"| Shoal cold with cache / cache disabled: total query time | {c['value']:.2f}× | "
                 f"≤ {c['target']}× | {ok(c['pass'])} |")
        L.append(f"| (same, counting `Session.close()`, which waits for the cache write-behind) | "
                 f"{ci['value']:.2f}× | ≤ {ci['target']}× | {'pass' if ci['pass'] else 'fail'} (info) |")
    L.append("")
    # totals per mode
    L.append("**Totals** (sum over queries of per-query medians; CPU = user+sys of the runner process during the "
             "query; proxy and SeaweedFS CPU are per run, other processes):")
    L.append("")
    L.append("| Mode | Query time s | CPU s | Peak RSS MiB (max) | GETs | MiB fetched | Proxy CPU s | SeaweedFS CPU s "
             "| Setup s (median) |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    for mode in modes:
        es = [e[mode] for e in pq.values() if mode in e]
        if not es:
            continue
        tot = lambda k: sum(_med(e, k) or 0 for e in es)  # noqa: E731
        gets = f"{tot('gets'):.0f}" if mode in PROXY_MODES else "—"
        mib = f"{tot('bytes_fetched') / MiB:.0f}" if mode in PROXY_MODES else "—"
        L.append(f"| {labels[mode]} | {tot('query_s'):.2f} | {tot('cpu_query_s'):.2f} | "
                 f"{max(e['peak_rss_MiB']['max'] for e in es):.0f} | {gets} | {mib} | {tot('proxy_cpu_s'):.2f} | "
                 f"{tot('server_cpu_s'):.2f} | {statistics.median(_med(e, 'setup_s') for e in es):.3f} |")
    L.append("")
    if chart_name:
        L.append(f"![TPC-H per-query times, log scale]({chart_name})")
        L.append("")
    # per query times
    L.append("**Per-query time, seconds** (timed region: table views / registration + query to Arrow):")
    L.append("")
    L.append("| Query | " + " | ".join(labels[m] for m in modes) + " | warm/local | cold/httpfs | cold/nocache |")
    L.append("|---" * (len(modes) + 4) + "|")
    for q, e in pq.items():
        cells = [_mm(e[m]["query_s"], 3) if m in e else "—" for m in modes]
        wl = t.get("warm_over_local_per_query", {}).get(q)
        ch = t.get("cold_over_httpfs_per_query", {}).get(q)
        cn = t.get("cold_over_nocache_per_query", {}).get(q)
        bad = [m for m in modes if m in e and not e[m]["rows_match"]]
        flag = f" ⚠ rows differ: {', '.join(bad)}" if bad else ""
        L.append(f"| {q}{flag} | " + " | ".join(cells) + f" | {_num(wl)} | {_num(ch)} | {_num(cn)} |")
    L.append("")
    # I/O
    L.append("**Per-query I/O through the proxy** (GETs and MiB sent by the proxy, counters reset before each run; "
             "medians). Shoal's own count (profile) in brackets; warm: hit ratio by bytes (SSD tier) and all requests "
             "(LIST/HEAD) it still made:")
    L.append("")
    L.append("| Query | httpfs GETs | httpfs MiB | cold GETs [profile] | cold MiB [profile] | cold/httpfs bytes "
             "| no-cache GETs | no-cache MiB | warm hit ratio | warm requests |")
    L.append("|---|---|---|---|---|---|---|---|---|---|")
    for q, e in pq.items():
        h, c, n, w = e.get("httpfs"), e.get("cold"), e.get("nocache"), e.get("warm")
        cb = t.get("cold_bytes_over_httpfs_per_query", {}).get(q)
        L.append(
            f"| {q} | {_num(_med(h, 'gets'), 0)} | {_num((_med(h, 'bytes_fetched') or 0) / MiB if h else None, 1)} "
            f"| {_num(_med(c, 'gets'), 0)} [{_num(_med(c, 'profile_store_requests'), 0)}] "
            f"| {_num((_med(c, 'bytes_fetched') or 0) / MiB if c else None, 1)} "
            f"[{_num((_med(c, 'profile_bytes_from_store') or 0) / MiB if c else None, 1)}] | {_num(cb)} "
            f"| {_num(_med(n, 'gets'), 0)} | {_num((_med(n, 'bytes_fetched') or 0) / MiB if n else None, 1)} "
            f"| {_num(w.get('hit_ratio_bytes') if w else None, 3)} "
            f"| {_num(_med(w, 'proxy_requests'), 0)} |")
    L.append("")
    # CPU and RSS
    L.append("**Per-query CPU seconds (user+sys, runner process, timed region) / peak RSS MiB:**")
    L.append("")
    L.append("| Query | " + " | ".join(labels[m] for m in modes) + " |")
    L.append("|---" * (len(modes) + 1) + "|")
    for q, e in pq.items():
        L.append(f"| {q} | " + " | ".join(
            f"{_med(e[m], 'cpu_query_s'):.2f} / {_med(e[m], 'peak_rss_MiB'):.0f}" if m in e else "—"
            for m in modes) + " |")
    L.append("")
    # stages of the slowest Shoal queries
    for mode in ("cold", "warm", "nocache"):
        es = [(q, e[mode]) for q, e in pq.items() if mode in e]
        if not es:
            continue
        slow = sorted(es, key=lambda x: -_med(x[1], "query_s"))[:6]
        L.append(f"**Where the time goes, slowest Shoal {mode} queries** (profile.stages, medians; plan = listing, "
                 "footers, DuckDB planning and pushdown; scan+finish = the fused DuckDB query over the cached fs):")
        L.append("")
        L.append("| Query | total s | plan s | scan+finish s | close s | CPU s | GETs | MiB from store |")
        L.append("|---|---|---|---|---|---|---|---|")
        for q, e in slow:
            st = e["stages_s"]
            sf = st.get("scan+finish") or st.get("scan")
            L.append(f"| {q} | {_med(e, 'query_s'):.3f} | {_num(st['plan']['median'] if st.get('plan') else None, 3)} "
                     f"| {_num(sf['median'] if sf else None, 3)} | {_med(e, 'close_s'):.3f} "
                     f"| {_med(e, 'cpu_query_s'):.2f} | {_num(_med(e, 'gets'), 0)} "
                     f"| {(_med(e, 'profile_bytes_from_store') or 0) / MiB:.1f} |")
        L.append("")
    # problems
    if res["mismatches"] or res["errors"]:
        L.append("**Problems in this run:**")
        L.append("")
        for m in res["mismatches"]:
            L.append(f"- ROW MISMATCH: {m}")
        for m in res["errors"]:
            L.append(f"- ERROR: {m}")
        L.append("")
    else:
        L.append("Every run's rows equal the DuckDB-local rows (`tpch_answers.rows_difference`).")
        L.append("")
    # environment
    o = px["overhead_profile_none"]
    d = res["data"]
    L.append("**Environment.** "
             f"Machine: {env['nproc']} vCPU {env['cpu_model']}, {env['memory_GiB']} GiB RAM, Linux {env['kernel']}; "
             f"load average (1/5/15 min) at start {'/'.join(f'{x:.2f}' for x in env['loadavg_start'])}, at end "
             f"{'/'.join(f'{x:.2f}' for x in env['loadavg_end'])} (other work shares this machine). "
             f"Python {v['python']}; DuckDB {v['duckdb']} (Shoal, local baseline) and {v['duckdb_side']} "
             f"(httpfs baseline, side env); pyarrow {v['pyarrow']}; s3fs {v['s3fs']}; aiobotocore {v['aiobotocore']}; "
             f"SeaweedFS {v['seaweedfs']} (S3 server, loopback). Git {env['git_commit']}"
             + (f" plus uncommitted changes in engine/ and cache/ ({', '.join(env.get('engine_cache_changes', []))}; "
                f"diff sha1 {env.get('engine_cache_diff_sha1')})" if env["engine_cache_modified"] else "") + "."
            + (f" Shoal ran from a copy of {', '.join(env['code_snapshot']['packages'])} taken at the start "
               f"(sha1 of the .py files {env['code_snapshot']['sha1']})." if env.get("code_snapshot") else "")
             + (f" Shoal CacheConfig overrides: `{json.dumps(res['shoal_cache_options'])}`."
                if res.get("shoal_cache_options") else ""))
    L.append("")
    L.append(f"**Data.** TPC-H SF {res['sf']:g} from {d['generator']}, snappy Parquet, row groups of "
             f"{d['row_group_size']:,} rows; files per table: "
             + ", ".join(f"{k} {n}" for k, n in d["files_per_table"].items())
             + f"; {d['uploaded']['bytes'] / MiB:.0f} MiB in {d['uploaded']['files']} objects.")
    L.append("")
    L.append(f"**Store and proxy.** `benchmarks/s3proxy.py` profile `{px['profile']}` (TTFB lognormal median 27 ms, "
             f"σ 0.5, 2.9% 200–600 ms, 0.1% 2–5 s; {px['bandwidth_mib_s_per_connection']:g} MiB/s per connection; "
             f"1.25 GB/s aggregate; errors {px['error_rate']:g}), seed {px['seed']}, in its own process. Proxy "
             f"overhead at profile `none` ({o['n']} × {o['size'] // MiB} MiB ranged GETs each side): direct "
             f"{o['median_s']['direct'] * 1000:.1f} ms, proxied {o['median_s']['proxy'] * 1000:.1f} ms median "
             f"(×{o['ratio_median']:.2f}).")
    L.append("")
    L.append(f"**Modes.** All {res['threads']} threads; DuckDB `enable_external_file_cache=false`. "
             f"{labels['local']}: `read_parquet` views over the local files (the floor). {labels['local155']}: the same "
             f"with DuckDB {v['duckdb_side']} (reference). {labels['httpfs']}: httpfs loaded by path, path-style "
             f"`s3://` through the proxy. Shoal: `Session(workers={res['threads']}, executor=\"{res['executor']}\")` "
             "through the proxy; cold = empty SSD cache directory per run; warm = cache filled by the query's first "
             "cold run, new process (nothing in memory); no cache = `CacheConfig(enabled=False)`. The OS page cache "
             "is not dropped (no root): local files and SSD cache files are page-cache warm alike. Timed region: "
             "view creation / table registration plus the query to an Arrow table; client setup (imports, pyarrow "
             "included, which DuckDB would otherwise import inside the first query; connection, LOAD, Session and S3 "
             "client objects, no network) is reported apart as setup. GETs count every GET the proxy saw, LISTs "
             "(ListObjectsV2) included.")
    return "\n".join(L) + "\n"


def render_chart(res: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no chart", file=sys.stderr)
        return False
    pq, labels = res["per_query"], res["labels"]
    modes = [m for m in CHART_MODES if m in res["modes"]]
    queries = list(pq)
    n = len(modes)
    width = 0.8 / max(n, 1)
    fig, ax = plt.subplots(figsize=(max(10, 0.75 * len(queries) + 3), 6.2))
    for i, mode in enumerate(modes):
        xs, meds, lo, hi = [], [], [], []
        for j, q in enumerate(queries):
            e = pq[q].get(mode)
            if not e:
                continue
            d = e["query_s"]
            xs.append(j - 0.4 + width * (i + 0.5))
            meds.append(d["median"])
            lo.append(d["median"] - d["min"])
            hi.append(d["max"] - d["median"])
        ax.bar(xs, meds, width=width * 0.95, color=COLORS[mode], label=labels[mode], yerr=[lo, hi],
               error_kw={"elinewidth": 0.8, "capsize": 1.5, "ecolor": "#222222"})
    ax.set_yscale("log")
    ax.set_xlim(-0.6, len(queries) - 0.4)
    ax.set_xticks(range(len(queries)))
    ax.set_xticklabels([q.upper() for q in queries])
    ax.set_ylabel("seconds (median, bars: min–max), log scale")
    ax.grid(axis="y", which="both", alpha=0.3)
    ax.set_axisbelow(True)
    t = res["targets"]
    sub = []
    if "warm_over_local_geomean" in t:
        sub.append(f"warm/local geomean {t['warm_over_local_geomean']['value']:.2f}x")
    if "cold_over_httpfs_total" in t:
        sub.append(f"cold/httpfs total {t['cold_over_httpfs_total']['value']:.2f}x")
    if "cold_over_nocache_total" in t:
        sub.append(f"cold/no-cache {t['cold_over_nocache_total']['value']:.2f}x")
    env = res["environment"]
    ax.set_title(f"TPC-H SF {res['sf']:g} — {res['reps']} reps, fresh process per run, {res['threads']} threads, "
                 f"{env['nproc']} vCPU; S3: SeaweedFS + proxy '{res['proxy']['profile']}' (seed {res['proxy']['seed']})"
                 + ("\n" + ", ".join(sub) if sub else ""), fontsize=10)
    ax.legend(ncol=n, loc="upper center", bbox_to_anchor=(0.5, -0.07), frameon=False, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def update_results_md(path: Path, body: str) -> None:
    """This benchmark's section of RESULTS.md."""
    from results_md import update_section  # benchmarks/ is on sys.path: these run as scripts

    update_section(path, SECTION, body)


def results_section(res: dict[str, Any], md_name: str, chart_name: str | None, notes: str) -> str:
    """The RESULTS.md section: the command, the summary table, pointers to the full tables."""
    full = render_markdown(res, None)
    summary = full.split("**Per-query time", 1)[0].rstrip()
    parts = [summary, ""]
    if chart_name:
        parts += [f"![TPC-H per-query times, log scale](results/{chart_name})", ""]
    parts += [f"Per-query tables (times, I/O, CPU, RSS, stages), environment and raw runs: "
              f"[`results/{md_name}`](results/{md_name}), `results/{md_name.replace('.md', '.json')}`.", ""]
    if notes.strip():
        parts += [notes.strip(), ""]
    return "\n".join(parts)


NOTES_FILE = HERE / "results" / "tpch-notes.md"


def write_outputs(res: dict[str, Any], out: Path, update_results: bool) -> None:
    """The chart, the Markdown next to ``out`` and, if asked, the RESULTS.md section."""
    chart = out.with_suffix(".png")
    chart_name = chart.name if render_chart(res, chart) else None
    md = render_markdown(res, chart_name)
    md_path = out.with_suffix(".md")
    md_path.write_text(f"# TPC-H benchmark, SF {res['sf']:g} (issue 4)\n\n{md}")
    print(md)
    print(f"wrote {md_path}" + (f" and {chart}" if chart_name else ""), file=sys.stderr)
    if update_results:
        notes = NOTES_FILE.read_text() if NOTES_FILE.exists() else ""
        update_results_md(HERE / "RESULTS.md", results_section(res, md_path.name, chart_name, notes))
        print(f"updated {HERE / 'RESULTS.md'} ({SECTION})", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--sf", type=float, default=None, help="scale factor (default 1; --quick: 0.1)")
    p.add_argument("--reps", type=int, default=None, help="repetitions per query and mode (default 5; --quick: 3)")
    p.add_argument("--quick", action="store_true",
                   help=f"SF 0.1, queries {','.join(QUICK_QUERIES)}, 3 reps, without the DuckDB 1.5.5 local reference")
    p.add_argument("--queries", help="comma-separated subset, e.g. q01,q06")
    p.add_argument("--modes", default=",".join(MODES), help=f"subset of {','.join(MODES)} (development)")
    p.add_argument("--threads", type=int, default=2, help="threads for every engine (Shoal workers)")
    p.add_argument("--executor", default="local", help="Shoal executor")
    p.add_argument("--cache-options", help='JSON of CacheConfig fields for Shoal modes (experiments), '
                   'e.g. \'{"readahead_blocks": 0}\'')
    p.add_argument("--seed", type=int, default=1, help="proxy RNG seed")
    p.add_argument("--profile", default="s3-standard", help="proxy latency profile")
    p.add_argument("--bandwidth-mib-s", type=float, default=60.0, help="fixed per-connection bandwidth")
    p.add_argument("--timeout", type=float, default=900, help="seconds per run before it counts as failed")
    p.add_argument("--side-venv", default=str(Path(os.environ.get("SHOAL_DUCKDB155_VENV", ROOT / ".venv-duckdb155"))),
                   help="the duckdb 1.5.5 env (benchmarks/duckdb155_env.sh)")
    p.add_argument("--workdir", help="SeaweedFS data, caches and results go here (default: a temp dir, removed)")
    p.add_argument("--keep", action="store_true", help="keep the temporary workdir")
    p.add_argument("--freeze-code", action=argparse.BooleanOptionalAction, default=True,
                   help="run Shoal from a copy of engine/, cache/, transport/ taken at the start (default: yes)")
    p.add_argument("--out", help="JSON path (default benchmarks/results/tpch-sf<SF>.json)")
    p.add_argument("--update-results", action=argparse.BooleanOptionalAction, default=None,
                   help="update benchmarks/RESULTS.md (default: yes for full runs, no for --quick or subsets)")
    p.add_argument("--from-json", help="only re-render .md/.png (and RESULTS.md with --update-results) from a "
                   "results JSON of an earlier run")
    args = p.parse_args(argv)
    if args.from_json:
        res = json.loads(Path(args.from_json).read_text())
        write_outputs(res, Path(args.from_json), bool(args.update_results))
        return 0
    if args.quick and args.modes == ",".join(MODES):
        args.modes = ",".join(m for m in MODES if m != "local155")  # the five modes of the issue only
    args.sf = args.sf if args.sf is not None else (0.1 if args.quick else 1.0)
    args.reps = args.reps if args.reps is not None else (3 if args.quick else 5)
    args.command = ".venv/bin/python benchmarks/bench_tpch.py" + ("" if not argv else " " + " ".join(argv))
    subset = bool(args.queries) or set(args.modes.split(",")) < set(MODES) and not args.quick \
        or bool(args.cache_options)
    if args.update_results is None:
        args.update_results = not args.quick and not subset
    res = Bench(args).run()
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else RESULTS_DIR / f"tpch-sf{args.sf:g}.json"
    out.write_text(json.dumps(res, indent=1, default=str) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    write_outputs(res, out, args.update_results)
    if res["mismatches"] or res["errors"]:
        print(f"!!! {len(res['mismatches'])} row mismatch(es), {len(res['errors'])} failed run(s)", file=sys.stderr)
        return 2
    verdicts = [v["pass"] for v in res["targets"].values()
                if isinstance(v, dict) and "pass" in v and not v.get("informational")]
    return 0 if all(verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
