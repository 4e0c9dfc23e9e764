"""Who owns a block: rendezvous (highest-random-weight) hashing over live peers.

Every node computes ``score(peer, key) = xxh3_64(peer || key)`` and the peer
with the highest score owns the key.  All nodes agree without talking as
long as they share the peer list (static ``SHOAL_PEERS`` today; later the
Ray executor supplies it).  A peer that fails is marked down for a while:
its keys move to their second-highest peer, and only those keys move
(rendezvous hashing's minimal disruption); they move back when it returns.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Iterable, Sequence

import xxhash

from .base import PeerAddress

__all__ = ["Membership", "is_local_address"]

logger = logging.getLogger(__name__)


def _score(peer: str, key: str) -> int:
    return xxhash.xxh3_64_intdigest(f"{peer}\0{key}".encode())


def is_local_address(address: PeerAddress) -> bool:
    """Whether ``address`` names this machine (loopback, its hostname or one of its IPs)."""
    host = address.host
    if host in ("localhost", "0.0.0.0", "::", "::1") or host.startswith("127."):
        return True
    try:
        local = {socket.gethostname(), socket.getfqdn()}
        local |= {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)}
        return host in local
    except OSError:
        return False


class Membership:
    """The peer list, which of them are up, and the owner of each key."""

    def __init__(self, peers: Iterable[PeerAddress | str], *, self_address: PeerAddress | str | None = None,
                 down_for: float = 10.0) -> None:
        self.peers: list[PeerAddress] = PeerAddress.parse_list([str(p) for p in peers])
        self.self_address = PeerAddress.parse(self_address) if self_address is not None else None
        self.down_for = down_for
        self._down_until: dict[PeerAddress, float] = {}
        self._lock = threading.Lock()

    def is_self(self, peer: PeerAddress) -> bool:
        return self.self_address is not None and peer == self.self_address

    def live(self) -> list[PeerAddress]:
        now = time.monotonic()
        with self._lock:
            return [p for p in self.peers if self._down_until.get(p, 0.0) <= now]

    def owner(self, key: str) -> PeerAddress | None:
        """The live peer that owns ``key`` (None when no peer is live)."""
        best, best_score = None, -1
        for peer in self.live():
            score = _score(str(peer), key)
            if score > best_score:
                best, best_score = peer, score
        return best

    def ranking(self, key: str, peers: Sequence[PeerAddress] | None = None) -> list[PeerAddress]:
        """All peers by descending score for ``key`` (owner first)."""
        pool = list(self.peers if peers is None else peers)
        return sorted(pool, key=lambda p: _score(str(p), key), reverse=True)

    def mark_down(self, peer: PeerAddress, reason: str = "") -> None:
        with self._lock:
            was_up = self._down_until.get(peer, 0.0) <= time.monotonic()
            self._down_until[peer] = time.monotonic() + self.down_for
        if was_up:
            logger.warning("peer %s marked down for %.0f s%s", peer, self.down_for, f" ({reason})" if reason else "")

    def mark_up(self, peer: PeerAddress) -> None:
        with self._lock:
            if self._down_until.pop(peer, None) is not None:
                logger.info("peer %s is back", peer)

    def snapshot(self) -> dict[str, object]:
        now = time.monotonic()
        with self._lock:
            down = {str(p): round(t - now, 1) for p, t in self._down_until.items() if t > now}
        return {"peers": [str(p) for p in self.peers], "self": str(self.self_address) if self.self_address else None,
                "down": down}
