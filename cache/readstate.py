"""What a :class:`~shoal.cache.reader.BlockReader` keeps besides the tiers
themselves: per-object I/O counters, the memory tier, sequential readers'
cursors, the peer tier's interface, and small helpers of the read path."""

from __future__ import annotations

import threading
from collections import OrderedDict, defaultdict
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence

from .source import ObjectSource, ObjectVersion

__all__ = ["IOLedger", "MemoryBlocks", "PeerSource", "ReadCursor", "UrlIO", "as_bytes", "covers_block", "slice_of"]


@dataclass
class UrlIO:
    """Bytes and requests for one object, by tier."""

    bytes_from_memory: int = 0
    bytes_from_cache: int = 0
    bytes_from_store: int = 0
    store_requests: int = 0
    blocks_hit: int = 0
    blocks_missed: int = 0
    bytes_from_peers: int = 0
    blocks_from_peers: int = 0
    #: Times the object was handed to DuckDB as a local copy (read natively, not counted in bytes).
    local_copies: int = 0


class IOLedger:
    """Per-object I/O counters; the engine diffs snapshots to report per-table I/O."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_url: dict[str, UrlIO] = defaultdict(UrlIO)

    def add(self, url: str, **deltas: int) -> None:
        with self._lock:
            entry = self._by_url[url]
            for name, delta in deltas.items():
                setattr(entry, name, getattr(entry, name) + delta)

    def snapshot(self) -> dict[str, UrlIO]:
        with self._lock:
            return {url: UrlIO(**vars(io)) for url, io in self._by_url.items()}


class MemoryBlocks:
    """A small LRU of verified blocks, bounded in bytes."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._blocks: OrderedDict[str, bytes | memoryview] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | memoryview | None:
        with self._lock:
            block = self._blocks.get(key)
            if block is not None:
                self._blocks.move_to_end(key)
            return block

    def put(self, key: str, block: bytes | memoryview) -> None:
        if len(block) > self.capacity:
            return
        with self._lock:
            old = self._blocks.pop(key, None)
            if old is not None:
                self._size -= len(old)
            self._blocks[key] = block
            self._size += len(block)
            while self._size > self.capacity and self._blocks:
                _, evicted = self._blocks.popitem(last=False)
                self._size -= len(evicted)

    def discard(self, key: str) -> None:
        with self._lock:
            old = self._blocks.pop(key, None)
            if old is not None:
                self._size -= len(old)

    def clear(self) -> None:
        with self._lock:
            self._blocks.clear()
            self._size = 0


def as_bytes(part: bytes | memoryview) -> bytes:
    """``bytes(part)``, without the copy when ``part`` is all of a bytes object
    (a read of exactly one block, from memory or the SSD)."""
    if isinstance(part, memoryview) and type(part.obj) is bytes and part.nbytes == len(part.obj):
        return part.obj
    return bytes(part)


def covers_block(index: int, start: int, end: int, block_size: int, size: int) -> bool:
    """Whether ``[start, end)`` covers all of block ``index``."""
    return start <= index * block_size and end >= min((index + 1) * block_size, size)


def slice_of(future: Future[bytes], lo: int, hi: int) -> Future[bytes]:
    """A future of ``future``'s result[lo:hi]."""
    out: Future[bytes] = Future()

    def done(f: Future[bytes]) -> None:
        if f.exception() is not None:
            out.set_exception(f.exception())  # type: ignore[arg-type]
        else:
            out.set_result(memoryview(f.result())[lo:hi])  # type: ignore[arg-type]

    future.add_done_callback(done)
    return out


class PeerSource(Protocol):
    """Optional tier between the SSD cache and the store (``shoal.transport.peercache.PeerTier``)."""

    def fetch_blocks(self, source: ObjectSource, version: ObjectVersion, block_size: int,
                     wanted: Sequence[tuple[int, str, int]]) -> Mapping[int, bytes | memoryview]:
        """Of the blocks ``(index, key, exact length)``, those peers delivered (verified)."""
        ...

    def fetch_pieces(self, source: ObjectSource, version: ObjectVersion, block_size: int,
                     wanted: Sequence[tuple[int, str, int, int]]) -> Mapping[int, bytes | memoryview]:
        """Of the pieces ``(index, key, lo, hi)`` (one per block), those peers delivered (verified)."""
        ...

    def remembered_listing(self, key: str) -> bytes | None:
        """A listing (JSON) a peer remembers under ``key``, or None."""
        ...

    def share_listing(self, key: str, body: bytes) -> None:
        """Offer a listing (JSON) to the peer that remembers ``key``."""
        ...


class ReadCursor:
    """A sequential reader's place: the SSD block it is reading, kept open.

    Reads that stay inside that block skip the tiers' lookups (memory, fetches
    in flight, pieces, the open-file table), a large share of a 1 MiB read's
    cost; they still verify the chunks they read.  Counters are added up here
    and handed to the metrics when the reader moves on or closes.  (Reading
    the next block ahead, whole, on another thread was tried: the extra copy
    and the GIL it holds made 1 MiB reads slower, 0.42x a local file vs 0.68x.)
    Instead, the helper thread of ``twocore.py`` fills the later half of the
    reads the reader will make in its block while it makes the earlier ones
    (``plan``), and is handed the next block's as this one is entered (``ahead``).
    """

    __slots__ = ("url", "index", "block", "reads", "bytes", "plan", "ahead")

    def __init__(self) -> None:
        self.url = ""
        self.index = -1
        self.block: Any = None  # the block's open file (blockfile.OpenBlock)
        self.reads = 0
        self.bytes = 0
        self.plan: Any = None  # reads of this block the helper thread fills (twocore.ReadPlan)
        # (url, block index, plan): the next block's plan, handed to the helper as
        # this block was entered, so that the helper is a block ahead of the reader.
        self.ahead: Any = None
