"""The local-SSD block cache, on diskcache.

Blocks are stored with a checksum per 64 KiB chunk and a checksummed footer
(``blockfile.py``): a truncated or corrupted block file fails the check, is
deleted and counted, and the caller refetches it.  Any failure of the cache itself (full disk, unwritable
directory, locked database) turns into a miss plus a counter and one warning,
never into a failed read.  diskcache keeps the index in SQLite, so many
processes (DataLoader workers, parallel CLI runs) share one directory safely.
"""

from __future__ import annotations

import collections
import io
import logging
import os
import sqlite3
import struct
import threading
import time
import weakref
from dataclasses import dataclass, field, fields
from typing import Any, BinaryIO, Callable

import diskcache

from .blockfile import Corrupt, OpenBlock, Sealed, read_range
from .config import CacheConfig
from .gated import FORK_GATE, BlockDisk, GatedCache
from .index import ObjectIndex
from .listings import ListingFiles

__all__ = ["BlockCache", "CacheMetrics"]

logger = logging.getLogger(__name__)

# diskcache's LRU policy writes to SQLite on every hit, which serializes
# concurrent readers (measured: 8 threads reading 4 MiB blocks, 240 MiB/s LRU
# vs 2,300 MiB/s least-recently-stored).  So blocks are stored LRS and a hit
# on a block stored longer ago than this is re-stored in the background:
# hot blocks stay young, and eviction approximates LRU at no cost per read.
PROMOTE_AFTER_S = 600.0
_STATS_KEY_PREFIX = "shoal.stats."
# At most this many pieces are indexed per block (a bound on the index entry).
_MAX_PIECES = 512
_PIECE_LISTS = 4096  # blocks whose piece lists are kept in memory
# After this many consecutive write failures, stop trying to write for a while.
_FAILURES_BEFORE_BACKOFF = 3
_WRITE_BACKOFF_PUTS = 256
#: The counters that add up to ``CacheMetrics.errors``.
_ERROR_COUNTERS = ("corrupt_blocks", "write_failures", "read_failures", "local_copy_corrupt")
#: Counters summed over processes in the cache directory (``shoal cache stats``).
_PERSISTED = ("hits", "misses", "bytes_from_cache", "bytes_from_store", "store_requests", "evictions",
              "corrupt_blocks", "write_failures", "read_failures", "local_copy_uses", "local_copy_bytes")


@dataclass
class CacheMetrics:
    """Counters of one process; :meth:`BlockCache.persisted_stats` adds all processes'."""

    hits: int = 0
    misses: int = 0
    bytes_from_cache: int = 0
    bytes_from_store: int = 0
    store_requests: int = 0
    evictions: int = 0
    corrupt_blocks: int = 0
    write_failures: int = 0
    read_failures: int = 0
    #: Files handed to a native reader as sparse local copies (see localcopy.py),
    #: bytes written into copies, copies found corrupt, and copies evicted.
    local_copy_uses: int = 0
    local_copy_bytes: int = 0
    local_copy_corrupt: int = 0
    local_copy_evictions: int = 0
    #: Queries that ran again through the cache because DuckDB could not read a local copy.
    local_copy_fallbacks: int = 0
    degraded: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)

    @property
    def errors(self) -> int:
        return sum(getattr(self, name) for name in _ERROR_COUNTERS)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            data = {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}
        data["errors"] = sum(data[name] for name in _ERROR_COUNTERS)
        return data


#: diskcache's ``retry=True`` repeats ``BEGIN IMMEDIATE`` on *any* SQLite
#: OperationalError, forever (seen once, spinning at close on a cache directory
#: made read-only).  SQLite's busy timeout (10 s) already waits out other
#: writers; after it, a write fails (counted, read through) instead of hanging.
_WRITE_RETRY = False

_OPEN_BLOCKS = 2048  # block and piece files kept open per cache (file descriptors)


def _reset_open_lock(cache: "BlockCache | None") -> None:
    """In a forked child: locks another thread of the parent may have held at the fork."""
    if cache is not None:
        cache._open_lock = threading.Lock()
        cache.metrics._lock = threading.Lock()
        if cache._index is not None:
            cache._index.after_fork_in_child()


