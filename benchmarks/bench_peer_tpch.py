#!/usr/bin/env python
"""TPC-H with an empty local cache and a warm peer cache, against local-warm (issue 5).

One command::

    .venv/bin/python benchmarks/bench_peer_tpch.py            # SF 1, 22 queries, 3 reps
    .venv/bin/python benchmarks/bench_peer_tpch.py --quick    # SF 0.1, 22 queries, 2 reps
    .venv/bin/python benchmarks/bench_peer_tpch.py --sf 1 --reps 1 --queries q01,q06

It reuses ``bench_tpch.py``'s harness (SeaweedFS on loopback, the latency proxy
``s3proxy.py`` with profile ``s3-standard`` in front of it, every measured query
in a fresh ``tpch_runner.py`` process, 2 threads, rows checked against DuckDB
local) and adds one process and one mode:

* a real ``shoal worker`` (``python -m shoal.transport.worker``) with its own
  cache directory, reading the store through the same proxy (a worker fills
  its cache from the store on a miss, as in production);
* its cache is warmed by running every query once through it (a runner with
  ``SHOAL_PEERS`` set and a throw-away local cache): the worker, owner of every
  block, reads each block from the store once and keeps it;
* ``peer``: Shoal in a fresh process, local cache directory **empty**,
  ``SHOAL_PEERS`` = the worker, ``SHOAL_TRANSPORT=tcp``; blocks come from the
  worker over the authenticated TCP protocol, listings still from the store;
* ``warm``: Shoal with its local SSD cache filled by a ``cold`` run of the same
  query (as in ``bench_tpch.py``), no peers.

Per query: one ``local`` (DuckDB, row reference) and one ``cold`` run (fills the
local cache), then ``--reps`` repetitions of ``warm`` and ``peer``, interleaved
(the order alternates).  Target (issue 5): peer / local-warm <= 1.3x, as the
geometric mean of the per-query median ratios.  Bytes: from the peer (query
profile, ``bytes_from_peers``), from the store (profile and proxy), and what
the worker itself read from the store during the measured runs (its STATS).

Results: ``benchmarks/results/peer-tpch-sf<SF>.json`` and ``.md``; full runs (or
``--update-results``) also write the "TPC-H with a warm peer cache (issue 5)"
section of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_tpch as bt  # noqa: E402 - the harness this benchmark extends

MiB = 1 << 20
SECTION = "## TPC-H with a warm peer cache (issue 5)"
AFTER_SECTION = "## Transport (issue 5)"
TARGET_PEER_OVER_WARM = 1.3
SECRET = b"bench-peer-tpch-cluster-secret-0123456789"
# The bench_tpch harness resets and reads the proxy's counters around runs of these modes.
bt.PROXY_MODES = tuple(dict.fromkeys((*bt.PROXY_MODES, "peer")))


class PeerBench(bt.Bench):
    """bench_tpch's harness plus a ``shoal worker`` and the ``peer`` mode."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        self.modes = ["local", "cold", "warm", "peer"]
        self.worker: subprocess.Popen[str] | None = None
        self.worker_address = ""
        self.admin: Any = None
        self.pinned = bool(getattr(args, "pin", False))
        self.worker_prefix = ["taskset", "-c", "1"] if self.pinned else []
        self.runner_prefix = ["taskset", "-c", "0"] if self.pinned else []

    # -- the worker ---------------------------------------------------------------

    def start_worker(self) -> None:
        secret = self.workdir / "cluster-secret"
        secret.write_bytes(SECRET)
        secret.chmod(0o600)
        self.secret_file = secret
        assert self.proxy is not None
        env = {**os.environ, "AWS_ENDPOINT_URL_S3": self.proxy.url, "AWS_ACCESS_KEY_ID": self.endpoint.access_key,
               "AWS_SECRET_ACCESS_KEY": self.endpoint.secret_key, "AWS_REGION": self.endpoint.region,
               "SHOAL_LOG_LEVEL": "WARNING"}
        if self.code_dir is not None:  # the same frozen copy of Shoal as the runners
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(self.code_dir), env.get("PYTHONPATH")) if p)
        self.worker_log = open(self.workdir / "worker.log", "w")
        self.worker = subprocess.Popen(
            [*self.worker_prefix, sys.executable, "-m", "shoal.transport.worker", "--listen", "127.0.0.1:0",
             "--cache-dir", str(self.workdir / "worker-cache"), "--secret-file", str(secret), "--transport", "tcp"],
            stdout=subprocess.PIPE, stderr=self.worker_log, text=True, env=env, cwd=self.workdir)
        assert self.worker.stdout is not None
        line = self.worker.stdout.readline()
        if "listening on" not in line:
            raise RuntimeError(f"shoal worker did not start: {line!r}; see {self.workdir / 'worker.log'}")
        self.worker_address = line.split("listening on ")[1].split()[0]
        from shoal.transport import TcpTransport

        self.admin = TcpTransport(SECRET)
        self.log(f"shoal worker at {self.worker_address} (pid {self.worker.pid}), cache {self.workdir / 'worker-cache'}")

    def worker_counters(self) -> dict[str, int]:
        """The worker's store reads and bytes served so far (its STATS answer)."""
        stats = self.admin.remote_stats(self.worker_address, timeout=10)
        store = stats.get("provider", {}).get("store", {}).values()
        return {"store_requests": sum(s["requests"] for s in store), "store_bytes": sum(s["bytes"] for s in store),
                "bytes_served": stats["server"]["bytes_sent"], "blocks_served": stats["server"]["served"],
                "fills": stats.get("provider", {}).get("fills", 0)}

    def stop_worker(self) -> None:
        if self.admin is not None:
            self.admin.close()
        if self.worker is not None and self.worker.poll() is None:
            self.worker.terminate()
            try:
                self.worker.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.worker.kill()
                self.worker.wait()
        if getattr(self, "worker_log", None):
            self.worker_log.close()

    @contextlib.contextmanager
    def peer_env(self, timeout: float | None = None) -> Iterator[None]:
        """The runner inherits os.environ: point it at the worker for one run."""
        values = {"SHOAL_PEERS": self.worker_address, "SHOAL_CLUSTER_SECRET_FILE": str(self.secret_file),
                  "SHOAL_TRANSPORT": "tcp"}
        if timeout is not None:
            values["SHOAL_PEER_TIMEOUT"] = f"{timeout:g}"
        saved = {k: os.environ.get(k) for k in values}
        os.environ.update(values)
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    # -- runs -----------------------------------------------------------------------

    def run_peer(self, query: str, rep: int, reference: list[tuple] | None, *, warmup: bool = False) -> dict[str, Any]:
        cache_dir = self.workdir / f"cache-peer-{query}-{rep}"
        shutil.rmtree(cache_dir, ignore_errors=True)  # empty local cache
        before = self.worker_counters()
        cpu0 = bt._proc_cpu(self.worker.pid if self.worker else None)
        # Warm-up: owners fill from the store, which may take longer than the default 5 s per batch.
        with self.peer_env(timeout=120 if warmup else None):
            run = self.run_one("peer", query, rep, cache_dir)
        worker_cpu = bt._proc_cpu(self.worker.pid if self.worker else None) - cpu0
        after = self.worker_counters()
        shutil.rmtree(cache_dir, ignore_errors=True)
        run["worker"] = {k: after[k] - before[k] for k in after}
        run["worker"]["cpu_s"] = worker_cpu  # the worker process's CPU during the run (user + system)
        if "error" not in run:
            tables = run["profile"]["tables"].values()
            run["profile"]["bytes_from_peers"] = sum(t.get("bytes_from_peers", 0) for t in tables)
            run["profile"]["blocks_from_peers"] = sum(t.get("blocks_from_peers", 0) for t in tables)
        if warmup:
            run["mode"] = "warmup"
            run.pop("result_path", None)
        else:
            self.check_rows(run, reference)
        return run

    def warm_worker(self) -> list[dict[str, Any]]:
        runs = []
        for query in self.queries:
            run = self.run_peer(query, -1, None, warmup=True)
            self._log_warmup(run)
            runs.append(run)
        return runs

    def _log_warmup(self, r: dict[str, Any]) -> None:
        if "error" in r:
            self.log(f"!!! {r['query']} warm-up: ERROR {r['error'][-800:]}")
            return
        w = r["worker"]
        self.log(f"{r['query']} warm-up through the worker: {r['query_s']:.2f}s; worker read "
                 f"{w['store_bytes'] / MiB:.1f} MiB from the store in {w['store_requests']} GETs, "
                 f"served {w['bytes_served'] / MiB:.1f} MiB")

    def run_query(self, query: str) -> list[dict[str, Any]]:
        runs: list[dict[str, Any]] = []
        local = self.run_one("local", query, 0, None)
        reference = bt._read_rows(Path(local["result_path"])) if "error" not in local else None
        self.check_rows(local, reference)
        runs.append(local)
        self._log_run(local)
        warm_dir = self.workdir / f"cache-warm-{query}"
        shutil.rmtree(warm_dir, ignore_errors=True)
        cold = self.run_one("cold", query, 0, warm_dir)  # fills the local cache the warm runs use
        self.check_rows(cold, reference)
        runs.append(cold)
        self._log_run(cold)
        for rep in range(self.reps):
            for mode in (("warm", "peer") if rep % 2 == 0 else ("peer", "warm")):
                if mode == "warm":
                    run = self.run_one("warm", query, rep, warm_dir)
                    self.check_rows(run, reference)
                else:
                    run = self.run_peer(query, rep, reference)
                runs.append(run)
                self._log_run(run)
                if mode == "peer" and "error" not in run:
                    p, w = run["profile"], run["worker"]
                    self.log(f"    peer bytes {p['bytes_from_peers'] / MiB:.1f} MiB ({p['blocks_from_peers']} blocks), "
                             f"store bytes {p['bytes_from_store'] / MiB:.1f} MiB; worker store reads "
                             f"{w['store_bytes'] / MiB:.1f} MiB")
        shutil.rmtree(warm_dir, ignore_errors=True)
        return runs

    def run(self) -> dict[str, Any]:
        started = time.time()
        load_start = os.getloadavg()
        manifest = self.ensure_data()
        env = bt.environment(self.side_python)
        own_workdir = self.args.workdir is None
        workdir = Path(tempfile.mkdtemp(prefix="shoal-peer-tpch-")) if own_workdir else Path(self.args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self.code_dir = self.snapshot_code(workdir) if self.args.freeze_code else None
        if self.code_dir is not None:
            env["code_snapshot"] = {"packages": list(bt.SNAPSHOT_PACKAGES), "sha1": bt._tree_sha1(self.code_dir / "shoal")}
            self.log(f"Shoal code frozen for this run: {self.code_dir} (sha1 {env['code_snapshot']['sha1']})")
        runs: list[dict[str, Any]] = []
        try:
            self.setup(workdir)
            self.start_worker()
            t0 = time.perf_counter()
            warmup = self.warm_worker()
            warmup_s = time.perf_counter() - t0
            worker_after_warmup = self.worker_counters()
            for query in self.queries:
                runs.extend(self.run_query(query))
            worker_end = self.worker_counters()
            proxy_args = self.proxy.args if self.proxy else []
        finally:
            self.stop_worker()
            if self.proxy is not None:
                self.proxy.stop()
            if getattr(self, "stop_weed", None):
                self.stop_weed()
            if own_workdir and not self.args.keep:
                shutil.rmtree(workdir, ignore_errors=True)
        env["loadavg_start"] = list(load_start)
        env["loadavg_end"] = list(os.getloadavg())
        res: dict[str, Any] = {
            "command": self.args.command, "sf": self.sf, "reps": self.reps, "threads": self.threads,
            "pinned": self.pinned,
            "quick": self.args.quick, "queries": list(self.queries), "modes": self.modes,
            "s3_server": f"SeaweedFS {env['versions'].get('seaweedfs')} on loopback",
            "proxy": {"profile": self.args.profile, "seed": self.args.seed,
                      "bandwidth_mib_s_per_connection": self.args.bandwidth_mib_s, "args": proxy_args},
            "data": {"dir": str(self.data_dir.relative_to(bt.ROOT)), "uploaded": self.uploaded,
                     "block_size_note": "Shoal's default CacheConfig block size; peers move whole blocks"},
            "worker": {"after_warmup": worker_after_warmup, "end": worker_end, "warmup_s": warmup_s},
            "environment": env, "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
            "runtime_s": time.time() - started, "warmup_runs": warmup, "runs": runs,
        }
        res["per_query"] = aggregate(runs, list(self.queries))
        res["summary"] = summarize(res["per_query"])
        res["errors"] = [f"{r['query']} {r['mode']} rep {r['rep']}: {r['error'][-300:]}"
                         for r in runs + warmup if "error" in r]
        res["mismatches"] = [f"{r['query']} {r['mode']} rep {r['rep']}" for r in runs if r.get("rows_match") is False]
        res["log"] = self.log_lines
        return res


# --------------------------------------------------------------------------- aggregation


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def aggregate(runs: list[dict[str, Any]], queries: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for q in queries:
        e: dict[str, Any] = {}
        for mode in ("local", "cold", "warm", "peer"):
            rs = [r for r in runs if r["query"] == q and r["mode"] == mode and "error" not in r]
            if not rs:
                continue
            m: dict[str, Any] = {"n": len(rs), "query_s": bt._mmm([r["query_s"] for r in rs]),
                                 "cpu_query_s": bt._mmm([r["cpu_query_s"] for r in rs]),
                                 "rows_match": all(r.get("rows_match") in (True, None) for r in rs)}
            if mode != "local":
                m["close_s"] = bt._mmm([r["close_s"] for r in rs])
                m["stages_s"] = {k: _median([r["stages_s"][k] for r in rs if k in r["stages_s"]])
                                 for k in sorted({k for r in rs for k in r["stages_s"]})}
                m["profile_bytes_from_store"] = _median([r["profile"]["bytes_from_store"] for r in rs])
                m["profile_bytes_from_cache"] = _median([r["profile"]["bytes_from_cache"] for r in rs])
                m["proxy_gets"] = _median([r["proxy"]["gets"] for r in rs if "proxy" in r])
                m["proxy_bytes"] = _median([r["proxy"]["bytes_sent"] for r in rs if "proxy" in r])
            if mode == "peer":
                m["bytes_from_peers"] = _median([r["profile"]["bytes_from_peers"] for r in rs])
                m["blocks_from_peers"] = _median([r["profile"]["blocks_from_peers"] for r in rs])
                m["worker_store_bytes"] = sum(r["worker"]["store_bytes"] for r in rs)
            e[mode] = m
        if "warm" in e and "peer" in e:
            e["peer_over_warm"] = e["peer"]["query_s"]["median"] / e["warm"]["query_s"]["median"]
        out[q] = e
    return out


def summarize(per_query: dict[str, Any]) -> dict[str, Any]:
    ratios = {q: e["peer_over_warm"] for q, e in per_query.items() if "peer_over_warm" in e}
    if not ratios:
        return {}
    both = list(ratios)
    total = {m: sum(per_query[q][m]["query_s"]["median"] for q in both) for m in ("warm", "peer")}
    worst = max(ratios, key=ratios.get)
    peer = [per_query[q]["peer"] for q in both]
    geomean = bt._geomean(list(ratios.values()))
    return {
        "peer_over_warm_geomean": geomean, "target": TARGET_PEER_OVER_WARM,
        "pass": geomean <= TARGET_PEER_OVER_WARM, "n_queries": len(ratios),
        "peer_over_warm_total": total["peer"] / total["warm"], "warm_total_s": total["warm"],
        "peer_total_s": total["peer"], "worst": {"query": worst, "ratio": ratios[worst]},
        "queries_over_target": sorted(q for q, r in ratios.items() if r > TARGET_PEER_OVER_WARM),
        "peer_bytes_total": sum(p["bytes_from_peers"] for p in peer),
        "peer_blocks_total": sum(p["blocks_from_peers"] for p in peer),
        "peer_store_bytes_profile_total": sum(p["profile_bytes_from_store"] for p in peer),
        "peer_proxy_bytes_total": sum(p["proxy_bytes"] or 0 for p in peer),
        "peer_proxy_gets_total": sum(p["proxy_gets"] or 0 for p in peer),
        "worker_store_bytes_during_runs": sum(p["worker_store_bytes"] for p in peer),
        "warm_cache_bytes_total": sum(per_query[q]["warm"]["profile_bytes_from_cache"] for q in both),
        "cold_store_bytes_total": sum(per_query[q]["cold"]["profile_bytes_from_store"] for q in both
                                      if "cold" in per_query[q]),
    }


# --------------------------------------------------------------------------- reporting


def render_markdown(res: dict[str, Any]) -> str:
    s, pq = res["summary"], res["per_query"]
    env = res["environment"]
    L = [f"Command: `{res['command']}` — SF {res['sf']:g}, {len(res['queries'])} queries, {res['reps']} reps of "
         f"local-warm and peer per query (interleaved), every run a fresh process, {res['threads']} threads; "
         f"S3: {res['s3_server']} behind `s3proxy.py` profile `{res['proxy']['profile']}` (seed "
         f"{res['proxy']['seed']}, {res['proxy']['bandwidth_mib_s_per_connection']:g} MiB/s per connection). "
         f"Runtime {res['runtime_s'] / 60:.1f} min, started {res['started']}; {env['nproc']} vCPU, load average "
         f"{env['loadavg_start'][0]:.1f} at the start, {env['loadavg_end'][0]:.1f} at the end.", ""]
    if res.get("pinned"):
        L += ["Pinned (`--pin`): two machines in one. Every query process (DuckDB local, cold, local-warm, peer) "
              "runs on CPU 0, the `shoal worker` on CPU 1: the worker's sending costs the client nothing, as "
              "between separate machines; SeaweedFS and the proxy are not pinned (only the cold runs and the "
              "warm-up use them).", ""]
    if not s:
        return "\n".join(L + ["No query completed in both modes."]) + "\n"
    verdict = "**PASS**" if s["pass"] else "**FAIL**"
    L += ["| Target (issue 5) | Measured | Target | Result |", "|---|---|---|---|",
          f"| peer (empty local cache, warm worker) / local-warm: geometric mean over {s['n_queries']} queries | "
          f"{s['peer_over_warm_geomean']:.2f}× | ≤ {s['target']}× | {verdict} |", "",
          f"Total of per-query medians: local-warm {s['warm_total_s']:.2f} s, peer {s['peer_total_s']:.2f} s "
          f"({s['peer_over_warm_total']:.2f}×); worst query {s['worst']['query']} ({s['worst']['ratio']:.2f}×); "
          f"queries above {s['target']}×: {', '.join(s['queries_over_target']) or 'none'}.", "",
          f"Bytes, summed over the queries' median peer runs: **{s['peer_bytes_total'] / MiB:.1f} MiB from the "
          f"peer** ({s['peer_blocks_total']:.0f} blocks, query profile `bytes_from_peers`), "
          f"{s['peer_store_bytes_profile_total'] / MiB:.1f} MiB of data from the store (profile), "
          f"{s['peer_proxy_bytes_total'] / MiB:.2f} MiB through the S3 proxy in {s['peer_proxy_gets_total']:.0f} GETs "
          f"(listings and metadata included); the worker read {s['worker_store_bytes_during_runs'] / MiB:.1f} MiB "
          f"from the store during all measured peer runs. For comparison: local-warm read "
          f"{s['warm_cache_bytes_total'] / MiB:.1f} MiB from its SSD cache, the cold runs "
          f"{s['cold_store_bytes_total'] / MiB:.1f} MiB from the store.", "",
          f"Worker warm-up (every query once through the worker, {res['worker']['warmup_s']:.0f} s): it read "
          f"{res['worker']['after_warmup']['store_bytes'] / MiB:.1f} MiB from the store in "
          f"{res['worker']['after_warmup']['store_requests']} GETs.", "",
          "| Query | DuckDB local s | local-warm s | peer s | peer / warm | peer MiB (blocks) | store MiB (profile) "
          "| proxy GETs | peer plan s | peer scan+finish s |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for q, e in pq.items():
        if "peer" not in e or "warm" not in e:
            L.append(f"| {q} | — | — | — | — | — | — | — | — | — |")
            continue
        p, w = e["peer"], e["warm"]
        local = e.get("local", {}).get("query_s")
        L.append(f"| {q} | {bt._mm(local)} | {bt._mm(w['query_s'])} | {bt._mm(p['query_s'])} | "
                 f"{e['peer_over_warm']:.2f} | {p['bytes_from_peers'] / MiB:.1f} ({p['blocks_from_peers']:.0f}) | "
                 f"{p['profile_bytes_from_store'] / MiB:.1f} | {bt._num(p['proxy_gets'], 0)} | "
                 f"{bt._num(p['stages_s'].get('plan'))} | {bt._num(p['stages_s'].get('scan+finish'))} |")
    if res["errors"] or res["mismatches"]:
        L += ["", f"Errors: {res['errors']}; row mismatches: {res['mismatches']}"]
    else:
        L += ["", "Every run's rows matched DuckDB local's."]
    return "\n".join(L) + "\n"


def update_results_md(path: Path, body: str) -> None:
    """This benchmark's section of RESULTS.md."""
    from results_md import update_section  # benchmarks/ is on sys.path: these run as scripts

    update_section(path, SECTION, body, after=AFTER_SECTION)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--sf", type=float, default=None, help="scale factor (default 1; --quick: 0.1)")
    p.add_argument("--reps", type=int, default=None, help="repetitions of warm and peer per query (default 3; --quick: 2)")
    p.add_argument("--quick", action="store_true", help="SF 0.1, 2 reps")
    p.add_argument("--queries", help="comma-separated subset, e.g. q01,q06 (default: all 22)")
    p.add_argument("--threads", type=int, default=None, help="DuckDB threads (default 2; --pin: 1)")
    p.add_argument("--pin", action="store_true",
                   help="two machines in one: every query process on CPU 0, the shoal worker on CPU 1 "
                        "(with 1 DuckDB thread): sending costs the client nothing, as on separate machines")
    p.add_argument("--seed", type=int, default=1, help="proxy RNG seed")
    p.add_argument("--profile", default="s3-standard", help="proxy latency profile")
    p.add_argument("--bandwidth-mib-s", type=float, default=60.0, help="fixed per-connection bandwidth")
    p.add_argument("--timeout", type=float, default=900, help="seconds per run before it counts as failed")
    p.add_argument("--side-venv", default=str(Path(os.environ.get("SHOAL_DUCKDB155_VENV",
                                                                 bt.ROOT / ".venv-duckdb155"))),
                   help="the duckdb 1.5.5 env (only used to generate missing data)")
    p.add_argument("--workdir", help="SeaweedFS data, caches and results go here (default: a temp dir, removed)")
    p.add_argument("--keep", action="store_true", help="keep the temporary workdir")
    p.add_argument("--freeze-code", action=argparse.BooleanOptionalAction, default=True,
                   help="run Shoal (runners and worker) from a copy taken at the start (default: yes)")
    p.add_argument("--out", help="JSON path (default benchmarks/results/peer-tpch-sf<SF>.json)")
    p.add_argument("--update-results", action=argparse.BooleanOptionalAction, default=None,
                   help="update benchmarks/RESULTS.md (default: yes for full runs of all 22 queries)")
    p.add_argument("--from-json", help="only re-render the Markdown (and, with --update-results, the RESULTS.md "
                   "section) from the JSON of an earlier run")
    args = p.parse_args(argv)
    if args.from_json:
        out = Path(args.from_json)
        write_outputs(json.loads(out.read_text()), out, bool(args.update_results))
        return 0
    args.sf = args.sf if args.sf is not None else (0.1 if args.quick else 1.0)
    args.reps = args.reps if args.reps is not None else (2 if args.quick else 3)
    args.threads = args.threads if args.threads is not None else (1 if args.pin else 2)
    args.command = ".venv/bin/python benchmarks/bench_peer_tpch.py" + ("" if not argv else " " + " ".join(argv))
    # What bench_tpch.Bench reads from its arguments, for the parts reused here.
    args.modes, args.executor, args.cache_options = "local,cold,warm", "local", None
    queries_given = bool(args.queries)
    if not args.queries:
        args.queries = ",".join(bt._load_answers().load_queries())
    if args.update_results is None:
        args.update_results = not args.quick and not queries_given
    res = PeerBench(args).run()
    bt.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else bt.RESULTS_DIR / f"peer-tpch-sf{args.sf:g}{'-pinned' if args.pin else ''}.json"
    out.write_text(json.dumps(res, indent=1, default=str) + "\n")
    write_outputs(res, out, args.update_results)
    if res["errors"] or res["mismatches"]:
        return 2
    return 0 if res["summary"].get("pass") else 1


NOTES_FILE = HERE / "results" / "peer-tpch-notes.md"


def write_outputs(res: dict[str, Any], out: Path, update_results: bool) -> None:
    """The Markdown next to ``out`` and, if asked, the RESULTS.md section (the run's
    Markdown, a pointer to the other scale factor's results, the notes file)."""
    md = render_markdown(res)
    out.with_suffix(".md").write_text(f"# TPC-H with a warm peer cache, SF {res['sf']:g} (issue 5)\n\n{md}")
    print(md)
    print(f"wrote {out} and {out.with_suffix('.md')}", file=sys.stderr)
    if not update_results:
        return
    parts = [md.rstrip("\n"), "", f"Raw runs: `results/{out.name}`, tables: [`results/{out.with_suffix('.md').name}`]"
             f"(results/{out.with_suffix('.md').name})."]
    for other in sorted(out.parent.glob("peer-tpch-sf*.json")):
        if other.resolve() == out.resolve():
            continue
        try:
            o = json.loads(other.read_text())
            s = o["summary"]
            parts.append(f"SF {o['sf']:g} (`{o['command'].split('benchmarks/')[-1]}`, {o['started']}): peer / "
                         f"local-warm geomean {s['peer_over_warm_geomean']:.2f}× over {s['n_queries']} queries, "
                         f"total {s['peer_over_warm_total']:.2f}×, {s['peer_bytes_total'] / MiB:.0f} MiB from the "
                         f"peer against {s['warm_cache_bytes_total'] / MiB:.0f} MiB local-warm reads; "
                         f"[`results/{other.with_suffix('.md').name}`](results/{other.with_suffix('.md').name}).")
        except (OSError, ValueError, KeyError):
            continue
    if NOTES_FILE.exists():
        parts += ["", NOTES_FILE.read_text().strip()]
    update_results_md(HERE / "RESULTS.md", "\n".join(parts))
    print(f"updated {HERE / 'RESULTS.md'} ({SECTION})", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
