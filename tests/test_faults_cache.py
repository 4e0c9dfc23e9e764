"""Faults of the local SSD block cache, mid-run, against a real S3 server (issue 8, "Faults").

The cache directory deleted, replaced by a file or made read-only while a
process uses it; block files corrupted or truncated under a reader that holds
them open; two processes evicting each other's blocks under a small limit; a
process SIGKILLed while it writes a block.  In every case reads return the
object's bytes (compared with what was uploaded), the cache never serves a
partial or damaged block, and a failing cache degrades to reading through.

Root-proof: ``chmod`` does not stop root, so the read-only test runs its
reader as root *without* CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH / CAP_FOWNER
(dropped from the child's capability bounding set), which makes the mode bits
bind it like any owner; the unusable-directory test replaces the directory by
a regular file, which stops everyone.

Covered elsewhere, not repeated here (``test_cache_unit.py``, on ``memory://``
and local files): a corrupt/truncated/empty block found at the next start
(``test_corrupt_block_is_refetched``), a directory unusable from the start
(``test_unusable_cache_directory_reads_through``), a full disk
(``test_full_disk_reads_through``, ENOSPC injected into diskcache), failing
index reads (``test_failing_cache_reads_are_misses``) and two processes on one
directory reading local files (``test_two_processes_share_one_cache_dir``).
"""

from __future__ import annotations

import ctypes
import io
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3servers
from faultkit import put, within
from s3servers import S3Endpoint

from shoal.cache import BlockCache, CacheConfig, ShoalFileSystem, StoreConfig
from shoal.engine import Session

BS = 64 * 1024
CACHE_LOGGER = "shoal.cache.blockcache"
ONE_SERVER = pytest.mark.parametrize(
    "s3_endpoint", ["external" if s3servers.external_from_env() else "seaweedfs"], indirect=True)
pytestmark = ONE_SERVER

MakeFs = Callable[..., ShoalFileSystem]


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def store_config(endpoint: S3Endpoint) -> StoreConfig:
    return StoreConfig(endpoint_url=endpoint.endpoint_url, access_key=endpoint.access_key,
                       secret_key=endpoint.secret_key, region=endpoint.region, max_attempts=3)


@pytest.fixture
def make_fs(s3_endpoint: S3Endpoint, cache_dir: Path) -> Iterator[MakeFs]:
    made: list[ShoalFileSystem] = []

    def make(**cache: Any) -> ShoalFileSystem:
        config = CacheConfig(**{"directory": cache_dir, "block_size": BS, "readahead_blocks": 0,
                                "max_request_size": BS, **cache})
        fs = ShoalFileSystem(cache=config, store=store_config(s3_endpoint))
        made.append(fs)
        return fs

    yield make
    for fs in made:
        fs.close()


def child_env(endpoint: S3Endpoint, home: Path) -> dict[str, str]:
    """The S3 server and its credentials for a child, in the environment (never on a command line)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SHOAL_"))}
    env.update(HOME=str(home), AWS_CONFIG_FILE=str(home / "none"), AWS_SHARED_CREDENTIALS_FILE=str(home / "none"),
               AWS_EC2_METADATA_DISABLED="true", AWS_ENDPOINT_URL_S3=endpoint.endpoint_url,
               AWS_ACCESS_KEY_ID=endpoint.access_key, AWS_SECRET_ACCESS_KEY=endpoint.secret_key,
               AWS_REGION=endpoint.region)
    return env


# Child processes: a ShoalFileSystem over the S3 server named in the environment; argv[1] (JSON)
# says which cache directory, block size and objects (with files holding their expected bytes).
_CHILD_PRELUDE = textwrap.dedent("""
    import json, os, random, signal, sys
    from shoal.cache import CacheConfig, ShoalFileSystem, StoreConfig
    spec = json.loads(sys.argv[1])
    def make_fs(**cache):
        config = CacheConfig(**{"directory": spec["cache_dir"], "block_size": spec["bs"], "readahead_blocks": 0,
                                "max_request_size": spec["bs"], **cache})
        return ShoalFileSystem(cache=config, store=StoreConfig.from_env(max_attempts=3))
    truth = {url: open(path, "rb").read() for url, path in spec["objects"].items()}
