"""Verified SSD block reads that use a second core (``shoal.cache.twocore``):
the bytes, the checks and the fallbacks, never the timing."""

from __future__ import annotations

import os
import random
import threading
import uuid
from pathlib import Path
from typing import Iterator

import fsspec
import pytest

from shoal.cache import CacheConfig, ShoalFileSystem, StoreConfig
from shoal.cache.blockfile import CHUNK, Corrupt, OpenBlock, Sealed
from shoal.cache.twocore import SPLIT_MIN, ReadPlan, fresh_bytes, helper

MiB = 1 << 20


def payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def sealed_block(path: Path, data: bytes) -> OpenBlock:
    with open(path, "wb") as f:
        sealed = Sealed(data)
        while part := sealed.read(1 << 20):
            f.write(part)
    return OpenBlock(os.open(path, os.O_RDONLY))


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))


@pytest.fixture
def busy_helper() -> Iterator[threading.Event]:
    """The helper thread held busy until the test sets the event."""
    release, started = threading.Event(), threading.Event()

    def hold() -> None:
        started.set()
        release.wait(10)

    future = helper.try_submit(hold)
    assert future is not None
    started.wait(5)
    yield release
    release.set()
    future.result(timeout=10)


def test_fresh_bytes_are_a_new_object_filled_in_place() -> None:
    assert fresh_bytes is not None
    data, view = fresh_bytes(3 * CHUNK)
    view[:] = b"x" * len(view)
    assert type(data) is bytes and data == b"x" * (3 * CHUNK)
    other, _ = fresh_bytes(3 * CHUNK)
    assert other is not data


def test_a_large_read_is_split_with_the_helper_and_returns_the_block(tmp_path: Path) -> None:
    data = payload(5 * MiB + 12345, seed=1)  # odd length: the last chunk is short
    block = sealed_block(tmp_path / "block", data)
    jobs = helper.jobs
    assert bytes(block.read(0, None)) == data
    assert helper.jobs == jobs + 1
    # Not chunk-aligned: one thread, as before.
    assert bytes(block.read(7, 3 * MiB)) == data[7 : 3 * MiB]
    assert helper.jobs == jobs + 1


@pytest.mark.parametrize("chunk_index", [0, 20, 40, 80])  # both halves, and the short last chunk
def test_a_split_read_catches_a_flipped_byte_in_either_half(tmp_path: Path, chunk_index: int) -> None:
    data = payload(5 * MiB + 12345, seed=2)
    path = tmp_path / "block"
    block = sealed_block(path, data)
    flip(path, min(chunk_index * CHUNK + 99, len(data) - 1))
    with pytest.raises(Corrupt, match=f"chunk {min(chunk_index, len(data) // CHUNK)} "):
        block.read(0, None)


def test_a_split_read_of_a_file_cut_short_raises(tmp_path: Path) -> None:
    data = payload(4 * MiB, seed=3)
    path = tmp_path / "block"
    block = sealed_block(path, data)
    os.truncate(path, 3 * MiB)
    with pytest.raises(Corrupt, match="truncated"):
        block.read(0, None)


def test_a_large_read_while_the_helper_is_busy_reads_alone(tmp_path: Path, busy_helper: threading.Event) -> None:
    data = payload(SPLIT_MIN * 2, seed=4)
    block = sealed_block(tmp_path / "block", data)
    jobs = helper.jobs
    assert bytes(block.read(0, None)) == data
    assert helper.jobs == jobs
    assert block.plan_reads(MiB, MiB) is None


def test_a_read_plan_fills_the_later_reads_of_the_block(tmp_path: Path) -> None:
    data = payload(8 * MiB, seed=5)
    block = sealed_block(tmp_path / "block", data)
    plan = block.plan_reads(MiB, MiB)  # the reader reads [0, 1 MiB) and goes on in 1 MiB reads
    assert plan is not None
    # Seven reads follow; the helper takes the last four.
    assert sorted(plan.reads) == [4 * MiB, 5 * MiB, 6 * MiB, 7 * MiB]
    assert plan.take(MiB, 2 * MiB) is None  # not planned: the reader reads it itself
    assert plan.take(6 * MiB, 6 * MiB + CHUNK) is None  # planned with another length
    assert plan.take(5 * MiB, 6 * MiB) == data[5 * MiB : 6 * MiB]
    assert plan.take(7 * MiB, 8 * MiB) == data[7 * MiB :]
    assert plan.take(7 * MiB, 8 * MiB) is None  # taken once


def test_a_read_plan_with_a_corrupt_range_hands_the_reader_nothing(tmp_path: Path) -> None:
    data = payload(8 * MiB, seed=6)
    path = tmp_path / "block"
    block = sealed_block(path, data)
    flip(path, 6 * MiB + 5 * CHUNK + 1)
    plan = block.plan_reads(MiB, MiB)
    assert plan is not None
    assert plan.take(5 * MiB, 6 * MiB) == data[5 * MiB : 6 * MiB]
    assert plan.take(6 * MiB, 7 * MiB) is None
    with pytest.raises(Corrupt):  # the reader's own read meets the damage
        block.read(6 * MiB, 7 * MiB)
    assert plan.take(7 * MiB, 8 * MiB) == data[7 * MiB :]


