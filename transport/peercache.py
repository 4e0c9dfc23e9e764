"""The peer cache tier: local miss -> the block's owner peer -> the object store.

A :class:`PeerTier` plugs into :class:`shoal.cache.reader.BlockReader` as its
``peers`` source.  For the blocks a read misses locally it asks each block's
owner (rendezvous hashing over the live peers, :mod:`.membership`), sending
the block's :class:`~.base.Origin` so that an owner that misses too reads the
store itself, fills its own cache and answers: the store is read once per
block for the whole cluster, and later readers on any node get it from the
owner.  Whatever the peers cannot deliver (not found, stale, busy, corrupt,
unavailable, timed out) the reader fetches from the store as before.
Scattered reads (Parquet column chunks) ask for *pieces*, byte ranges of a
block (:meth:`PeerTier.fetch_pieces`): only those bytes cross the network,
and an owner that misses fills and keeps just that range.

Guarantees: a peer problem is a miss, never a failed read and never wrong
bytes (the version token and exact length travel with every request and
the data is checksummed end to end); a dead or slow peer costs at most one
``timeout`` and is then skipped for ``down_for`` seconds.  Blocks this node
owns itself are not requested over the network.
"""

from __future__ import annotations

import logging
import mmap
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, NamedTuple, Sequence

from .base import (
    BlockRequest, BlockTransport, LatencyHistogram, Origin, Outcome, PeerAddress, load_secret, transport_mode,
)
from .membership import Membership
from .tcp import ClientConfig, TcpTransport

if TYPE_CHECKING:  # the cache layer sits above transport: types only
    from shoal.cache.source import ObjectSource, ObjectVersion

