"""Storage layer logic against ``memory://`` and ``file://`` sources (no servers)."""

from __future__ import annotations

import errno
import gc
import json
import logging
import os
import random
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import diskcache
import duckdb
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shoal.cache import (
    BlockCache,
    CacheConfig,
    ObjectChangedError,
    ObjectNotFoundError,
    ShoalFileSystem,
    StorageConfigError,
    StoreConfig,
    parse_size,
)
from shoal.cache.blockfile import CHUNK, Corrupt, OpenBlock, Sealed
from shoal.cache.index import ObjectIndex
from shoal.cache.reader import BlockReader
from shoal.cache.threadlocal import ThreadSlots

BS = 64 * 1024  # > diskcache's 32 KiB inline limit, so blocks live in .val files
CACHE_LOGGER = "shoal.cache.blockcache"

MakeFs = Callable[..., ShoalFileSystem]


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.fixture
def mem() -> Iterator[tuple[fsspec.AbstractFileSystem, str]]:
    """fsspec's (process-global) memory fs and a unique prefix, removed afterwards."""
    fs = fsspec.filesystem("memory")
    prefix = f"/t-{uuid.uuid4().hex}"
    yield fs, prefix
    if fs.exists(prefix):
        fs.rm(prefix, recursive=True)


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def make_fs(cache_dir: Path) -> Iterator[MakeFs]:
    """New ShoalFileSystems (fresh process memory tier) over one cache dir; closed at the end."""
    made: list[ShoalFileSystem] = []

    def make(**config: Any) -> ShoalFileSystem:
        config = {"directory": cache_dir, "block_size": BS, "readahead_blocks": 0, **config}
        fs = ShoalFileSystem(cache=CacheConfig(**config), store=StoreConfig(), protocols=("memory", "file"))
        made.append(fs)
        return fs

    yield make
    for fs in made:
        fs.close()


def put_object(mem: tuple[fsspec.AbstractFileSystem, str], name: str, data: bytes) -> str:
    fs, prefix = mem
    fs.pipe(f"{prefix}/{name}", data)
    return f"memory://{prefix}/{name}"


def overwrite(mem: tuple[fsspec.AbstractFileSystem, str], name: str, data: bytes) -> None:
    # Memory objects are versioned by creation time (microseconds): let the clock tick.
    time.sleep(0.002)
    put_object(mem, name, data)


# -- configuration ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("20GB", 20 * 10**9), ("512MiB", 512 << 20), ("4m", 4 * 10**6), ("1.5KiB", 1536),
     (" 7 kb ", 7000), ("123", 123), (123, 123), ("2TiB", 2 << 40)],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "abc", "12XB", "-1", "1e3", -1, "GB"])
def test_parse_size_rejects_bad_values(bad: str | int) -> None:
    with pytest.raises(StorageConfigError) as info:
        parse_size(bad)
    assert isinstance(info.value, ValueError)


def test_cache_config_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    default = CacheConfig.from_env({})
    assert default.directory == tmp_path / "xdg" / "shoal"
    assert default.enabled and default.size_limit == CacheConfig().size_limit

    env = {"SHOAL_CACHE_DIR": str(tmp_path / "env"), "SHOAL_CACHE_SIZE": "1GiB",
           "SHOAL_CACHE_BLOCK_SIZE": "1MiB", "SHOAL_CACHE": "off"}
    from_env = CacheConfig.from_env(env)
    assert (from_env.directory, from_env.size_limit, from_env.block_size, from_env.enabled) == (
        tmp_path / "env", 1 << 30, 1 << 20, False)

    explicit = CacheConfig.from_env(env, directory=tmp_path / "x", size_limit="2GiB",
                                    block_size=None, max_request_size="8MiB")
    assert explicit.directory == tmp_path / "x"
    assert explicit.size_limit == 2 << 30
    assert explicit.block_size == 1 << 20  # None means "not given": env still applies
    assert explicit.max_request_size == 8 << 20

    monkeypatch.setenv("SHOAL_CACHE_SIZE", "3GB")
    assert CacheConfig.from_env().size_limit == 3 * 10**9  # os.environ is the default env


@pytest.mark.parametrize(
    ("env", "overrides"),
    [({"SHOAL_CACHE_SIZE": "lots"}, {}), ({"SHOAL_CACHE_BLOCK_SIZE": "5000"}, {}),
     ({}, {"block_size": 3 * 4096}), ({}, {"block_size": 1024}),
     ({}, {"size_limit": 4096, "block_size": 8192}), ({}, {"max_concurrency": 0}),
     ({}, {"readahead_blocks": -1})],
)
def test_cache_config_rejects_bad_values(env: dict[str, str], overrides: dict[str, Any],
                                         tmp_path: Path) -> None:
    with pytest.raises(StorageConfigError):
        CacheConfig.from_env(env, directory=tmp_path, **overrides)


def test_store_config_from_env() -> None:
    env = {"AWS_ENDPOINT_URL_S3": "http://s3only:1", "AWS_ENDPOINT_URL": "http://all:2",
           "AWS_REGION": "eu-west-3", "AWS_DEFAULT_REGION": "us-west-1"}
    config = StoreConfig.from_env(env)
    assert (config.endpoint_url, config.region, config.anonymous) == ("http://s3only:1", "eu-west-3", False)
    assert StoreConfig.from_env({"AWS_ENDPOINT_URL": "http://all:2"}).endpoint_url == "http://all:2"
    assert StoreConfig.from_env({"AWS_DEFAULT_REGION": "us-west-1"}).region == "us-west-1"
    assert StoreConfig.from_env({"SHOAL_S3_ANONYMOUS": "true"}).anonymous

    explicit = StoreConfig.from_env(env, endpoint_url="http://mine:3", region="ap-south-1",
                                    access_key="AK", secret_key="SK")
    assert (explicit.endpoint_url, explicit.region) == ("http://mine:3", "ap-south-1")
    options = explicit.s3fs_options()
    assert options["endpoint_url"] == "http://mine:3" and options["secret"] == "SK"
    # Plain HTTP has no TLS to verify: the client skips loading the CA bundle.
    assert options["client_kwargs"] == {"region_name": "ap-south-1", "verify": False}
    secure = StoreConfig(endpoint_url="https://s3.example:443", region="ap-south-1").s3fs_options()
    assert secure["client_kwargs"] == {"region_name": "ap-south-1"}  # TLS: verified (botocore's default)
    assert "verify" not in StoreConfig(region="eu-west-1").s3fs_options()["client_kwargs"]  # AWS: https
    assert StoreConfig.from_env({}) == StoreConfig()