def test_a_cancelled_plan_fills_nothing_more(tmp_path: Path) -> None:
    data = payload(4 * MiB, seed=7)
    block = sealed_block(tmp_path / "block", data)
    plan = ReadPlan([(2 * MiB, 3 * MiB), (3 * MiB, 4 * MiB)])
    plan.cancel()
    plan.run(block._fill)
    assert plan.take(2 * MiB, 3 * MiB) is None and plan.take(3 * MiB, 4 * MiB) is None


def test_unaligned_reads_are_not_planned(tmp_path: Path) -> None:
    block = sealed_block(tmp_path / "block", payload(4 * MiB, seed=8))
    assert block.plan_reads(1000, MiB) is None
    assert block.plan_reads(MiB, MiB + 1) is None


@pytest.fixture
def mem_url() -> Iterator[tuple[str, bytes]]:
    fs = fsspec.filesystem("memory")
    path = f"/twocore-{uuid.uuid4().hex}/obj"
    data = payload(16 * MiB + 3 * CHUNK, seed=9)
    fs.pipe(path, data)
    yield f"memory://{path}", data
    fs.rm(path.rsplit("/", 1)[0], recursive=True)


def _fs(cache_dir: Path) -> ShoalFileSystem:
    config = CacheConfig(directory=cache_dir, block_size=8 * MiB, readahead_blocks=0)
    return ShoalFileSystem(cache=config, store=StoreConfig(), protocols=("memory", "file"))


def _scan(fs: ShoalFileSystem, url: str, size: int) -> bytes:
    with fs.open(url, "rb") as f:
        return b"".join(iter(lambda: f.read(size), b""))


def _filled_fs(tmp_path: Path, url: str, data: bytes) -> ShoalFileSystem:
    """A filesystem over a cache that one cold scan (1 MiB reads) has filled."""
    cold = _fs(tmp_path / "cache")
    assert _scan(cold, url, MiB) == data
    cold.close()
    return _fs(tmp_path / "cache")


@pytest.mark.parametrize("read_size", [256 << 10, 8 * MiB])
def test_a_warm_scan_uses_the_helper_and_reads_the_right_bytes(
    tmp_path: Path, mem_url: tuple[str, bytes], read_size: int
) -> None:
    url, data = mem_url
    warm = _filled_fs(tmp_path, url, data)
    jobs = helper.jobs
    assert _scan(warm, url, read_size) == data
    stats = warm.stats()
    assert stats["store_requests"] == 0 and stats["bytes_from_cache"] == len(data)
    assert helper.jobs >= jobs + 2  # one plan or split per full block
    warm.close()


def test_a_flipped_byte_in_a_planned_range_is_refetched(tmp_path: Path, mem_url: tuple[str, bytes]) -> None:
    url, data = mem_url
    cold = _fs(tmp_path / "cache")
    assert _scan(cold, url, MiB) == data
    cold.close()
    files = sorted((tmp_path / "cache").rglob("*.val"), key=lambda p: p.stat().st_size, reverse=True)
    victim = files[0]  # one of the two 8 MiB blocks
    flip(victim, 7 * MiB + 3)  # in the reads the helper fills
    warm = _fs(tmp_path / "cache")
    assert _scan(warm, url, 256 << 10) == data
    stats = warm.stats()
    assert (stats["corrupt_blocks"], stats["store_requests"]) == (1, 1)
    warm.close()


def _wait_helper_idle() -> None:
    for _ in range(500):
        future = helper.try_submit(lambda: None)
        if future is not None:
            future.result(timeout=5)
            return
        threading.Event().wait(0.01)
    raise AssertionError("the helper thread stayed busy")


def test_the_next_blocks_plan_is_handed_over_as_a_block_is_entered(tmp_path: Path, mem_url: tuple[str, bytes]) -> None:
    url, data = mem_url
    warm = _filled_fs(tmp_path, url, data)
    with warm.open(url, "rb") as f:
        assert f.read(MiB) == data[:MiB]
        cursor = f._cursor()
        assert cursor.index == 0 and cursor.plan is not None
        url_ahead, index_ahead, plan_ahead = cursor.ahead
        assert index_ahead == 1 and sorted(plan_ahead.reads) == [4 * MiB, 5 * MiB, 6 * MiB, 7 * MiB]
        rest = b"".join(iter(lambda: f.read(MiB), b""))
    assert rest == data[MiB:]
    assert cursor.ahead is None  # settled at close
    # The helper filled block 1's later reads, which the reader took when it got there.
    assert not plan_ahead.reads
    assert warm.stats()["bytes_from_cache"] == len(data)
    warm.close()


