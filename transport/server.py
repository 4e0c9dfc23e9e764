"""The block server: serves a :class:`~shoal.transport.base.BlockProvider` to
authenticated peers over TCP (and, when an RDMA acceptor is attached, pushes
block data by RDMA WRITE with TCP as the control channel).

Threads, per connection: one reader (parses frames, answers PING/STATS and
BUSY inline, hands GETs to a shared handler pool) and one writer (sends
responses in completion order, so answers are naturally out of order; block
bodies go out with ``sendfile`` straight from the cache file when the
provider hands over a file; for a ranged GET, only the slice asked for, with
the stored sums of the chunks it covers).  Nothing a client sends can crash the server: a
malformed frame closes that connection (after an ERROR frame), counted in
:attr:`BlockServer.metrics`.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import queue
import secrets
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from . import _io
from .base import BlockProvider, BlockRequest, PeerAddress, ServedBlock
from .errors import AuthenticationFailed, PeerUnavailable, ProtocolError, RdmaError, TransportError
from .messages import (
    ERR_AUTH, ERR_PROTOCOL, LISTING_GET, MAX_LISTING, BlockReply, Hello, RdmaSlot, decode_get, decode_listing,
    encode_error, encode_listing_reply,
)
from .protocol import (
    CAP_LISTING, CAP_RANGE, CAP_RDMA, CLIENT_TYPES, FLAG_RDMA, MAX_TEXT, NONCE_BYTES, Limits, MsgType, Status,
    auth_mac, chunk_sums, encode_frame,
)

__all__ = ["BlockServer", "ServerConfig", "ServerMetrics", "RdmaAcceptor", "RdmaServerSession"]

logger = logging.getLogger(__name__)

CLIENT_LABEL = b"shoal-client-v1"
SERVER_LABEL = b"shoal-server-v1"


class RdmaServerSession(Protocol):
    """One connection's RDMA data path on the serving side."""

    def push(self, served: ServedBlock, slot: RdmaSlot, timeout: float) -> None:
        """WRITE the block into the requester's slot; raises :class:`RdmaError`."""
        ...

    def close(self) -> None:
        ...


class RdmaAcceptor(Protocol):
    """Creates an RDMA session from a client's RDMA_CONNECT metadata."""

    def accept(self, meta: bytes) -> tuple[bytes, RdmaServerSession]:
        """Returns the RDMA_ACCEPT metadata and the session; raises :class:`RdmaError`."""
        ...


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """Limits and sizes of a block server."""

    #: Largest block served (requests for more are REJECTED).
    max_block: int = 16 << 20
    #: Requests in flight per connection; more are answered BUSY.
    max_inflight: int = 4096
    max_connections: int = 256
    handler_threads: int = 16
    #: Seconds a client has to finish authenticating.
    handshake_timeout: float = 5.0
    #: Seconds a send may stall before the connection is dropped.
    send_timeout: float = 30.0
    node: str = ""


@dataclass
class ServerMetrics:
    connections: int = 0
    active_connections: int = 0
    auth_failures: int = 0
    protocol_errors: int = 0
    requests: int = 0
    served: int = 0
    bytes_sent: int = 0
    sendfile_bytes: int = 0
    rdma_bytes: int = 0
    rdma_sessions: int = 0
    rdma_rejected: int = 0
    busy: int = 0
    refused: int = 0
    listings_served: int = 0
    listings_stored: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)

    def status(self, status: Status) -> None:
        with self._lock:
            self.statuses[status.name.lower()] = self.statuses.get(status.name.lower(), 0) + 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {k: (dict(v) if isinstance(v, dict) else v) for k, v in vars(self).items()
                    if not k.startswith("_")}


