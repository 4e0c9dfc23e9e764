#!/usr/bin/env python
"""Benchmark of the Ray executor (issue 7).

One machine cannot show scale-out speed-up, so this reports what it can::

    .venv/bin/python benchmarks/bench_ray.py                 # all four parts
    .venv/bin/python benchmarks/bench_ray.py --parts scaleout --quick

1. **overhead**: TPC-H (SF 1 by default, local Parquet files, warm: one
   untimed run first) per query through ``Session(executor=...)`` with the
   same number of workers: ``ray`` against ``threads`` (the same task
   protocol in one process: the ratio is Ray's cost) and against ``local``
   (the embedded default, scans fused into DuckDB).  Best of ``--reps``
   rounds that run each query on the three executors in turn.
2. **affinity**: all 22 queries three times on a 3-actor local Ray cluster
   against a loopback SeaweedFS (``tests/s3servers.py``), workers' memory
   tier dropped between runs so hits are SSD hits; cache hit ratio of each
   run, bytes the actors got from each other's caches (the peer tier), and
   cluster-wide bytes fetched from the store (owners' fills included) per
   distinct byte, with cache-affinity scheduling and with a random worker per
   fragment, each with the peer tier and without it (``peers=False``).
3. **scaleout** (simulated, no Ray): the planner's fragments of the 22
   queries at 2..64 workers, placed by the executor's own assignment
   (:func:`shoal.engine.ray_affinity.assign`); load balance, bytes moved when
   one worker joins, and store reads per block over three runs of the query
   set (each worker caches what it read), with affinity and without.
4. **spill**: the 22 queries (SF ``--affinity-sf``, SeaweedFS, 2 actors,
   warm) with every scan result spilled to the store as Parquet
   (``spill_threshold=0``) against none spilled: the price of spilling.

Results: ``benchmarks/results/ray.json`` and ``ray.md``; with
``--update-results`` also the "Ray (issue 7)" section of ``benchmarks/RESULTS.md``
(``--from-json results/ray.json --update-results`` re-renders a finished run).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))

import pyarrow.parquet as pq  # noqa: E402

from shoal.cache import CacheConfig, StoreConfig  # noqa: E402
from shoal.engine import Session  # noqa: E402
from shoal.engine.ray_affinity import assign, fragment_key, owner  # noqa: E402

from tpch_fixtures import TPCH_TABLES, answers, generate, queries, upload  # noqa: E402

RESULTS = HERE / "results"
MiB = 1 << 20


def log(message: str) -> None:
    print(f"[bench_ray {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


# -- 1. overhead -----------------------------------------------------------------------


def overhead(data: Path, *, workers: int, reps: int, only: list[str] | None) -> dict[str, Any]:
    """Per query: one warm-up per executor, then ``reps`` rounds that run the query once on
    each executor in turn (so load from elsewhere on the machine hits all three alike)."""
    qs = {k: v for k, v in queries().items() if not only or k in only}
    reference = answers.connect_reference(data)
    modes = ("local", "threads", "ray")
    out: dict[str, Any] = {"data": str(data.relative_to(ROOT)), "workers": workers, "reps": reps, "queries": {}}
    sessions: dict[str, Session] = {}
    caches = []
    try:
        for mode in modes:
            started = time.perf_counter()
            cache = CacheConfig(directory=Path(tempfile.mkdtemp(prefix="shoal-bench-ray-")))
            caches.append(cache.directory)
            sessions[mode] = Session(executor=mode, workers=workers, cache=cache)
            out[f"{mode}_startup_s"] = time.perf_counter() - started
            for table in TPCH_TABLES:
                sessions[mode].register(table, str(data / table / "*.parquet"))
        for name, sql in qs.items():
            expected = answers.reference_results(data, sql, reference)
            entry: dict[str, Any] = {}
            times: dict[str, list[float]] = {m: [] for m in modes}
            for mode in modes:
                result = sessions[mode].sql(sql)  # warm-up and answer check
                wrong = answers.rows_difference([tuple(r.values()) for r in result.table.to_pylist()], expected)
                entry[mode] = {"correct": not wrong}
            for _ in range(reps):
                for mode in modes:
                    t0 = time.perf_counter()
                    sessions[mode].sql(sql)
                    times[mode].append(time.perf_counter() - t0)
            for mode in modes:
                entry[mode].update(median_s=statistics.median(times[mode]), min_s=min(times[mode]))
            entry["tasks"] = len(sessions["ray"].executor.last_assignment)
            out["queries"][name] = entry
            log(f"overhead {name}: " + ", ".join(f"{m} {entry[m]['min_s'] * 1000:.1f} ms" for m in modes))
    finally:
        for session in sessions.values():
            session.close()
        for directory in caches:
            shutil.rmtree(directory, ignore_errors=True)
    per = out["queries"]
    # Best of the rounds: the least disturbed run of each executor.
    out["ray_over_threads"] = {q: e["ray"]["min_s"] / e["threads"]["min_s"] for q, e in per.items()}
    out["ray_over_local"] = {q: e["ray"]["min_s"] / e["local"]["min_s"] for q, e in per.items()}
    out["ray_minus_threads_ms"] = {q: 1000 * (e["ray"]["min_s"] - e["threads"]["min_s"]) for q, e in per.items()}
    out["summary"] = {
        "geomean_ray_over_threads": _geomean(list(out["ray_over_threads"].values())),
        "geomean_ray_over_local": _geomean(list(out["ray_over_local"].values())),
        "median_extra_ms_vs_threads": statistics.median(out["ray_minus_threads_ms"].values()),
        "total_s": {m: sum(e[m]["min_s"] for e in per.values()) for m in modes},
        "all_correct": all(e[m]["correct"] for e in per.values() for m in modes),
    }
    return out


# -- 2. affinity on a real cluster ------------------------------------------------------


def affinity(sf: float, *, workers: int, runs: int) -> dict[str, Any]:
    import ray
    import s3servers

    data = generate(sf)
    tmp = Path(tempfile.mkdtemp(prefix="shoal-bench-ray-aff-"))
    endpoint, stop = s3servers.start_seaweedfs(tmp / "weed")
    out: dict[str, Any] = {"sf": sf, "workers": workers, "runs": runs}
    try:
        client = endpoint.boto3_client()
        client.create_bucket(Bucket="tpch")
        upload(client, "tpch", data)
        store = StoreConfig(endpoint_url=endpoint.endpoint_url, access_key=endpoint.access_key,
                            secret_key=endpoint.secret_key, region=endpoint.region)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        from shoal.engine import EXECUTORS
        from shoal.engine.ray_executor import RayExecutor

        # Baseline: one process, one cache, fetches each needed block exactly once.
        with Session(executor="threads", workers=workers, cache=CacheConfig(directory=tmp / "cache-single"),
                     store=store) as session:
            for table in TPCH_TABLES:
                session.register(table, f"s3://tpch/tpch/{table}/*.parquet")
            distinct = sum(session.sql(sql).profile.bytes_from_store for sql in queries().values())
        out["distinct_store_bytes"] = distinct
        for mode, options in AFFINITY_VARIANTS.items():
            EXECUTORS["ray"] = functools.partial(RayExecutor, **options)
            cache = CacheConfig(directory=tmp / f"cache-{mode}")
            rows = []
            with Session(executor="ray", workers=workers, cache=cache, store=store) as session:
                for table in TPCH_TABLES:
                    session.register(table, f"s3://tpch/tpch/{table}/*.parquet")
                for run in range(runs):
                    session.executor.drop_memory()
                    before = session.executor.worker_stats()
                    t0 = time.perf_counter()
                    for sql in queries().values():
                        session.sql(sql)
                    seconds = time.perf_counter() - t0
                    after = session.executor.worker_stats()
                    def delta(*keys: str) -> int:
                        return sum(a.get(k, 0) - before[m].get(k, 0) for m, a in after.items() for k in keys)

                    # The store bytes of the cluster: the actors' own reads and their fills for peers.
                    fetched = delta("bytes_from_store", "fill_bytes_from_store")
                    own = delta("bytes_from_store")
                    peers = delta("bytes_from_peers")
                    cached = delta("bytes_from_cache", "bytes_from_memory")
                    read = own + peers + cached
                    rows.append({"run": run + 1, "bytes_from_store": fetched, "bytes_from_cache": cached,
                                 "bytes_from_peers": peers, "hit_ratio": cached / read if read else 0.0,
                                 "seconds": seconds})
                    log(f"affinity {mode:8s} run {run + 1}: hit ratio {rows[-1]['hit_ratio']:.3f}, "
                        f"{fetched / MiB:.1f} MiB from store, {peers / MiB:.1f} MiB from peers")
                volume = sum(s["cache_volume"] for s in session.executor.worker_stats().values())
            out[mode] = {"runs": rows, "cache_volume_bytes": volume,
                         "store_bytes_per_distinct_byte": sum(r["bytes_from_store"] for r in rows) / distinct}
        ray.shutdown()
    finally:
        stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# -- 4. spilling ------------------------------------------------------------------------


def spill(sf: float, *, workers: int, reps: int) -> dict[str, Any]:
    """Each query warm, in memory and with every result spilled, alternately; best of ``reps``."""
    import ray
    import s3servers

    data = generate(sf)
    tmp = Path(tempfile.mkdtemp(prefix="shoal-bench-ray-spill-"))
    endpoint, stop = s3servers.start_seaweedfs(tmp / "weed")
    out: dict[str, Any] = {"sf": sf, "workers": workers, "reps": reps}
    try:
        client = endpoint.boto3_client()
        client.create_bucket(Bucket="tpch")
        upload(client, "tpch", data)
        store = StoreConfig(endpoint_url=endpoint.endpoint_url, access_key=endpoint.access_key,
                            secret_key=endpoint.secret_key, region=endpoint.region)
        reference = answers.connect_reference(data)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        from shoal.engine import EXECUTORS
        from shoal.engine.ray_executor import RayExecutor

        sessions = {}
        for mode, threshold in (("memory", 256 * MiB), ("spilled", 0)):
            EXECUTORS["ray"] = functools.partial(RayExecutor, spill_threshold=threshold)
            session = Session(executor="ray", workers=workers, cache=CacheConfig(directory=tmp / f"cache-{mode}"),
                              store=store)
            for table in TPCH_TABLES:
                session.register(table, f"s3://tpch/tpch/{table}/*.parquet")
            sessions[mode] = session
        expected = {name: answers.reference_results(data, sql, reference) for name, sql in queries().items()}
        best: dict[str, dict[str, float]] = {m: {} for m in sessions}
        correct = True
        executor = sessions["spilled"].executor
        before: dict[str, Any] = {}
        for rep in range(reps + 1):  # round 0 warms the caches
            if rep == 1:
                before = {"results": executor.spilled_results, "stats": executor.worker_stats()}
            for name, sql in queries().items():
                for mode, session in sessions.items():
                    t0 = time.perf_counter()
                    result = session.sql(sql)
                    seconds = time.perf_counter() - t0
                    rows = [tuple(r.values()) for r in result.table.to_pylist()]
                    correct &= not answers.rows_difference(rows, expected[name])
                    if rep:
                        best[mode][name] = min(best[mode].get(name, math.inf), seconds)
        stats = executor.worker_stats()

        def per_round(key: str) -> int:
            return sum(s[key] - before["stats"][m][key] for m, s in stats.items()) // reps

        out.update(
            total_s={m: sum(v.values()) for m, v in best.items()},
            geomean_spilled_over_memory=_geomean([best["spilled"][q] / best["memory"][q] for q in best["memory"]]),
            spilled_results=(executor.spilled_results - before["results"]) // reps,
            spilled_parquet_bytes=per_round("spilled_bytes"), spilled_arrow_bytes=per_round("spilled_arrow_bytes"),
            all_correct=correct, queries={q: {m: best[m][q] for m in best} for q in best["memory"]},
        )
        for session in sessions.values():
            session.close()
        listing = client.list_objects_v2(Bucket="tpch", Prefix=".shoal-spill/")
        out["objects_left"] = listing.get("KeyCount", 0)
        ray.shutdown()
    finally:
        stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# -- 3. simulated scale-out -------------------------------------------------------------


def _fid(f: Any) -> tuple[Any, ...]:
    """A fragment's identity (its files and row groups); ownership uses only the files."""
    return (fragment_key(f.files), f.row_groups)