def test_a_reader_that_leaves_early_or_jumps_cancels_the_plan_ahead(tmp_path: Path, mem_url: tuple[str, bytes]) -> None:
    url, data = mem_url
    warm = _filled_fs(tmp_path, url, data)
    with warm.open(url, "rb") as f:
        assert f.read(MiB) == data[:MiB]
        plan_ahead = f._cursor().ahead[2]
    assert plan_ahead.cancelled  # closed after one read
    _wait_helper_idle()  # the plans cancelled above stop after the range in hand
    with warm.open(url, "rb") as f:
        assert f.read(MiB) == data[:MiB]
        plan_ahead = f._cursor().ahead[2]
        f.seek(16 * MiB)
        assert f.read(MiB) == data[16 * MiB :]
        assert plan_ahead.cancelled and f._cursor().ahead is None
        f.seek(9 * MiB)  # into block 1, not at its start: planned afresh
        assert f.read(MiB) == data[9 * MiB : 10 * MiB]
    warm.close()


def _v1_block(path: Path, data: bytes) -> None:
    """A block file as written before span sums: data, chunk sums, 32-byte footer."""
    import struct

    import xxhash

    count = (len(data) + CHUNK - 1) // CHUNK
    sums = b"".join(struct.pack("<Q", xxhash.xxh3_64_intdigest(data[i * CHUNK : (i + 1) * CHUNK]))
                    for i in range(count))
    head = struct.pack("<QIId", len(data), CHUNK, count, 1.0)
    path.write_bytes(data + sums + head + struct.pack("<Q", xxhash.xxh3_64_intdigest(sums + head)))


def test_span_sums_verify_aligned_reads_and_name_the_bad_chunk(tmp_path: Path) -> None:
    data = payload(3 * MiB + 5 * CHUNK + 17, seed=21)
    path = tmp_path / "block"
    block = sealed_block(path, data)
    assert block.span == MiB and len(block.spans) == 8 * 4
    for lo, hi in ((0, MiB), (MiB, 2 * MiB), (MiB, 3 * MiB + CHUNK), (3 * MiB, None), (CHUNK, 2 * MiB + 1), (0, None)):
        assert bytes(block.read(lo, hi)) == data[lo:hi]
    flip(path, 2 * MiB + 3 * CHUNK + 5)
    with pytest.raises(Corrupt, match=f"chunk {2 * 16 + 3} "):
        sealed = OpenBlock(os.open(path, os.O_RDONLY))
        sealed.read(2 * MiB, 3 * MiB)  # one span
    assert bytes(OpenBlock(os.open(path, os.O_RDONLY)).read(0, 2 * MiB)) == data[: 2 * MiB]


def test_a_changed_span_table_fails_the_footer(tmp_path: Path) -> None:
    data = payload(2 * MiB, seed=22)
    path = tmp_path / "block"
    sealed_block(path, data)
    flip(path, len(data) + 8 * (2 * MiB // CHUNK) + 3)  # inside the span table
    with pytest.raises(Corrupt, match="checksum table"):
        OpenBlock(os.open(path, os.O_RDONLY))


def test_block_files_written_before_span_sums_still_read_verified(tmp_path: Path) -> None:
    data = payload(2 * MiB + 999, seed=23)
    path = tmp_path / "block"
    _v1_block(path, data)
    block = OpenBlock(os.open(path, os.O_RDONLY))
    assert block.span == 0 and block.length == len(data)
    assert bytes(block.read(0, None)) == data and bytes(block.read(MiB, 2 * MiB)) == data[MiB : 2 * MiB]
    with open(path, "rb") as handle:
        from shoal.cache.blockfile import read_range

        view, length, stored_at = read_range(handle, 5, MiB + 3)
        assert bytes(view) == data[5 : MiB + 3] and length == len(data) and stored_at == 1.0
    flip(path, MiB + 7)
    with pytest.raises(Corrupt, match=f"chunk {MiB // CHUNK} "):
        OpenBlock(os.open(path, os.O_RDONLY)).read(0, None)


def test_a_plan_made_before_a_fork_is_not_waited_for_in_the_child(tmp_path: Path, busy_helper: threading.Event) -> None:
    """The parent's helper thread does not exist in a forked child: a plan it
    had not filled yet would never be; the child reads those ranges itself."""
    import signal

    data = payload(8 * MiB, seed=31)
    block = sealed_block(tmp_path / "block", data)
    plan = ReadPlan([(4 * MiB, 5 * MiB)])  # made, never handed to the (busy) helper
    pid = os.fork()
    if pid == 0:
        signal.alarm(10)
        untaken = plan.take(4 * MiB, 5 * MiB) is None
        os._exit(0 if untaken and bytes(block.read(4 * MiB, 5 * MiB)) == data[4 * MiB : 5 * MiB] else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
