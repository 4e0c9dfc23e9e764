"""diskcache behind a fork gate, with per-OS-thread connections.

DataLoader workers fork from processes whose other threads may be inside
diskcache (holding SQLite's locks); :data:`FORK_GATE` makes a fork wait until
none is.  :class:`GatedCache` runs every diskcache call inside that gate and
keeps diskcache's per-thread SQLite connections per OS thread (see
``threadlocal.py``: DuckDB's native threads lose a ``threading.local``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import Any, Iterator

import diskcache

from .threadlocal import ThreadSlots

__all__ = ["FORK_GATE", "FORK_WAIT_S", "GatedCache", "BlockDisk"]

logger = logging.getLogger(__name__)


#: How long a fork waits for threads to leave diskcache before it goes ahead anyway (and warns).
FORK_WAIT_S = 30.0


class ForkGate:
    """Keeps ``fork()`` out while any thread of this process is inside diskcache (SQLite).

    A child forked while another thread is inside SQLite inherits SQLite's
    mutexes (the connection's, the allocator's) held by a thread that does not
    exist in the child; Python closes that thread's connection as the child
    starts, and the child waits on them forever (seen: DataLoader workers that
    never produced a batch).  Threads enter the gate around every diskcache
    call, many at a time (shared); :meth:`before_fork` (an
    ``os.register_at_fork`` hook) stops new entries and waits until none is
    inside, and holds the gate through the fork; the parent then reopens it,
    and the child starts with a fresh gate.  diskcache itself opens a new
    SQLite connection in the child (it checks the process id on every call).
    Entering is re-entrant per thread (a transaction's calls).
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._inside = 0
        self._forking = False
        self._local = threading.local()

    def __enter__(self) -> None:
        local = self._local
        depth = getattr(local, "depth", 0)
        if not depth:
            with self._cond:
                while self._forking:
                    self._cond.wait()
                self._inside += 1
        local.depth = depth + 1

    def __exit__(self, *exc: object) -> None:
        local = self._local
        local.depth -= 1
        if not local.depth:
            with self._cond:
                self._inside -= 1
                if self._forking and not self._inside:
                    self._cond.notify_all()

    def before_fork(self) -> None:
        """Wait (at most :data:`FORK_WAIT_S`) until no thread is inside; keep the gate closed."""
        self._cond.acquire()
        self._forking = True
        mine = 1 if getattr(self._local, "depth", 0) else 0  # a fork from inside a call: do not wait on ourselves
        if not self._cond.wait_for(lambda: self._inside <= mine, timeout=FORK_WAIT_S):
            logger.warning("forking while %d thread(s) still use the block cache index after %.0f s; "
                           "the child may hang in SQLite", self._inside - mine, FORK_WAIT_S)

    def after_fork_in_parent(self) -> None:
        self._forking = False
        self._cond.notify_all()
        self._cond.release()

    def after_fork_in_child(self) -> None:
        depth = getattr(self._local, "depth", 0)  # the forking thread's own calls (if it forked from one)
        self._reset()  # the parent's other threads (and what they held) do not exist here
        if depth:
            self._local.depth, self._inside = depth, 1


FORK_GATE = ForkGate()
os.register_at_fork(before=FORK_GATE.before_fork, after_in_parent=FORK_GATE.after_fork_in_parent,
                    after_in_child=FORK_GATE.after_fork_in_child)


class BlockDisk(diskcache.Disk):
    """diskcache's file storage with one level of 256 directories, not two of 65,536.

    diskcache files each value under a random ``xx/yy/`` directory: in a new cache
    almost every block or piece stored created two directories first (a cold TPC-H
    query stores ~100-250 pieces; mkdir was ~30% of storing one).  One level keeps
    directories small enough (a 10 GiB cache of 100 KiB pieces: ~400 files each)
    and is created once.  Files stored under the old layout stay readable: the
    index keeps each entry's path.
    """

    def filename(self, key: Any = diskcache.core.UNKNOWN, value: Any = diskcache.core.UNKNOWN) -> tuple[str, str]:
        name = os.urandom(16).hex()
        filename = os.path.join(name[:2], name[2:] + ".val")
        return filename, os.path.join(self._directory, filename)


class GatedCache:
    """A ``diskcache.Cache`` whose every call runs inside :data:`FORK_GATE`."""

    def __init__(self, directory: str, **settings: Any) -> None:
        with FORK_GATE:
            self._inner = diskcache.Cache(directory, **settings)
        old = getattr(self._inner, "_local", None)
        if isinstance(old, threading.local):
            # diskcache keeps one SQLite connection per thread in a threading.local,
            # which DuckDB's native threads lose after every call (see threadlocal.py).
            slots = ThreadSlots()
            for name in ("pid", "con"):  # this thread's connection, opened (read-write) just now
                if hasattr(old, name):
                    setattr(slots, name, getattr(old, name))
            self._inner._local = slots
        self._slots = self._inner._local if isinstance(self._inner._local, ThreadSlots) else None

    def close(self) -> None:
        """Let go of every thread's connection (diskcache's own close closes the
        caller's; the others close as they are dropped: sqlite3 allows
        ``close()`` only from the thread that opened a connection)."""
        with FORK_GATE:
            self._inner.close()
            if self._slots is not None:
                for values in self._slots.clear():
                    values.clear()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        def gated(*args: Any, **kwargs: Any) -> Any:
            with FORK_GATE:
                return attr(*args, **kwargs)

        return gated

    def __contains__(self, key: str) -> bool:
        with FORK_GATE:
            return key in self._inner

    def __len__(self) -> int:
        with FORK_GATE:
            return len(self._inner)

    @contextlib.contextmanager
    def transact(self, retry: bool = False) -> Iterator[None]:
        """The whole transaction (and the calls in it) inside the gate."""
        with FORK_GATE, self._inner.transact(retry=retry):
            yield
