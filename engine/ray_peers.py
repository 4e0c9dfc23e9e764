"""The peer cache tier of a Ray cluster: worker actors serve their SSD caches.

Each :class:`~shoal.engine.ray_worker.ShoalWorker` actor runs a
:class:`~shoal.transport.BlockServer` (TCP, HMAC-authenticated with the
cluster secret) on its node's IP, serving its block cache, exactly as
``shoal worker`` does: a request for a block the actor does not have, that
names the block's origin, is filled from the object store into the actor's
cache and then served.  The actor's own reads use the other actors as peers
(a :class:`~shoal.transport.PeerTier` on its block reader), so a miss goes
local cache -> the block's owner actor -> the store, and the store is read
once per block for the whole cluster.  The peer list is the set of live
actors, pushed by the executor whenever it changes.

The driver (or any process that can reach the nodes) reads through the same
caches with :func:`driver_filesystem` or, for processes it starts (DataLoader
workers), with the environment of :func:`peer_environment`.

The cluster secret is generated per cluster by the coordinator
(:func:`cluster_secret`) unless ``SHOAL_CLUSTER_SECRET_FILE`` names one; it
travels to the actors as a constructor argument over Ray's own channel and
is never logged or returned by any call.

No Ray import here: the actor module and the executor wrap these pieces.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

from shoal.cache import BlockReader, CacheConfig, ShoalFileSystem, StoreConfig
from shoal.transport import (
    BlockServer, CacheProvider, Membership, PeerAddress, PeerConfig, PeerTier, ServerConfig, load_secret,
)
from shoal.transport.worker import StoreFiller

__all__ = ["ActorPeers", "cluster_secret", "driver_filesystem", "peer_environment", "retarget",
           "write_secret_file", "node_ip"]

logger = logging.getLogger(__name__)

#: Largest block an actor serves (the transport's limit).
MAX_BLOCK = 16 << 20


def cluster_secret() -> tuple[bytes, str | None]:
    """The cluster secret and the file it came from: ``SHOAL_CLUSTER_SECRET_FILE``
    when set, else 32 fresh random bytes as hex (``None`` for the file): printable, so
    that it survives a secret file (``load_secret`` strips whitespace)."""
    path = os.environ.get("SHOAL_CLUSTER_SECRET_FILE")
    if path:
        return load_secret(path), path
    return secrets.token_hex(32).encode(), None


def write_secret_file(secret: bytes, directory: str | os.PathLike[str] | None = None) -> Path:
    """Write ``secret`` to a new private file (mode 0600 in a 0700 directory); returns its path."""
    folder = Path(tempfile.mkdtemp(prefix="shoal-cluster-", dir=directory))
    path = folder / "secret"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(secret)
    return path


def node_ip() -> str:
    """This node's IP as Ray knows it (the address other nodes reach it at)."""
    try:
        import ray.util

        return str(ray.util.get_node_ip_address())
    except Exception:  # noqa: BLE001 - outside Ray (unit use): loopback
        return "127.0.0.1"


def retarget(tier: PeerTier, peers: Iterable[str], self_address: str | None = None) -> None:
    """Point an existing tier at a new peer list (blocks move by rendezvous hashing;
    a fetch in progress finishes on the list it started with)."""
    addresses = tuple(str(p) for p in PeerAddress.parse_list(list(peers)))
    tier.membership = Membership(addresses, self_address=self_address, down_for=tier.config.down_for)


class ActorPeers:
    """An actor's block server (serving ``reader``'s cache, filling misses from the
    store) and the peer tier its own reads use."""

    def __init__(self, reader: BlockReader, cache: CacheConfig, store: StoreConfig, secret: bytes, *,
                 host: str | None = None, port: int = 0, timeout: float = 5.0) -> None:
        self.reader = reader
        self._secret = secret
        self._timeout = timeout
        self.filler = StoreFiller(reader.cache, cache, store, max_block=MAX_BLOCK)
        self.provider = CacheProvider(reader.cache, self.filler)
        host = host or node_ip()
        try:
            self.server = self._serve(host, port)
        except OSError as exc:
            if not port:
                raise
            # The predecessor's port is taken: any port (its blocks' ownership moves).
            logger.info("port %d on %s is taken (%s); serving on another", port, host, exc.strerror)
            self.server = self._serve(host, 0)
        assert self.server.address is not None
        self.address = str(self.server.address)
        self.tier: PeerTier | None = None

    def _serve(self, host: str, port: int) -> BlockServer:
        config = ServerConfig(max_block=MAX_BLOCK, node=f"{socket.gethostname()}:{os.getpid()}")
        server = BlockServer(self.provider, self._secret, host, port, config=config)
        try:
            server.start()
        except OSError:
            server.close()
            raise
        return server

    def set_peers(self, peers: Sequence[str]) -> None:
        """Use ``peers`` (every live actor, this one included) for this actor's misses."""
        if self.tier is None:
            config = PeerConfig(peers=tuple(peers), self_address=self.address, mode="tcp", timeout=self._timeout)
            self.tier = PeerTier(config, self._secret)
            self.reader.peers = self.tier
        else:
            retarget(self.tier, peers, self.address)

    def stats(self) -> dict[str, Any]:
        """What this actor served to peers, filled from the store for them, and fetched from them."""
        fills = self.filler.store_stats()
        out: dict[str, Any] = {
            "address": self.address,
            "served": self.provider.stats(),
            "server": self.server.metrics.snapshot(),
            "fill_store_requests": sum(s["requests"] for s in fills.values()),
            "fill_bytes_from_store": sum(s["bytes"] for s in fills.values()),
        }
        if self.tier is not None:
            peer = self.tier.metrics.snapshot()
            out["peer"] = {k: v for k, v in peer.items() if k != "latency"}
            out["peers"] = [str(p) for p in self.tier.membership.peers]
        return out

    def close(self) -> None:
        self.reader.peers = None
        if self.tier is not None:
            self.tier.close()
        self.server.close()
        self.filler.close()


def driver_filesystem(peers: Sequence[str], secret: bytes, cache: CacheConfig, store: StoreConfig,
                      protocols: tuple[str, ...], *, timeout: float = 5.0) -> tuple[ShoalFileSystem, PeerTier]:
    """A filesystem for this process whose misses go to the actors' caches first."""
    tier = PeerTier(PeerConfig(peers=tuple(peers), mode="tcp", timeout=timeout), secret)
    fs = ShoalFileSystem(cache=cache, store=store, protocols=protocols, reader=BlockReader(cache, peers=tier))
    return fs, tier


def peer_environment(peers: Sequence[str], secret_file: str | os.PathLike[str], block_size: int) -> dict[str, str]:
    """Environment variables that make a new :class:`ShoalFileSystem` (in this
    process or in processes it starts) read through the actors' caches."""
    return {
        "SHOAL_PEERS": ",".join(peers),
        "SHOAL_CLUSTER_SECRET_FILE": str(secret_file),
        "SHOAL_TRANSPORT": "tcp",
        # Block keys include the block size: readers must use the actors' to hit their caches.
        "SHOAL_CACHE_BLOCK_SIZE": str(block_size),
    }