def test_store_config_never_shows_secrets() -> None:
    config = StoreConfig(endpoint_url="http://e:1", access_key="AKIDSHOWN",
                         secret_key="s3cr3t-value", session_token="t0ken-value")
    for text in (repr(config), str(config), config.store_id):
        assert "s3cr3t-value" not in text and "t0ken-value" not in text
    assert "anon" in StoreConfig(anonymous=True, access_key="a", secret_key="b").s3fs_options()
    assert "secret" not in StoreConfig(anonymous=True, access_key="a", secret_key="b").s3fs_options()


# -- reads, cold and warm -------------------------------------------------------


@pytest.mark.parametrize(("max_request_blocks", "requests"), [(256, 1), (4, 3), (1, 11)])
def test_cold_read_fills_cache_with_coalesced_requests(
    mem: Any, make_fs: MakeFs, max_request_blocks: int, requests: int
) -> None:
    data = payload(10 * BS + 100)
    url = put_object(mem, "obj", data)
    fs = make_fs(max_request_size=max_request_blocks * BS)
    assert fs.cat_file(url) == data
    stats = fs.stats()
    assert (stats["misses"], stats["hits"], stats["store_requests"]) == (11, 0, requests)
    assert stats["bytes_from_store"] == len(data) == fs.source("memory").bytes_fetched
    assert fs.source("memory").requests == requests
    fs.reader.flush()
    assert fs.reader.cache.entries() == 11
    io = fs.reader.ledger.snapshot()[url]
    assert (io.blocks_missed, io.store_requests, io.bytes_from_store) == (11, requests, len(data))