""")


def child_spec(cache_dir: Path, objects: dict[str, bytes], tmp_path: Path) -> dict[str, Any]:
    files = {}
    for n, (url, data) in enumerate(objects.items()):
        path = tmp_path / f"truth-{n}.bin"
        path.write_bytes(data)
        files[url] = str(path)
    return {"cache_dir": str(cache_dir), "bs": BS, "objects": files}


def value_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*.val") if "stats" not in p.relative_to(directory).parts)


# -- the cache directory disappears or becomes unusable ---------------------------------------------


def test_cache_dir_deleted_mid_run(make_fs: MakeFs, cache_dir: Path, s3_endpoint: S3Endpoint, s3_client: Any,
                                   s3_bucket: str) -> None:
    """``rm -rf`` of the cache directory while a filesystem and a Session use it."""
    url_a, data_a = put(s3_client, s3_bucket, "a.bin", 8 * BS + 5, seed=1)
    url_b, data_b = put(s3_client, s3_bucket, "b.bin", 8 * BS + 7, seed=2)
    fs = make_fs()
    assert fs.cat_file(url_a) == data_a
    fs.reader.flush()
    shutil.rmtree(cache_dir)
    fs.reader.drop_memory()
    assert within(60, fs.cat_file, url_a) == data_a  # blocks indexed before: files gone -> misses
    assert within(60, fs.cat_file, url_b) == data_b  # new blocks: written into a recreated tree
    fs.reader.flush()
    fs.reader.drop_memory()
    assert within(60, fs.cat_file, url_b) == data_b
    assert fs.stats()["corrupt_blocks"] == 0
    # A later process on the same path starts on whatever is there and still reads right.
    again = make_fs()
    assert within(60, again.cat_file, url_a) == data_a and within(60, again.cat_file, url_b) == data_b

    # The same under the engine: a query, the directory removed, the next query.
    rows = pa.table({"x": list(range(5000)), "y": [f"v{i}" for i in range(5000)]})
    buffer = io.BytesIO()
    pq.write_table(rows, buffer, row_group_size=500)
    s3_client.put_object(Bucket=s3_bucket, Key="t/part-0.parquet", Body=buffer.getvalue())
    query = f"SELECT count(*) AS n, sum(x) AS s, max(y) AS m FROM 's3://{s3_bucket}/t/*.parquet'"
    expected = duckdb.sql("SELECT count(*) AS n, sum(x) AS s, max(y) AS m FROM rows").to_arrow_table().to_pylist()
    config = CacheConfig(directory=cache_dir / "engine", block_size=BS)
    with Session(workers=2, cache=config, store=store_config(s3_endpoint)) as s:
        assert within(60, s.sql, query).table.to_pylist() == expected
        # The cache is filled after the result: let that finish first, or rmtree
        # races the writer's new files ("directory not empty").
        s.fs.reader.flush()
        shutil.rmtree(cache_dir / "engine")
        assert within(60, s.sql, query).table.to_pylist() == expected


def test_cache_dir_replaced_by_a_file_mid_run(make_fs: MakeFs, cache_dir: Path, s3_client: Any, s3_bucket: str,
                                              caplog: pytest.LogCaptureFixture) -> None:
    """The directory becomes a regular file (unwritable for root too): reads go through, one warning."""
    url_a, data_a = put(s3_client, s3_bucket, "a.bin", 6 * BS, seed=3)
    url_b, data_b = put(s3_client, s3_bucket, "b.bin", 6 * BS + 1, seed=4)
    fs = make_fs()
    assert fs.cat_file(url_a) == data_a
    fs.reader.flush()
    shutil.rmtree(cache_dir)
    cache_dir.write_bytes(b"not a directory any more")
    with caplog.at_level(logging.WARNING, logger=CACHE_LOGGER):
        for _ in range(2):
            fs.reader.drop_memory()
            assert within(60, fs.cat_file, url_a) == data_a
            assert within(60, fs.cat_file, url_b) == data_b
            fs.reader.flush()
    stats = fs.stats()
    assert stats["write_failures"] >= 1 and stats["degraded"] and stats["corrupt_blocks"] == 0
    warnings = [r for r in caplog.records if r.name == CACHE_LOGGER and r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    later = make_fs()  # a new process cannot open it at all: reads through
    assert within(60, later.cat_file, url_b) == data_b
    assert not later.stats()["enabled"]


def _drop_dac_capabilities() -> None:
    """In a child before exec: root without CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER
    (PR_CAPBSET_DROP), so that file modes bind it."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2, 3):
        if libc.prctl(24, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


_READ_ONLY_CHILD = _CHILD_PRELUDE + textwrap.dedent("""
    fs = make_fs()
    first, second = list(truth)
    ok = fs.cat_file(first) == truth[first]
    fs.reader.flush()
    print("READY", flush=True)
    sys.stdin.readline()            # the parent makes the cache read-only now
    fs.reader.drop_memory()
    ok &= fs.cat_file(first) == truth[first]
    ok &= fs.cat_file(second) == truth[second]
    fs.reader.flush()
    fs.reader.drop_memory()
    ok &= fs.cat_file(second) == truth[second]
    import threading
    done = []
    def fresh_thread():             # its SQLite connections open now, on read-only files
        fs.reader.cache.flush_stats()
        fs.reader.drop_memory()
        done.append(fs.cat_file(second) == truth[second])
    thread = threading.Thread(target=fresh_thread)
    thread.start()
    thread.join(60)
    ok &= done == [True]
    stats = fs.stats()
    fs.close()
    print(json.dumps({"ok": ok, **{k: stats[k] for k in ("write_failures", "degraded", "hits", "corrupt_blocks")}}))
""")


def test_cache_dir_made_read_only_mid_run(s3_endpoint: S3Endpoint, s3_client: Any, s3_bucket: str,
                                          cache_dir: Path, tmp_path: Path) -> None:
    url_a, data_a = put(s3_client, s3_bucket, "a.bin", 6 * BS, seed=5)
    url_b, data_b = put(s3_client, s3_bucket, "b.bin", 6 * BS + 3, seed=6)
    spec = child_spec(cache_dir, {url_a: data_a, url_b: data_b}, tmp_path)
    preexec = _drop_dac_capabilities if os.geteuid() == 0 else None
    proc = subprocess.Popen([sys.executable, "-c", _READ_ONLY_CHILD, json.dumps(spec)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=child_env(s3_endpoint, tmp_path), preexec_fn=preexec)
    try:
        line = within(60, proc.stdout.readline)  # type: ignore[union-attr]
        assert line.strip() == "READY", (line, proc.stderr.read() if proc.poll() is not None else "")  # type: ignore[union-attr]
        for path in [cache_dir, *cache_dir.rglob("*")]:
            path.chmod(0o555 if path.is_dir() else 0o444)
        out, err = proc.communicate("go\n", timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for path in [cache_dir, *cache_dir.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
    assert proc.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["ok"] and result["corrupt_blocks"] == 0
    assert result["write_failures"] >= 1 and result["degraded"]  # the new blocks could not be stored...
    assert result["hits"] >= 6  # ...while the blocks already there were still read from the cache
    assert "Traceback" not in err


# -- damaged block files ------------------------------------------------------------------------


def test_block_files_damaged_under_an_open_reader(make_fs: MakeFs, cache_dir: Path, s3_client: Any,
                                                  s3_bucket: str) -> None:
    """Block files flipped, truncated and emptied while the process that wrote them (and holds
    some of them open) keeps reading: every read is right, each damaged block is counted once,
    refetched and stored again."""
    url, data = put(s3_client, s3_bucket, "obj.bin", 6 * BS, seed=7)
    fs = make_fs()
    assert fs.cat_file(url) == data
    fs.reader.flush()
    fs.reader.drop_memory()
    assert fs.cat_file(url) == data  # from the SSD: the block files are now open in this process
    files = value_files(cache_dir)
    assert len(files) == 6
    damage = {files[1]: "flip", files[3]: "truncate", files[4]: "empty"}
    for path, kind in damage.items():
        raw = bytearray(path.read_bytes())
        if kind == "flip":
            raw[BS // 2] ^= 0x01
            path.write_bytes(bytes(raw))
        elif kind == "truncate":
            os.truncate(path, len(raw) - 1000)
        else:
            os.truncate(path, 0)
    fs.reader.drop_memory()
    before = fs.stats()
    assert within(60, fs.cat_file, url) == data
    stats = fs.stats()
    assert stats["corrupt_blocks"] - before["corrupt_blocks"] == 3  # each damaged block found once...
    assert stats["misses"] - before["misses"] == 3  # ...and fetched again, the others read from the SSD
    fs.reader.flush()
    fs.reader.drop_memory()
    for start in range(0, len(data), 7000):  # small reads verify only the chunks they cover
        assert fs.cat_file(url, start, start + 7000) == data[start : start + 7000]
    assert fs.stats()["misses"] == stats["misses"] and fs.stats()["corrupt_blocks"] == stats["corrupt_blocks"]
    fresh = make_fs()
    assert fresh.cat_file(url) == data
    assert fresh.stats()["store_requests"] == 0 and fresh.stats()["corrupt_blocks"] == 0


# -- two processes, one small cache -------------------------------------------------------------------


_EVICTING_CHILD = _CHILD_PRELUDE + textwrap.dedent("""
    fs = make_fs(size_limit=spec["limit"], memory_size=0)
    rng = random.Random(spec["seed"])
    urls = sorted(truth)
    bad = 0
    for n in range(100):
        url = rng.choice(urls)
        size = len(truth[url])
        start = rng.randrange(size)
        end = min(size, start + rng.randrange(1, 3 * spec["bs"]))
        bad += fs.cat_file(url, start, end) != truth[url][start:end]
    for url in urls:
        bad += fs.cat_file(url) != truth[url]
    stats = fs.stats()
    fs.close()
    print(json.dumps({"bad": bad, **{k: stats[k] for k in ("evictions", "corrupt_blocks", "read_failures",
                                                            "write_failures", "hits", "misses")}}))
""")


def test_two_processes_evicting_concurrently_under_a_small_limit(s3_endpoint: S3Endpoint, s3_client: Any,
                                                                  s3_bucket: str, cache_dir: Path,
                                                                  tmp_path: Path) -> None:
    """48 blocks in play, room for 8: each process evicts blocks the other is reading."""
    objects = dict(put(s3_client, s3_bucket, f"o{n}.bin", 16 * BS - 11 * n, seed=10 + n) for n in range(3))
    limit = 8 * BS
    procs = []
    for seed in (1, 2):
        spec = {**child_spec(cache_dir, objects, tmp_path), "limit": limit, "seed": seed}
        procs.append(subprocess.Popen([sys.executable, "-c", _EVICTING_CHILD, json.dumps(spec)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env=child_env(s3_endpoint, tmp_path)))
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    for result in results:
        assert result["bad"] == 0 and result["corrupt_blocks"] == 0, result
        assert result["read_failures"] == 0 and result["write_failures"] == 0, result
        assert result["evictions"] > 0 and result["hits"] > 0, result
    cache = BlockCache(CacheConfig(directory=cache_dir, block_size=BS, size_limit=limit))
    try:
        assert 0 < cache.volume() <= limit + 2 * BS  # a cull runs after each store: one block over at most
    finally:
        cache.close()


# -- killed while writing a block -----------------------------------------------------------------------


_KILLED_CHILD = _CHILD_PRELUDE + textwrap.dedent("""
    import diskcache.core
    mode, nth = spec["mode"], spec["nth"]
    original = diskcache.core.Disk._write
    calls = [0]
    def write(self, full_path, iterator, file_mode, encoding=None):
        calls[0] += 1
        if mode == "mid-file" and calls[0] == nth:
            # Half of the block's first chunk reaches the disk, then the process dies.
            os.makedirs(os.path.dirname(full_path), exist_ok=True)
            with open(full_path, file_mode) as partial:
                chunk = bytes(next(iterator))
                partial.write(chunk[: len(chunk) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        size = original(self, full_path, iterator, file_mode, encoding)
        if mode == "before-index" and calls[0] == nth:
            os.kill(os.getpid(), signal.SIGKILL)  # the file is complete but not yet in the index
        return size
    diskcache.core.Disk._write = write
    fs = make_fs()
    print("WRITING", flush=True)
    while True:  # "while-writing" runs until the parent kills it
        for url in sorted(truth):
            fs.cat_file(url)
            fs.reader.flush()
        fs.reader.cache.clear()
        fs.reader.drop_memory()
""")


@pytest.mark.parametrize("mode", ["mid-file", "before-index", "while-writing"])
def test_killed_during_a_cache_write_never_serves_a_partial_block(mode: str, s3_endpoint: S3Endpoint,
                                                                  s3_client: Any, s3_bucket: str, cache_dir: Path,
                                                                  tmp_path: Path, make_fs: MakeFs) -> None:
    """SIGKILL half-way through writing a block file, after writing it but before indexing it, or
    at some moment of a process that keeps writing (and clearing) blocks: after the restart every
    read is right and no damaged block is found in the index (none is ever served)."""
    objects = dict(put(s3_client, s3_bucket, f"o{n}.bin", 8 * BS + 100 * n, seed=20 + n) for n in range(2))
    spec = {**child_spec(cache_dir, objects, tmp_path), "mode": mode, "nth": 5}
    kill_after = random.Random(4).uniform(0.3, 1.0)  # "while-writing": when to kill (not an assertion)
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_CHILD, json.dumps(spec)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=child_env(s3_endpoint, tmp_path))
    try:
        assert within(60, proc.stdout.readline).strip() == "WRITING"  # type: ignore[union-attr]
        if mode == "while-writing":
            threading.Event().wait(kill_after)
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]
    assert proc.returncode == -signal.SIGKILL
    fs = make_fs()
    for url, data in objects.items():
        assert within(60, fs.cat_file, url) == data
    stats = fs.stats()
    assert stats["corrupt_blocks"] == 0  # no partial block made it into the index
    if mode != "while-writing":
        assert stats["hits"] == 4  # the four blocks stored before the killed write
    fs.reader.flush()
    fs.reader.drop_memory()
    for url, data in objects.items():
        assert fs.cat_file(url) == data
    assert fs.stats()["corrupt_blocks"] == 0
