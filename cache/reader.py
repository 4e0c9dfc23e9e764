"""Reading byte ranges of pinned object versions, block by block.

Tiers, in order: decoded blocks in process memory, the SSD
:class:`~shoal.cache.blockcache.BlockCache`, the owner peers (optional, see
:class:`PeerSource`), then the object store.  Pieces (exact byte ranges) go
to peers as pieces too, and whole blocks only when a read covers the block
or a sequential reader asks for blocks.  Missing
blocks that touch each other are coalesced into one GET of at most
``max_request_size``; the GETs of one read run concurrently; a block already
being fetched by another thread is waited for, never fetched twice.
Sequential readers get read-ahead (see :meth:`BlockReader.prefetch`).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterable, Sequence

from .blockcache import BlockCache
from .config import CacheConfig
from .pieces import PieceFetching
from .readstate import IOLedger, MemoryBlocks, PeerSource, ReadCursor, UrlIO, as_bytes, covers_block
from .source import ObjectSource, ObjectVersion
from .twocore import SPLIT_MIN
from .writebehind import WriteBehind

__all__ = ["BlockReader", "IOLedger", "PeerSource", "ReadCursor", "UrlIO"]

logger = logging.getLogger(__name__)

# Read-ahead GETs are at least this big (blocks are coalesced up to it): at
# S3's ~27 ms first byte and ~60 MiB/s per connection a 4 MiB GET spends ~70%
# of its time moving bytes; smaller ones mostly wait.
_READAHEAD_REQUEST = 4 << 20


class BlockReader(PieceFetching):
    """Serves ``read(version, start, end)`` from memory, SSD cache, peers (optional), or the store."""

    def __init__(self, config: CacheConfig, cache: BlockCache | None = None,
                 peers: PeerSource | None = None) -> None:
        self.config = config
        self.cache = cache if cache is not None else BlockCache(config)
        self.peers = peers
        self.metrics = self.cache.metrics
        self.ledger = IOLedger()
        self._memory = MemoryBlocks(config.memory_size)
        self._closed = False
        self.cache.on_promote = lambda key: self._writes.submit(lambda: self.cache.promote(key))
        self._init_threads()
        os.register_at_fork(after_in_child=self._init_threads)

    def _init_threads(self) -> None:
        # After a fork (DataLoader workers) the parent's threads are gone: start clean.
        self._inflight: dict[str, Future[bytes | memoryview]] = {}
        # Pieces (byte ranges of blocks) being fetched or not yet on the SSD.
        self._pieces: dict[str, list[tuple[int, int, Future[bytes]]]] = {}
        # Without an SSD cache: pieces kept in memory, oldest first.
        self._held: collections.deque[tuple[str, int, Future[bytes], int]] = collections.deque()
        self._held_bytes = 0
        self._lock = threading.Lock()
        # One thread per concurrent read-ahead GET (each waits on its fetch): with
        # two, a sequential reader had at most ~2 GETs in flight, i.e. no faster
        # than a single stream at S3's 60 MiB/s per connection.
        self._prefetch_pool = ThreadPoolExecutor(
            max_workers=max(2, self.config.max_concurrency), thread_name_prefix="shoal-readahead")
        self._writes = WriteBehind(self._lock)

    # -- keys ---------------------------------------------------------------

    def object_key(self, source: ObjectSource, version: ObjectVersion) -> str:
        """The cache's key of one object version (its blocks are ``"<key>:<index>"``)."""
        identity = "\0".join(
            (source.store_id, version.url, version.token, str(version.size), str(self.config.block_size))
        )
        return hashlib.blake2b(identity.encode(), digest_size=16).hexdigest()

    # -- public -------------------------------------------------------------

    def read(self, source: ObjectSource, version: ObjectVersion, start: int, end: int, *,
             whole_blocks: bool = False, cursor: ReadCursor | None = None) -> bytes:
        """Bytes ``[start, end)`` of ``version`` (clamped to the object's size).

        Missing blocks that the read covers only in part are fetched as exact
        pieces, unless ``whole_blocks`` (a sequential reader) asks for blocks.
        A ``cursor`` (one per sequential reader) keeps the SSD block being read
        open for the next reads inside it; :meth:`settle` it when done.
        """
        end = min(end, version.size)
        if end <= start:
            return b""
        bs = self.config.block_size
        if cursor is not None and cursor.url == version.url:
            served = self._read_at_cursor(cursor, version, start, end)
            if served is not None:
                return served
            self.settle(cursor, keep_ahead=True)
        if not self.caches(source):
            data = source.fetch(version, [(start, end)])[0]
            self.metrics.add(bytes_from_store=len(data), store_requests=1)
            self.ledger.add(version.url, bytes_from_store=len(data), store_requests=1)
            return data
        first, last = start // bs, (end - 1) // bs
        object_key = self.object_key(source, version)
        parts: dict[int, bytes | memoryview] = {}
        missing: list[int] = []
        for index in range(first, last + 1):
            lo = max(start - index * bs, 0)
            hi = min(end - index * bs, bs)
            key = f"{object_key}:{index}"
            block = self._memory.get(key)
            if block is not None:
                parts[index] = block[lo:hi]
                self.ledger.add(version.url, bytes_from_memory=hi - lo)
                continue
            with self._lock:
                fetching = key in self._inflight
            # From the SSD, read (and verify) only the chunks this read covers:
            # whole blocks would be read again for every small read of them.
            hi = min(hi, version.size - index * bs)
            if not fetching:
                # A piece in memory first (prefetched, from a peer or awaiting its
                # SSD write): a dict lookup, where the SSD lookup of a block this
                # process has not stored is an SQLite query (DuckDB's reads of a
                # peer-warm query spent ~20 ms of q03 in them, py-spy).
                pending = self._pending_piece(key, lo, hi)
                if pending is not None:
                    parts[index] = pending
                    continue
            piece = None
            if not fetching and self.cache.known_partial(key):
                piece = self.cache.read_piece(key, lo, hi)  # skip the whole-block lookup
            plan = None
            if piece is None and not fetching:
                if cursor is not None and first == last and hi - lo < SPLIT_MIN:
                    # A sequential reader entering a block: its later reads there go to
                    # the helper thread (twocore.py), which starts before this read does.
                    plan = self._plan_block(cursor, version, object_key, index, lo, hi)
                piece = self.cache.read_range(key, lo, hi)
                if plan is not None and (piece is None or len(piece) != hi - lo):
                    plan.cancel()  # the block could not be read after all
                    plan = None
            if piece is None and not fetching:
                # Again: another thread may have announced the piece while the SSD was asked.
                pending = self._pending_piece(key, lo, hi)
                if pending is not None:
                    parts[index] = pending
                    continue
                piece = self.cache.read_piece(key, lo, hi)
            if piece is not None and len(piece) == hi - lo:
                parts[index] = piece
                self.metrics.add(hits=1, bytes_from_cache=len(piece))
                self.ledger.add(version.url, bytes_from_cache=len(piece), blocks_hit=1)
                if cursor is not None and first == last:
                    cursor.url, cursor.index = version.url, index
                    cursor.block = self.cache.opened(key)
                    cursor.plan = plan
            else:
                missing.append(index)
        # Pieces unless the read covers the block or reads sequentially (peers serve both).
        whole = [i for i in missing if whole_blocks or covers_block(i, start, end, bs, version.size)]
        partial = [i for i in missing if i not in whole]
        if whole:
            blocks = self._resolve(source, version, whole, wait=True, ssd_checked=True)
            for index in whole:
                lo = max(start - index * bs, 0)
                hi = min(end - index * bs, len(blocks[index]))
                parts[index] = blocks[index][lo:hi]
        if partial:
            wanted = [(i, max(start - i * bs, 0), min(end - i * bs, bs, version.size - i * bs)) for i in partial]
            parts.update(self._fetch_pieces(source, version, object_key, wanted))
        retry = []
        for index, part in list(parts.items()):
            if isinstance(part, Future):
                try:
                    parts[index] = part.result()
                except Exception:  # noqa: BLE001 - another reader's fetch failed: try ourselves
                    retry.append((index, max(start - index * bs, 0), min(end - index * bs, bs, version.size - index * bs)))
        if retry:
            parts.update(self._fetch_pieces(source, version, object_key, retry))
        if first == last:
            return as_bytes(parts[first])
        return b"".join(parts[index] for index in range(first, last + 1))

    def prefetch(self, source: ObjectSource, version: ObjectVersion, first_block: int, count: int) -> None:
        """Start fetching ``count`` blocks from ``first_block`` in the background.

        The range is split into GET-sized pieces fetched concurrently (up to
        ``max_concurrency``), not one coalesced request per call."""
        if not self.caches(source):
            return
        last = min(first_block + count, self.num_blocks(version))
        step = self.readahead_request_blocks()
        object_key = self.object_key(source, version)
        for first in range(first_block, last, step):
            # Only blocks on neither tier are fetched.  Blocks already on the SSD
            # are left there for the reader to read in place (``read_range``):
            # loading them into the memory tier from pool threads first cost a
            # fresh process a page fault per 4 KiB of new memory, the warm
            # scan's largest cost.  Checked here, so a warm scan starts no threads.
            wanted = [index for index in range(first, min(first + step, last))
                      if self._wants(f"{object_key}:{index}")]
            if wanted:
                self._prefetch_pool.submit(self._prefetch_quietly, source, version, wanted)

    def _wants(self, key: str) -> bool:
        """Whether a block is on neither tier nor being fetched.  A block stored
        as pieces is not wanted whole: the reader takes what the pieces hold and
        fetches exactly the ranges they miss (read-ahead used to refetch it)."""
        with self._lock:
            if key in self._inflight:
                return False
        return (self._memory.get(key) is None and not self.cache.contains(key)
                and not self.cache.has_pieces(key))

    def readahead_request_blocks(self) -> int:
        """Blocks per read-ahead GET."""
        bs = self.config.block_size
        return max(1, min(_READAHEAD_REQUEST, self.config.max_request_size) // bs)

    def readahead_limit(self) -> int:
        """Most blocks a sequential reader keeps in flight ahead of itself: enough
        for ``max_concurrency`` read-ahead GETs, at most half the memory tier (the
        blocks wait there until read), and never below ``readahead_blocks``."""
        cfg = self.config
        blocks = cfg.max_concurrency * self.readahead_request_blocks()
        blocks = min(blocks, max(1, cfg.memory_size // (2 * cfg.block_size)))
        return max(cfg.readahead_blocks, blocks)

    def read_cached(self, object_key: str, version: ObjectVersion, start: int, end: int, *,
                    count: bool = True) -> bytes | None:
        """Bytes ``[start, end)`` if this SSD holds (and verifies) all of them, else
        None; never fetches and never waits for a fetch in flight.  ``count=False``:
        not a reader's hit (background work), left out of the metrics."""
        bs = self.config.block_size
        end = min(end, version.size)
        parts = []
        for index in range(start // bs, (end - 1) // bs + 1 if end > start else start // bs):
            key = f"{object_key}:{index}"
            lo, hi = max(start - index * bs, 0), min(end - index * bs, bs)
            # A block seen stored as pieces is looked up there first; the whole
            # block, when stored too, still serves what the pieces lack.
            partial = self.cache.known_partial(key)
            piece = self.cache.read_piece(key, lo, hi) if partial else None
            if piece is None:
                piece = self.cache.read_range(key, lo, hi, promote=False)
            if piece is None and not partial:
                piece = self.cache.read_piece(key, lo, hi)
            if piece is None or len(piece) != hi - lo:
                return None
            parts.append(piece)
        if count:
            self.metrics.add(hits=len(parts), bytes_from_cache=end - start)
        return b"".join(parts)

    def num_blocks(self, version: ObjectVersion) -> int:
        bs = self.config.block_size
        return (version.size + bs - 1) // bs

    # -- a sequential reader's cursor -------------------------------------------

    def _read_at_cursor(self, cursor: ReadCursor, version: ObjectVersion, start: int, end: int) -> bytes | None:
        """A read inside the cursor's block, else None."""
        bs = self.config.block_size
        index = start // bs
        if index != cursor.index or cursor.block is None or end > (index + 1) * bs:
            return None
        base = index * bs
        lo, hi = start - base, end - base
        view = cursor.plan.take(lo, hi) if cursor.plan is not None else None
        if view is None:
            try:
                view = cursor.block.read(lo, hi)
            except Exception:  # noqa: BLE001 - corrupt or gone: the full path re-reads and repairs
                return None
        if len(view) != end - start:
            return None
        cursor.reads += 1
        cursor.bytes += len(view)
        return as_bytes(view)

    def _plan_block(self, cursor: ReadCursor, version: ObjectVersion, object_key: str, index: int,
                    lo: int, hi: int) -> Any:
        """A sequential reader enters block ``index`` with a read of ``[lo, hi)``:
        the helper thread's plan for the later reads there (made when the reader
        entered the block before, or now), and the next block's plan handed over
        now, queued behind it, so that the helper works a block ahead and its
        wake-up (~50-250 us here) is never on the reader's path."""
        plan = None
        ahead, cursor.ahead = cursor.ahead, None
        if ahead is not None:
            url, ahead_index, ahead_plan = ahead
            if url == version.url and ahead_index == index and lo == 0:
                plan = ahead_plan
            else:
                ahead_plan.cancel()
        if plan is None:
            opened = self.cache.open_for_scan(f"{object_key}:{index}")
            plan = opened.plan_reads(hi, hi - lo) if opened is not None else None
        following = index + 1
        if plan is not None and following * self.config.block_size < version.size:
            upcoming = self.cache.open_for_scan(f"{object_key}:{following}")
            upcoming_plan = upcoming.plan_reads(hi - lo, hi - lo, queue=True) if upcoming is not None else None
            if upcoming_plan is not None:
                cursor.ahead = (version.url, following, upcoming_plan)
        return plan

    def settle(self, cursor: ReadCursor, *, keep_ahead: bool = False) -> None:
        """Count a cursor's reads in the metrics and let go of its block (and,
        unless ``keep_ahead``, of the next block's plan)."""
        if cursor.reads:
            self.metrics.add(hits=cursor.reads, bytes_from_cache=cursor.bytes)
            self.ledger.add(cursor.url, bytes_from_cache=cursor.bytes, blocks_hit=cursor.reads)
        cursor.reads = cursor.bytes = 0
        if cursor.plan is not None:
            cursor.plan.cancel()
        if cursor.ahead is not None and not keep_ahead:
            cursor.ahead[2].cancel()
            cursor.ahead = None
        cursor.block, cursor.index, cursor.plan = None, -1, None

    def release(self, source: ObjectSource, version: ObjectVersion, first_block: int, end_block: int) -> None:
        """A sequential reader has passed blocks ``[first_block, end_block)``.

        They leave the memory tier (the SSD has them, or will once the
        write-behind queue reaches them): a scan would otherwise fill the
        tier with blocks it will not read again, and every block it fetches
        would land in fresh memory, paid for with a page fault per 4 KiB;
        freed blocks let the allocator hand the same pages to the next ones.
        """
        if first_block >= end_block or not self.caches(source):
            return
        if not self.cache.available or self.cache.metrics.degraded:  # the memory tier is the only copy
            return
        if self._writes.holding:  # not on the SSD until the query ends: a rescan would refetch them
            return
        object_key = self.object_key(source, version)
        for index in range(first_block, end_block):
            self._memory.discard(f"{object_key}:{index}")

    def drop_memory(self) -> None:
        """Forget blocks held in memory (benchmarks use this to measure the SSD tier)."""
        self._memory.clear()

    # -- internals ----------------------------------------------------------

    def caches(self, source: ObjectSource) -> bool:
        """Local files are read in place unless ``cache_local_files`` asks otherwise."""
        return self.config.cache_local_files or source.store_id != "file"

    def _prefetch_quietly(self, source: ObjectSource, version: ObjectVersion, indices: Sequence[int]) -> None:
        try:
            # The SSD was checked by prefetch(); a block stored meanwhile by
            # another process is merely fetched once more.
            self._resolve(source, version, indices, wait=False, ssd_checked=True)
        except Exception as exc:  # noqa: BLE001 - a failed read-ahead is retried by the real read
            logger.debug("read-ahead of %s failed: %s", version.url, exc)

    def _resolve(
        self, source: ObjectSource, version: ObjectVersion, indices: Iterable[int], *, wait: bool,
        ssd_checked: bool = False,
    ) -> dict[int, bytes | memoryview]:
        object_key = self.object_key(source, version)
        found: dict[int, bytes | memoryview] = {}
        waiting: dict[int, Future[bytes | memoryview]] = {}
        to_fetch: list[int] = []
        owned: dict[int, Future[bytes | memoryview]] = {}
        for index in indices:
            key = f"{object_key}:{index}"
            block = self._memory.get(key)
            if block is not None:
                found[index] = block
                self.ledger.add(version.url, bytes_from_memory=len(block))
                continue
            with self._lock:
                future = self._inflight.get(key)
                if future is None:
                    future = Future()
                    self._inflight[key] = future
                    owned[index] = future
            if index not in owned:
                waiting[index] = future
                continue
            block = None if ssd_checked else self.cache.get(key)
            if block is not None:
                self.metrics.add(hits=1, bytes_from_cache=len(block))
                self.ledger.add(version.url, bytes_from_cache=len(block), blocks_hit=1)
                self._finish(key, owned.pop(index), block)
                found[index] = block
            else:
                to_fetch.append(index)
        if to_fetch:
            try:
                fetched = self._fetch_from_peers(source, version, object_key, to_fetch)
                from_peers = set(fetched)
                rest = [index for index in to_fetch if index not in fetched]
                if rest:
                    fetched.update(self._fetch_blocks(source, version, rest))
            except BaseException as exc:
                for index in to_fetch:
                    self._fail(f"{object_key}:{index}", owned[index], exc)
                raise
            for index, block in fetched.items():
                key = f"{object_key}:{index}"
                self._finish(key, owned[index], block)
                found[index] = block
                if index in from_peers and not self.config.keep_peer_copies:
                    continue  # its owner keeps it; here it stays in the memory tier
                self._write_behind(key, block)
        if wait:
            retry: list[int] = []
            for index, future in waiting.items():
                if future.exception() is None:
                    found[index] = future.result()
                else:  # another reader's (read-ahead) fetch failed: try once ourselves
                    retry.append(index)
            if retry:
                found.update(self._resolve(source, version, retry, wait=True))
        return found

    def _write_behind(self, key: str, block: bytes) -> None:
        """Write a block to the SSD off the read path."""
        self._writes.write(len(block), lambda: self.cache.put(key, block))

    def hold_writes(self) -> contextlib.AbstractContextManager[None]:
        """Hold SSD writes of what is fetched inside the block until it ends.

        A query's fetched blocks and pieces are served from memory meanwhile;
        the writer stores them once the query has its result, so filling the
        cache does not take CPU (on a VM, page-cache pages touched for the
        first time) or the GIL from the query (see :class:`WriteBehind`)."""
        return self._writes.hold()

    def after_writes(self, job: Callable[[], object]) -> None:
        """Run ``job`` on the cache writer after the writes queued (or held) before
        it (its errors are logged, never raised: it is background work)."""
        self._writes.after(job)

    def flush(self) -> None:
        """Wait until blocks fetched so far are written to the SSD cache."""
        self._writes.flush()

    def _finish(self, key: str, future: Future, block: bytes | memoryview) -> None:
        self._memory.put(key, block)
        with self._lock:
            self._inflight.pop(key, None)
        future.set_result(block)

    def _fail(self, key: str, future: Future, exc: BaseException) -> None:
        with self._lock:
            self._inflight.pop(key, None)
        future.set_exception(exc)

    def _fetch_from_peers(self, source: ObjectSource, version: ObjectVersion, object_key: str,
                          indices: Sequence[int]) -> dict[int, bytes | memoryview]:
        """Missing blocks from the peer tier, if any; a peer problem is a miss."""
        if self.peers is None:
            return {}
        bs = self.config.block_size
        lengths = {index: min(bs, version.size - index * bs) for index in indices}
        wanted = [(index, f"{object_key}:{index}", lengths[index]) for index in indices]
        try:
            got = self.peers.fetch_blocks(source, version, bs, wanted)
        except Exception as exc:  # noqa: BLE001 - never fail a read because of a peer
            logger.warning("peer tier failed (%s); reading from the store", exc)
            return {}
        found = {index: block for index, block in got.items()
                 if index in lengths and len(block) == lengths[index]}
        if found:
            self.ledger.add(version.url, bytes_from_peers=sum(len(b) for b in found.values()),
                            blocks_from_peers=len(found))
        return found

    def _fetch_blocks(self, source: ObjectSource, version: ObjectVersion, indices: Sequence[int]) -> dict[int, bytes]:
        """One concurrent batch of GETs for the missing blocks, coalescing neighbours."""
        bs = self.config.block_size
        per_request = max(1, self.config.max_request_size // bs)
        runs: list[list[int]] = []
        for index in sorted(indices):
            if runs and index == runs[-1][-1] + 1 and len(runs[-1]) < per_request:
                runs[-1].append(index)
            else:
                runs.append([index])
        ranges = [(run[0] * bs, min((run[-1] + 1) * bs, version.size)) for run in runs]
        payloads = source.fetch(version, ranges)
        out: dict[int, bytes] = {}
        total = 0
        for run, payload in zip(runs, payloads):
            total += len(payload)
            if len(run) == 1:
                out[run[0]] = payload
                continue
            view = memoryview(payload)
            for n, index in enumerate(run):
                out[index] = bytes(view[n * bs : (n + 1) * bs])
        self.metrics.add(misses=len(indices), bytes_from_store=total, store_requests=len(ranges))
        self.ledger.add(version.url, bytes_from_store=total, store_requests=len(ranges),
                        blocks_missed=len(indices))
        return out

    def close(self) -> None:
        if self._closed:  # idempotent, like file objects
            return
        self._closed = True
        self._prefetch_pool.shutdown(wait=True, cancel_futures=True)
        self._writes.close()
        self.cache.close()
