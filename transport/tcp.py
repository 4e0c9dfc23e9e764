"""TCP block transport, client side (the server is :mod:`.server`).

A peer gets a few authenticated connections (``connections_per_peer``).  A
fetch spreads its requests over them, sends each connection's GETs in one
write (pipelining), and waits; one reader thread per connection matches
answers to requests by id, in whatever order they come, and receives each
body with ``recv_into`` straight into the caller's buffer, checking the
per-chunk checksums as the bytes arrive (:mod:`._connection`).  Ranged
requests (a slice of a block) go only to servers that offered ``CAP_RANGE``;
for others they are answered ``UNSUPPORTED`` without asking.

A request that is not answered by the deadline is *abandoned*: its answer,
if it ever comes, is drained into a scratch buffer, never into the caller's
buffer (a body already being received is finished first, bounded by the
socket's ``io_timeout``).  A connection that fails fails only its own
requests (UNAVAILABLE) and is replaced on the next fetch.

When an RDMA connector is given (see :mod:`shoal.transport.rdma`), each new
connection offers RDMA; if both ends agree the GETs carry a registered slot
and the owner WRITEs the data there (the TCP answer confirms it).  Failed
handshakes fall back to TCP (mode ``auto``) and repeated RDMA failures
demote the peer to TCP for ``demote_for`` seconds.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import secrets
import socket
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Sequence

from . import _io
from ._connection import (
    _ABANDONED, _DONE, _RECEIVING, RdmaClientSession, RdmaConnector, _Batch, _Connection, _Pending,
)
from .base import BlockRequest, BlockTransport, Outcome, PeerAddress, TransportMetrics
from .errors import AuthenticationFailed, PeerUnavailable, ProtocolError, RdmaError, TransportError, TransportTimeout
from .messages import (
    ERR_AUTH, LISTING_GET, LISTING_PUT, MAX_LISTING, Hello, decode_error, decode_listing_reply, encode_listing,
)
from .protocol import (
    CAP_LISTING, CAP_RANGE, CAP_RDMA, HARD_MAX_PAYLOAD, NONCE_BYTES, Limits, MsgType, auth_mac, encode_frame,
)
from .server import CLIENT_LABEL, SERVER_LABEL

__all__ = ["TcpTransport", "ClientConfig", "RdmaConnector", "RdmaClientSession"]

logger = logging.getLogger(__name__)

#: After the deadline, how long a body that is already arriving may still take.
_BODY_GRACE_S = 1.0


@dataclass(frozen=True, kw_only=True)
class ClientConfig:
    """Client-side settings of a TCP (and RDMA) transport."""

    connections_per_peer: int = 2
    connect_timeout: float = 1.0
    handshake_timeout: float = 2.0
    #: Longest stall of a connection in the middle of a frame.
    io_timeout: float = 10.0
    #: Largest block this client accepts.
    max_block: int = 16 << 20
    #: Consecutive RDMA failures before a peer is demoted to TCP.
    demote_after: int = 3
    demote_for: float = 60.0
    node: str = ""

    def __post_init__(self) -> None:
        if self.connections_per_peer < 1 or not 0 < self.max_block <= HARD_MAX_PAYLOAD:
            raise ValueError("connections_per_peer must be >= 1 and max_block within the protocol limit")


class _PeerState:
    def __init__(self) -> None:
        self.conns: list[_Connection] = []
        self.lock = threading.Lock()
        self.rdma_failures = 0
        self.demoted_until = 0.0
        self.announced: str | None = None
        self.rotate = 0


_TRANSPORTS: "weakref.WeakSet[TcpTransport]" = weakref.WeakSet()


def _after_fork() -> None:
    for transport in list(_TRANSPORTS):
        transport._reset_after_fork()


os.register_at_fork(after_in_child=_after_fork)


class TcpTransport(BlockTransport):
    """Pipelined, multiplexed block fetches over authenticated TCP connections."""

    name = "tcp"

    def __init__(self, secret: bytes, *, config: ClientConfig | None = None, mode: str = "tcp",
                 rdma: RdmaConnector | None = None) -> None:
        if len(secret) < 16:
            raise ValueError("the cluster secret must be at least 16 bytes")
        if mode not in ("auto", "tcp", "rdma"):
            raise ValueError(f"unknown transport mode {mode!r}")
        if mode == "rdma" and rdma is None:
            raise RdmaError("SHOAL_TRANSPORT=rdma but no RDMA backend is available")
        self.config = config or ClientConfig(node=socket.gethostname())
        self.mode = mode
        self.metrics = TransportMetrics()
        self._secret = secret
        self._rdma = rdma if mode != "tcp" else None
        self._peers: dict[PeerAddress, _PeerState] = {}
        self._lock = threading.Lock()
        _TRANSPORTS.add(self)

    # -- connections ----------------------------------------------------------

    def _state(self, peer: PeerAddress) -> _PeerState:
        with self._lock:
            state = self._peers.get(peer)
            if state is None:
                state = self._peers[peer] = _PeerState()
            return state

    def _connections(self, peer: PeerAddress) -> list[_Connection]:
        state = self._state(peer)
        with state.lock:
            state.conns = [c for c in state.conns if not c.closed]
            error: Exception | None = None
            while len(state.conns) < self.config.connections_per_peer:
                try:
                    state.conns.append(self._connect(peer, state))
                except (TransportError, OSError) as exc:
                    error = exc
                    break
            if not state.conns:
                if isinstance(error, AuthenticationFailed):
                    raise error
                raise PeerUnavailable(f"cannot connect to {peer}: {error}") from error
            return list(state.conns)

    def _connect(self, peer: PeerAddress, state: _PeerState) -> _Connection:
        cfg = self.config
        try:
            sock = socket.create_connection(tuple(peer), timeout=cfg.connect_timeout)
        except OSError as exc:
            raise PeerUnavailable(f"cannot connect to {peer}: {exc}") from exc
        try:
            _io.configure(sock)
            sock.settimeout(cfg.handshake_timeout)
            want_rdma = self._rdma is not None and time.monotonic() >= state.demoted_until
            server = self._authenticate(sock, peer, want_rdma)
            session = self._rdma_handshake(sock, peer, state, server) if want_rdma else None
            _io.set_blocking_timeouts(sock, cfg.io_timeout)
        except BaseException:
            sock.close()
            raise
        self.metrics.add(connections=1)
        self._announce(peer, state, "rdma" if session is not None else "tcp")
        return _Connection(self, peer, sock, server, session)

    def _authenticate(self, sock: socket.socket, peer: PeerAddress, want_rdma: bool) -> Hello:
        limits = Limits(max_payload=0)
        hello = Hello(secrets.token_bytes(NONCE_BYTES), CAP_RDMA if want_rdma else 0,
                      self.config.max_block, 0, self.config.node).encode()
        try:
            sock.sendall(encode_frame(MsgType.HELLO, 0, hello))
            header, challenge = _io.read_frame(sock, limits)
            if header.type is not MsgType.CHALLENGE:
                raise ProtocolError(f"expected CHALLENGE from {peer}, got {header.type.name}")
            server = Hello.decode(challenge)
            sock.sendall(encode_frame(MsgType.AUTH, 0, auth_mac(self._secret, CLIENT_LABEL, (hello, challenge))))
            header, proof = _io.read_frame(sock, limits)
        except socket.timeout as exc:
            raise TransportTimeout(f"{peer} did not complete the handshake") from exc
        if header.type is MsgType.ERROR:
            code, message = decode_error(proof)
            if code == ERR_AUTH:
                raise AuthenticationFailed(f"{peer} refused our cluster secret")
            raise PeerUnavailable(f"{peer} refused the connection: {message}")
        expected = auth_mac(self._secret, SERVER_LABEL, (hello, challenge))
        if header.type is not MsgType.AUTH_OK or not hmac.compare_digest(proof, expected):
            raise AuthenticationFailed(f"{peer} could not prove it knows the cluster secret")
        return server

    def _rdma_handshake(self, sock: socket.socket, peer: PeerAddress, state: _PeerState,
                        server: Hello) -> RdmaClientSession | None:
        assert self._rdma is not None
        limits = Limits(max_payload=0)

        def exchange(meta: bytes) -> tuple[MsgType, bytes]:
            sock.sendall(encode_frame(MsgType.RDMA_CONNECT, 0, meta))
            header, reply = _io.read_frame(sock, limits)
            return header.type, reply

        try:
            if not server.caps & CAP_RDMA:
                raise RdmaError(f"{peer} does not offer RDMA")
            return self._rdma.connect(exchange)
        except RdmaError as exc:
            self.metrics.add(rdma_fallbacks=1)
            self._rdma_failed(peer, state, str(exc))
            if self.mode == "rdma":
                raise PeerUnavailable(f"SHOAL_TRANSPORT=rdma and RDMA to {peer} failed: {exc}") from exc
            return None

    def _rdma_failed(self, peer: PeerAddress, state: _PeerState, reason: str) -> None:
        state.rdma_failures += 1
        if state.rdma_failures >= self.config.demote_after:
            state.rdma_failures = 0
            state.demoted_until = time.monotonic() + self.config.demote_for
            self.metrics.add(rdma_demotions=1)
            logger.warning("peer %s demoted to TCP for %.0f s after repeated RDMA failures (%s)",
                           peer, self.config.demote_for, reason)

    def _announce(self, peer: PeerAddress, state: _PeerState, via: str) -> None:
        if state.announced != via:
            state.announced = via
            logger.info("peer %s: block data over %s", peer, via.upper())

    def _forget(self, conn: _Connection) -> None:
        state = self._peers.get(conn.peer)
        if state is not None:
            with state.lock:
                if conn in state.conns:
                    state.conns.remove(conn)

    def peer_transport(self, peer: PeerAddress) -> str | None:
        state = self._peers.get(PeerAddress.parse(peer))
        if state is None or not state.conns:
            return None
        use_rdma = time.monotonic() >= state.demoted_until and any(c.rdma for c in state.conns)
        return "rdma" if use_rdma else "tcp"

    # -- fetching ---------------------------------------------------------------

    def fetch(self, peer: PeerAddress, requests: Sequence[BlockRequest], buffers: Sequence[memoryview], *,
              timeout: float) -> list[Outcome]:
        if len(requests) != len(buffers):
            raise ValueError("one buffer per request")
        for request, buffer in zip(requests, buffers):
            if len(buffer) < request.length:
                raise ValueError(f"buffer of {len(buffer)} bytes for a {request.length}-byte block")
        peer = PeerAddress.parse(peer)
        start = time.monotonic()
        deadline = start + timeout
        outcomes: list[Outcome | None] = [None] * len(requests)
        vias = ["tcp"] * len(requests)
        todo = []
        for i, request in enumerate(requests):
            if request.length > self.config.max_block:
                outcomes[i] = Outcome.REJECTED
            else:
                todo.append(i)
        retry = self._fetch_round(peer, requests, buffers, todo, outcomes, vias, deadline, use_rdma=True)
        if retry and time.monotonic() < deadline:  # RDMA WRITEs that failed: once more over TCP
            for i in retry:
                outcomes[i] = None
            self._fetch_round(peer, requests, buffers, retry, outcomes, vias, deadline, use_rdma=False)
        final = [o if o is not None else Outcome.TIMEOUT for o in outcomes]
        elapsed = time.monotonic() - start
        for i, outcome in enumerate(final):
            self.metrics.latency.add(elapsed)
            self.metrics.record(outcome, requests[i].length, vias[i])
        return final

    def _fetch_round(self, peer: PeerAddress, requests: Sequence[BlockRequest], buffers: Sequence[memoryview],
                     indices: list[int], outcomes: list[Outcome | None], vias: list[str], deadline: float, *,
                     use_rdma: bool) -> list[int]:
        if not indices:
            return []
        state = self._state(peer)
        try:
            conns = self._connections(peer)
        except AuthenticationFailed as exc:
            logger.error("%s; check SHOAL_CLUSTER_SECRET_FILE on both sides", exc)
            for i in indices:
                outcomes[i] = Outcome.UNAVAILABLE
            return []
        except (TransportError, OSError) as exc:
            logger.info("peer %s unavailable: %s", peer, exc)
            for i in indices:
                outcomes[i] = Outcome.UNAVAILABLE
            return []
        if not conns[0].server.caps & CAP_RANGE:  # an older server would refuse the frame: ask for blocks
            for i in indices:
                if requests[i].ranged:
                    outcomes[i] = Outcome.UNSUPPORTED
            indices = [i for i in indices if not requests[i].ranged]
            if not indices:
                return []
        use_rdma = use_rdma and time.monotonic() >= state.demoted_until
        batch = _Batch(len(indices))
        per_conn: dict[int, list[tuple[int, _Pending]]] = {}
        state.rotate += 1
        for n, i in enumerate(indices):
            c = (n + state.rotate) % len(conns)
            per_conn.setdefault(c, []).append((i, _Pending(0, requests[i], memoryview(buffers[i]), batch)))
        placed: list[tuple[int, _Pending, _Connection]] = []
        for c, items in per_conn.items():
            try:
                conns[c].submit([p for _, p in items], use_rdma)
                placed.extend((i, p, conns[c]) for i, p in items)
            except PeerUnavailable:
                for i, p in items:
                    outcomes[i] = Outcome.UNAVAILABLE
                    batch.finish_one()
        if not batch.wait(deadline):
            for _, p, conn in placed:
                conn.abandon(p)  # False when its body is arriving: let it finish, briefly
            extra = time.monotonic() + min(self.config.io_timeout, _BODY_GRACE_S)
            for _, p, conn in placed:
                while p.state == _RECEIVING and time.monotonic() < extra:
                    batch.wait(min(extra, time.monotonic() + 0.05))
            # A body still trickling in: drop the connection and wait for its reader to
            # stop, so that nothing writes into the caller's buffers after we return.
            for conn in {conn for _, p, conn in placed if p.state == _RECEIVING}:
                conn.fail(TransportTimeout(f"{peer} stalled in the middle of a block"))
                conn.thread.join(timeout=5)
        retry: list[int] = []
        for i, p, conn in placed:
            vias[i] = "rdma" if p.via == "rdma" else "tcp"
            outcome = self._finalize(p, conn, state)
            if outcome is Outcome.UNAVAILABLE and p.via == "rdma-failed":
                retry.append(i)
            outcomes[i] = outcome
        return retry

    def _finalize(self, p: _Pending, conn: _Connection, state: _PeerState) -> Outcome:
        if p.state == _ABANDONED:
            return Outcome.TIMEOUT
        if p.state != _DONE:
            return Outcome.TIMEOUT
        outcome = p.outcome if p.outcome is not None else Outcome.UNAVAILABLE
        if p.via == "rdma-failed":
            self._rdma_failed(conn.peer, state, "RDMA WRITE failed")
            return Outcome.UNAVAILABLE
        if p.via == "rdma" and outcome is Outcome.FILLED:
            state.rdma_failures = 0
        elif p.via == "rdma" and outcome is Outcome.CORRUPT:
            self._rdma_failed(conn.peer, state, "checksum mismatch in an RDMA slot")
        if outcome is Outcome.CORRUPT:
            logger.warning("block %s from %s failed its checksums", p.request.key if p.request else "?", conn.peer)
        return outcome

    # -- control ----------------------------------------------------------------

    def ping(self, peer: PeerAddress | str, timeout: float = 1.0) -> float:
        """Round-trip time of one PING over an existing (or new) connection."""
        peer = PeerAddress.parse(peer)
        conn = self._connections(peer)[0]
        start = time.perf_counter()
        conn.control(MsgType.PING, b"", time.monotonic() + timeout)
        return time.perf_counter() - start

    def remote_stats(self, peer: PeerAddress | str, timeout: float = 2.0) -> dict[str, Any]:
        """The peer's counters (its STATS answer)."""
        peer = PeerAddress.parse(peer)
        meta = self._connections(peer)[0].control(MsgType.STATS, b"", time.monotonic() + timeout)
        try:
            data = json.loads(meta.decode("utf-8"))
        except ValueError as exc:
            raise ProtocolError(f"unreadable STATS answer from {peer}") from exc
        if not isinstance(data, dict):
            raise ProtocolError(f"unreadable STATS answer from {peer}")
        return data

    def remote_listing(self, peer: PeerAddress | str, key: str, timeout: float = 1.0) -> bytes | None:
        """The listing (JSON) ``peer`` remembers under ``key``, or None (none kept, or
        a server that does not keep listings)."""
        conn = self._connections(PeerAddress.parse(peer))[0]
        if not conn.server.caps & CAP_LISTING:
            return None
        meta = conn.control(MsgType.LISTING, encode_listing(LISTING_GET, key), time.monotonic() + timeout)
        return decode_listing_reply(meta)

    def share_listing(self, peer: PeerAddress | str, key: str, body: bytes, timeout: float = 1.0) -> bool:
        """Give ``peer`` a listing (JSON, at most ``MAX_LISTING`` bytes) to remember;
        False when it does not keep listings or the listing is too long to share."""
        if len(body) > MAX_LISTING:
            return False
        conn = self._connections(PeerAddress.parse(peer))[0]
        if not conn.server.caps & CAP_LISTING:
            return False
        conn.control(MsgType.LISTING, encode_listing(LISTING_PUT, key, body), time.monotonic() + timeout)
        return True

    def drop_peer(self, peer: PeerAddress | str) -> None:
        """Close the connections to one peer (they reopen on the next fetch)."""
        state = self._peers.get(PeerAddress.parse(peer))
        if state is not None:
            for conn in list(state.conns):
                conn.close()

    def close(self) -> None:
        with self._lock:
            states = list(self._peers.values())
            self._peers.clear()
        for state in states:
            for conn in list(state.conns):
                conn.close()

    def _reset_after_fork(self) -> None:
        # The parent's reader threads do not exist in the child: forget (don't close) the sockets.
        self._peers = {}
        self._lock = threading.Lock()
