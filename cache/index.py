"""Where an object's blocks are on the SSD: one index query per object, not one per block.

A warm query opens every block and piece it reads once per process.  Through
diskcache that is one SQLite lookup per block or piece, from the calling
thread's own connection; DuckDB reads from many threads, each with a cold
connection, and a warm TPC-H query opens 150-300 pieces: ~25 ms of CPU under
the GIL for Q6, a third of DuckDB's whole query on local files.

:class:`ObjectIndex` asks diskcache's SQLite index once per object for all of
its entries (the keys of an object's blocks, pieces and piece lists share the
prefix ``"<object key>:"``), on one read-only connection shared by all
threads, and remembers them.  It only ever says *where a block was stored*:
the block file is opened and its checksums are verified as on any read, a
file evicted since is a miss that falls back to a diskcache lookup, and an
entry stored after the object was indexed is found that way too.

This reads diskcache's table (``Cache``: ``key``, ``raw``, ``mode``,
``filename``, ``value``) directly.  The schema is checked when the index is
first used; if it ever differs, the index switches itself off and every
lookup goes through diskcache's API.
"""

from __future__ import annotations

import collections
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path

__all__ = ["ObjectIndex", "ObjectEntries"]

logger = logging.getLogger(__name__)

_MODE_RAW = 1  # diskcache.core.MODE_RAW: bytes kept inline in the index
_MODE_BINARY = 2  # diskcache.core.MODE_BINARY: bytes in a file named by ``filename``
_COLUMNS = {"key", "raw", "mode", "filename", "value"}
_OBJECTS = 4096  # objects whose entries are remembered (LRU)


# For this long after an object's entries were loaded, a key they lack counts as
# not stored (unless this process stored something of the object since): a cold
# query's prefetch asked SQLite about each of its ~100-250 blocks and piece lists
# one by one, ~0.3 ms apiece while the fetches it had started ran (q03 of TPC-H:
# 70 ms of a 120 ms prefetch).  Another process's block stored meanwhile is then
# fetched again at worst, never read wrong: reads still look it up.
_ABSENT_TRUST_S = 10.0


class ObjectEntries:
    """One object's index entries: block/piece key -> file, and inline values."""

    __slots__ = ("files", "inline", "seeded", "loaded_at", "complete")

    def __init__(self) -> None:
        self.files: dict[str, str] = {}
        self.inline: dict[str, bytes] = {}
        #: Set by the cache once it has taken what it keeps elsewhere (piece lists).
        self.seeded = False
        self.loaded_at = time.monotonic()
        #: False once this process stored something of the object after the load.
        self.complete = True

    def lacks(self, key: str) -> bool:
        """Whether ``key`` can be taken as not stored: these entries are recent,
        no store of this process since has made them incomplete, and lack it."""
        return (self.complete and time.monotonic() - self.loaded_at < _ABSENT_TRUST_S
                and key not in self.files and key not in self.inline)


class ObjectIndex:
    """A per-process map of object key -> its stored entries, loaded in bulk."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._lock = threading.Lock()
        self._con: sqlite3.Connection | None = None
        self._enabled = True
        self._objects: collections.OrderedDict[str, ObjectEntries] = collections.OrderedDict()

    def after_fork_in_child(self) -> None:
        """A connection (and a lock) from the parent must not be used in a child."""
        self._lock = threading.Lock()
        self._con = None

    def close(self) -> None:
        with self._lock:
            if self._con is not None:
                self._con.close()
                self._con = None
            self._objects.clear()

    def path_of(self, filename: str) -> str:
        return os.path.join(self._directory, filename)

    def entries(self, object_key: str) -> ObjectEntries | None:
        """The object's entries as stored when first asked in this process, or
        None when the index is off or failed (then use diskcache's lookups)."""
        if not self._enabled:
            return None
        with self._lock:
            known = self._objects.get(object_key)
            if known is not None:
                self._objects.move_to_end(object_key)
                return known
            try:
                found = self._load(object_key)
            except sqlite3.Error as exc:
                logger.debug("cache index query failed (%s); using per-block lookups", exc)
                self._enabled = False
                return None
            self._objects[object_key] = found
            while len(self._objects) > _OBJECTS:
                self._objects.popitem(last=False)
            return found

    def drop(self, key: str) -> None:
        """Forget one entry (the cache deleted or re-stored it): the object's entries
        no longer say what is absent."""
        with self._lock:
            entries = self._objects.get(key.split(":", 1)[0])
        if entries is not None:
            entries.files.pop(key, None)
            entries.inline.pop(key, None)
            entries.complete = False

    def _connect(self) -> sqlite3.Connection:
        if self._con is None:
            con = sqlite3.connect(f"file:{self._directory / 'cache.db'}?mode=ro", uri=True,
                                  check_same_thread=False, timeout=10, isolation_level=None)
            columns = {row[1] for row in con.execute("PRAGMA table_info(Cache)")}
            if not _COLUMNS <= columns:
                con.close()
                raise sqlite3.DatabaseError(f"unexpected diskcache schema: {sorted(columns)}")
            self._con = con
        return self._con

    def _load(self, object_key: str) -> ObjectEntries:
        rows = self._connect().execute(
            "SELECT key, mode, filename, value FROM Cache WHERE key >= ? AND key < ? AND raw = 1",
            (f"{object_key}:", f"{object_key};"),  # ';' follows ':': exactly this object's keys
        ).fetchall()
        found = ObjectEntries()
        for key, mode, filename, value in rows:
            if mode == _MODE_BINARY and filename:
                found.files[key] = filename
            elif mode == _MODE_RAW and value is not None:
                found.inline[key] = bytes(value)
        return found
