#!/usr/bin/env python
"""Soak: concurrent queries and a training loader for minutes, with faults injected.

Starts SeaweedFS and the S3 fault proxy (``s3proxy.py``: 503 SlowDown, resets
and truncations mid-body, first-byte stalls, at fixed rates on every request),
loads TPC-H SF 0.1, then runs at once, until ``--duration`` is over:

* ``--query-procs`` processes, each a Shoal ``Session`` looping over random
  TPC-H queries and checking every answer against DuckDB on the local files;
* one process running ``ShoalDataset`` epochs (shuffled, through a DataLoader
  with two worker processes) and checking each epoch's row count and key sum.

All of them share one SSD cache directory whose size limit is far below the
data read, so eviction runs all the time.  The orchestrator samples every
process tree's RSS and the cache directory's size.  It reports queries and
epochs completed, errors by kind, wrong answers (must be 0), RSS over time
(growth from the first to the last third of the run) and the largest cache
size seen against the limit.  Writes ``benchmarks/results/soak.{json,md}`` and
the "Soak (issue 8)" section of ``benchmarks/RESULTS.md``::

    .venv/bin/python benchmarks/bench_soak.py                 # 5 minutes
    .venv/bin/python benchmarks/bench_soak.py --quick         # 1 minute, not in RESULTS.md
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS_DIR = HERE / "results"
SECTION = "## Soak (issue 8)"
MiB = 1 << 20
TABLES = ("lineitem", "orders", "partsupp", "part", "customer", "supplier", "nation", "region")
BUCKET = "soak"


# -- worker processes -------------------------------------------------------------------


def _emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def _session(spec: dict[str, Any]) -> Any:
    from shoal.cache import CacheConfig, StoreConfig
    from shoal.engine import Session

    store = StoreConfig(endpoint_url=spec["endpoint"], access_key=spec["access_key"], secret_key=spec["secret_key"],
                        region="us-east-1", read_timeout=spec["read_timeout"], max_attempts=spec["max_attempts"])
    # A small memory tier too: reads must go to the SSD cache and the store.
    cache = CacheConfig(directory=spec["cache_dir"], size_limit=spec["cache_limit"], memory_size=4 * MiB)
    return Session(cache=cache, store=store, workers=2)


def worker_queries(spec: dict[str, Any]) -> None:
    sys.path.insert(0, str(HERE))
    import tpch_answers

    queries = tpch_answers.load_queries()
    ref = tpch_answers.connect_reference(spec["data_dir"])
    expected = {name: ref.execute(sql).fetchall() for name, sql in queries.items()}
    rng = random.Random(spec["seed"])
    deadline = spec["deadline"]
    session = _session(spec)
    for table in TABLES:
        session.register(table, f"s3://{BUCKET}/tpch/{table}/*.parquet")
    while time.time() < deadline:
        name = rng.choice(sorted(queries))
        started = time.perf_counter()
        try:
            rows = [tuple(r.values()) for r in session.sql(queries[name]).table.to_pylist()]
        except Exception as exc:  # noqa: BLE001 - every failure is counted by kind
            _emit({"event": "query", "query": name, "ok": False, "error": type(exc).__name__,
                   "message": str(exc)[:300], "s": time.perf_counter() - started})
            continue
        difference = tpch_answers.rows_difference(rows, expected[name])
        _emit({"event": "query", "query": name, "ok": difference is None, "wrong": difference is not None,
               "difference": (difference or "")[:300], "s": time.perf_counter() - started})
    session.close()


def worker_loader(spec: dict[str, Any]) -> None:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from shoal.cache import CacheConfig, StoreConfig
    from shoal.engine.torch import ShoalDataLoader, ShoalDataset

    table = pq.read_table(Path(spec["data_dir"]) / "orders", columns=["o_orderkey"])
    want_rows, want_sum = table.num_rows, pc.sum(table["o_orderkey"]).as_py()
    store = StoreConfig(endpoint_url=spec["endpoint"], access_key=spec["access_key"], secret_key=spec["secret_key"],
                        region="us-east-1", read_timeout=spec["read_timeout"], max_attempts=spec["max_attempts"])
    cache = CacheConfig(directory=spec["cache_dir"], size_limit=spec["cache_limit"], memory_size=4 * MiB)
    epoch = 0
    ds = ShoalDataset(f"s3://{BUCKET}/tpch/orders/*.parquet", batch_size=4096,
                      columns=["o_orderkey", "o_totalprice"], shuffle=True, seed=7, cache=cache, store=store)
    while time.time() < spec["deadline"]:
        started = time.perf_counter()
        try:
            ds.set_epoch(epoch)
            rows = total = 0
            for batch in ShoalDataLoader(ds, num_workers=2):
                keys = batch["o_orderkey"]
                rows += int(keys.numel())
                total += int(keys.sum())
        except Exception as exc:  # noqa: BLE001
            _emit({"event": "epoch", "ok": False, "error": type(exc).__name__, "message": str(exc)[:300],
                   "s": time.perf_counter() - started})
        else:
            wrong = (rows, total) != (want_rows, want_sum)
            _emit({"event": "epoch", "ok": not wrong, "wrong": wrong, "rows": rows, "expected_rows": want_rows,
                   "s": time.perf_counter() - started})
        epoch += 1
    ds.close()


# -- orchestration -----------------------------------------------------------------------


def _rss(pid: int) -> tuple[int, int]:
    """Resident bytes of a process, and of it with its children (DataLoader
    workers, which start and end with every epoch)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        own = proc.memory_info().rss
        children = proc.children(recursive=True)
    except psutil.Error:
        return 0, 0
    total = own
    for child in children:
        try:
            total += child.memory_info().rss
        except psutil.Error:
            pass
    return own, total