def _footprints(fragments: list[Any], block_size: int) -> dict[tuple[Any, ...], set[tuple[str, int]]]:
    """Blocks each fragment reads: its files' blocks, or its row groups' byte span, plus the footer."""
    meta: dict[str, Any] = {}
    out = {}
    for f in fragments:
        blocks: set[tuple[str, int]] = set()
        for version in f.files:
            last = (version.size - 1) // block_size
            if f.row_groups is None:
                blocks |= {(version.url, b) for b in range(last + 1)}
                continue
            if version.url not in meta:
                meta[version.url] = pq.ParquetFile(version.url).metadata
            md = meta[version.url]
            lo, hi = version.size, 0
            for g in f.row_groups:
                rg = md.row_group(g)
                for c in range(rg.num_columns):
                    col = rg.column(c)
                    start = col.dictionary_page_offset or col.data_page_offset
                    lo, hi = min(lo, start), max(hi, start + col.total_compressed_size)
            blocks |= {(version.url, b) for b in range(lo // block_size, (hi - 1) // block_size + 1)}
            blocks.add((version.url, last))  # the footer
        out[_fid(f)] = blocks
    return out


def _plan_fragments(data: Path, workers: int) -> list[list[Any]]:
    """The fragments of each of the 22 queries, planned for ``workers``."""
    per_query = []
    cache = CacheConfig(directory=Path(tempfile.mkdtemp(prefix="shoal-bench-plan-")))
    with Session(executor="threads", workers=workers, cache=cache) as session:
        for table in TPCH_TABLES:
            session.register(table, str(data / table / "*.parquet"))
        for sql in queries().values():
            with session.fs.snapshot():
                plan = session.planner.plan(sql)
                session.planner.drop_views(list(plan.scans))
            per_query.append(sorted((f for s in plan.scans.values() for f in s.fragments), key=lambda f: -f.size))
    shutil.rmtree(cache.directory, ignore_errors=True)
    return per_query


def _schedule(fragments: list[Any], members: list[str], mode: str, rng: random.Random) -> tuple[list[str], float]:
    """Who runs each fragment, and the makespan in bytes (workers read at one common rate)."""
    keys = [fragment_key(f.files) for f in fragments]
    sizes = [f.size for f in fragments]
    if mode == "random":
        placed = [rng.choice(members) for _ in fragments]
    else:
        placed = assign(keys, sizes, members, load_factor=1.25 if mode == "bounded" else None).members
    if mode != "steal":
        load = {m: 0 for m in members}
        for size, m in zip(sizes, placed):
            load[m] += size
        return placed, max(load.values())
    # Soft affinity as the executor does it: owners' queues, largest first; a
    # worker with nothing of its own takes the smallest queued fragment of the
    # most backlogged worker.
    from collections import deque

    queues = {m: deque(i for i, p in enumerate(placed) if p == m) for m in members}
    clock = {m: 0 for m in members}
    runner = list(placed)
    while any(queues.values()):
        m = min(members, key=lambda w: (clock[w], w))
        if queues[m]:
            i = queues[m].popleft()
        else:
            victim = max(members, key=lambda w: len(queues[w]))
            i = queues[victim].pop()
            runner[i] = m
        clock[m] += sizes[i]
    return runner, max(clock.values())


def _simulate(per_query: list[list[Any]], footprints: dict[tuple[Any, ...], set[tuple[str, int]]],
              members: list[str], *, runs: int, mode: str) -> dict[str, float]:
    """Store reads per block over ``runs`` runs of the query set (each worker keeps what it read)
    and makespan against a perfect split of each query's bytes."""
    cached: dict[str, set[tuple[str, int]]] = {m: set() for m in members}
    fetched = reads = from_peer = 0
    slowdown = []
    rng = random.Random(7)
    block_owner: dict[tuple[str, int], str] = {}
    for run in range(runs):
        for fragments in per_query:
            runner, makespan = _schedule(fragments, members, "steal" if mode == "peer" else mode, rng)
            if run == 0:
                ideal = max(sum(f.size for f in fragments) / len(members), max(f.size for f in fragments))
                slowdown.append(makespan / ideal)
            for f, member in zip(fragments, runner):
                if mode != "peer":
                    new = footprints[_fid(f)] - cached[member]
                    fetched += len(new)
                    cached[member] |= new
                    continue
                # The peer tier (issue 5): each block has one owner among the live
                # workers; the owner fetches it once, everyone else asks the owner.
                for block in footprints[_fid(f)]:
                    if block not in block_owner:
                        block_owner[block] = owner(f"{block[0]}#{block[1]}", members)
                    holder = block_owner[block]
                    if block not in cached[holder]:
                        fetched += 1
                        cached[holder].add(block)
                    reads += 1
                    from_peer += holder != member
    distinct = len(set().union(*footprints.values()))
    out = {"store_reads_per_block": fetched / distinct, "distinct_blocks": distinct,
           "cached_copies_per_block": sum(len(c) for c in cached.values()) / distinct,
           "makespan_over_ideal": statistics.mean(slowdown)}
    if mode == "peer":
        out["peer_read_share"] = from_peer / reads if reads else 0.0
    return out


#: owners: each object's fragments on its owner only; steal: plus idle workers at once
#: taking queued fragments (the executor's default); bounded: static bounded
#: loads; random: no affinity; peer: steal, with the peer block tier of issue 5.
MODES = ("owners", "steal", "bounded", "random", "peer")
AFFINITY_VARIANTS: dict[str, dict[str, Any]] = {
    "affinity": {}, "owners-only": {"locality_wait_s": None}, "random": {"affinity": False},
    "affinity, no peers": {"peers": False}, "random, no peers": {"affinity": False, "peers": False},
}
AFFINITY_MODES = tuple(AFFINITY_VARIANTS)


def scaleout(data: Path, *, sizes: list[int], block_size: int, runs: int) -> dict[str, Any]:
    out: dict[str, Any] = {"data": str(data.relative_to(ROOT)), "block_size": block_size, "runs": runs, "workers": {}}
    for n in sizes:
        per_query = _plan_fragments(data, n)
        fragments = {_fid(f): f for q in per_query for f in q}
        footprints = _footprints(list(fragments.values()), block_size)
        members = [f"node:{i}" for i in range(n)]
        grown = members + [f"node:{n}"]
        objects = {fragment_key(f.files): sum(g.size for g in f.files) for f in fragments.values()}
        before = {k: assign([k], [1], members).members[0] for k in objects}
        after = {k: assign([k], [1], grown).members[0] for k in objects}
        moved = [k for k in objects if before[k] != after[k]]
        blocks = sorted(set().union(*footprints.values()))
        block_moves = [b for b in blocks if owner(f"{b[0]}#{b[1]}", members) != owner(f"{b[0]}#{b[1]}", grown)]
        entry: dict[str, Any] = {
            "blocks_moved_on_join": len(block_moves) / len(blocks),
            "block_moves_to_new_worker_share": (sum(owner(f"{b[0]}#{b[1]}", grown) == f"node:{n}"
                                                    for b in block_moves) / len(block_moves)) if block_moves else 1.0,
            "fragments_per_query": statistics.mean(len(q) for q in per_query),
            "distinct_fragments": len(fragments),
            "objects": len(objects),
            "bytes_moved_on_join": sum(objects[k] for k in moved) / sum(objects.values()),
            "ideal_move_share": 1 / (n + 1),
            "moves_to_new_worker_share": (sum(after[k] == f"node:{n}" for k in moved) / len(moved)) if moved else 1.0,
        }
        for mode in MODES:
            entry[mode] = _simulate(per_query, footprints, members, runs=runs, mode=mode)
        out["workers"][str(n)] = entry
        log(f"scaleout n={n}: " + ", ".join(
            f"{m} {entry[m]['store_reads_per_block']:.2f} reads/block {entry[m]['makespan_over_ideal']:.2f}x"
            for m in MODES) + f"; moved {entry['bytes_moved_on_join']:.3f}")
    return out


# -- report ---------------------------------------------------------------------------


def render(res: dict[str, Any]) -> str:
    lines = [f"Machine: {res['machine']}", ""]
    if "overhead" in res:
        o = res["overhead"]
        s = o["summary"]
        lines += [
            f"### Per-query overhead ({o['data']}, warm, {o['workers']} workers, best of {o['reps']} "
            f"interleaved rounds)", "",
            f"Geometric mean ray/threads **{s['geomean_ray_over_threads']:.2f}x**, ray/local "
            f"**{s['geomean_ray_over_local']:.2f}x**; median extra time per query vs threads "
            f"**{s['median_extra_ms_vs_threads']:.1f} ms**; all answers correct: {s['all_correct']}.  "
            f"Sum over queries: local {s['total_s']['local']:.2f} s, threads {s['total_s']['threads']:.2f} s, "
            f"ray {s['total_s']['ray']:.2f} s.  Startup: ray {o['ray_startup_s']:.1f} s (runtime + actors), "
            f"threads {o['threads_startup_s']:.2f} s.", "",
            "| query | tasks | local ms | threads ms | ray ms | ray/threads | ray/local |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for q, e in o["queries"].items():
            lines.append(f"| {q} | {e.get('tasks', '')} | {e['local']['min_s'] * 1000:.1f} | "
                         f"{e['threads']['min_s'] * 1000:.1f} | {e['ray']['min_s'] * 1000:.1f} | "
                         f"{o['ray_over_threads'][q]:.2f} | {o['ray_over_local'][q]:.2f} |")
        lines.append("")
    if "affinity" in res:
        a = res["affinity"]
        modes = [m for m in AFFINITY_MODES if m in a]
        lines += [f"### Cache hit ratio with and without affinity (SF {a['sf']}, {a['workers']} actors, "
                  f"SeaweedFS, memory tier dropped between runs)", "",
                  "| scheduling | run | hit ratio | MiB from store | MiB from peers | seconds |",
                  "|---|---:|---:|---:|---:|---:|"]
        for mode in modes:
            for r in a[mode]["runs"]:
                lines.append(f"| {mode} | {r['run']} | {r['hit_ratio']:.3f} | {r['bytes_from_store'] / MiB:.1f} | "
                             f"{r.get('bytes_from_peers', 0) / MiB:.1f} | {r['seconds']:.2f} |")
        once = sum(r["bytes_from_store"] for r in a["owners-only"]["runs"])
        lines += ["", f"Bytes the workers fetched from the store over all runs, per byte fetched with owners "
                  f"only (every object fetched by its one owner: {once / MiB:.1f} MiB; one process with one "
                  f"cache, planning included, fetches {a['distinct_store_bytes'] / MiB:.1f} MiB): " + ", ".join(
                      f"{m} {sum(r['bytes_from_store'] for r in a[m]['runs']) / once:.2f}" for m in modes)
                  + "; SSD use: " + ", ".join(f"{m} {a[m]['cache_volume_bytes'] / MiB:.0f} MiB" for m in modes)
                  + ".  affinity: the default (idle workers take queued fragments after "
                  "`locality_wait_s` = 0.5 s); owners-only: `locality_wait_s=None`; random: `affinity=False`; "
                  "MiB from store counts owners' fills for peers; \"no peers\": `peers=False`.", ""]
    if "spill" in res:
        sp = res["spill"]
        lines += [f"### Spilling every scan result to the store (SF {sp['sf']}, {sp['workers']} actors, SeaweedFS, "
                  f"warm, best of {sp['reps']})", "",
                  f"Sum over the 22 queries: in memory {sp['total_s']['memory']:.2f} s, spilled "
                  f"{sp['total_s']['spilled']:.2f} s (geometric mean per query **{sp['geomean_spilled_over_memory']:.2f}x**); "
                  f"{sp['spilled_results']} results spilled per round, {sp['spilled_arrow_bytes'] / MiB:.1f} MiB of "
                  f"Arrow as {sp['spilled_parquet_bytes'] / MiB:.1f} MiB of Parquet; all answers correct: "
                  f"{sp['all_correct']}; spill objects left after the runs: {sp['objects_left']}.", ""]
    if "scaleout" in res:
        s = res["scaleout"]
        lines += [f"### Simulated scale-out ({s['data']}, {s['block_size'] // MiB} MiB blocks, "
                  f"{s['runs']} runs of the 22 queries)", "",
                  "Store reads per block (cluster-wide, over all runs; 1.00 = every block fetched once) "
                  "and makespan / ideal (first run, mean over queries):", "",
                  "| workers | fragments/query | objects | bytes moved on join (ideal 1/(n+1)) | to the new worker | "
                  + " | ".join(f"{m}: reads/block, makespan" for m in MODES) + " |",
                  "|---:|---:|---:|---:|---:|" + "---:|" * len(MODES)]
        for n, e in s["workers"].items():
            cells = " | ".join(f"{e[m]['store_reads_per_block']:.2f}, {e[m]['makespan_over_ideal']:.2f}x" for m in MODES)
            lines.append(f"| {n} | {e['fragments_per_query']:.1f} | {e['objects']} | {e['bytes_moved_on_join']:.3f} "
                         f"({e['ideal_move_share']:.3f}) | {e['moves_to_new_worker_share']:.2f} | {cells} |")
        lines.append("")
        lines.append("peer tier (block ownership): blocks moved when one worker joins (ideal 1/(n+1)), all to "
                     "the new worker: " + ", ".join(
                         f"n={n} {e['blocks_moved_on_join']:.3f} ({e['ideal_move_share']:.3f}, "
                         f"{e['block_moves_to_new_worker_share']:.2f})" for n, e in s["workers"].items()))
        lines.append("")
        lines.append("peer: share of block reads served by another worker's cache: " + ", ".join(
            f"n={n} {e['peer']['peer_read_share']:.2f}" for n, e in s["workers"].items()))
        lines.append("")
    return "\n".join(lines)


SECTION = "## Ray (issue 7)"

NOTES = """\
How to read this (`benchmarks/bench_ray.py`; raw numbers in `results/ray.json`, tables in
`results/ray.md`):

* **Overhead** compares executors on one machine with the same workers.  `threads` and `ray`
  run the same scan tasks and ship the same Arrow results, so ray/threads is what Ray itself
  costs per query (task submission, the object store, actor threads); ray/local includes the
  price of not fusing scans into the coordinator's DuckDB, which any multi-node executor pays.
* **Affinity** runs the 22 queries three times on a 3-actor cluster against SeaweedFS; between
  runs the workers drop their memory tier, so every hit is an SSD hit.  With affinity every
  object is fetched by one worker; without it (a random worker per fragment) each worker ends
  up fetching and storing its own copy of nearly everything: store traffic and SSD use grow
  with the number of workers, and the first run's hit ratio drops.
* **Scale-out** is computed, not run: the planner's fragments of the 22 queries at each
  cluster size, placed by the executor's own functions.  Ownership is by object (rendezvous
  hashing of url@version), so with owners only, every block is fetched once by the whole
  cluster (1.00) at any size and a joining worker takes only its own share (all moves go to the
  new worker).  TPC-H SF 1 has only 23 objects, so beyond a few workers owners-only cannot
  balance (makespan column); work stealing balances but each stolen fragment is another copy.
  The peer block tier of issue 5 (each block owned by one live worker, others read it from the
  owner) keeps store reads at one per block *and* balances: the `peer` column.
"""


def update_results_md(path: Path, body: str) -> None:
    """This benchmark's section of RESULTS.md."""
    from results_md import update_section  # benchmarks/ is on sys.path: these run as scripts

    update_section(path, SECTION, body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="overhead,affinity,scaleout,spill")
    parser.add_argument("--sf", type=float, default=1.0, help="TPC-H scale of the overhead and scale-out parts")
    parser.add_argument("--affinity-sf", type=float, default=0.1)
    parser.add_argument("--workers", type=int, default=2, help="workers of the overhead part")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--queries", default="", help="comma-separated subset, e.g. q01,q06")
    parser.add_argument("--sizes", default="2,4,8,16,32,64")
    parser.add_argument("--quick", action="store_true", help="SF 0.1, 1 rep, sizes 2,8,64")
    parser.add_argument("--out", type=Path, default=RESULTS / "ray.json")
    parser.add_argument("--update-results", action="store_true",
                        help="also rewrite the 'Ray (issue 7)' section of benchmarks/RESULTS.md")
    parser.add_argument("--from-json", type=Path, help="re-render an earlier run's JSON instead of measuring")
    args = parser.parse_args()
    if args.quick:
        args.sf, args.reps, args.sizes = 0.1, 1, "2,8,64"
    if args.from_json:
        res = json.loads(args.from_json.read_text())
        if args.update_results:
            update_results_md(HERE / "RESULTS.md", NOTES + "\n" + render(res))
        print(render(res))
        return
    parts = args.parts.split(",")
    data = generate(args.sf)
    res: dict[str, Any] = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
                           "args": {k: str(v) for k, v in vars(args).items()}}
    if "overhead" in parts:
        res["overhead"] = overhead(data, workers=args.workers, reps=args.reps,
                                   only=[q for q in args.queries.split(",") if q] or None)
    if "affinity" in parts:
        res["affinity"] = affinity(args.affinity_sf, workers=3, runs=3)
    if "spill" in parts:
        res["spill"] = spill(args.affinity_sf, workers=2, reps=args.reps)
    if "scaleout" in parts:
        res["scaleout"] = scaleout(data, sizes=[int(n) for n in args.sizes.split(",")],
                                   block_size=CacheConfig().block_size, runs=3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2, default=str))
    args.out.with_suffix(".md").write_text(render(res))
    if args.update_results:
        update_results_md(HERE / "RESULTS.md", NOTES + "\n" + render(res))
    print(render(res))


if __name__ == "__main__":
    main()