class BlockCache:
    """A bounded, checksummed, multi-process key -> block store."""

    def __init__(self, config: CacheConfig) -> None:
        self.config = config
        self.metrics = CacheMetrics()
        self._cache: GatedCache | None = None  # every diskcache call waits out a fork (FORK_GATE)
        self._stats: GatedCache | None = None
        self._skip_writes = 0
        self._consecutive_failures = 0
        self._warned = False
        self._flushed: dict[str, int] = {}
        self._open: collections.OrderedDict[str, OpenBlock] = collections.OrderedDict()
        self._open_lock = threading.Lock()
        self._listings = ListingFiles(config.directory / "listings")
        #: Where each object's blocks are, one index query per object (see index.py).
        self._index: ObjectIndex | None = None
        # A fork while another thread held a lock would leave it held in the
        # child (DataLoader workers): give the child fresh ones.
        this = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _reset_open_lock(this()))
        # Piece lists of recently used blocks, so a warm read of a piece costs
        # no index lookup (another process's newer pieces show up on a miss).
        self._piece_lists: collections.OrderedDict[str, tuple[tuple[int, int], ...]] = collections.OrderedDict()
        #: Set by the reader to re-store old hit blocks in its background writer.
        self.on_promote: Callable[[str], None] | None = None
        if not config.enabled:
            return
        try:
            config.directory.mkdir(parents=True, exist_ok=True)
            self._cache = GatedCache(
                str(config.directory),
                size_limit=config.size_limit,
                # Culling is done by us (cull_limit=0) so evictions can be counted.
                cull_limit=0,
                eviction_policy="least-recently-stored",
                statistics=False,
                timeout=10,
                disk=BlockDisk,
            )
            # Counters live apart from the blocks so that eviction never drops them.
            self._stats = GatedCache(str(config.directory / "stats"), timeout=10)
            self._index = ObjectIndex(config.directory)
        except (OSError, sqlite3.Error) as exc:
            self._cache = None
            self.metrics.add(write_failures=1)
            self._degrade("cannot open cache directory %s (%s); reading through without caching",
                          config.directory, exc)

    @property
    def available(self) -> bool:
        """False when the cache is disabled or could not be opened."""
        return self._cache is not None

    def _degrade(self, message: str, *args: object) -> None:
        self.metrics.degraded = True
        if not self._warned:
            self._warned = True
            logger.warning(message, *args)
        else:
            logger.debug(message, *args)

    def get(self, key: str, *, promote: bool = True) -> memoryview | None:
        """The whole block, or None on a miss, a corrupt block or a cache failure."""
        return self.read_range(key, 0, None, promote=promote)

    def read_range(self, key: str, lo: int, hi: int | None, *, promote: bool = True) -> memoryview | None:
        """Bytes ``[lo, hi)`` of a block (only the chunks covering them are read
        and verified), or None on a miss, a corrupt block or a cache failure."""
        if self._cache is None:
            return None
        try:
            block = self._open_block(key)
            if block is None:
                return None
            if isinstance(block, bytes):  # small values live in SQLite
                with io.BytesIO(block) as inline:
                    data, length, stored_at = read_range(inline, lo, hi)
            else:
                data, length, stored_at = block.read(lo, hi), block.length, block.stored_at
        except Corrupt as exc:
            self._forget(key)
            self.metrics.add(corrupt_blocks=1)
            logger.warning("corrupt cache block %s discarded (%s); refetching", key, exc)
            self.discard(key)
            return None
        except (OSError, sqlite3.Error, diskcache.Timeout) as exc:
            self.metrics.add(read_failures=1)
            self._degrade("block cache read failed (%s); reading through", exc)
            return None
        if promote and time.time() - stored_at > PROMOTE_AFTER_S:
            # Re-store the whole block, off the read path when a reader is attached.
            if self.on_promote is not None:
                self.on_promote(key)
            else:
                self.promote(key)
        return data

    def _open_block(self, key: str) -> "OpenBlock | bytes | None":
        """A block's open file (from the open-file table, else the index), or
        its bytes when diskcache kept it inline; None on a miss."""
        with self._open_lock:
            block = self._open.get(key)
            if block is not None:
                self._open.move_to_end(key)
                return block
        if self._cache is None:
            return None
        indexed = self._indexed(key)
        if indexed is not None:
            return indexed
        handle = self._cache.get(key, default=None, read=True, retry=True)
        if handle is None or isinstance(handle, bytes):
            return handle
        if isinstance(handle, (bytearray, memoryview)):
            return bytes(handle)
        with handle:
            return self._keep_open(key, OpenBlock(os.dup(handle.fileno())))

    def _keep_open(self, key: str, block: "OpenBlock") -> "OpenBlock":
        """Add a block to the open-file table (least recently used ones leave)."""
        with self._open_lock:
            self._open[key] = block
            while len(self._open) > _OPEN_BLOCKS:
                self._open.popitem(last=False)
        return block

    def _indexed(self, key: str) -> "OpenBlock | bytes | None":
        """A block from its object's bulk-loaded index entries (None: ask diskcache)."""
        if self._index is None:
            return None
        object_key = key.split(":", 1)[0]
        with FORK_GATE:
            entries = self._index.entries(object_key)
        if entries is None:
            return None
        if not entries.seeded:
            entries.seeded = True
            with self._open_lock:  # piece lists as stored: a read that they miss looks again
                for entry, raw in entries.inline.items():
                    if entry.endswith("#p") and entry[:-2] not in self._piece_lists:
                        self._piece_lists[entry[:-2]] = tuple(sorted(struct.iter_unpack("<II", raw)))
        inline = entries.inline.get(key)
        if inline is not None:
            return inline
        filename = entries.files.get(key)
        if filename is None:
            return None
        try:
            fd = os.open(self._index.path_of(filename), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            entries.files.pop(key, None)  # evicted or re-stored since: diskcache knows
            return None
        return self._keep_open(key, OpenBlock(fd))

    def open_for_scan(self, key: str) -> "OpenBlock | None":
        """A block's open, footer-verified file, opened now if need be, for a
        sequential reader about to read it in parts; None on a miss, a block kept
        inline or any failure (the reader's own read then meets and reports it)."""
        if self._cache is None:
            return None
        try:
            block = self._open_block(key)
        except (Corrupt, OSError, sqlite3.Error, diskcache.Timeout):
            return None
        return block if isinstance(block, OpenBlock) else None

    def opened(self, key: str) -> "OpenBlock | None":
        """The open, footer-verified file of a block read before, if still open
        (no index lookup): a sequential reader's next reads of the same block
        go straight to it.  Its reads verify their chunks and raise on corruption."""
        with self._open_lock:
            return self._open.get(key)

    def _indexed_entry(self, key: str) -> bool:
        """Whether the object's bulk-loaded index entries (or the open files) have ``key``."""
        with self._open_lock:
            if key in self._open:
                return True
        if self._index is None:
            return False
        with FORK_GATE:
            entries = self._index.entries(key.split(":", 1)[0])
        return entries is not None and (key in entries.files or key in entries.inline)

    def contains(self, key: str) -> bool:
        """Whether a block is stored (an index lookup; the block is not read or verified).
        Read-ahead asks this for every block ahead of a reader: the object's
        entries answer first, without a query per block."""
        if self._cache is None:
            return False
        if self._indexed_entry(key):
            return True
        if self._known_absent(key):
            return False
        try:
            return key in self._cache
        except (OSError, sqlite3.Error, diskcache.Timeout):
            return False

    def open_block(self, key: str) -> tuple[BinaryIO, int, int, tuple[int, ...]] | None:
        """For zero-copy serving (``sendfile``): the block's open file, its data
        length, checksum chunk size and per-chunk xxh3_64 sums.  The data is
        ``file[0:length]``; only the footer and checksum table are read and
        verified here, the receiver verifies the data against the sums.  None
        on a miss, a block kept inline in the index, or any failure; the
        caller closes the file."""
        if self._cache is None:
            return None
        try:
            # The open-file table and the object's index entries first: a peer
            # serving a block it served before reads no footer and asks no index.
            block = self._open_block(key)
        except Corrupt as exc:
            self._forget(key)
            self.metrics.add(corrupt_blocks=1)
            logger.warning("corrupt cache block %s discarded (%s)", key, exc)
            self.discard(key)
            return None
        except (OSError, sqlite3.Error, diskcache.Timeout):
            return None
        if not isinstance(block, OpenBlock):
            return None  # a miss, or kept inline in the index
        try:
            # The caller's own descriptor (it closes it); sendfile and pread take
            # explicit offsets, so sharing the file position does not matter.
            handle = os.fdopen(os.dup(block.fd), "rb", buffering=0)
        except OSError:
            return None
        count = len(block.sums) // 8
        return handle, block.length, block.chunk, struct.unpack(f"<{count}Q", block.sums)

    def promote(self, key: str) -> None:
        """Store a block again so that least-recently-stored eviction sees it as fresh."""
        block = self.get(key, promote=False)
        if block is not None:
            self.put(key, block)

    def put(self, key: str, data: bytes | memoryview) -> bool:
        """Store a block; returns False (and counts) when the cache cannot take it."""
        if self._cache is None:
            return False
        if self._skip_writes:
            self._skip_writes -= 1
            return False
        self._forget(key)  # a re-stored (promoted) block gets a new file and time
        try:
            self._cache.set(key, Sealed(data), read=True, retry=_WRITE_RETRY)
            self._consecutive_failures = 0
            if self._cache.volume() > self.config.size_limit:
                evicted = self._cache.cull(retry=_WRITE_RETRY)
                if evicted:
                    self.metrics.add(evictions=evicted)
            return True
        except (OSError, sqlite3.Error, diskcache.Timeout) as exc:
            self.metrics.add(write_failures=1)
            self._consecutive_failures += 1
            if self._consecutive_failures >= _FAILURES_BEFORE_BACKOFF:
                self._skip_writes = _WRITE_BACKOFF_PUTS
                self._consecutive_failures = 0
            self._degrade("cannot write to the block cache at %s (%s); reading through without caching",
                          self.config.directory, exc)
            return False

    # -- pieces: byte ranges of a block -------------------------------------------
    # A Parquet scan reads column chunks (often tens of KiB) scattered through a
    # file; fetching whole blocks for them moved ~10x the bytes needed.  Such
    # reads fetch and store exactly their range as a *piece* of the block: its
    # own entry ``<block key>@<offset>`` in the same sealed format, listed in a
    # small per-block index ``<block key>#p``.  A whole block, when present,
    # always wins.

    def put_piece(self, block_key: str, offset: int, data: bytes | memoryview) -> bool:
        """Store bytes ``[offset, offset + len(data))`` of a block and index them."""
        if self._cache is None or not self.put(f"{block_key}@{offset}", data):
            return False
        try:
            with self._cache.transact(retry=_WRITE_RETRY):  # several processes may add pieces
                raw = self._cache.get(f"{block_key}#p", default=b"", retry=True)
                pieces = set(struct.iter_unpack("<II", raw)) | {(offset, offset + len(data))}
                kept = sorted(pieces)[-_MAX_PIECES:]
                self._cache.set(f"{block_key}#p", b"".join(struct.pack("<II", lo, hi) for lo, hi in kept),
                                retry=_WRITE_RETRY)
            self._remember_pieces(block_key, tuple(kept))
            return True
        except (OSError, sqlite3.Error, diskcache.Timeout) as exc:
            self.metrics.add(write_failures=1)
            self._degrade("cannot index a cache piece at %s (%s)", self.config.directory, exc)
            return False

    def read_piece(self, block_key: str, lo: int, hi: int) -> memoryview | None:
        """Bytes ``[lo, hi)`` of a block from a stored piece that covers them, or None."""
        if self._cache is None:
            return None
        with self._open_lock:
            known = self._piece_lists.get(block_key)
        if known is not None:
            found = self._read_from_pieces(block_key, known, lo, hi)
            if found is not None:
                return found
        pieces = self._load_pieces(block_key)
        if pieces is None:
            return None
        return self._read_from_pieces(block_key, pieces, lo, hi)

    def _load_pieces(self, block_key: str) -> tuple[tuple[int, int], ...] | None:
        """The block's piece list from its index entry (another process may have
        added pieces since this one last looked), remembered; None if none."""
        try:
            raw = self._cache.get(f"{block_key}#p", default=None, retry=True)  # type: ignore[union-attr]
        except (OSError, sqlite3.Error, diskcache.Timeout):
            return None
        if not raw:
            return None
        pieces = tuple(sorted(struct.iter_unpack("<II", raw)))
        self._remember_pieces(block_key, pieces)
        return pieces

    def has_pieces(self, block_key: str) -> bool:
        """Whether any piece of the block is stored (its piece index exists)."""
        if self._cache is None:
            return False
        with self._open_lock:
            if block_key in self._piece_lists:
                return True
        if self._indexed_entry(f"{block_key}#p"):
            return True
        if self._known_absent(f"{block_key}#p"):
            return False
        try:
            return f"{block_key}#p" in self._cache
        except (OSError, sqlite3.Error, diskcache.Timeout):
            return False

    def has_piece(self, block_key: str, lo: int, hi: int) -> bool:
        """Whether stored pieces cover bytes ``[lo, hi)`` of a block, from the
        piece index alone (no data is read or verified: prefetch planning asks
        this for every column chunk of a query, and reading them to answer
        made a warm query's planning cost more than its scan)."""
        if self._cache is None:
            return False
        with self._open_lock:
            pieces = self._piece_lists.get(block_key)
        if pieces is None:
            if self._known_absent(f"{block_key}#p"):
                return False
            pieces = self._load_pieces(block_key)
            if pieces is None:
                return False
        position = lo
        for start, end in pieces:  # sorted: one piece, or neighbours, must reach hi
            if start <= position < end:
                position = end
                if position >= hi:
                    return True
        return False

    def open_piece(self, block_key: str, lo: int, hi: int
                   ) -> tuple[BinaryIO, int, int, int, tuple[int, ...]] | None:
        """For zero-copy serving of bytes ``[lo, hi)`` of a block from one stored
        piece that covers them (see :meth:`open_block`): the piece's open file, its
        offset in the block, its data length, checksum chunk size and per-chunk
        sums; the file holds block bytes ``[offset, offset + length)`` at
        ``file[0:length]``.  None when no single piece covers the range, the piece
        is kept inline in the index, or on any failure; the caller closes the file."""
        if self._cache is None:
            return None
        with self._open_lock:
            known = self._piece_lists.get(block_key)
        if known is not None:
            found = self._open_covering(block_key, known, lo, hi)
            if found is not None:
                return found
        pieces = self._load_pieces(block_key)  # another process may have stored it since
        if pieces is None or pieces == known:
            return None
        return self._open_covering(block_key, pieces, lo, hi)

    def _open_covering(self, block_key: str, pieces: tuple[tuple[int, int], ...], lo: int, hi: int
                       ) -> tuple[BinaryIO, int, int, int, tuple[int, ...]] | None:
        for start, end in pieces:
            if start <= lo and hi <= end:
                opened = self.open_block(f"{block_key}@{start}")
                if opened is None:
                    continue
                handle, length, chunk, sums = opened
                if length == end - start:
                    return handle, start, length, chunk, sums
                handle.close()
        return None

    def known_partial(self, block_key: str) -> bool:
        """Whether this process has seen the block stored as pieces (read those first)."""
        with self._open_lock:
            return block_key in self._piece_lists

    def _remember_pieces(self, block_key: str, pieces: tuple[tuple[int, int], ...]) -> None:
        with self._open_lock:
            self._piece_lists[block_key] = pieces
            self._piece_lists.move_to_end(block_key)
            while len(self._piece_lists) > _PIECE_LISTS:
                self._piece_lists.popitem(last=False)

    def _read_from_pieces(self, block_key: str, pieces: tuple[tuple[int, int], ...], lo: int, hi: int
                          ) -> memoryview | None:
        for start, end in pieces:
            if start <= lo and hi <= end:
                data = self.read_range(f"{block_key}@{start}", lo - start, hi - start)
                if data is not None and len(data) == hi - lo:
                    return data  # else evicted or corrupt: try assembling below
        # A read may span neighbouring pieces (a footer and the chunk before it).
        parts, position = [], lo
        for start, end in pieces:
            if start <= position < end:
                upto = min(end, hi)
                data = self.read_range(f"{block_key}@{start}", position - start, upto - start)
                if data is None or len(data) != upto - position:
                    return None
                parts.append(data)
                position = upto
                if position >= hi:
                    return memoryview(b"".join(parts))
        return None

    def _known_absent(self, key: str) -> bool:
        """Whether the object's index entries, loaded lately in this process and
        not changed by it since, lack ``key`` (see :mod:`shoal.cache.index`): the
        questions read-ahead and prefetch ask about blocks not stored yet then
        need no SQLite lookup each."""
        object_key, sep, _ = key.partition(":")
        if self._index is None or not sep:  # not a block, piece or piece list of an object
            return False
        with FORK_GATE:
            entries = self._index.entries(object_key)
        return entries is not None and entries.lacks(key)

    def _forget(self, key: str) -> None:
        with self._open_lock:
            self._open.pop(key, None)
        if self._index is not None:
            self._index.drop(key)

    def discard(self, key: str) -> None:
        self._forget(key)
        if self._cache is None:
            return
        try:
            self._cache.delete(key, retry=_WRITE_RETRY)
        except (OSError, sqlite3.Error, diskcache.Timeout):
            logger.debug("could not delete cache key %s", key)

    def clear(self) -> int:
        """Remove every block (and the persisted counters); returns blocks removed."""
        with self._open_lock:
            self._open.clear()
        if self._cache is None:
            return 0
        if self._stats is not None:
            self._stats.clear(retry=True)
        self._listings.clear()
        self._flushed = {}
        return int(self._cache.clear(retry=True))

    def volume(self) -> int:
        """Bytes on disk used by the cache."""
        return int(self._cache.volume()) if self._cache is not None else 0

    def entries(self) -> int:
        return len(self._cache) if self._cache is not None else 0

    def flush_stats(self) -> None:
        """Add this process's counters (since the last flush) to the shared totals."""
        if self._stats is None:
            return
        current = self.metrics.snapshot()
        try:
            for name in _PERSISTED:
                delta = current[name] - self._flushed.get(name, 0)
                if delta:
                    self._stats.incr(_STATS_KEY_PREFIX + name, delta, default=0, retry=_WRITE_RETRY)
                self._flushed[name] = current[name]
        except (OSError, sqlite3.Error, diskcache.Timeout) as exc:
            logger.debug("could not persist cache statistics: %s", exc)

    # Listings (remembered LIST results) live apart from the blocks: see listings.py.

    def get_listing(self, key: str) -> list[dict[str, Any]] | None:
        """A listing remembered by :meth:`put_listing`, or None."""
        return self._listings.get(key) if self._cache is not None else None

    def put_listing(self, key: str, entries: list[dict[str, Any]]) -> None:
        if self._cache is not None:
            self._listings.put(key, entries)

    def persisted_stats(self) -> dict[str, int]:
        """Counters summed over every process that used this directory."""
        if self._stats is None:
            return {}
        out: dict[str, int] = {}
        for name in _PERSISTED:
            out[name] = int(self._stats.get(_STATS_KEY_PREFIX + name, default=0, retry=True))
        return out

    def close(self) -> None:
        with self._open_lock:
            self._open.clear()
        if self._index is not None:
            self._index.close()
        if self._cache is not None:
            self.flush_stats()
            self._cache.close()
        if self._stats is not None:
            self._stats.close()