def _dir_bytes(path: Path) -> tuple[int, int]:
    """(bytes of block files, bytes of everything: SQLite index and WAL too)."""
    values = total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                size = os.stat(os.path.join(root, name)).st_size
            except OSError:
                continue
            total += size
            if name.endswith(".val"):
                values += size
    return values, total


def run(args: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(HERE))
    from bench_cache import Proxy, environment
    from s3servers import create_bucket, start_seaweedfs
    from tpch_fixtures import generate, upload

    data_dir = generate(0.1)
    work = Path(tempfile.mkdtemp(prefix="shoal-soak-"))
    endpoint, stop_weed = start_seaweedfs(work / "weed")
    proxy = procs = None
    try:
        client = endpoint.boto3_client()
        create_bucket(client, BUCKET)
        upload(client, BUCKET, data_dir)
        rates = {"slowdown": args.fault_rate * 0.4, "reset": args.fault_rate * 0.2,
                 "truncate": args.fault_rate * 0.2, "stall": args.fault_rate * 0.2}
        proxy = Proxy(endpoint.endpoint_url, args.profile, args.seed,
                      extra=[a for k, r in rates.items() for a in (f"--{k}-rate", str(r))] + ["--stall-s", "4"])
        deadline = time.time() + args.duration
        base = {"endpoint": proxy.url, "access_key": endpoint.access_key, "secret_key": endpoint.secret_key,
                "cache_dir": str(work / "cache"), "cache_limit": args.cache_limit * MiB, "data_dir": str(data_dir),
                "deadline": deadline, "read_timeout": 2.0, "max_attempts": 6}
        procs = {}
        for n in range(args.query_procs):
            procs[f"queries-{n}"] = dict(base, kind="queries", seed=args.seed + n)
        if not args.no_loader:
            procs["loader"] = dict(base, kind="loader", seed=args.seed)
        running = {name: subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)], cwd=ROOT,
                                          stdout=open(work / f"{name}.jsonl", "w"), stderr=open(work / f"{name}.err", "w"))
                   for name, spec in procs.items()}
        samples: list[dict[str, Any]] = []
        started = time.time()
        while any(p.poll() is None for p in running.values()):
            samples.append({"t": round(time.time() - started, 1),
                            "rss": {name: _rss(p.pid)[0] for name, p in running.items() if p.poll() is None},
                            "rss_tree": {name: _rss(p.pid)[1] for name, p in running.items() if p.poll() is None},
                            "cache_bytes": _dir_bytes(work / "cache")[1],
                            "block_bytes": _dir_bytes(work / "cache")[0]})
            if time.time() > deadline + args.grace:
                for p in running.values():
                    if p.poll() is None:
                        p.send_signal(signal.SIGTERM)
            time.sleep(args.sample_s)
        events = {name: [json.loads(l) for l in (work / f"{name}.jsonl").read_text().splitlines() if l.startswith("{")]
                  for name in running}
        stderr_tail = {name: (work / f"{name}.err").read_text()[-2000:] for name in running
                       if running[name].returncode != 0}
        return {"args": {k: v for k, v in vars(args).items() if k != "worker"}, "fault_rates": rates,
                "duration_s": round(time.time() - started, 1), "events": events, "samples": samples,
                "exit_codes": {n: p.returncode for n, p in running.items()}, "stderr_tail": stderr_tail,
                "proxy_stats": proxy.stats(), "environment": environment(),
                "machine": f"{os.cpu_count()} vCPU, {platform.machine()}, load average at end {os.getloadavg()}",
                "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))}
    finally:
        if proxy is not None:
            proxy.stop()
        stop_weed()
        import shutil

        shutil.rmtree(work, ignore_errors=True)


def summarize(res: dict[str, Any]) -> dict[str, Any]:
    queries = [e for name, evs in res["events"].items() if name.startswith("queries") for e in evs]
    epochs = res["events"].get("loader", [])
    errors = collections.Counter(e["error"] for e in queries + epochs if not e["ok"] and "error" in e)
    samples = res["samples"][max(1, len(res["samples"]) // 10):]  # past start-up
    third = max(1, len(samples) // 3)
    growth = {}
    for name in res["events"]:
        first = statistics.median(s["rss"].get(name, 0) for s in samples[:third]) if samples else 0
        last = statistics.median(s["rss"].get(name, 0) for s in samples[-third:]) if samples else 0
        growth[name] = {"first_MiB": round(first / MiB), "last_MiB": round(last / MiB),
                        "growth": round(last / first - 1, 3) if first else None}

    def total_rss(s: dict[str, Any]) -> int:
        return sum(s["rss_tree"].values())

    return {
        "queries_completed": sum(1 for e in queries if e["ok"]),
        "queries_failed": sum(1 for e in queries if not e["ok"] and "error" in e),
        "wrong_answers": sum(1 for e in queries + epochs if e.get("wrong")),
        "epochs_completed": sum(1 for e in epochs if e["ok"]),
        "epochs_failed": sum(1 for e in epochs if not e["ok"] and "error" in e),
        "errors_by_kind": dict(errors),
        "error_examples": {k: next(e["message"] for e in queries + epochs if e.get("error") == k) for k in errors},
        "rss_by_process": growth,
        "rss_MiB_max": round(max((total_rss(s) for s in samples), default=0) / MiB),  # with children
        "cache_MiB_max": round(max((s["cache_bytes"] for s in samples), default=0) / MiB, 1),
        "block_MiB_max": round(max((s["block_bytes"] for s in samples), default=0) / MiB, 1),
        "cache_limit_MiB": res["args"]["cache_limit"],
        "faults_injected": {k: v for k, v in res["proxy_stats"].get("faults", {}).items() if v},
        "requests": res["proxy_stats"].get("requests"),
        "query_seconds_median": round(statistics.median(e["s"] for e in queries), 2) if queries else None,
    }


def render(res: dict[str, Any], summary: dict[str, Any]) -> str:
    a = res["args"]
    env = res["environment"]["versions"]
    lines = [
        f"Command: `.venv/bin/python benchmarks/bench_soak.py{' --quick' if a['quick'] else ''}` — "
        f"{res['duration_s']:.0f} s, started {res['started']}; {a['query_procs']} query processes "
        f"(Shoal `Session`, random TPC-H SF 0.1 queries, each answer checked against DuckDB on the local files)"
        + ("" if a["no_loader"] else " and one loader process (`ShoalDataset` epochs through a 2-worker "
           "DataLoader, each epoch's rows and key sum checked)")
        + f", sharing one SSD cache limited to {a['cache_limit']} MiB. SeaweedFS behind `s3proxy.py` "
        f"(profile `{a['profile']}`, seed {a['seed']}) injecting faults on "
        f"{a['fault_rate']:.1%} of requests: " + ", ".join(f"{k} {v:.2%}" for k, v in res["fault_rates"].items())
        + " (stalls 4 s; Shoal's `read_timeout` 2 s, `max_attempts` 6). "
        f"Machine: {res['machine']}; Python {env['python']}, duckdb {env['duckdb']}, pyarrow {env['pyarrow']}.",
        "",
        "| Measure | Value |",
        "|---|---|",
        f"| Queries completed (right answer) | {summary['queries_completed']} |",
        f"| Queries failed (one clear error) | {summary['queries_failed']} |",
        f"| Loader epochs completed (exactly once) | {summary['epochs_completed']} |",
        f"| Loader epochs failed | {summary['epochs_failed']} |",
        f"| **Wrong answers** | **{summary['wrong_answers']}** |",
        f"| Errors by kind | {', '.join(f'{k} {v}' for k, v in summary['errors_by_kind'].items()) or 'none'} |",
        f"| Faults injected by the proxy (of {summary['requests']} requests) | "
        f"{', '.join(f'{k} {v}' for k, v in summary['faults_injected'].items()) or 'none'} |",
        "| RSS per process (main process; leak check), median of the first → last third | "
        + "; ".join(f"{n} {g['first_MiB']} → {g['last_MiB']} MiB ({g['growth']:+.0%})"
                    for n, g in sorted(summary["rss_by_process"].items()) if g["growth"] is not None)
        + f"; all processes with the loader's DataLoader workers at most {summary['rss_MiB_max']} MiB |",
        f"| Largest block files total / SQLite index + WAL included, vs the limit | {summary['block_MiB_max']} / "
        f"{summary['cache_MiB_max']} MiB vs {summary['cache_limit_MiB']} MiB |",
        f"| Median query time | {summary['query_seconds_median']} s |",
    ]
    if summary["error_examples"]:
        lines += ["", "Error messages (one per kind):", ""]
        lines += [f"- `{k}`: {v}" for k, v in summary["error_examples"].items()]
    lines += ["", "RSS over time (MiB, main processes; the loader's DataLoader workers come and go; every "
              f"{max(1, len(res['samples']) // 12)}th sample):", "",
              "| t s | " + " | ".join(sorted(res["events"])) + " | cache MiB (blocks) |",
              "|---|" + "---|" * (len(res["events"]) + 1)]
    step = max(1, len(res["samples"]) // 12)
    for s in res["samples"][::step]:
        lines.append(f"| {s['t']:.0f} | " + " | ".join(str(round(s['rss'].get(n, 0) / MiB)) for n in sorted(res["events"]))
                     + f" | {s['cache_bytes'] / MiB:.0f} ({s['block_bytes'] / MiB:.0f}) |")
    return "\n".join(lines) + "\n"


def update_results_md(body: str) -> None:
    """This benchmark's section of RESULTS.md."""
    from results_md import update_section  # benchmarks/ is on sys.path: these run as scripts

    update_section(HERE / "RESULTS.md", SECTION, body)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="1 minute; results not written to RESULTS.md")
    p.add_argument("--duration", type=float, help="seconds of load (default 300; --quick 60)")
    p.add_argument("--query-procs", type=int, default=3, help="concurrent query processes")
    p.add_argument("--no-loader", action="store_true", help="no loader process")
    p.add_argument("--fault-rate", type=float, default=0.03, help="share of requests that get a fault")
    p.add_argument("--profile", default="s3-standard", help="proxy latency profile")
    p.add_argument("--cache-limit", type=int, default=12, help="SSD cache size limit, MiB (far below the ~30 MiB the queries read)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--sample-s", type=float, default=2.0, help="RSS/cache sampling interval")
    p.add_argument("--grace", type=float, default=120.0, help="seconds past the deadline before workers are stopped")
    p.add_argument("--out", help="JSON path (default benchmarks/results/soak.json; --quick soak-quick.json)")
    args = p.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        try:
            (worker_queries if spec["kind"] == "queries" else worker_loader)(spec)
        except Exception:  # noqa: BLE001 - the orchestrator reports the worker's exit code and stderr
            traceback.print_exc()
            return 1
        return 0
    if args.duration is None:
        args.duration = 60.0 if args.quick else 300.0
    res = run(args)
    summary = res["summary"] = summarize(res)
    RESULTS_DIR.mkdir(exist_ok=True)
    stem = "soak-quick" if args.quick else "soak"
    out = Path(args.out) if args.out else RESULTS_DIR / f"{stem}.json"
    out.write_text(json.dumps(res, indent=1, default=str) + "\n")
    body = render(res, summary)
    out.with_suffix(".md").write_text("# Soak (issue 8)\n\n" + body)
    if not args.quick and not args.out:
        update_results_md(body)
    print(json.dumps(summary, indent=1))
    return 0 if summary["wrong_answers"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
