"""Forking while another thread is inside the block cache's SQLite index.

DataLoader workers are forked from a process whose other threads (the
loader's read-ahead, the cache's write-behind) may be in the middle of a
diskcache call.  A child forked then inherits SQLite's mutexes held by a
thread that does not exist in it, and the first SQLite call of the child
(even closing the dead thread's connection, which Python does as the child
starts) waits forever.  The block cache holds forks back until no thread is
inside diskcache; these tests fork repeatedly under a thread that hammers the
cache and require every child to finish its cache reads within a deadline.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from shoal.cache import BlockCache, CacheConfig

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

ROUNDS = 60
CHILD_DEADLINE_S = 20.0
SMALL = bytes(range(256)) * 16  # 4 KiB: kept inline in the SQLite index
LARGE = os.urandom(256 << 10)  # 256 KiB: a block file, indexed in SQLite


class _Hammer(threading.Thread):
    """Writes, reads and deletes cache entries as fast as it can (SQLite busy all the time)."""

    def __init__(self, cache: BlockCache) -> None:
        super().__init__(name="cache-hammer", daemon=True)
        self.cache = cache
        self.stop = threading.Event()
        self.operations = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            n = 0
            while not self.stop.is_set():
                key = f"hammer-{n % 32}"
                self.cache.put(key, SMALL if n % 2 else LARGE[: 64 << 10])
                self.cache.get(key)
                self.cache.contains(f"hammer-{(n + 7) % 32}")
                if n % 5 == 0:
                    self.cache.discard(f"hammer-{(n + 16) % 32}")
                self.cache.flush_stats()
                n += 1
                self.operations += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


def _wait(pid: int, deadline_s: float) -> int | None:
    """The child's exit status, or None when it did not exit in time (it is killed)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None


def _child(cache: BlockCache, directory: Path) -> int:
    """In the forked child: read through the inherited cache and a freshly opened one."""
    if bytes(cache.get("small") or b"") != SMALL or bytes(cache.get("large") or b"") != LARGE:
        return 3
    if bytes(cache.read_range("large", 1000, 70000) or b"") != LARGE[1000:70000]:
        return 4
    if not cache.put(f"child-{os.getpid()}", SMALL):
        return 5
    fresh = BlockCache(CacheConfig(directory=directory))
    try:
        if bytes(fresh.get("large") or b"") != LARGE or bytes(fresh.get(f"child-{os.getpid()}") or b"") != SMALL:
            return 6
    finally:
        fresh.close()
    return 0


def test_children_forked_during_cache_traffic_finish_their_reads(tmp_path: Path) -> None:
    directory = tmp_path / "cache"
    cache = BlockCache(CacheConfig(directory=directory))
    assert cache.put("small", SMALL) and cache.put("large", LARGE)
    hammer = _Hammer(cache)
    hammer.start()
    statuses: list[int | None] = []
    children: list[int] = []
    try:
        while hammer.operations < 20:  # the hammer's connection is open and busy
            time.sleep(0.005)
        for _ in range(ROUNDS):
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:  # pragma: no cover - runs in the child
                code = 1
                try:
                    code = _child(cache, directory)
                finally:
                    os._exit(code)
            children.append(pid)
            statuses.append(_wait(pid, CHILD_DEADLINE_S))
            if statuses[-1] is None:
                break  # one hang is enough; the next would cost another deadline
    finally:
        hammer.stop.set()
        hammer.join(timeout=30)
    assert hammer.error is None, hammer.error
    hung = statuses.count(None)
    assert hung == 0, f"{hung} of {len(statuses)} forked children hung in the cache (killed after {CHILD_DEADLINE_S} s)"
    assert statuses == [0] * ROUNDS, f"children's exit codes: {statuses}"
    # The parent's cache still works, and every child's entry landed in the shared index.
    assert bytes(cache.get("large") or b"") == LARGE
    assert [pid for pid in children if not cache.contains(f"child-{pid}")] == []
    assert hammer.operations > ROUNDS
    cache.close()
