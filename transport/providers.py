"""Block providers: what a :class:`~shoal.transport.server.BlockServer` serves.

* :class:`CacheProvider` serves a worker's SSD block cache (any object with
  the :class:`~shoal.cache.blockcache.BlockCache` methods ``open_block`` and
  ``get``; ranged requests also use ``open_piece`` and ``read_piece`` when the
  cache has them), zero-copy from the cache file when it can, and on a miss
  asks an optional *filler* (the worker's store reader) so the owner fills its
  own cache and the store is read once for the whole cluster.
* :class:`MemoryProvider` serves a dict (tests, benchmarks), with hooks to
  delay, corrupt or version-shift blocks.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, BinaryIO, Callable, Protocol, Sequence

import xxhash

from .base import BlockRequest, ServedBlock
from .protocol import CHUNK, Status, chunk_sums

__all__ = ["CacheProvider", "MemoryProvider", "Filler"]

logger = logging.getLogger(__name__)

#: Fills a block the provider does not have (None: cannot).
Filler = Callable[[BlockRequest], ServedBlock | None]


class _Cache(Protocol):
    def open_block(self, key: str) -> Any: ...

    def get(self, key: str, *, promote: bool = True) -> Any: ...


class _Counters:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.values: dict[str, int] = {}

    def add(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                self.values[name] = self.values.get(name, 0) + delta

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.values)


def _file_slice(file: BinaryIO, base: int, length: int, chunk: int, sums: Sequence[int], lo: int, hi: int,
                token: str) -> ServedBlock | None:
    """Block bytes ``[lo, hi)`` out of a sealed cache file that holds block bytes
    ``[base, base + length)`` (at file offset 0, with per-``chunk`` ``sums``).

    A slice that starts on a chunk boundary of the file is sent from the file
    (``sendfile``) with the stored sums of the chunks it covers; if it ends inside
    a chunk, that chunk is read and checked whole, and the sum of the part sent
    replaces its stored sum.  Any other slice is read with the chunks around it,
    checked against the stored sums, and sent from memory with sums of its own.
    None when a check fails (the caller then reads through the cache's verifying
    path, which drops the corrupt entry).
    """
    start, end = lo - base, hi - base
    if start < 0 or end > length or end < start or chunk <= 0:
        return None
    if end == start:
        return ServedBlock(Status.FILLED, token=token, data=b"", chunk=chunk, sums=[])
    first, last = start // chunk, (end - 1) // chunk
    if start % chunk:  # off the file's chunk grid: read, check, re-sum
        edge = first * chunk
        raw = memoryview(os.pread(file.fileno(), min((last + 1) * chunk, length) - edge, edge))
        for n in range(last + 1 - first):
            if xxhash.xxh3_64_intdigest(raw[n * chunk : (n + 1) * chunk]) != sums[first + n]:
                return None
        return ServedBlock(Status.FILLED, token=token, data=raw[start - edge : end - edge])
    picked = list(sums[first : last + 1])
    if end % chunk and end != length:
        edge = last * chunk
        raw = os.pread(file.fileno(), min(chunk, length - edge), edge)
        if xxhash.xxh3_64_intdigest(raw) != sums[last]:
            return None
        picked[-1] = xxhash.xxh3_64_intdigest(memoryview(raw)[: end - edge])
    return ServedBlock(Status.FILLED, token=token, file=file, offset=start, length=end - start, chunk=chunk,
                       sums=picked)


class CacheProvider:
    """Serves blocks (and, for ranged requests, slices of blocks or of stored
    pieces) of a block cache; fills misses through ``filler`` when the request
    says where the block comes from."""

    def __init__(self, cache: _Cache, filler: Filler | None = None) -> None:
        self.cache = cache
        self.filler = filler
        self.counters = _Counters()

    # Listings remembered for peers (LISTING): kept where this cache keeps its own.

    def get_listing(self, key: str) -> list[dict[str, Any]] | None:
        get = getattr(self.cache, "get_listing", None)
        return get(key) if get is not None else None

    def put_listing(self, key: str, entries: list[dict[str, Any]]) -> None:
        put = getattr(self.cache, "put_listing", None)
        if put is not None:
            put(key, entries)

    def _cached_range(self, request: BlockRequest) -> ServedBlock | None:
        """A ranged request from the cache: a slice of the whole block or of one stored
        piece (zero-copy), else bytes assembled from pieces (verified, in memory)."""
        lo, hi = request.offset, request.offset + request.length
        known_partial = getattr(self.cache, "known_partial", None)
        pieces_first = known_partial is not None and known_partial(request.key)
        if pieces_first:  # its piece list is in memory: no block lookup
            served = self._piece_slice(request, lo, hi)
            if served is not None:
                return served
        opened = self.cache.open_block(request.key)
        if opened is not None:
            file, length, chunk, sums = opened
            if length != request.block_length:
                file.close()
                self.counters.add(stale=1)
                return ServedBlock(Status.STALE, detail=f"block has {length} bytes")
            served = _file_slice(file, 0, length, chunk, sums, lo, hi, request.token)
            if served is None or served.file is None:
                file.close()
            if served is not None:
                self.counters.add(hits=1, range_hits=1, sendfile_hits=1 if served.file else 0, bytes=hi - lo)
                return served
        served = None if pieces_first else self._piece_slice(request, lo, hi)
        if served is not None:
            return served
        # A block kept inline in the index, a range spread over several pieces, or a
        # file that failed a check: the cache's verifying reads (they drop corrupt entries).
        read_piece = getattr(self.cache, "read_piece", None)
        data = read_piece(request.key, lo, hi) if read_piece is not None and hi > lo else None
        if data is None:
            block = self.cache.get(request.key)
            if block is not None and len(block) != request.block_length:
                self.counters.add(stale=1)
                return ServedBlock(Status.STALE, detail=f"block has {len(block)} bytes")
            data = block[lo:hi] if block is not None else None
        if data is None or len(data) != hi - lo:
            return None
        self.counters.add(hits=1, range_hits=1, bytes=hi - lo)
        return ServedBlock(Status.FILLED, token=request.token, data=data)

    def _piece_slice(self, request: BlockRequest, lo: int, hi: int) -> ServedBlock | None:
        """``[lo, hi)`` from one stored piece's file (zero-copy), if one covers it."""
        open_piece = getattr(self.cache, "open_piece", None)
        opened = open_piece(request.key, lo, hi) if open_piece is not None else None
        if opened is None:
            return None
        file, base, length, chunk, sums = opened
        served = _file_slice(file, base, length, chunk, sums, lo, hi, request.token)
        if served is None or served.file is None:
            file.close()
        if served is not None:
            self.counters.add(hits=1, range_hits=1, piece_hits=1, sendfile_hits=1 if served.file else 0,
                              bytes=hi - lo)
        return served

    def _cached(self, request: BlockRequest) -> ServedBlock | None:
        if request.ranged:
            return self._cached_range(request)
        opened = self.cache.open_block(request.key)
        if opened is not None:
            file, length, chunk, sums = opened
            self.counters.add(hits=1, sendfile_hits=1, bytes=length)
            # The key embeds the object's version: a block stored under it is that version.
            return ServedBlock(Status.FILLED, token=request.token, file=file, offset=0, length=length,
                               chunk=chunk, sums=sums)
        block = self.cache.get(request.key)
        if block is not None:
            self.counters.add(hits=1, bytes=len(block))
            return ServedBlock(Status.FILLED, token=request.token, data=block)
        return None

    def lookup_fast(self, request: BlockRequest) -> ServedBlock | None:
        """The answer when it needs no store read (a hit, or a miss nobody can fill);
        None when :meth:`lookup` must fill it (the server runs that off the connection)."""
        served = self._cached(request)
        if served is not None:
            return served
        if request.origin is not None and self.filler is not None:
            return None
        self.counters.add(misses=1)
        return ServedBlock(Status.NOT_FOUND)

    def lookup(self, request: BlockRequest) -> ServedBlock:
        served = self._cached(request)
        if served is not None:
            return served
        if request.origin is not None and self.filler is not None:
            served = self.filler(request)
            if served is not None:
                self.counters.add(fills=1 if served.status is Status.FILLED else 0,
                                  fill_failures=0 if served.status is Status.FILLED else 1)
                return served
        self.counters.add(misses=1)
        return ServedBlock(Status.NOT_FOUND)

    def stats(self) -> dict[str, Any]:
        data: dict[str, Any] = dict(self.counters.snapshot())
        metrics = getattr(self.cache, "metrics", None)
        if metrics is not None and hasattr(metrics, "snapshot"):
            data["cache"] = metrics.snapshot()
        return data


