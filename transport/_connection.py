"""One client connection of the TCP transport: pipelined requests, one reader thread.

The reader matches answers to requests by id, in whatever order they come,
receives each body with ``recv_into`` straight into the caller's buffer and
checks its checksums as it arrives (see :class:`~shoal.transport.tcp.TcpTransport`).
"""

from __future__ import annotations

import itertools
import logging
import socket
import threading
import time
from typing import TYPE_CHECKING, Callable, Protocol, Sequence

import xxhash

from . import _io
from .base import BlockRequest, Outcome, PeerAddress
from .errors import PeerUnavailable, ProtocolError, TransportError, TransportTimeout
from .messages import BlockReply, Hello, RdmaSlot, decode_error, encode_get
from .protocol import FLAG_RDMA, Limits, MsgType, Status, encode_frame, verify_chunks

if TYPE_CHECKING:
    from .tcp import TcpTransport

__all__ = ["RdmaClientSession", "RdmaConnector"]

logger = logging.getLogger(__name__)

_WAITING, _RECEIVING, _DONE, _ABANDONED = range(4)

#: Largest single receive of a block body: each piece is verified right after it
#: arrives, while it is still in the CPU's L2 cache.  An unbounded ``recv_into``
#: can return a whole 4 MiB block at once (the socket buffer holds several), and
#: the checksum pass then reads it back from memory: on the loopback benchmark
#: that made xxh3 cost two thirds as much as the kernel's copy.
_RECV_PIECE = 256 << 10


class RdmaClientSession(Protocol):
    """The requester's side of one connection's RDMA data path."""

    def acquire_slot(self, length: int) -> tuple[RdmaSlot, memoryview, int] | None:
        """A free registered slot of at least ``length`` bytes (descriptor, its
        memory, a handle), or None (the request then goes over TCP)."""
        ...

    def release_slot(self, handle: int) -> None:
        ...

    def close(self) -> None:
        ...


class RdmaConnector(Protocol):
    """Sets up RDMA over an authenticated connection."""

    def connect(self, exchange: Callable[[bytes], tuple[MsgType, bytes]]) -> RdmaClientSession:
        """Run the handshake; ``exchange(meta)`` sends RDMA_CONNECT and returns
        the reply.  Raises :class:`RdmaError` when RDMA cannot be used."""
        ...


class _Pending:
    """One request on one connection."""

    __slots__ = ("req_id", "request", "buffer", "state", "outcome", "reply", "slot", "slot_view",
                 "slot_handle", "batch", "via", "is_control", "meta")

    def __init__(self, req_id: int, request: BlockRequest | None, buffer: memoryview | None, batch: "_Batch") -> None:
        self.req_id = req_id
        self.request = request
        self.buffer = buffer
        self.state = _WAITING
        self.outcome: Outcome | None = None
        self.reply: BlockReply | None = None
        self.slot: RdmaSlot | None = None
        self.slot_view: memoryview | None = None
        self.slot_handle = -1
        self.batch = batch
        self.via = "tcp"
        self.is_control = request is None
        self.meta = b""


class _Batch:
    """Counts down the pendings of one fetch."""

    def __init__(self, count: int) -> None:
        self.remaining = count
        self.cond = threading.Condition()

    def finish_one(self) -> None:
        with self.cond:
            self.remaining -= 1
            if self.remaining <= 0:
                self.cond.notify_all()

    def wait(self, deadline: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: self.remaining <= 0, max(0.0, deadline - time.monotonic()))


