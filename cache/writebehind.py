"""The cache's write-behind: SSD writes off the read path, bounded, and held
while a query runs.

One writer thread stores what readers fetched, so a read never waits for the
SSD.  Unwritten bytes are capped: past the cap a fetching thread writes
inline (backpressure), so memory stays bounded when the SSD is slower than
the store.  A query can hold its writes until it has its result
(:meth:`WriteBehind.hold`): the fill then takes no CPU or GIL from it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

__all__ = ["WriteBehind"]

logger = logging.getLogger(__name__)

_MAX_PENDING_WRITE_BYTES = 256 << 20
# A query holds at most this much of its SSD writes; a query that fetches more
# writes behind from there on, leaving the writer headroom below the pending
# cap (past it, fetching threads would write inline).
_MAX_HELD_WRITE_BYTES = _MAX_PENDING_WRITE_BYTES // 2


class WriteBehind:
    """One writer thread with a cap on unwritten bytes, and holds.

    ``lock`` is the owner's: the ``done`` callbacks of :meth:`write` run under
    it, as they update the owner's state (which pieces are still in memory).
    """

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shoal-cache-writer")
        self._pending_bytes = 0
        self._holds = 0
        self._held: list[Callable[[], None]] = []
        self._held_bytes = 0
        self._overflowed = False  # this hold passed _MAX_HELD_WRITE_BYTES

    def write(self, size: int, write: Callable[[], object], done: Callable[[], None] | None = None) -> None:
        """Run ``write`` on the writer thread, then ``done`` (under the lock); past
        the pending cap, in this thread (backpressure: the writer is behind).
        While writes are held (:meth:`hold`) the job waits for the release."""
        def run() -> None:
            try:
                write()
            finally:
                with self._lock:
                    self._pending_bytes -= size
                    if done is not None:
                        done()

        with self._lock:
            inline = self._pending_bytes + size > _MAX_PENDING_WRITE_BYTES
            self._pending_bytes += size
            if self._holds and not self._overflowed:
                if not inline and self._held_bytes + size <= _MAX_HELD_WRITE_BYTES:
                    self._held.append(run)
                    self._held_bytes += size
                    return
                self._overflowed = True  # a big query: write behind from here on
            released = self._take_held()
        for job in released:  # what was held goes first
            self._writer.submit(job)
        if inline:
            run()
        else:
            self._writer.submit(run)

    def submit(self, job: Callable[[], object]) -> None:
        """Run ``job`` on the writer thread now, held writes or not."""
        self._writer.submit(job)

    def after(self, job: Callable[[], object]) -> None:
        """Run ``job`` on the writer after the writes queued (or held) before it
        (its errors are logged, never raised: it is background work)."""
        def run() -> None:
            try:
                job()
            except Exception as exc:  # noqa: BLE001
                logger.debug("background cache job failed: %s", exc)

        with self._lock:
            if self._holds and not self._overflowed:
                self._held.append(run)
                return
        with contextlib.suppress(RuntimeError):  # closed
            self._writer.submit(run)

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Hold the writes made inside the block until it ends (holds nest).

        Past ``_MAX_HELD_WRITE_BYTES`` the held writes go at once and the rest
        write behind as they come."""
        with self._lock:
            self._holds += 1
        try:
            yield
        finally:
            with self._lock:
                self._holds -= 1
                released = []
                if not self._holds:
                    released = self._take_held()
                    self._overflowed = False
            for job in released:
                try:
                    self._writer.submit(job)
                except RuntimeError:  # closed meanwhile: nothing more is written
                    break

    @property
    def holding(self) -> bool:
        """Whether a write made now would wait for the end of a hold."""
        return bool(self._holds) and not self._overflowed

    def _take_held(self) -> list[Callable[[], None]]:
        held, self._held = self._held, []
        self._held_bytes = 0
        return held

    def flush(self) -> None:
        """Wait until the writes queued so far (not those held) are done."""
        self._writer.submit(lambda: None).result()

    def close(self) -> None:
        """Write everything, held writes included, then stop the thread."""
        with self._lock:
            held = self._take_held()
        for job in held:
            self._writer.submit(job)
        self.flush()
        self._writer.shutdown(wait=True)