class BlockServer:
    """Serves blocks from ``provider`` on ``host:port`` to peers that know ``secret``."""

    def __init__(self, provider: BlockProvider, secret: bytes, host: str = "127.0.0.1", port: int = 0, *,
                 config: ServerConfig | None = None, rdma: RdmaAcceptor | None = None) -> None:
        if len(secret) < 16:
            raise ValueError("the cluster secret must be at least 16 bytes")
        self.provider = provider
        #: Whether this server remembers listings for its peers (``CAP_LISTING``).
        self.keeps_listings = hasattr(provider, "get_listing") and hasattr(provider, "put_listing")
        self.config = config or ServerConfig()
        self.rdma = rdma
        self.metrics = ServerMetrics()
        self._secret = secret
        self._bind = (host, port)
        self._listener: socket.socket | None = None
        self._closing = threading.Event()
        self._conns: set[_ServerConnection] = set()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(self.config.handler_threads, thread_name_prefix="shoal-serve")
        self._acceptor: threading.Thread | None = None
        self.address: PeerAddress | None = None

    def start(self) -> PeerAddress:
        """Bind, listen and start accepting; returns the bound address."""
        family = socket.AF_INET6 if ":" in self._bind[0] else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(self._bind)
        listener.listen(128)
        listener.settimeout(0.2)
        self._listener = listener
        host, port = listener.getsockname()[:2]
        self.address = PeerAddress(host, port)
        self._acceptor = threading.Thread(target=self._accept_loop, name="shoal-accept", daemon=True)
        self._acceptor.start()
        logger.info("block server listening on %s (rdma %s)", self.address, "on" if self.rdma else "off")
        return self.address

    def __enter__(self) -> "BlockServer":
        if self._listener is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._closing.is_set():
            try:
                sock, peer = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                if self._closing.is_set():
                    return
                logger.exception("accept failed")
                continue
            with self._lock:  # checked under the lock close() snapshots connections with
                if self._closing.is_set():
                    sock.close()
                    return
                too_many = len(self._conns) >= self.config.max_connections
                if not too_many:
                    conn = _ServerConnection(self, sock, peer)
                    self._conns.add(conn)
            if too_many:
                self.metrics.add(refused=1)
                logger.warning("refusing connection from %s: %d connections open", peer, len(self._conns))
                sock.close()
                continue
            self.metrics.add(connections=1, active_connections=1)
            conn.start()

    def _forget(self, conn: "_ServerConnection") -> None:
        with self._lock:
            if conn in self._conns:
                self._conns.discard(conn)
                self.metrics.add(active_connections=-1)

    def stats(self) -> dict[str, Any]:
        try:
            provider = self.provider.stats()
        except Exception:  # noqa: BLE001 - stats must never break serving
            logger.exception("provider stats failed")
            provider = {}
        return {"server": self.metrics.snapshot(), "provider": provider, "node": self.config.node}

    def close(self) -> None:
        """Stop accepting, drop every connection, wait for the handler pool."""
        with self._lock:
            self._closing.set()
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes a blocked accept() on Linux
            except OSError:
                pass
            self._listener.close()
        if self._acceptor is not None:
            self._acceptor.join(timeout=5)
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            conn.shutdown()
        self._pool.shutdown(wait=True, cancel_futures=True)


