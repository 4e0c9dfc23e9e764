"""Pieces: exact byte ranges of blocks, fetched, shared while in flight, and stored.

A Parquet scan reads column chunks (often tens of KiB) scattered through a
file; fetching whole blocks for them moved ~10x the bytes needed.  Such reads,
and the engine's prefetch of a query's column chunks, fetch exactly their
ranges as *pieces*: from the owner peers first (when there are any), then from
the store, one GET per contiguous run.  A piece in flight is announced, so
readers wait for it instead of fetching it again; it is read from memory until
the cache writer has stored it on the SSD.  This is a part of
:class:`~shoal.cache.reader.BlockReader` (a mixin over its state), kept apart
to keep each module readable.
"""

from __future__ import annotations

import collections
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Sequence

from .readstate import IOLedger, PeerSource, slice_of
from .source import ObjectSource, ObjectVersion

if TYPE_CHECKING:
    from .blockcache import BlockCache, CacheMetrics
    from .config import CacheConfig
    from .readstate import MemoryBlocks
    from .writebehind import WriteBehind

__all__ = ["PieceFetching"]

logger = logging.getLogger(__name__)


class PieceFetching:
    """Fetching, sharing and storing pieces, for :class:`~shoal.cache.reader.BlockReader`."""

    # The reader's state that these methods use (set up by BlockReader).
    config: CacheConfig
    cache: BlockCache
    peers: PeerSource | None
    metrics: CacheMetrics
    ledger: IOLedger
    _memory: MemoryBlocks
    _lock: threading.Lock
    _pieces: dict[str, list[tuple[int, int, Future[bytes]]]]
    _held: collections.deque[tuple[str, int, Future[bytes], int]]
    _held_bytes: int
    _inflight: dict[str, Future]
    _prefetch_pool: ThreadPoolExecutor
    _writes: WriteBehind

    def object_key(self, source: ObjectSource, version: ObjectVersion) -> str:  # defined by BlockReader
        raise NotImplementedError

    def caches(self, source: ObjectSource) -> bool:  # defined by BlockReader
        raise NotImplementedError

    def _pending_piece(self, key: str, lo: int, hi: int) -> Future[bytes] | None:
        """A piece being fetched (or awaiting its SSD write) that covers ``[lo, hi)``."""
        with self._lock:
            for start, end, future in self._pieces.get(key, ()):
                if start <= lo and hi <= end:
                    return slice_of(future, lo - start, hi - start)
        return None

    def _fetch_pieces(self, source: ObjectSource, version: ObjectVersion, object_key: str,
                      wanted: Sequence[tuple[int, int, int]]) -> dict[int, memoryview]:
        """Fetch ``(block index, lo, hi)`` pieces: one GET per contiguous run (up to
        ``max_request_size``), concurrently; store each piece behind the read."""
        return self._run_pieces(source, version, object_key, wanted, self._register_pieces(object_key, wanted))

    def _register_pieces(self, object_key: str, wanted: Sequence[tuple[int, int, int]]) -> dict[int, Future[bytes]]:
        """Announce pieces as in flight, so that readers wait for them instead of fetching."""
        futures: dict[int, Future[bytes]] = {}
        with self._lock:
            for index, lo, hi in wanted:
                future: Future[bytes] = Future()
                self._pieces.setdefault(f"{object_key}:{index}", []).append((lo, hi, future))
                futures[index] = future
        return futures

    def _run_pieces(self, source: ObjectSource, version: ObjectVersion, object_key: str,
                    wanted: Sequence[tuple[int, int, int]], futures: dict[int, Future[bytes]]) -> dict[int, memoryview]:
        """The owner peers first (when there are any), then the store for the rest."""
        out: dict[int, memoryview] = {}
        if self.peers is not None:
            out = self._pieces_from_owners(source, version, object_key, wanted, futures)
            wanted = [w for w in wanted if w[0] not in out]
        if wanted:
            out.update(self._pieces_from_store(source, version, object_key, wanted,
                                               {w[0]: futures[w[0]] for w in wanted}))
        return out

    def _pieces_from_owners(self, source: ObjectSource, version: ObjectVersion, object_key: str,
                            wanted: Sequence[tuple[int, int, int]],
                            futures: dict[int, Future[bytes]]) -> dict[int, memoryview]:
        """Of ``wanted`` (one piece per block), those the owner peers delivered: each
        settles its future and is kept (in memory; on the SSD too with
        ``keep_peer_copies``)."""
        out: dict[int, memoryview] = {}
        for index, lo, piece in self._pieces_from_peers(source, version, object_key, wanted):
            out[index] = piece
            futures[index].set_result(piece)  # type: ignore[arg-type]
            self._store_piece(f"{object_key}:{index}", lo, piece, futures[index],
                              to_ssd=self.config.keep_peer_copies)
        return out

    def _pieces_from_peers(self, source: ObjectSource, version: ObjectVersion, object_key: str,
                           wanted: Sequence[tuple[int, int, int]]) -> list[tuple[int, int, memoryview]]:
        """``(index, lo, bytes)`` of the pieces the peer tier delivered; a peer problem is a miss."""
        bs = self.config.block_size
        try:
            got = self.peers.fetch_pieces(  # type: ignore[union-attr]
                source, version, bs, [(index, f"{object_key}:{index}", lo, hi) for index, lo, hi in wanted])
        except Exception as exc:  # noqa: BLE001 - never fail a read because of a peer
            logger.warning("peer tier failed (%s); reading from the store", exc)
            return []
        found = []
        for index, lo, hi in wanted:
            piece = got.get(index)
            if piece is not None and len(piece) == hi - lo:
                found.append((index, lo, memoryview(piece)))
        if found:
            self.ledger.add(version.url, bytes_from_peers=sum(len(p) for _, _, p in found),
                            blocks_from_peers=len(found))
        return found

    def _pieces_from_store(self, source: ObjectSource, version: ObjectVersion, object_key: str,
                           wanted: Sequence[tuple[int, int, int]],
                           futures: dict[int, Future[bytes]]) -> dict[int, memoryview]:
        bs = self.config.block_size
        runs: list[list[tuple[int, int, int]]] = []
        for piece in sorted(wanted):
            index, lo, hi = piece
            if runs:
                last_index, _, last_hi = runs[-1][-1]
                run_bytes = (last_index * bs + last_hi) - (runs[-1][0][0] * bs + runs[-1][0][1])
                if index == last_index + 1 and last_hi == bs and lo == 0 and run_bytes < self.config.max_request_size:
                    runs[-1].append(piece)
                    continue
            runs.append([piece])
        ranges = [(run[0][0] * bs + run[0][1], run[-1][0] * bs + run[-1][2]) for run in runs]
        try:
            payloads = source.fetch(version, ranges)
        except BaseException as exc:
            with self._lock:
                for index, lo, hi in wanted:
                    self._drop_piece(f"{object_key}:{index}", futures[index])
            for future in futures.values():
                future.set_exception(exc)
            raise
        # Counted before any waiting reader is woken: what it read is in the metrics when it returns.
        total = sum(len(p) for p in payloads)
        self.metrics.add(misses=len(wanted), bytes_from_store=total, store_requests=len(ranges))
        self.ledger.add(version.url, bytes_from_store=total, store_requests=len(ranges), blocks_missed=len(wanted))
        out: dict[int, memoryview] = {}
        for run, (begin, _), payload in zip(runs, ranges, payloads):
            view = memoryview(payload)
            for index, lo, hi in run:
                piece = view[index * bs + lo - begin : index * bs + hi - begin]
                out[index] = piece
                futures[index].set_result(piece)  # type: ignore[arg-type]
                self._store_piece(f"{object_key}:{index}", lo, piece, futures[index])
        return out

    def _drop_piece(self, key: str, future: Future[bytes]) -> None:
        entries = [e for e in self._pieces.get(key, ()) if e[2] is not future]
        if entries:
            self._pieces[key] = entries
        else:
            self._pieces.pop(key, None)

    def _store_piece(self, key: str, lo: int, piece: memoryview, future: Future[bytes], *,
                     to_ssd: bool = True) -> None:
        """Write a piece to the SSD off the read path; it stays readable from memory until then.

        Pieces not meant for the SSD (``to_ssd=False``: what a peer served, see
        ``CacheConfig.keep_peer_copies``), and all pieces when there is no SSD
        cache, stay in memory, at most ``memory_size`` of them; past that the
        oldest go to the SSD (if there is one) or are dropped, so that
        prefetched bytes still reach the reader."""
        if to_ssd and self.cache.available:
            self._write_piece(key, lo, piece, future)
            return
        spill: list[tuple[str, int, Future[bytes]]] = []
        with self._lock:
            self._held.append((key, lo, future, len(piece)))
            self._held_bytes += len(piece)
            while self._held_bytes > self.config.memory_size and self._held:
                old_key, old_lo, old_future, size = self._held.popleft()
                self._held_bytes -= size
                if self.cache.available:
                    spill.append((old_key, old_lo, old_future))  # memory is short: keep it on the SSD
                else:
                    self._drop_piece(old_key, old_future)
        for old_key, old_lo, old_future in spill:
            self._write_piece(old_key, old_lo, old_future.result(), old_future)

    def _write_piece(self, key: str, lo: int, piece: memoryview, future: Future[bytes]) -> None:
        # No copy: the buffer under the piece (a store payload, or what the peer tier
        # received into) is never written again.  Until written it is read from memory.
        self._writes.write(len(piece), lambda: self.cache.put_piece(key, lo, piece),
                          lambda: self._drop_piece(key, future))

    def prefetch_ranges(self, source: ObjectSource, version: ObjectVersion,
                        ranges: Sequence[tuple[int, int]], *, gap: int = 64 << 10,
                        collect: list[tuple[int, int, Future]] | None = None) -> int:
        """Fetch exactly these byte ranges (neighbours closer than ``gap`` merged) in
        the background, as pieces; returns the bytes requested.  Ranges already
        cached or being fetched are skipped.  With ``collect``, every piece of
        the ranges that will be in memory (being fetched now, already in flight,
        or in a block held in memory) is appended as ``(start, end, future of
        its bytes)``, object offsets; pieces on the SSD are not."""
        if not self.caches(source):
            return 0
        merged: list[list[int]] = []
        for start, end in sorted((max(0, s), min(e, version.size)) for s, e in ranges if e > s):
            if merged and start - merged[-1][1] <= gap:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        bs = self.config.block_size
        object_key = self.object_key(source, version)
        requested = 0
        batch: list[tuple[list[tuple[int, int, int]], dict[int, Future[bytes]]]] = []  # for the owner peers
        for start, end in merged:
            wanted = []
            for index in range(start // bs, (end - 1) // bs + 1):
                lo, hi = max(start - index * bs, 0), min(end - index * bs, bs, version.size - index * bs)
                key = f"{object_key}:{index}"
                with self._lock:
                    busy = key in self._inflight
                if busy:
                    continue
                block = self._memory.get(key)
                if block is not None:
                    if collect is not None:
                        done: Future = Future()
                        done.set_result(memoryview(block)[lo:hi])
                        collect.append((index * bs + lo, index * bs + hi, done))
                    continue
                pending = self._pending_piece(key, lo, hi)
                if pending is not None:
                    if collect is not None:
                        collect.append((index * bs + lo, index * bs + hi, pending))
                    continue
                # Pieces first: their list is usually in memory, the block lookup is a query.
                if self.cache.has_piece(key, lo, hi) or self.cache.contains(key):
                    continue
                wanted.append((index, lo, hi))
                requested += hi - lo
            if wanted:  # as pieces, from their owners (when there are peers) or the store
                futures = self._register_pieces(object_key, wanted)
                if collect is not None:
                    collect.extend((index * bs + lo, index * bs + hi, futures[index]) for index, lo, hi in wanted)
                if self.peers is None:
                    self._prefetch_pool.submit(self._prefetch_pieces_quietly, source, version, object_key,
                                               wanted, futures)
                else:
                    batch.append((wanted, futures))
        if batch:
            self._prefetch_pool.submit(self._prefetch_from_peers_quietly, source, version, object_key, batch)
        return requested

    def _prefetch_pieces_quietly(self, source: ObjectSource, version: ObjectVersion, object_key: str,
                                 wanted: Sequence[tuple[int, int, int]], futures: dict[int, Future[bytes]], *,
                                 store_only: bool = False) -> None:
        fetch = self._pieces_from_store if store_only else self._run_pieces
        try:
            fetch(source, version, object_key, wanted, futures)
        except Exception as exc:  # noqa: BLE001 - the reader fetches again if it needs to
            logger.debug("prefetch of %s failed: %s", version.url, exc)

    def _prefetch_from_peers_quietly(self, source: ObjectSource, version: ObjectVersion, object_key: str,
                                     batch: list[tuple[list[tuple[int, int, int]], dict[int, Future[bytes]]]]) -> None:
        """One prefetch's pieces from their owners in as few requests as it takes
        (one batch per round of distinct blocks, answered pipelined), then what the
        owners did not deliver from the store, range by range as without peers.

        A piece per job, each waiting on its own answer on one of the pool's
        threads, made a peer-warm TPC-H q03 wait ~10 ms per 64-680 KiB piece: the
        threads, DuckDB and the receiving thread queued for the GIL and two CPUs."""
        rounds: list[dict[int, tuple[tuple[int, int, int], Future[bytes]]]] = []
        for wanted, futures in batch:
            for index, lo, hi in wanted:
                for pieces in rounds:  # a block may have several pieces: one per round
                    if index not in pieces:
                        pieces[index] = ((index, lo, hi), futures[index])
                        break
                else:
                    rounds.append({index: ((index, lo, hi), futures[index])})
        served: set[int] = set()
        try:
            for pieces in rounds:
                got = self._pieces_from_owners(source, version, object_key, [w for w, _ in pieces.values()],
                                               {index: future for index, (_, future) in pieces.items()})
                served.update(id(pieces[index][1]) for index in got)
        except Exception as exc:  # noqa: BLE001 - what is not served comes from the store
            logger.debug("prefetch of %s from peers failed: %s", version.url, exc)
        for wanted, futures in batch:
            rest = [w for w in wanted if id(futures[w[0]]) not in served]
            if not rest:
                continue
            job = (source, version, object_key, rest, {w[0]: futures[w[0]] for w in rest})
            try:
                self._prefetch_pool.submit(self._prefetch_pieces_quietly, *job, store_only=True)
            except RuntimeError:  # the reader is closing: settle the futures here
                self._prefetch_pieces_quietly(*job, store_only=True)