def test_held_writes_wait_for_the_release_and_are_read_from_memory(
    mem: Any, make_fs: MakeFs, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = payload(6 * BS)
    url = put_object(mem, "obj", data)
    fs = make_fs()
    ran: list[int] = []
    with fs.reader.hold_writes():
        with fs.reader.hold_writes():  # holds nest
            assert fs.cat_file(url) == data
        fs.reader.after_writes(lambda: ran.append(fs.reader.cache.entries()))
        fs.reader.flush()
        assert fs.reader.cache.entries() == 0 and ran == []  # nothing written yet
        assert fs.cat_file(url) == data  # served from memory meanwhile
        assert fs.stats()["store_requests"] == 1
    fs.reader.flush()
    # Released in order: the blocks, then the job queued after them.
    assert fs.reader.cache.entries() == 6 and ran == [6]

    # Past the cap on held bytes, held writes go at once and the rest write behind.
    monkeypatch.setattr("shoal.cache.writebehind._MAX_HELD_WRITE_BYTES", 2 * BS)
    other = put_object(mem, "other", payload(4 * BS, seed=1))
    fresh = make_fs(directory=fs.reader.config.directory.parent / "second")
    ran.clear()
    with fresh.reader.hold_writes():
        assert fresh.cat_file(other) == payload(4 * BS, seed=1)
        fresh.reader.after_writes(lambda: ran.append(fresh.reader.cache.entries()))
        fresh.reader.flush()
        assert fresh.reader.cache.entries() == 4 and ran == [4]  # nothing left held
    with fresh.reader.hold_writes():  # a new hold holds again
        fresh.reader.drop_memory()
        again = put_object(mem, "again", payload(BS, seed=2))
        fresh.cat_file(again)
        fresh.reader.flush()
        assert fresh.reader.cache.entries() == 4
    fresh.reader.flush()
    assert fresh.reader.cache.entries() == 5


def test_a_rescan_inside_a_hold_reads_from_memory(mem: Any, make_fs: MakeFs) -> None:
    """A sequential reader lets go of the blocks it passed (the SSD has them), except
    while writes are held: they are not on the SSD yet, and a second scan of the
    file in the same query would fetch them again."""
    data = payload(6 * BS)
    url = put_object(mem, "obj", data)
    fs = make_fs(readahead_blocks=2)
    with fs.reader.hold_writes():
        for _ in range(2):
            with fs.open(url, "rb") as f:
                assert b"".join(iter(lambda: f.read(BS), b"")) == data
        assert fs.stats()["bytes_from_store"] == len(data)
    fs.close()  # waits for read-ahead, then for the writes
    warm = make_fs()
    assert warm.cat_file(url) == data and warm.stats()["bytes_from_store"] == 0


def test_warm_read_from_new_filesystem_needs_no_store(mem: Any, make_fs: MakeFs) -> None:
    data = payload(10 * BS + 100)
    url = put_object(mem, "obj", data)
    cold = make_fs()
    assert cold.cat_file(url) == data
    assert cold.cat_file(url) == data  # second read in-process: memory tier
    assert cold.stats()["hits"] == 0 and cold.stats()["store_requests"] == 1
    assert cold.reader.ledger.snapshot()[url].bytes_from_memory == len(data)
    cold.close()

    warm = make_fs()
    assert warm.cat_file(url) == data
    stats = warm.stats()
    assert (stats["hits"], stats["misses"], stats["store_requests"]) == (11, 0, 0)
    assert stats["bytes_from_cache"] == len(data) and stats["bytes_from_store"] == 0
    assert warm.source("memory").requests == 0


SIZE = 5 * BS + 1234


@pytest.mark.parametrize(
    ("start", "end"),
    [(0, 1), (BS - 1, BS + 1), (BS, 2 * BS), (3 * BS - 10, 5 * BS + 10), (SIZE - 5, SIZE),
     (SIZE - 5, SIZE + 100), (SIZE, SIZE + 10), (SIZE + 10, SIZE + 20), (7, 7), (10, 5),
     (0, SIZE), (-10, None), (None, 5)],
)
def test_ranges_across_blocks_and_eof(mem: Any, make_fs: MakeFs, start: Any, end: Any) -> None:
    data = payload(SIZE, seed=1)
    url = put_object(mem, "obj", data)
    for fs in (make_fs(), make_fs()):  # cold, then warm from the SSD tier
        assert fs.cat_file(url, start, end) == data[start:end]
        fs.reader.flush()


def test_file_object_seek_read(mem: Any, make_fs: MakeFs) -> None:
    data = payload(SIZE, seed=2)
    url = put_object(mem, "obj", data)
    with make_fs(readahead_blocks=2).open(url) as f:
        assert f.seekable() and f.readable()
        f.seek(BS - 3)
        assert f.read(6) == data[BS - 3 : BS + 3] and f.tell() == BS + 3
        f.seek(-4, os.SEEK_END)
        assert f.read(100) == data[-4:] and f.read(10) == b"" and f.read() == b""
        f.seek(SIZE + 50)
        assert f.read(10) == b""
        f.seek(2, os.SEEK_SET)
        f.seek(3, os.SEEK_CUR)
        buffer = bytearray(BS + 7)
        assert f.readinto(buffer) == BS + 7 and bytes(buffer) == data[5 : BS + 12]
        f.seek(0)
        assert f.read() == data
        with pytest.raises(ValueError):
            f.seek(-1)


def test_missing_object_is_a_clear_error(mem: Any, make_fs: MakeFs) -> None:
    with pytest.raises(ObjectNotFoundError) as info:
        make_fs().cat_file(f"memory://{mem[1]}/nope")
    assert isinstance(info.value, FileNotFoundError) and "nope" in str(info.value)


# -- versions -------------------------------------------------------------------


def test_overwrite_returns_new_bytes(mem: Any, make_fs: MakeFs) -> None:
    old, new = payload(3 * BS, seed=3), payload(3 * BS, seed=4)  # same size: only the version differs
    url = put_object(mem, "obj", old)
    fs = make_fs()
    assert fs.cat_file(url) == old
    fs.reader.flush()
    overwrite(mem, "obj", new)
    assert fs.cat_file(url) == new
    assert fs.cat_file(url, BS - 5, BS + 5) == new[BS - 5 : BS + 5]
    with fs.open(url) as f:
        assert f.read() == new
    fs.reader.flush()
    other = make_fs()
    assert other.cat_file(url) == new
    assert other.stats()["store_requests"] == 0  # the new version's blocks are cached too


def test_snapshot_pins_version_and_refuses_torn_reads(mem: Any, make_fs: MakeFs) -> None:
    old, new = payload(4 * BS, seed=5), payload(4 * BS, seed=6)
    url = put_object(mem, "obj", old)
    fs = make_fs()
    with fs.snapshot():
        assert fs.info(url)["size"] == len(old)
        assert fs.cat_file(url, 0, BS) == old[:BS]
        overwrite(mem, "obj", new)
        with fs.snapshot():  # nested: still the outer query's pins
            assert fs.cat_file(url, 0, 10) == old[:10]
        with pytest.raises(ObjectChangedError):
            fs.cat_file(url)  # blocks 1..3 would come from the new version
        with pytest.raises(ObjectChangedError), fs.open(url) as f:
            f.seek(2 * BS)
            f.read(10)
        assert fs.cat_file(url, 0, BS) == old[:BS]  # what was read stays the old version
    assert fs.cat_file(url) == new


def test_snapshot_read_in_full_stays_consistent(mem: Any, make_fs: MakeFs) -> None:
    old, new = payload(2 * BS, seed=7), payload(2 * BS + 1, seed=8)
    url = put_object(mem, "obj", old)
    fs = make_fs()
    with fs.snapshot():
        assert fs.glob(f"memory://{mem[1]}/*") == [url]
        assert fs.cat_file(url) == old
        overwrite(mem, "obj", new)
        assert fs.cat_file(url) == old and fs.size(url) == len(old)
    assert fs.cat_file(url) == new and fs.size(url) == len(new)


# -- eviction, corruption, degraded cache ----------------------------------------


def test_eviction_under_small_limit(mem: Any, make_fs: MakeFs) -> None:
    data = payload(20 * BS, seed=9)
    url = put_object(mem, "obj", data)
    fs = make_fs(size_limit=4 * BS, max_request_size=BS)
    for index in range(20):
        assert fs.cat_file(url, index * BS, (index + 1) * BS) == data[index * BS : (index + 1) * BS]
        fs.reader.flush()
        assert fs.reader.cache.volume() <= 5 * BS
    stats = fs.stats()
    assert stats["evictions"] >= 16 and stats["misses"] == 20
    assert fs.reader.cache.entries() <= 4
    assert stats["volume"] <= 5 * BS


def _value_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*.val") if "stats" not in p.parts)


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_corrupt_block_is_refetched(mem: Any, make_fs: MakeFs, cache_dir: Path, damage: str) -> None:
    data = payload(4 * BS, seed=10)
    url = put_object(mem, "obj", data)
    first = make_fs()
    assert first.cat_file(url) == data
    first.close()
    files = _value_files(cache_dir)
    assert len(files) == 4
    victim = files[2]
    raw = bytearray(victim.read_bytes())
    if damage == "flip":
        raw[100] ^= 0xFF
        victim.write_bytes(bytes(raw))
    elif damage == "truncate":
        victim.write_bytes(bytes(raw[: len(raw) // 2]))
    else:
        victim.write_bytes(b"")

    second = make_fs()
    assert second.cat_file(url) == data
    stats = second.stats()
    assert (stats["corrupt_blocks"], stats["hits"], stats["misses"], stats["store_requests"]) == (1, 3, 1, 1)
    assert stats["errors"] == 1
    second.close()
    third = make_fs()
    assert third.cat_file(url) == data
    assert third.stats()["store_requests"] == 0 and third.stats()["corrupt_blocks"] == 0


@pytest.mark.parametrize("chunk_index", [0, 9, 31])
def test_large_reads_verify_every_chunk(mem: Any, make_fs: MakeFs, cache_dir: Path, chunk_index: int) -> None:
    """A read of a whole 2 MiB block verifies each of its 64 KiB chunks: a flipped
    byte in the first, a middle or the last chunk is caught, the block refetched,
    and the bytes returned are the object's."""
    bs = 2 << 20
    data = payload(2 * bs, seed=12)
    url = put_object(mem, "big", data)
    first = make_fs(block_size=bs)
    assert first.cat_file(url) == data
    first.close()
    victim = _value_files(cache_dir)[0]
    raw = bytearray(victim.read_bytes())
    raw[chunk_index * CHUNK + 777] ^= 0x01
    victim.write_bytes(bytes(raw))
    second = make_fs(block_size=bs)
    assert second.cat_file(url) == data
    assert (second.stats()["corrupt_blocks"], second.stats()["store_requests"]) == (1, 1)


def test_a_block_file_cut_short_after_it_was_opened_is_corrupt(tmp_path: Path) -> None:
    """The footer is checked when a block file is opened; a file truncated later
    (another process, a failing disk) makes the next large read raise, not return
    the bytes it could still read."""
    data = payload(3 << 20, seed=13)
    path = tmp_path / "block"
    with open(path, "wb") as f:
        sealed = Sealed(data)
        while part := sealed.read(1 << 20):
            f.write(part)
    block = OpenBlock(os.open(path, os.O_RDONLY))
    assert bytes(block.read(0, None)) == data
    assert bytes(block.read(5, 1 << 20)) == data[5 : 1 << 20]
    os.truncate(path, 2 << 20)
    with pytest.raises(Corrupt, match="truncated"):
        block.read(0, None)


def _cache_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == CACHE_LOGGER and r.levelno == logging.WARNING]


def test_unusable_cache_directory_reads_through(
    mem: Any, tmp_path: Path, make_fs: MakeFs, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_bytes(b"a regular file")  # root ignores chmod; a file parent stops mkdir
    data = payload(3 * BS + 1, seed=11)
    url = put_object(mem, "obj", data)
    with caplog.at_level(logging.WARNING, logger=CACHE_LOGGER):
        fs = make_fs(directory=blocker / "cache")
        assert fs.cat_file(url) == data
        fs.reader.drop_memory()
        assert fs.cat_file(url) == data
    stats = fs.stats()
    assert stats["degraded"] and not stats["enabled"] and stats["write_failures"] >= 1
    assert stats["store_requests"] == 2 and stats["volume"] == 0
    assert len(_cache_warnings(caplog)) == 1


def test_full_disk_reads_through(
    mem: Any, make_fs: MakeFs, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def disk_full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    data = payload(10 * BS, seed=12)
    url = put_object(mem, "obj", data)
    fs = make_fs()
    monkeypatch.setattr(diskcache.Cache, "set", disk_full)
    with caplog.at_level(logging.WARNING, logger=CACHE_LOGGER):
        assert fs.cat_file(url) == data
        fs.reader.flush()
        fs.reader.drop_memory()
        assert fs.cat_file(url) == data
        fs.reader.flush()
    stats = fs.stats()
    assert stats["degraded"] and stats["write_failures"] >= 1 and stats["errors"] >= 1
    assert stats["store_requests"] == 2 and fs.reader.cache.entries() == 0
    assert len(_cache_warnings(caplog)) == 1


def test_failing_cache_reads_are_misses(
    mem: Any, make_fs: MakeFs, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    data = payload(2 * BS, seed=13)
    url = put_object(mem, "obj", data)
    make_fs().cat_file(url)

    def locked(*args: Any, **kwargs: Any) -> None:
        raise sqlite3.OperationalError("database is locked")

    fs = make_fs()
    monkeypatch.setattr(diskcache.Cache, "get", locked)
    monkeypatch.setattr(ObjectIndex, "_load", locked)  # the bulk lookup fails too (then per-block ones are tried)
    with caplog.at_level(logging.WARNING, logger=CACHE_LOGGER):
        assert fs.cat_file(url) == data
    stats = fs.stats()
    assert stats["read_failures"] == 2 and stats["degraded"] and stats["misses"] == 2
    assert len(_cache_warnings(caplog)) == 1


def test_disabled_cache_reads_through(mem: Any, make_fs: MakeFs, cache_dir: Path) -> None:
    data = payload(2 * BS, seed=14)
    url = put_object(mem, "obj", data)
    fs = make_fs(enabled=False)
    for _ in range(2):
        fs.reader.drop_memory()
        assert fs.cat_file(url) == data
    stats = fs.stats()
    assert stats["store_requests"] == 2 and not stats["degraded"] and stats["errors"] == 0
    assert not cache_dir.exists()


def test_local_files_are_not_cached_unless_asked(tmp_path: Path, make_fs: MakeFs) -> None:
    data = payload(3 * BS, seed=15)
    path = tmp_path / "local.bin"
    path.write_bytes(data)
    plain = make_fs()
    assert plain.cat_file(f"file://{path}", 10, 2 * BS) == data[10 : 2 * BS]
    plain.reader.flush()
    assert plain.reader.cache.entries() == 0 and plain.stats()["misses"] == 0
    cached = make_fs(cache_local_files=True)
    assert cached.cat_file(f"file://{path}") == data
    cached.reader.flush()
    assert cached.reader.cache.entries() == 3


# -- concurrency and several processes --------------------------------------------

_WORKER = textwrap.dedent(
    """
    import json, random, sys
    from shoal.cache import CacheConfig, ShoalFileSystem
    cache_dir, seed, *paths = sys.argv[1:]
    originals = {p: open(p, "rb").read() for p in paths}
    fs = ShoalFileSystem(cache=CacheConfig(directory=cache_dir, block_size=%d, size_limit=%d,
                         memory_size=0, readahead_blocks=0, cache_local_files=True),
                         protocols=("file",))
    rng = random.Random(int(seed))
    bad = 0
    for _ in range(1000):
        path = rng.choice(paths)
        size = len(originals[path])
        start = rng.randrange(size)
        end = start + rng.randrange(1, 3 * %d)
        bad += fs.cat_file("file://" + path, start, end) != originals[path][start:end]
    bad += fs.cat_file("file://" + paths[0]) != originals[paths[0]]
    fs.close()
    print(json.dumps({"bad": bad, **fs.reader.metrics.snapshot()}))
    """
)


def test_two_processes_share_one_cache_dir(tmp_path: Path, cache_dir: Path) -> None:
    paths = []
    for n in range(3):
        path = tmp_path / f"obj{n}.bin"
        path.write_bytes(payload(16 * BS + 17 * n, seed=20 + n))
        paths.append(str(path))
    size_limit = 32 * BS  # 48+ blocks in play: processes evict under each other
    script = _WORKER % (BS, size_limit, BS)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(cache_dir), str(seed), *paths],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed in (1, 2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    for result in results:
        assert result["bad"] == 0
        assert result["corrupt_blocks"] == 0 and result["write_failures"] == 0
        assert result["read_failures"] == 0 and not result["degraded"]
        assert result["hits"] > 0 and result["misses"] > 0
    cache = BlockCache(CacheConfig(directory=cache_dir, block_size=BS, size_limit=size_limit))
    try:
        # Entries are blocks, pieces and piece indexes: the bound that holds is the volume.
        assert cache.entries() > 0
        assert cache.volume() <= size_limit + 2 * BS
        persisted = cache.persisted_stats()
        for name in ("hits", "misses", "bytes_from_store", "bytes_from_cache", "store_requests", "evictions"):
            assert persisted[name] == sum(r[name] for r in results), name
    finally:
        cache.close()


def test_persisted_stats_accumulate(mem: Any, make_fs: MakeFs, cache_dir: Path) -> None:
    data = payload(3 * BS, seed=30)
    url = put_object(mem, "obj", data)
    for _ in range(2):
        fs = make_fs()
        fs.cat_file(url)
        fs.reader.cache.flush_stats()
        fs.reader.cache.flush_stats()  # a second flush adds nothing new
        fs.close()
    cache = BlockCache(CacheConfig(directory=cache_dir, block_size=BS))
    try:
        stats = cache.persisted_stats()
        assert (stats["misses"], stats["hits"], stats["store_requests"]) == (3, 3, 1)
        assert stats["bytes_from_store"] == stats["bytes_from_cache"] == len(data)
        cache.clear()
        assert cache.persisted_stats()["hits"] == 0 and cache.entries() == 0
    finally:
        cache.close()


def test_threads_share_one_file_with_own_positions(mem: Any, make_fs: MakeFs) -> None:
    data = payload(12 * BS + 5, seed=31)
    url = put_object(mem, "obj", data)
    fs = make_fs(readahead_blocks=4, memory_size=4 * BS)
    f = fs.open(url)
    barrier = threading.Barrier(8)
    failures: list[str] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        barrier.wait()
        try:
            for _ in range(100):
                start, length = rng.randrange(len(data)), rng.randrange(1, 2 * BS)
                f.seek(start)
                if f.read(length) != data[start : start + length] or f.tell() != min(start + length, len(data)):
                    failures.append(f"thread {seed} at {start}+{length}")
        except Exception as exc:  # noqa: BLE001 - reported below
            failures.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    f.close()
    assert failures == []


# -- DuckDB and pyarrow through the filesystem -----------------------------------------


@pytest.fixture
def parquet_file(tmp_path: Path) -> tuple[Path, pa.Table]:
    rows = 12_000
    rng = random.Random(40)
    table = pa.table({
        "id": pa.array(range(rows), pa.int64()),
        "big": pa.array([rng.randbytes(150).hex() for _ in range(rows)]),
        "small": pa.array([i % 7 for i in range(rows)], pa.int8()),
    })
    path = tmp_path / "t.parquet"
    pq.write_table(table, path, row_group_size=1000, compression="none")
    return path, table


def test_duckdb_reads_parquet_through_fs(mem: Any, make_fs: MakeFs, parquet_file: Any) -> None:
    path, _ = parquet_file
    url = put_object(mem, "t.parquet", path.read_bytes())
    query = "SELECT id, small, md5(big) FROM read_parquet('{}') ORDER BY id"
    expected = duckdb.connect().sql(query.format(path)).fetchall()
    for warm in (False, True):
        fs = make_fs()
        con = duckdb.connect()
        con.register_filesystem(fs)
        assert con.sql(query.format(url)).fetchall() == expected
        assert con.sql(f"SELECT sum(small) FROM '{url}' WHERE id >= 11000").fetchall() == [
            (sum(i % 7 for i in range(11000, 12000)),)]
        con.close()
        fs.reader.flush()
        assert (fs.stats()["store_requests"] == 0) == warm


def test_pyarrow_projection_fetches_only_needed_ranges(
    mem: Any, make_fs: MakeFs, parquet_file: Any
) -> None:
    path, table = parquet_file
    url = put_object(mem, "t.parquet", path.read_bytes())
    fs = make_fs()
    read = pq.read_table(url, filesystem=fs.to_pyarrow(), columns=["small"])
    assert read.equals(table.select(["small"]))
    stats = fs.stats()
    assert 0 < stats["bytes_from_store"] < path.stat().st_size / 2
    assert stats["misses"] < path.stat().st_size // BS


def test_old_blocks_are_promoted_on_hit(tmp_path, monkeypatch) -> None:
    """Least-recently-stored eviction + re-storing hit blocks older than PROMOTE_AFTER_S
    approximates LRU without a database write per read."""
    from shoal.cache import blockcache

    cache = blockcache.BlockCache(CacheConfig(directory=tmp_path / "c", block_size=64 * 1024))
    block = bytes(range(256)) * 512
    assert cache.put("k", block)
    promoted: list[str] = []
    cache.on_promote = promoted.append
    assert bytes(cache.get("k")) == block
    assert promoted == []
    monkeypatch.setattr(blockcache, "PROMOTE_AFTER_S", -1.0)
    assert bytes(cache.read_range("k", 10, 20)) == block[10:20]
    assert promoted == ["k"]
    cache.on_promote = None
    cache.promote("k")
    assert bytes(cache.get("k", promote=False)) == block
    cache.close()


def test_scattered_reads_fetch_exact_pieces_and_warm_reads_need_no_store(tmp_path) -> None:
    """Parquet-like reads (column chunks here and there) fetch only their bytes;
    a read spanning two stored pieces of one block is assembled from both."""
    mem = fsspec.filesystem("memory")
    data = os.urandom(1 << 20)
    with mem.open("/pieces/obj", "wb") as f:
        f.write(data)
    url = "memory:///pieces/obj"
    config = CacheConfig(directory=tmp_path / "c", block_size=256 * 1024)
    ranges = [(1000, 5000), (300_000, 301_000), (5000, 9000)]
    cold = ShoalFileSystem(cache=config, protocols=("memory",))
    with cold.open(url, "rb") as handle:
        for start, end in ranges:
            handle.seek(start)
            assert handle.read(end - start) == data[start:end]
    assert cold.stats()["bytes_from_store"] == sum(e - s for s, e in ranges)
    cold.close()
    warm = ShoalFileSystem(cache=config, protocols=("memory",))
    assert warm.cat_file(url, 1000, 9000) == data[1000:9000]  # two pieces, one read
    assert warm.cat_file(url, 300_100, 300_900) == data[300_100:300_900]
    assert warm.stats()["store_requests"] == 0
    # A sequential reader gets whole blocks (and read-ahead).
    with warm.open(url, "rb") as handle:
        assert handle.read(64 * 1024) == data[: 64 * 1024]
    warm.reader.flush()
    assert warm.stats()["bytes_from_store"] >= 256 * 1024
    warm.close()


def test_cached_range_uses_the_whole_block_where_its_pieces_fall_short(tmp_path) -> None:
    """A block stored as a piece and later whole (a scan's pieces, then a
    sequential reader's block): a cached-range lookup (what local copies are made
    from) falls back to the whole block where the pieces do not cover the range."""
    mem = fsspec.filesystem("memory")
    data = os.urandom(600_000)
    with mem.open("/both/obj", "wb") as f:
        f.write(data)
    url = "memory:///both/obj"
    config = CacheConfig(directory=tmp_path / "c", block_size=256 * 1024, readahead_blocks=0)
    cold = ShoalFileSystem(cache=config, protocols=("memory",))
    assert cold.cat_file(url, 1000, 5000) == data[1000:5000]  # a piece of block 0
    with cold.open(url, "rb") as handle:  # then block 0 whole
        assert handle.read(256 * 1024) == data[: 256 * 1024]
    cold.close()
    warm = ShoalFileSystem(cache=config, protocols=("memory",))
    assert warm.cat_file(url, 2000, 3000) == data[2000:3000]  # learns block 0 has pieces
    assert warm.reader.cache.known_partial(f"{warm._cached_object(url)[1]}:0")
    assert warm.cached_range(url, 0, 200_000) == data[:200_000]
    assert warm.stats()["store_requests"] == 0
    warm.close()


def test_prefetched_ranges_serve_later_reads(tmp_path) -> None:
    mem = fsspec.filesystem("memory")
    data = os.urandom(600_000)
    with mem.open("/pf/obj", "wb") as f:
        f.write(data)
    url = "memory:///pf/obj"
    fs = ShoalFileSystem(cache=CacheConfig(directory=tmp_path / "c", block_size=256 * 1024), protocols=("memory",))
    assert fs.prefetch(url, [(10, 20_000), (20_050, 40_000), (500_000, 600_000)]) == 600_000 - 500_000 + 40_000 - 10
    # Reads wait for the pieces in flight (or read them from the SSD) instead of fetching again.
    assert fs.cat_file(url, 100, 39_000) == data[100:39_000]
    assert fs.cat_file(url, 510_000, 600_000) == data[510_000:]
    # The two close ranges were merged; the third crosses a block boundary in one GET.
    assert fs.stats()["store_requests"] == 2
    assert fs.stats()["bytes_from_store"] == 600_000 - 500_000 + 40_000 - 10
    fs.close()


def test_prefetched_pieces_are_kept_in_memory_without_a_cache(tmp_path) -> None:
    mem = fsspec.filesystem("memory")
    data = os.urandom(300_000)
    with mem.open("/nocache/obj", "wb") as f:
        f.write(data)
    url = "memory:///nocache/obj"
    fs = ShoalFileSystem(cache=CacheConfig(directory=tmp_path / "c", enabled=False, block_size=64 * 1024),
                         protocols=("memory",))
    fs.prefetch(url, [(1000, 200_000)])
    assert fs.cat_file(url, 5000, 150_000) == data[5000:150_000]
    assert fs.stats()["store_requests"] == 1
    fs.close()


def test_sequential_small_reads_stay_verified_and_counted(mem: Any, make_fs: MakeFs, cache_dir: Path) -> None:
    """A scan reading a warm block in small pieces keeps the block's file open
    (the cursor): its reads are still checked chunk by chunk, so a block file
    damaged under an open reader is caught, discarded and refetched, and the
    reads are counted as hits once the file is closed."""
    data = payload(4 * BS, seed=21)
    url = put_object(mem, "scan", data)
    first = make_fs()
    assert first.cat_file(url) == data
    first.close()

    fs = make_fs()
    step = BS // 8
    out = bytearray()
    with fs.open(url, "rb") as f:
        for n in range(8 * 4):
            if n == 8 + 2:  # inside block 1, whose file the cursor holds open
                victim = next(p for p in _value_files(cache_dir) if p.read_bytes()[:64] == data[BS : BS + 64])
                raw = bytearray(victim.read_bytes())
                raw[5 * step + 7] ^= 0xFF  # a chunk this reader has not read yet
                victim.write_bytes(bytes(raw))  # same inode: the open file sees it
            out += f.read(step)
    assert bytes(out) == data
    stats = fs.stats()
    assert stats["corrupt_blocks"] == 1
    assert stats["store_requests"] == 1  # only the damaged block came from the store
    assert stats["bytes_from_cache"] + stats["bytes_from_store"] >= len(data)
    assert stats["hits"] >= 8 * 3  # every read of the three intact blocks, counted at close


def test_thread_slots_are_per_thread() -> None:
    slots = ThreadSlots()
    slots.value = "main"
    seen: list[Any] = []

    def other() -> None:
        seen.append(getattr(slots, "value", None))
        slots.value = "other"
        seen.append(slots.value)

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert seen == [None, "other"] and slots.value == "main"
    del slots.value
    with pytest.raises(AttributeError):
        slots.value  # noqa: B018
    slots.value = "again"
    assert [v for v in slots.clear()] == [{"value": "again"}]  # a closed cache lets go of them...
    slots.value = "after"  # ...and is usable again: the old guard must not drop the new values
    assert slots.value == "after"


def _count_sqlite_connects(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, str]]:
    """The (thread, database) of each SQLite connection diskcache opens."""
    import diskcache.core

    calls: list[tuple[int, str]] = []
    real = sqlite3.connect

    class Counting:
        def __getattr__(self, name: str) -> Any:
            return getattr(sqlite3, name)

        def connect(self, *args: Any, **kwargs: Any) -> sqlite3.Connection:
            calls.append((threading.get_ident(), str(args[0] if args else kwargs.get("database"))))
            return real(*args, **kwargs)

    monkeypatch.setattr(diskcache.core, "sqlite3", Counting())
    return calls


def test_duckdb_threads_keep_their_cache_connections(mem: Any, make_fs: MakeFs, parquet_file: Any,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """DuckDB calls the filesystem from native threads whose Python thread state lives for
    one call: a threading.local made diskcache open a new SQLite connection per block read."""
    path, _ = parquet_file
    url = put_object(mem, "t.parquet", path.read_bytes())
    fs = make_fs()
    fs.cat_file(url)
    fs.reader.flush()
    connects = _count_sqlite_connects(monkeypatch)
    warm = make_fs()
    warm.reader.cache._index = None  # every block through diskcache's own lookup
    con = duckdb.connect()
    con.register_filesystem(warm)
    con.execute("SET threads=4")
    for _ in range(3):
        assert con.sql(f"SELECT count(*), sum(small), sum(length(big)) FROM read_parquet('{url}')").fetchall() == [
            (12_000, sum(i % 7 for i in range(12_000)), 300 * 12_000)]
    con.close()
    stats = warm.stats()
    assert stats["store_requests"] == 0 and stats["hits"] >= 12
    # One connection per thread and database that touched the cache, not one per read.
    from_duckdb = [c for c in connects if c[0] != threading.get_ident()]
    assert from_duckdb and len(from_duckdb) == len(set(from_duckdb)) < stats["hits"] / 2


def test_warm_blocks_are_found_with_one_index_query_per_object(mem: Any, make_fs: MakeFs,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    data = payload(8 * BS, seed=41)
    url = put_object(mem, "obj", data)
    cold = make_fs()
    assert cold.cat_file(url) == data
    cold.reader.flush()
    loads: list[str] = []
    real_load = ObjectIndex._load
    monkeypatch.setattr(ObjectIndex, "_load", lambda self, key: loads.append(key) or real_load(self, key))
    gets: list[str] = []
    real_get = diskcache.Cache.get
    monkeypatch.setattr(diskcache.Cache, "get", lambda self, key, *a, **k: gets.append(key) or real_get(self, key, *a, **k))
    warm = make_fs()
    for start in range(0, len(data), BS // 2):  # 16 reads over 8 blocks
        assert warm.cat_file(url, start, start + BS // 2) == data[start : start + BS // 2]
    stats = warm.stats()
    assert stats["store_requests"] == 0 and stats["hits"] == 16
    assert len(loads) == 1  # one query for the object's 8 blocks...
    assert not [k for k in gets if ":" in k]  # ...and no per-block lookups


def test_cold_prefetch_asks_the_index_once_per_object(mem: Any, make_fs: MakeFs,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A query prefetching scattered ranges of an object with nothing cached asks
    the object's index entries once, not SQLite once per block and piece list;
    once this process has stored pieces of it, the entries no longer count as
    complete, so a second prefetch finds what was stored (nothing is fetched twice)."""
    data = payload(8 * BS, seed=43)
    url = put_object(mem, "obj", data)
    fs = make_fs()
    loads: list[str] = []
    real_load = ObjectIndex._load
    monkeypatch.setattr(ObjectIndex, "_load", lambda self, key: loads.append(key) or real_load(self, key))
    lookups: list[str] = []
    real_get, real_contains = diskcache.Cache.get, diskcache.Cache.__contains__
    monkeypatch.setattr(diskcache.Cache, "get",
                        lambda self, key, *a, **k: lookups.append(key) or real_get(self, key, *a, **k))
    monkeypatch.setattr(diskcache.Cache, "__contains__",
                        lambda self, key: lookups.append(key) or real_contains(self, key))
    ranges = [(i * BS + 100, i * BS + 5000) for i in range(0, 8, 2)]  # far apart: one GET each
    with fs.reader.hold_writes():  # as in a query: its pieces are written after it
        assert fs.prefetch(url, ranges) == sum(hi - lo for lo, hi in ranges)
        assert len(loads) == 1 and not [k for k in lookups if ":" in k]
        for lo, hi in ranges:  # served by the prefetch, from memory
            assert fs.cat_file(url, lo, hi) == data[lo:hi]
    fs.reader.flush()
    assert fs.prefetch(url, ranges) == 0  # all stored now, and found
    assert fs.stats()["store_requests"] == len(ranges)


class _HalfPeers:
    """A peer tier (logic test) that delivers the pieces of even-numbered blocks,
    read from the object itself, and records each batch it was asked for."""

    def __init__(self, data: bytes, block_size: int) -> None:
        self.data, self.block_size, self.batches = data, block_size, []

    def fetch_pieces(self, source: Any, version: Any, block_size: int, wanted: Any) -> dict[int, bytes]:
        self.batches.append([(index, lo, hi) for index, _, lo, hi in wanted])
        return {index: self.data[index * block_size + lo : index * block_size + hi]
                for index, _, lo, hi in wanted if index % 2 == 0}

    def fetch_blocks(self, source: Any, version: Any, block_size: int, wanted: Any) -> dict[int, bytes]:
        return {}

    def close(self) -> None:
        pass


def test_prefetch_asks_owner_peers_in_batches_and_the_store_for_the_rest(mem: Any, cache_dir: Path) -> None:
    """With a peer tier, one prefetch asks the owners in as few batches as there
    are pieces of one block (a batch never holds two pieces of a block); what the
    owners do not deliver comes from the store, one GET per range as without peers."""
    bs = 1 << 20  # pieces further apart than the 64 KiB that prefetch merges across
    data = payload(6 * bs, seed=44)
    url = put_object(mem, "obj", data)
    peers = _HalfPeers(data, bs)
    config = CacheConfig(directory=cache_dir, block_size=bs, readahead_blocks=0)
    fs = ShoalFileSystem(cache=config, protocols=("memory",), reader=BlockReader(config, peers=peers))
    try:
        # Two far-apart pieces in block 0, one in each of blocks 1-5.
        ranges = [(100, 900), (bs - 900, bs - 100)] + [(i * bs + 300_000, i * bs + 301_000) for i in range(1, 6)]
        assert fs.prefetch(url, ranges) == sum(hi - lo for lo, hi in ranges)
        for lo, hi in ranges:
            assert fs.cat_file(url, lo, hi) == data[lo:hi]
        assert len(peers.batches) == 2  # block 0's second piece waits for a second batch
        assert all(len({index for index, _, _ in batch}) == len(batch) for batch in peers.batches)
        assert sorted(piece for batch in peers.batches for piece in batch) == sorted(
            (lo // bs, lo % bs, hi - (lo // bs) * bs) for lo, hi in ranges)
        # Blocks 1, 3 and 5 from the store: one GET per range.
        metrics = fs.reader.metrics.snapshot()
        assert (metrics["store_requests"], metrics["bytes_from_store"]) == (3, 3 * 1000)
    finally:
        fs.close()


def test_block_evicted_after_its_object_was_indexed_is_a_miss(mem: Any, make_fs: MakeFs, cache_dir: Path) -> None:
    data = payload(4 * BS, seed=42)
    url = put_object(mem, "obj", data)
    cold = make_fs()
    assert cold.cat_file(url) == data
    cold.reader.flush()
    warm = make_fs()
    assert warm.cat_file(url, 0, 10) == data[:10]  # indexes the object, opens block 0
    for path in sorted(cache_dir.rglob("*.val"))[:4]:
        path.unlink()  # evicted by another process (files gone; block 0 stays open here)
    warm.reader.drop_memory()
    assert warm.cat_file(url) == data
    stats = warm.stats()
    assert stats["corrupt_blocks"] == 0 and stats["bytes_from_store"] >= 3 * BS


def test_closed_filesystems_leave_no_open_files(mem: Any, tmp_path: Path) -> None:
    """Each thread's SQLite connections and the open block files go with the filesystem
    (connections kept per OS thread must not outlive their threads or the cache)."""
    url = put_object(mem, "obj", payload(4 * BS, seed=43))

    def open_fds() -> int:
        gc.collect()  # filesystems sit in reference cycles until a collection
        return len(os.listdir("/proc/self/fd"))

    def use_once(n: int) -> None:
        fs = ShoalFileSystem(cache=CacheConfig(directory=tmp_path / f"c{n}", block_size=BS),
                             store=StoreConfig(), protocols=("memory",))
        fs.cat_file(url)
        fs.reader.flush()
        threads = [threading.Thread(target=fs.cat_file, args=(url, 0, 1000)) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        fs.close()

    use_once(0)
    before = open_fds()
    for n in range(1, 21):
        use_once(n)
    assert open_fds() - before < 10  # it grew by ~5 per filesystem when connections outlived them
