"""Verified reads of SSD block files that use a second, idle core.

A warm read from the SSD tier is a copy out of the page cache plus an xxh3
of every 64 KiB chunk copied: on one core the hash alone is ~20% of a plain
file read, so a single thread cannot come near a local file's speed.  Both
halves of the work release the GIL (``os.preadv`` and ``xxhash``), so a
second thread can do half of it at the same time.  (Hashing releases it only
for the hash itself: verified in 64 KiB chunks, a MiB is sixteen calls and two
threads queued for the GIL between them; block files therefore also carry a
sum per 1 MiB span, which aligned reads check with one call.)

* a large read (:data:`SPLIT_MIN` or more) is split in two chunk-aligned
  halves, the helper thread filling the second while the caller fills the first;
* a sequential reader's smaller reads share a block: as the reader enters
  the block, before its first read there, the helper is handed the later
  half of the reads of that size it will make there, and fills them while
  the reader makes the earlier ones itself (:class:`ReadPlan`); the next
  block's plan is handed over at the same time, queued, so the helper works a
  block ahead.

Both fill one new ``bytes`` object in place (what ``os.pread`` does inside
CPython, for one thread): a ``bytearray`` would need a second copy into the
``bytes`` that readers are given, which costs more than the hash saved.  The
helper is used only when it is idle, so many readers never queue behind it;
they then read on their own thread as before.  Every byte is verified
against its chunk's stored sum before anyone sees it; a mismatch raises
:class:`~shoal.cache.blockfile.Corrupt` in the reader, as a one-thread read does.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from typing import Any, Callable

logger = logging.getLogger(__name__)

__all__ = ["SPLIT_MIN", "PendingRead", "ReadPlan", "fresh_bytes", "helper"]

#: Reads of at least this many bytes are split between two threads; smaller
#: ones pay more for the hand-off (~50 us) than half of them takes.
SPLIT_MIN = 2 << 20
#: A filling thread copies and hashes in steps of this size: a step is still
#: in its core's L2 cache (2 MiB here) when it is hashed, and a bad chunk stops
#: the fill early.  (256 KiB steps measured the same.)
FILL_STEP = 1 << 20


def _bytes_factory() -> Callable[[int], tuple[bytes, memoryview]] | None:
    try:
        new = ctypes.pythonapi.PyBytes_FromStringAndSize
    except (AttributeError, OSError):  # not CPython
        return None
    new.restype = ctypes.py_object
    new.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
    # A bytes object's data starts at ob_sval, the last field of its header.
    offset = bytes.__basicsize__ - 1

    def fresh(size: int) -> tuple[bytes, memoryview]:
        data = new(None, size)
        view = memoryview((ctypes.c_char * size).from_address(id(data) + offset)).cast("B")
        return data, view

    return fresh


#: ``fresh_bytes(n)`` -> a new, uninitialised ``bytes`` of ``n`` bytes and a
#: writable view of its data, to fill before the object is handed to anyone
#: (the view does not keep the object alive: hold both).  None off CPython.
fresh_bytes = _bytes_factory()


class _Helper:
    """One background thread that takes a job only when it is idle."""

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        # A forked child (DataLoader workers) has none of its parent's threads.
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._queued = 0  # jobs submitted and not finished
        self.jobs = 0  # jobs handed over (tests and benchmarks read it)
        # Plans made before a fork wait on the parent's thread, which the child has not got.
        self.generation = getattr(self, "generation", 0) + 1

    def try_submit(self, fn: Callable[..., Any], *args: Any, queue: bool = False) -> "Future[Any] | None":
        """Run ``fn(*args)`` on the helper thread, or return None if it is busy.

        With ``queue``, one job may wait behind the running one (a sequential
        reader's plan for its next block, handed over early so that the
        helper's wake-up is never on the reader's path)."""
        with self._lock:
            if self._queued > (1 if queue else 0):
                return None
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shoal-verify")
            self._queued += 1
            self.jobs += 1
            try:
                future = self._pool.submit(fn, *args)
            except RuntimeError:  # interpreter shutting down
                self._queued -= 1
                return None
        future.add_done_callback(self._idle)
        return future

    def _idle(self, _future: "Future[Any]") -> None:
        with self._lock:
            self._queued -= 1


#: The process's helper thread (started on first use).
helper = _Helper()


class PendingRead:
    """A range of an open block that the helper thread fills (see :class:`ReadPlan`)."""

    __slots__ = ("lo", "hi", "data", "view", "future")

    def __init__(self, lo: int, hi: int) -> None:
        assert fresh_bytes is not None
        self.lo, self.hi = lo, hi
        self.data, self.view = fresh_bytes(hi - lo)
        self.future: Future[None] = Future()

    def result(self) -> bytes | None:
        """The verified bytes, or None if the fill failed or was cancelled (the
        caller reads the range on its own, and meets the error as a plain read would)."""
        try:
            self.future.result()
        except Exception as exc:  # noqa: BLE001 - re-read on the normal path
            logger.debug("read-ahead of a cached block failed: %s", exc)
            return None
        return self.data


class ReadPlan:
    """Ranges of one block that the helper fills one after another, in one
    hand-off (waking a thread costs ~50-250 us here, a quarter of a 1 MiB read)."""

    def __init__(self, ranges: list[tuple[int, int]]) -> None:
        self._order = [PendingRead(lo, hi) for lo, hi in ranges]
        self.reads = {pending.lo: pending for pending in self._order}
        self.cancelled = False
        self.generation = helper.generation

    def take(self, lo: int, hi: int) -> bytes | None:
        """The verified bytes of ``[lo, hi)`` if planned (waits for them), else None."""
        pending = self.reads.pop(lo, None)
        if pending is None or pending.hi != hi or self.generation != helper.generation:
            return None  # not planned, or planned in the parent of this forked process
        return pending.result()

    def cancel(self) -> None:
        """Stop after the range being filled (the reader moved on)."""
        self.cancelled = True

    def run(self, fill: Callable[[bytes, memoryview, int], None]) -> None:
        """The helper's job: ``fill(data, view, offset)`` each range in order."""
        for pending in self._order:  # not ``reads``: the reader takes from it meanwhile
            if self.cancelled:
                pending.future.set_exception(CancelledError("read plan cancelled"))
                continue
            try:
                fill(pending.data, pending.view, pending.lo)
            except BaseException as exc:  # noqa: BLE001 - handed to the reader, who re-reads
                pending.future.set_exception(exc)
            else:
                pending.future.set_result(None)
