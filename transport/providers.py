"""Block providers: what a :class:`~shoal.transport.server.BlockServer` serves.

* :class:`CacheProvider` serves a worker's SSD block cache (any object with
  the :class:`~shoal.cache.blockcache.BlockCache` methods ``open_block`` and
  ``get``), zero-copy from the cache file when it can, and on a miss asks an
  optional *filler* (the worker's store reader) so the owner fills its own
  cache and the store is read once for the whole cluster.
* :class:`MemoryProvider` serves a dict (tests, benchmarks), with hooks to
  delay, corrupt or version-shift blocks.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Protocol

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


class CacheProvider:
    """Serves blocks of a block cache; fills misses through ``filler`` when the
    request says where the block comes from."""

    def __init__(self, cache: _Cache, filler: Filler | None = None) -> None:
        self.cache = cache
        self.filler = filler
        self.counters = _Counters()

    def _cached(self, request: BlockRequest) -> ServedBlock | None:
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
        sums = self._sums.get(request.key)
        if sums is None:
            sums = self._sums[request.key] = chunk_sums(data, self.chunk)
        if request.key in self.corrupt:
            sums = [s ^ 1 for s in sums] or sums
        self.counters.add(hits=1, bytes=len(data))
        return ServedBlock(Status.FILLED, token=token, data=data, chunk=self.chunk, sums=sums)

    def stats(self) -> dict[str, Any]:
        return self.counters.snapshot()