class _Connection:
    """One authenticated connection and its reader thread."""

    def __init__(self, transport: TcpTransport, peer: PeerAddress, sock: socket.socket,
                 server: Hello, rdma: RdmaClientSession | None) -> None:
        self.transport = transport
        self.peer = peer
        self.sock = sock
        self.server = server
        self.rdma = rdma
        self.pending: dict[int, _Pending] = {}
        self.lock = threading.Lock()
        self.send_lock = threading.Lock()
        self.ids = itertools.count(1)
        self.closed = False
        self.limits = Limits(max_payload=transport.config.max_block)
        self.thread = threading.Thread(target=self._read_loop, name=f"shoal-peer-{peer}", daemon=True)
        self.thread.start()

    @property
    def inflight(self) -> int:
        return len(self.pending)

    def submit(self, pendings: Sequence[_Pending], use_rdma: bool) -> None:
        """Register and send GETs; raises :class:`PeerUnavailable` if the connection is gone."""
        frames = []
        with self.lock:
            if self.closed:
                raise PeerUnavailable(f"connection to {self.peer} is closed")
            for p in pendings:
                assert p.request is not None
                p.req_id = next(self.ids)
                slot = None
                if use_rdma and self.rdma is not None:
                    got = self.rdma.acquire_slot(p.request.length) if p.request.length else None
                    if got is not None:
                        p.slot, p.slot_view, p.slot_handle = got
                        p.via, slot = "rdma", got[0]
                meta, flags = encode_get(p.request, slot)
                frames.append(encode_frame(MsgType.GET, p.req_id, meta, flags=flags))
                self.pending[p.req_id] = p
        self._send(b"".join(frames))

    def control(self, msg_type: MsgType, meta: bytes, deadline: float) -> bytes:
        """Send a PING/STATS/LISTING and wait for its answer's metadata."""
        batch = _Batch(1)
        p = _Pending(0, None, None, batch)
        with self.lock:
            if self.closed:
                raise PeerUnavailable(f"connection to {self.peer} is closed")
            p.req_id = next(self.ids)
            self.pending[p.req_id] = p
        self._send(encode_frame(msg_type, p.req_id, meta))
        if not batch.wait(deadline):
            with self.lock:
                self.pending.pop(p.req_id, None)
            raise TransportTimeout(f"{self.peer} did not answer {msg_type.name}")
        if p.outcome is not Outcome.FILLED:
            raise PeerUnavailable(f"connection to {self.peer} lost")
        return p.meta

    def _send(self, data: bytes) -> None:
        try:
            with self.send_lock:
                self.sock.sendall(data)
        except OSError as exc:
            self.fail(PeerUnavailable(f"send to {self.peer} failed: {exc}"))
            raise PeerUnavailable(f"send to {self.peer} failed: {exc}") from exc

    def abandon(self, p: _Pending) -> bool:
        """Give up on ``p`` unless its body is being received (then False: wait)."""
        with self.lock:
            if p.state == _WAITING:
                p.state = _ABANDONED
                if p.slot is None:  # an RDMA slot stays reserved until the late answer
                    self.pending.pop(p.req_id, None)
                return True
            return p.state != _RECEIVING

    def _read_loop(self) -> None:
        scratch = memoryview(bytearray(256 << 10))
        try:
            while True:
                try:
                    header, meta = _io.read_frame(self.sock, self.limits, idle_ok=True)
                except _io.Idle:
                    if self.closed:
                        return
                    continue
                if header.type is MsgType.ERROR:
                    code, message = decode_error(meta)
                    raise PeerUnavailable(f"{self.peer} closed the connection: {message} ({code})")
                with self.lock:
                    p = self.pending.get(header.req_id)
                    if p is not None and p.state == _WAITING:
                        p.state = _RECEIVING
                if header.type in (MsgType.PONG, MsgType.STATS_REPLY, MsgType.LISTING_REPLY):
                    _io.expect_no_payload(header)
                    if p is not None and p.is_control:
                        p.meta = meta
                        self._finish(p, Outcome.FILLED)
                    continue
                if header.type is not MsgType.BLOCK:
                    raise ProtocolError(f"unexpected {header.type.name} from a server")
                reply = BlockReply.decode(meta)
                if p is None or p.is_control or p.state == _ABANDONED:
                    _io.drain(self.sock, header.payload_len, scratch)
                    if p is not None:
                        self._release(p)
                        with self.lock:
                            self.pending.pop(header.req_id, None)
                    continue
                self._receive(p, header.flags, header.payload_len, reply, scratch)
        except (TransportError, OSError) as exc:
            self.fail(exc)
        except Exception as exc:  # noqa: BLE001 - never leave waiters hanging
            logger.exception("reader for %s failed", self.peer)
            self.fail(exc)

    def _receive(self, p: _Pending, flags: int, payload_len: int, reply: BlockReply, scratch: memoryview) -> None:
        request = p.request
        assert request is not None and p.buffer is not None
        p.reply = reply
        if reply.status is not Status.FILLED:
            _io.drain(self.sock, payload_len, scratch)
            if reply.status is Status.RDMA_FAILED:
                p.via = "rdma-failed"
            self._release(p)  # nothing was (or will be: the owner dropped its QP) written there
            self._finish(p, Outcome.from_status(reply.status))
            return
        if reply.length != request.length or reply.token != request.token:
            _io.drain(self.sock, payload_len, scratch)
            self._release(p)
            self._finish(p, Outcome.STALE)
            return
        length = reply.length
        if flags & FLAG_RDMA:
            if p.slot_view is None or payload_len:
                raise ProtocolError("RDMA answer for a request without a slot")
            # The owner answers only after its WRITE completed: the bytes are in the slot.
            data = p.slot_view[:length]
            ok = length == 0 or verify_chunks(data, reply.chunk, reply.sums)
            if ok:
                p.buffer[:length] = data
        else:
            if payload_len != length:
                raise ProtocolError(f"payload of {payload_len} bytes for a {length}-byte block")
            if p.slot is not None:  # sent with a slot, answered inline: fine
                p.via = "tcp"
            ok = self._recv_verified(p.buffer[:length], reply)
        self._release(p)
        self._finish(p, Outcome.FILLED if ok else Outcome.CORRUPT)

    def _recv_verified(self, view: memoryview, reply: BlockReply) -> bool:
        """Receive a body and check its chunks as they arrive, while they are still
        in the CPU cache (a second pass over 4 MiB would cost a memory read).

        The body comes in pieces of ``_RECV_PIECE`` bytes (a whole number of
        checksum chunks), each received with ``MSG_WAITALL`` (one wakeup into
        Python per piece, not per TCP segment) and verified at once."""
        length, chunk, sums = len(view), reply.chunk, reply.sums
        if length == 0:
            return True
        if chunk <= 0 or len(sums) != -(-length // chunk):
            _io.recv_into_exact(self.sock, view)
            return False
        sock, digest = self.sock, xxhash.xxh3_64_intdigest
        flags = _io.WAITALL if sock.gettimeout() is None else 0
        piece = max(chunk, _RECV_PIECE - _RECV_PIECE % chunk)
        got = checked = 0  # bytes received, bytes verified (a multiple of chunk, or length)
        n_sum = 0
        ok = True
        while got < length:
            try:
                n = sock.recv_into(view[got:], min(length - got, piece), flags)
            except (socket.timeout, BlockingIOError) as exc:
                raise TransportTimeout(f"{self.peer} stalled in the middle of a block") from exc
            if n == 0:
                raise PeerUnavailable(f"{self.peer} closed the connection in the middle of a block")
            got += n
            ready = length if got == length else got - got % chunk
            while ok and checked < ready:
                ok = digest(view[checked : checked + chunk]) == sums[n_sum]
                checked += chunk
                n_sum += 1
        return ok

    def _finish(self, p: _Pending, outcome: Outcome | None) -> None:
        with self.lock:
            self.pending.pop(p.req_id, None)
            p.state = _DONE
            p.outcome = outcome
        p.batch.finish_one()

    def _release(self, p: _Pending) -> None:
        if p.slot is not None and self.rdma is not None:
            self.rdma.release_slot(p.slot_handle)
        p.slot = None
        p.slot_view = None

    def fail(self, exc: BaseException) -> None:
        """Close the connection and fail every request still on it."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
            waiting = [p for p in self.pending.values() if p.state in (_WAITING, _RECEIVING)]
            for p in waiting:
                p.state = _DONE
                p.outcome = Outcome.UNAVAILABLE
            self.pending.clear()
        logger.info("connection to %s closed: %s", self.peer, exc)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if self.rdma is not None:  # destroys the QP: no WRITE can land in a slot any more
            try:
                self.rdma.close()
            except Exception:  # noqa: BLE001
                logger.debug("closing RDMA session failed", exc_info=True)
        for p in waiting:
            p.batch.finish_one()
        self.transport._forget(self)

    def close(self) -> None:
        self.fail(PeerUnavailable("closed by the client"))
        self.thread.join(timeout=2)
        self.sock.close()