__all__ = ["PeerTier", "PeerConfig", "PeerMetrics"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class PeerConfig:
    """Settings of the peer tier (see :meth:`from_env` for the environment names)."""

    peers: tuple[str, ...] = ()
    #: This node's own address in ``peers`` when it is a worker (its keys are not fetched remotely).
    self_address: str | None = None
    #: Longest wait for one owner's answer, an owner miss filled from the store included.
    timeout: float = 5.0
    connect_timeout: float = 0.5
    #: How long a failed peer is skipped.
    down_for: float = 10.0
    connections_per_peer: int = 2
    #: ``auto`` | ``tcp`` | ``rdma`` (``SHOAL_TRANSPORT``).
    mode: str = "auto"
    #: Ask owners to fill their cache from the store on a miss.
    fill: bool = True
    max_block: int = 16 << 20

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> "PeerConfig":
        """``SHOAL_PEERS`` (``host:port,host:port``), ``SHOAL_PEER_TIMEOUT`` (seconds),
        ``SHOAL_TRANSPORT``; explicit ``overrides`` win."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        if env.get("SHOAL_PEERS"):
            values["peers"] = tuple(str(p) for p in PeerAddress.parse_list(env["SHOAL_PEERS"]))
        if env.get("SHOAL_PEER_TIMEOUT"):
            values["timeout"] = float(env["SHOAL_PEER_TIMEOUT"])
        values["mode"] = transport_mode(None, env)
        values.update({k: v for k, v in overrides.items() if v is not None})
        if isinstance(values.get("peers"), str):
            values["peers"] = tuple(str(p) for p in PeerAddress.parse_list(values["peers"]))
        return cls(**values)


@dataclass
class PeerMetrics:
    """Counters of the peer tier (the local and store tiers count in the cache's metrics)."""

    #: Blocks and pieces delivered, and their bytes (as the reader received them).
    peer_hits: int = 0
    peer_bytes: int = 0
    #: Of ``peer_hits``: pieces (ranged GETs).
    piece_hits: int = 0
    #: Pieces asked of an owner that does not serve ranges (its whole blocks were fetched).
    ranges_unsupported: int = 0
    peer_misses: int = 0
    stale: int = 0
    corrupt: int = 0
    busy: int = 0
    unavailable: int = 0
    timeouts: int = 0
    self_owned: int = 0
    no_live_peer: int = 0
    #: Remembered listings an owner answered, and listings handed to owners to remember.
    listings_from_peers: int = 0
    listings_shared: int = 0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            data = {k: v for k, v in vars(self).items() if not k.startswith("_") and k != "latency"}
        data["latency"] = self.latency.snapshot()
        return data


_SHARED_SCHEMES = ("s3://", "s3a://")
#: Longest wait for an owner's remembered listing (on a query's critical path).
_LISTING_TIMEOUT_S = 1.0


class _Want(NamedTuple):
    """Bytes ``[lo, hi)`` of block ``index`` (``block_length`` bytes); ``ranged``: a piece."""

    index: int
    key: str
    lo: int
    hi: int
    block_length: int
    ranged: bool


_OUTCOME_COUNTER = {
    Outcome.NOT_FOUND: "peer_misses", Outcome.STALE: "stale", Outcome.CORRUPT: "corrupt",
    Outcome.BUSY: "busy", Outcome.UNAVAILABLE: "unavailable", Outcome.TIMEOUT: "timeouts",
    Outcome.REJECTED: "peer_misses", Outcome.UNSUPPORTED: "peer_misses",
}


class PeerTier:
    """Fetches missing blocks from their owner peers (the reader's ``peers`` seam)."""

    def __init__(self, config: PeerConfig, secret: bytes | None = None, *,
                 transport: BlockTransport | None = None) -> None:
        self.config = config
        self.membership = Membership(config.peers, self_address=config.self_address, down_for=config.down_for)
        self.metrics = PeerMetrics()
        self.transport = transport if transport is not None else _make_transport(config, secret or load_secret())
        self._init_pool()
        os.register_at_fork(after_in_child=self._init_pool)

    def _init_pool(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="shoal-peer-fetch")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> "PeerTier | None":
        """A tier from ``SHOAL_PEERS`` / ``SHOAL_CLUSTER_SECRET_FILE`` / ``SHOAL_TRANSPORT``,
        or None when no peers are configured."""
        config = PeerConfig.from_env(env, **overrides)
        if not config.peers:
            return None
        return cls(config, load_secret(None, env))

    # -- the reader's seam ------------------------------------------------------

    def fetch_blocks(self, source: "ObjectSource", version: "ObjectVersion", block_size: int,
                     wanted: Sequence[tuple[int, str, int]]) -> dict[int, memoryview]:
        """Blocks ``(index, key, length)`` of ``version`` that owner peers delivered."""
        return self._fetch(source, version, block_size,
                           [_Want(index, key, 0, length, length, False) for index, key, length in wanted])

    def fetch_pieces(self, source: "ObjectSource", version: "ObjectVersion", block_size: int,
                     wanted: Sequence[tuple[int, str, int, int]]) -> dict[int, memoryview]:
        """Pieces ``(index, key, lo, hi)`` (bytes ``[lo, hi)`` of block ``index``, one
        piece per block) that owner peers delivered, each exactly ``hi - lo`` bytes.

        Each is one ranged GET for exactly those bytes: an owner that misses fills
        that range from the store and keeps it as a piece, so the next request for
        the same column chunk, from any node, is sent straight from that piece's
        file.  An owner that does not serve ranges is asked for the whole block."""
        wants = []
        for index, key, lo, hi in wanted:
            block_length = min(block_size, version.size - index * block_size)
            if 0 <= lo <= hi <= block_length:
                wants.append(_Want(index, key, lo, hi, block_length, True))
        return self._fetch(source, version, block_size, wants)

    def _fetch(self, source: "ObjectSource", version: "ObjectVersion", block_size: int,
               wanted: list[_Want]) -> dict[int, memoryview]:
        if not version.url.startswith(_SHARED_SCHEMES):
            return {}  # local and in-memory objects are not shared between peers
        by_owner: dict[PeerAddress, list[_Want]] = {}
        for want in wanted:
            owner = self.membership.owner(want.key)
            if owner is None:
                self.metrics.add(no_live_peer=1)
            elif self.membership.is_self(owner):
                self.metrics.add(self_owned=1)
            else:
                by_owner.setdefault(owner, []).append(want)
        if not by_owner:
            return {}
        found: dict[int, memoryview] = {}
        if len(by_owner) == 1:
            (owner, items), = by_owner.items()
            found.update(self._fetch_from(owner, source, version, block_size, items))
            return found
        futures = [self._pool.submit(self._fetch_from, owner, source, version, block_size, items)
                   for owner, items in by_owner.items()]
        for future in futures:
            found.update(future.result())
        return found

    def _fetch_from(self, owner: PeerAddress, source: "ObjectSource", version: "ObjectVersion", block_size: int,
                    items: list[_Want]) -> dict[int, memoryview]:
        requests = []
        for want in items:
            origin = None
            if self.config.fill:
                origin = Origin(store_id=source.store_id, url=version.url, size=version.size, block_size=block_size,
                                index=want.index, etag=version.etag, version_id=version.version_id,
                                mtime=version.mtime)
            if want.ranged:
                requests.append(BlockRequest(key=want.key, token=version.token, length=want.hi - want.lo,
                                             origin=origin, offset=want.lo, block_length=want.block_length))
            else:
                requests.append(BlockRequest(key=want.key, token=version.token, length=want.block_length,
                                             origin=origin))
        buffers = _receive_buffers([request.length for request in requests])
        start = time.monotonic()
        try:
            outcomes = self.transport.fetch(owner, requests, buffers, timeout=self.config.timeout)
        except Exception as exc:  # noqa: BLE001 - a peer problem is a miss, never a failed read
            logger.warning("fetch from peer %s failed: %s", owner, exc)
            self.membership.mark_down(owner, type(exc).__name__)
            self.metrics.add(unavailable=len(items))
            return {}
        self.metrics.latency.add(time.monotonic() - start)
        found: dict[int, memoryview] = {}
        unsupported: list[_Want] = []
        for want, outcome, buffer in zip(items, outcomes, buffers):
            if outcome is Outcome.FILLED:
                found[want.index] = buffer[: want.hi - want.lo]
                self.metrics.add(peer_hits=1, peer_bytes=want.hi - want.lo, piece_hits=1 if want.ranged else 0)
            elif outcome is Outcome.UNSUPPORTED:
                unsupported.append(want)
            else:
                self.metrics.add(**{_OUTCOME_COUNTER[outcome]: 1})
        if any(o is Outcome.UNAVAILABLE for o in outcomes):
            self.membership.mark_down(owner, "unavailable")
        elif outcomes and all(o is Outcome.TIMEOUT for o in outcomes):
            self.membership.mark_down(owner, "timed out")
        elif found:
            self.membership.mark_up(owner)
        if unsupported:  # an owner without ranged GETs: its whole blocks, sliced here
            self.metrics.add(ranges_unsupported=len(unsupported))
            blocks = self._fetch_from(owner, source, version, block_size,
                                      [_Want(w.index, w.key, 0, w.block_length, w.block_length, False)
                                       for w in unsupported])
            for want in unsupported:
                if want.index in blocks:
                    found[want.index] = blocks[want.index][want.lo : want.hi]
                    # counted as a block of block_length bytes; the reader gets the piece
                    self.metrics.add(peer_bytes=(want.hi - want.lo) - want.block_length)
        return found

    # -- remembered listings ------------------------------------------------------
    # A client with an empty cache (a new process, a new machine) would list the
    # store before planning; the owner of the listing's key may remember the
    # listing from another client.  Advice only: the session plans on it while it
    # lists the store, and re-runs if the two differ.

    def remembered_listing(self, key: str) -> bytes | None:
        """The listing (JSON) the owner of ``key`` remembers, or None (a peer problem too)."""
        owner = self.membership.owner(key)
        remote = getattr(self.transport, "remote_listing", None)
        if owner is None or self.membership.is_self(owner) or remote is None:
            return None
        try:
            body = remote(owner, key, timeout=min(self.config.timeout, _LISTING_TIMEOUT_S))
        except Exception as exc:  # noqa: BLE001 - then the store is listed, as without peers
            logger.debug("no remembered listing from %s: %s", owner, exc)
            return None
        if body is not None:
            self.metrics.add(listings_from_peers=1)
        return body

    def share_listing(self, key: str, body: bytes) -> None:
        """Give the owner of ``key`` a listing to remember (in the background)."""
        owner = self.membership.owner(key)
        share = getattr(self.transport, "share_listing", None)
        if owner is None or self.membership.is_self(owner) or share is None:
            return

        def send() -> None:
            try:
                if share(owner, key, body, timeout=min(self.config.timeout, _LISTING_TIMEOUT_S)):
                    self.metrics.add(listings_shared=1)
            except Exception as exc:  # noqa: BLE001 - a listing not shared costs a later LIST
                logger.debug("could not share a listing with %s: %s", owner, exc)

        try:
            self._pool.submit(send)
        except RuntimeError:  # closing
            pass

    # -- stats ------------------------------------------------------------------

    def stats(self, cache_metrics: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Per tier: local hits (from ``cache_metrics``, the reader's), peer hits, store reads;
        the transport's own counters; the membership."""
        out: dict[str, Any] = {"peer": self.metrics.snapshot(), "membership": self.membership.snapshot()}
        transport_metrics = getattr(self.transport, "metrics", None)
        if transport_metrics is not None:
            out["transport"] = {"name": getattr(self.transport, "name", "?"), **transport_metrics.snapshot(),
                                "peers": {str(p): self.transport.peer_transport(p) for p in self.membership.peers}}
        if cache_metrics is not None:
            out["local"] = {"hits": cache_metrics.get("hits", 0), "bytes": cache_metrics.get("bytes_from_cache", 0)}
            out["store"] = {"requests": cache_metrics.get("store_requests", 0),
                            "bytes": cache_metrics.get("bytes_from_store", 0)}
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.transport.close()


class _ReceiveArena:
    """Receive buffers cut from large anonymous mappings backed by huge pages.

    A peer batch's answers are received straight into memory that nothing has
    touched, so every page costs a fault: 0.5 ms per MiB in 4 KiB pages here
    (0.73 ms in a shared mapping, which is what ``mmap.mmap(-1, n)`` makes),
    0.1 ms per MiB when a private mapping asks for transparent huge pages.  Batches
    are small (a query's pieces come in ~1 MiB batches), so they are cut one
    after another from a shared arena of :data:`ARENA_BYTES`; an arena's memory
    is returned when no piece cut from it is referenced any more.  ``bytearray``
    would be worse still: it writes zeros over every page before the data.
    """

    ARENA_BYTES = 8 << 20

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        # A forked child (a DataLoader worker) starts with a lock nobody holds
        # and its own arena; pieces it inherited keep their copy-on-write pages.
        self._lock = threading.Lock()
        self._arena: memoryview | None = None
        self._used = 0

    @staticmethod
    def _map(size: int) -> memoryview:
        # Private: a shared anonymous mapping is shmem, which takes no huge
        # pages here and costs more per fault (0.73 against 0.51 ms per MiB).
        region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if size >= (2 << 20) and hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                region.madvise(mmap.MADV_HUGEPAGE)
            except OSError:  # THP off or unsupported: ordinary pages
                pass
        return memoryview(region)

    def take(self, size: int) -> memoryview:
        """``size`` bytes of untouched memory (zero when first read)."""
        if size > self.ARENA_BYTES // 4:
            return self._map(size)
        with self._lock:
            if self._arena is None or self._used + size > len(self._arena):
                self._arena, self._used = self._map(self.ARENA_BYTES), 0
            region = self._arena[self._used : self._used + size]
            # Keep slices 4 KiB-aligned so that no page is shared by two batches.
            self._used += (size + 4095) & ~4095
            return region


_ARENA = _ReceiveArena()


def _receive_buffers(lengths: Sequence[int]) -> list[memoryview]:
    """Buffers for one batch's answers, all slices of one region (see
    :class:`_ReceiveArena`); the region lives as long as any piece cut from it."""
    total = sum(lengths)
    if total == 0:
        return [memoryview(b"") for _ in lengths]
    region = _ARENA.take(total)
    out, at = [], 0
    for length in lengths:
        out.append(region[at : at + length])
        at += length
    return out


def _make_transport(config: PeerConfig, secret: bytes) -> BlockTransport:
    """TCP, or RDMA with per-peer TCP fallback, by ``config.mode``."""
    client = ClientConfig(connections_per_peer=config.connections_per_peer, connect_timeout=config.connect_timeout,
                          handshake_timeout=max(config.connect_timeout, 1.0), max_block=config.max_block,
                          node=socket.gethostname())
    mode = transport_mode(config.mode, {})
    if mode == "tcp":
        return TcpTransport(secret, config=client)
    from .rdma.transport import RdmaTransport

    transport = RdmaTransport(secret, config=client, mode=mode)
    if transport.rdma_client is None:
        logger.info("no RDMA device here: the peer tier uses TCP")
    return transport