class _ServerConnection:
    """One client connection: handshake, then pipelined requests."""

    def __init__(self, server: BlockServer, sock: socket.socket, peer: Any) -> None:
        self.server = server
        self.sock = sock
        self.peer = peer
        self.config = server.config
        self.limits = Limits(max_payload=0)  # clients never send payloads
        self._out: queue.SimpleQueue[tuple[bytes, ServedBlock | None] | None] = queue.SimpleQueue()
        self._inflight = 0
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._wlock = threading.Lock()
        self.rdma_session: RdmaServerSession | None = None

    def start(self) -> None:
        _io.configure(self.sock)
        threading.Thread(target=self._run, name=f"shoal-conn-{self.peer}", daemon=True).start()

    # -- reader ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            self.sock.settimeout(self.config.handshake_timeout)
            self._handshake()
            self._data_phase_socket()
            self._read_loop()
        except AuthenticationFailed as exc:
            self.server.metrics.add(auth_failures=1)
            logger.warning("peer %s failed authentication: %s", self.peer, exc)
            self._send_error_quietly(ERR_AUTH, "authentication failed")
        except ProtocolError as exc:
            self.server.metrics.add(protocol_errors=1)
            logger.warning("protocol error from %s: %s; closing", self.peer, exc)
            self._send_error_quietly(ERR_PROTOCOL, str(exc))
        except (TransportError, OSError) as exc:
            logger.debug("connection from %s ended: %s", self.peer, exc)
        except Exception:  # noqa: BLE001 - a bug in one connection must not kill the server
            logger.exception("unexpected error serving %s", self.peer)
        finally:
            self.shutdown()
            with self._wlock:  # nobody is inside a send once we hold it (shutdown woke them)
                self.sock.close()
            self._release_queued()

    def _data_phase_socket(self) -> None:
        """Blocking from now on: an idle connection just waits (the reader
        treats SO_RCVTIMEO expiries as idle), sends give up after ``send_timeout``,
        and ``os.sendfile`` needs no poll loop."""
        _io.set_blocking_timeouts(self.sock, self.config.send_timeout)

    def _handshake(self) -> None:
        header, hello_meta = _io.read_frame(self.sock, self.limits)
        if header.type is not MsgType.HELLO:
            raise ProtocolError(f"expected HELLO, got {header.type.name}")
        hello = Hello.decode(hello_meta)
        caps = (CAP_RANGE | (CAP_RDMA if self.server.rdma is not None else 0)
                | (CAP_LISTING if self.server.keeps_listings else 0))
        challenge = Hello(secrets.token_bytes(NONCE_BYTES), caps, self.config.max_block,
                          self.config.max_inflight, self.config.node).encode()
        self.sock.sendall(encode_frame(MsgType.CHALLENGE, 0, challenge))
        header, auth = _io.read_frame(self.sock, self.limits)
        if header.type is not MsgType.AUTH:
            raise ProtocolError(f"expected AUTH, got {header.type.name}")
        expected = auth_mac(self.server._secret, CLIENT_LABEL, (hello_meta, challenge))
        if not hmac.compare_digest(auth, expected):
            raise AuthenticationFailed(f"bad client proof from {self.peer}")
        proof = auth_mac(self.server._secret, SERVER_LABEL, (hello_meta, challenge))
        self.sock.sendall(encode_frame(MsgType.AUTH_OK, 0, proof))
        logger.debug("peer %s (%s) authenticated", self.peer, hello.node)

    def _read_loop(self) -> None:
        while not self._closed.is_set():
            try:
                header, meta = _io.read_frame(self.sock, self.limits, idle_ok=True)
            except _io.Idle:
                continue
            if header.type not in CLIENT_TYPES:
                raise ProtocolError(f"unexpected {header.type.name} frame from a client")
            if header.type is MsgType.GET:
                self._on_get(header.req_id, header.flags, meta)
            elif header.type is MsgType.PING:
                self._send(encode_frame(MsgType.PONG, header.req_id, meta[:MAX_TEXT]))
            elif header.type is MsgType.STATS:
                body = json.dumps(self.server.stats(), default=str).encode()[: 60 << 10]
                self._send(encode_frame(MsgType.STATS_REPLY, header.req_id, body))
            elif header.type is MsgType.RDMA_CONNECT:
                self._on_rdma_connect(header.req_id, meta)
            elif header.type is MsgType.LISTING:
                self._on_listing(header.req_id, meta)

    def _on_listing(self, req_id: int, meta: bytes) -> None:
        """Answer a remembered listing, or remember one (JSON: a list of objects; the
        client that uses it checks every entry, and the store's listing decides)."""
        op, key, body = decode_listing(meta)
        provider: Any = self.server.provider
        if not self.server.keeps_listings:
            raise ProtocolError("LISTING sent to a server that did not offer it")
        if op == LISTING_GET:
            entries = provider.get_listing(key)
            raw = json.dumps(entries).encode() if entries is not None else None
            if raw is not None and len(raw) > MAX_LISTING:
                raw = None
            self.server.metrics.add(listings_served=1 if raw is not None else 0)
            self._send(encode_frame(MsgType.LISTING_REPLY, req_id, encode_listing_reply(raw)))
            return
        try:
            entries = json.loads(body)
        except ValueError:
            raise ProtocolError("unreadable listing") from None
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise ProtocolError("a listing is a list of objects")
        provider.put_listing(key, entries)
        self.server.metrics.add(listings_stored=1)
        self._send(encode_frame(MsgType.LISTING_REPLY, req_id, encode_listing_reply(b"")))

    def _on_rdma_connect(self, req_id: int, meta: bytes) -> None:
        acceptor = self.server.rdma
        if acceptor is None or self.rdma_session is not None:
            self._send(encode_frame(MsgType.RDMA_REJECT, req_id, encode_error(0, "rdma not offered")))
            return
        try:
            reply, session = acceptor.accept(meta)
        except (RdmaError, ProtocolError) as exc:
            self.server.metrics.add(rdma_rejected=1)
            logger.warning("RDMA handshake with %s failed (%s); the peer stays on TCP", self.peer, exc)
            self._send(encode_frame(MsgType.RDMA_REJECT, req_id, encode_error(0, str(exc))))
            return
        self.rdma_session = session
        self.server.metrics.add(rdma_sessions=1)
        self._send(encode_frame(MsgType.RDMA_ACCEPT, req_id, reply))

    def _on_get(self, req_id: int, flags: int, meta: bytes) -> None:
        request, slot = decode_get(meta, flags)
        self.server.metrics.add(requests=1)
        with self._lock:
            busy = self._inflight >= self.config.max_inflight
            if not busy:
                self._inflight += 1
        if busy:
            self.server.metrics.add(busy=1)
            self._reply(req_id, BlockReply(Status.BUSY, detail="too many requests in flight"))
            return
        fast = getattr(self.server.provider, "lookup_fast", None)
        if fast is not None and slot is None and self._refusal(request) is None:
            # Cache hits are answered right here, on the connection's reader thread:
            # one thread handoff less per block (this connection's sends are serial anyway).
            try:
                served = fast(request)
            except Exception:  # noqa: BLE001 - take the slow path, which reports it
                served = None
            if served is not None:
                self._serve_one(req_id, request, None, served)
                return
        try:
            self.server._pool.submit(self._serve_one, req_id, request, slot)
        except RuntimeError:  # pool shut down: the server is closing
            self._done()
            self._reply(req_id, BlockReply(Status.UNAVAILABLE, detail="server closing"))

    # -- handlers -------------------------------------------------------------

    def _refusal(self, request: BlockRequest) -> str | None:
        """Why a request is invalid (answered REJECTED), or None."""
        if request.length > self.config.max_block:
            return f"block larger than {self.config.max_block}"
        if request.block_length is not None:
            if request.block_length > self.config.max_block:
                return f"block larger than {self.config.max_block}"
            if request.offset + request.length > request.block_length:
                return f"range {request.offset}+{request.length} is not inside a block of {request.block_length} bytes"
        return None

    def _serve_one(self, req_id: int, request: BlockRequest, slot: RdmaSlot | None,
                   served: ServedBlock | None = None) -> None:
        try:
            refusal = self._refusal(request)
            if refusal is not None:
                self._reply(req_id, BlockReply(Status.REJECTED, detail=refusal))
                return
            if slot is not None and (self.rdma_session is None or slot.length < request.length):
                self._reply(req_id, BlockReply(Status.REJECTED, detail="bad RDMA slot"))
                return
            try:
                if served is None:
                    served = self.server.provider.lookup(request)
            except Exception as exc:  # noqa: BLE001 - the provider's failure is this request's outcome
                logger.warning("lookup of %s failed: %s", request.key, exc)
                self._reply(req_id, BlockReply(Status.UNAVAILABLE, detail=type(exc).__name__))
                return
            length = len(served.data) if served.data is not None else served.length
            if served.status is Status.FILLED and length != request.length:
                served.close()
                self._reply(req_id, BlockReply(Status.STALE, detail=f"block has {length} bytes"))
                return
            if served.status is not Status.FILLED:
                served.close()
                self._reply(req_id, BlockReply(served.status, token=served.token, detail=served.detail))
                return
            sums = served.sums
            chunk = served.chunk
            if sums is None:
                sums = chunk_sums(served.data if served.data is not None else b"", chunk)
            reply = BlockReply(Status.FILLED, length, chunk, served.token, sums)
            if slot is not None and self.rdma_session is not None:
                try:
                    self.rdma_session.push(served, slot, self.config.send_timeout)
                except RdmaError as exc:
                    logger.warning("RDMA WRITE to %s failed: %s", self.peer, exc)
                    self._reply(req_id, BlockReply(Status.RDMA_FAILED, detail=str(exc)))
                    return
                finally:
                    served.close()
                self.server.metrics.add(rdma_bytes=length, served=1)
                self.server.metrics.status(Status.FILLED)
                self._send(encode_frame(MsgType.BLOCK, req_id, reply.encode(), flags=FLAG_RDMA))
                return
            self.server.metrics.add(served=1)
            self.server.metrics.status(Status.FILLED)
            self._send(encode_frame(MsgType.BLOCK, req_id, reply.encode(), payload_len=length), served)
            served = None  # the writer owns (and closes) it now
        except Exception:  # noqa: BLE001
            logger.exception("serving %s failed", request.key)
            self._reply(req_id, BlockReply(Status.UNAVAILABLE, detail="internal error"))
        finally:
            if served is not None:
                served.close()
            self._done()

    def _done(self) -> None:
        with self._lock:
            self._inflight -= 1

    def _reply(self, req_id: int, reply: BlockReply) -> None:
        self.server.metrics.status(reply.status)
        self._send(encode_frame(MsgType.BLOCK, req_id, reply.encode()))

    # -- writer ---------------------------------------------------------------
    #
    # No writer thread: whoever queues a response drains the queue if nobody
    # else is (a combining lock).  Only one thread per connection sends at a
    # time, so a slow client ties up at most one handler thread.

    def _send(self, frame: bytes, body: ServedBlock | None = None) -> None:
        if self._closed.is_set():
            if body is not None:
                body.close()
            return
        self._out.put((frame, body))
        while not self._out.empty():
            if not self._wlock.acquire(blocking=False):
                return  # the current sender drains our item too (it re-checks after releasing)
            try:
                while True:
                    try:
                        item = self._out.get_nowait()
                    except queue.Empty:
                        break
                    if item is not None:
                        self._write(*item)
            finally:
                self._wlock.release()

    def _write(self, frame: bytes, body: ServedBlock | None) -> None:
        try:
            if self._closed.is_set():
                return
            if body is None:
                self.sock.sendall(frame)
            else:
                self._send_body(frame, body)
        except OSError as exc:
            logger.debug("send to %s failed: %s", self.peer, exc)
            self.shutdown()
        finally:
            if body is not None:
                body.close()

    def _send_body(self, frame: bytes, body: ServedBlock) -> None:
        more = getattr(socket, "MSG_MORE", 0)
        if body.file is not None:
            self.sock.sendall(frame, more)
            out, source, offset, remaining = self.sock.fileno(), body.file.fileno(), body.offset, body.length
            while remaining > 0:
                sent = os.sendfile(out, source, offset, remaining)
                if sent <= 0:
                    raise PeerUnavailable("cache file shorter than its block")
                offset += sent
                remaining -= sent
            self.server.metrics.add(bytes_sent=body.length, sendfile_bytes=body.length)
        else:
            data = memoryview(body.data if body.data is not None else b"")
            if len(data) <= 64 << 10:
                self.sock.sendall(frame + bytes(data))
            else:
                self.sock.sendall(frame, more)
                self.sock.sendall(data)
            self.server.metrics.add(bytes_sent=len(data))

    def _release_queued(self) -> None:
        while True:
            try:
                item = self._out.get_nowait()
            except queue.Empty:
                return
            if item is not None and item[1] is not None:
                item[1].close()

    # -- teardown -------------------------------------------------------------

    def _send_error_quietly(self, code: int, message: str) -> None:
        if not self._wlock.acquire(timeout=1.0):
            return
        try:
            self.sock.settimeout(1.0)
            self.sock.sendall(encode_frame(MsgType.ERROR, 0, encode_error(code, message)))
        except OSError:
            pass
        finally:
            self._wlock.release()

    def shutdown(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        try:  # sends FIN and wakes the reader and any sender; the reader thread closes the socket
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if self.rdma_session is not None:
            try:
                self.rdma_session.close()
            except Exception:  # noqa: BLE001
                logger.debug("closing RDMA session failed", exc_info=True)
        self.server._forget(self)