class MemoryProvider:
    """Serves ``key -> (token, bytes)`` from memory.

    ``delay(key)`` returns seconds to sleep before answering (to force
    out-of-order answers); keys in ``corrupt`` are served with checksums of
    other bytes; ``chunk`` is the checksum granularity.
    """

    def __init__(self, blocks: dict[str, tuple[str, bytes]] | None = None, *,
                 delay: Callable[[str], float] | None = None, chunk: int = CHUNK) -> None:
        self.blocks: dict[str, tuple[str, bytes]] = dict(blocks or {})
        self.delay = delay
        self.chunk = chunk
        self.corrupt: set[str] = set()
        self.counters = _Counters()
        self._sums: dict[str, list[int]] = {}

    def put(self, key: str, data: bytes, token: str = "v1") -> None:
        self.blocks[key] = (token, data)
        self._sums.pop(key, None)

    def lookup(self, request: BlockRequest) -> ServedBlock:
        if self.delay is not None:
            seconds = self.delay(request.key)
            if seconds > 0:
                time.sleep(seconds)
        entry = self.blocks.get(request.key)
        if entry is None:
            self.counters.add(misses=1)
            return ServedBlock(Status.NOT_FOUND)
        token, data = entry
        if token != request.token:
            self.counters.add(stale=1)
            return ServedBlock(Status.STALE, token=token, detail="version differs")
        if request.ranged:
            if len(data) != request.block_length:
                self.counters.add(stale=1)
                return ServedBlock(Status.STALE, token=token, detail=f"block has {len(data)} bytes")
            data = data[request.offset : request.offset + request.length]
            sums = chunk_sums(data, self.chunk)
        else:
            sums = self._sums.get(request.key)
            if sums is None:
                sums = self._sums[request.key] = chunk_sums(data, self.chunk)
        if request.key in self.corrupt:
            sums = [s ^ 1 for s in sums] or sums
        self.counters.add(hits=1, bytes=len(data))
        return ServedBlock(Status.FILLED, token=token, data=data, chunk=self.chunk, sums=sums)

    def stats(self) -> dict[str, Any]:
        return self.counters.snapshot()
