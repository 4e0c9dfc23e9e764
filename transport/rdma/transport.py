"""The RDMA block transport: one-sided RDMA WRITE by the owner, TCP as control channel.

Data path (chosen: **owner WRITEs**, not requester READs with a lease)::

    requester                                   owner
    GET{key, token, len, slot(addr, rkey)} --->  look the block up (SSD / fill)
                                                 pread it into a registered staging slot
                                    <=== RDMA WRITE(s) into the requester's slot
                                                 wait for the (signaled) completion
    <--- BLOCK{FILLED, checksums}  (TCP)
    verify checksums on the slot, copy to the caller's buffer, free the slot

Why WRITE-by-owner:

* Blocks live on the owner's SSD (or come from the store on an owner miss),
  so they must be staged into registered memory anyway; a READ design would
  have to stage them too, then *keep* them pinned under a lease until the
  requester has read them.
* No lease, no eviction race: the owner never exposes its own memory (its
  staging region is registered LOCAL_WRITE only), so a requester can neither
  read stale bytes of a recycled staging slot nor pin the owner's memory.
* WRITE depth is not capped by ``max_rd_atomic`` (often 16) as READs are.
* The requester trusts a slot only after the owner's BLOCK answer on the
  authenticated TCP connection *and* the per-chunk checksums match; the
  answer is sent only after the WRITE's completion, so the data has landed.
* Trust boundary: an authenticated peer may WRITE anywhere in the
  requester's receive region (its own slots only); acceptable inside a
  cluster that shares a secret.

Ranged GETs (a slice of a block) take the same path: the owner stages and
WRITEs only the slice (``ServedBlock.offset``/``length``), and the BLOCK
answer carries the sums of the chunks it covers.

Slot recycling: a requester frees a slot when the answer for it arrives (or
the connection dies, which destroys the QP so no WRITE can land any more).
A timed-out request keeps its slot reserved until its late answer.  An
owner whose WRITE does not complete in time destroys the QP for the same
reason.  Any error completion breaks the session; the requester retries the
request over TCP and, after repeated failures, demotes the peer to TCP.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from typing import Any, Callable

from ..base import ServedBlock
from ..errors import ProtocolError, RdmaError, RdmaUnavailable
from ..messages import RdmaSlot, decode_error
from ..protocol import MsgType
from ..tcp import ClientConfig, TcpTransport
from .verbs import Access, Completion, CompletionQueue, QPCaps, QPEndpoint, QueuePair, VerbsBackend, WCStatus

__all__ = ["RdmaClient", "RdmaServer", "RdmaTransport", "detect_backend", "WRITE_CHUNK"]

logger = logging.getLogger(__name__)

#: Largest single RDMA WRITE; a block is posted as a chain, only the last signaled.
WRITE_CHUNK = 1 << 20
_CQ_DEPTH = 1024


def detect_backend(device: str | None = None) -> VerbsBackend | None:
    """The pyverbs backend when pyverbs imports and lists a device, else None."""
    try:
        from .pyverbs_backend import PyverbsBackend

        backend = PyverbsBackend()
        devices = backend.devices()
    except Exception as exc:  # noqa: BLE001 - ImportError, or PyverbsRDMAError (ENOSYS) without kernel support
        logger.debug("no RDMA: %s", exc)
        return None
    if not devices or (device is not None and device not in devices):
        return None
    return backend


class _Completions:
    """Waits for completions by ``wr_id``; whoever waits first polls the CQ in
    batches for everyone (completions of finished requests are dropped)."""

    def __init__(self, cq: CompletionQueue) -> None:
        self.cq = cq
        self.cond = threading.Condition()
        self.waiting: set[int] = set()
        self.results: dict[int, Completion] = {}
        self.polling = False

    def expect(self, wr_id: int) -> None:
        with self.cond:
            self.waiting.add(wr_id)

    def wait_for(self, wr_id: int, deadline: float) -> Completion | None:
        try:
            while True:
                with self.cond:
                    if wr_id in self.results:
                        return self.results.pop(wr_id)
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return None
                    if self.polling:
                        self.cond.wait(remaining)
                        continue
                    self.polling = True
                got: list[Completion] = []
                try:
                    got = self.cq.poll(32)
                    if not got and self.cq.wait(min(0.05, remaining)):
                        got = self.cq.poll(32)
                finally:
                    with self.cond:
                        self.polling = False
                        for completion in got:
                            if completion.wr_id in self.waiting and completion.wr_id not in self.results:
                                self.results[completion.wr_id] = completion
                        self.cond.notify_all()
        finally:
            with self.cond:
                self.waiting.discard(wr_id)
                self.results.pop(wr_id, None)


class _ClientSession:
    """A requester's QP and its registered receive slots."""

    def __init__(self, qp: QueuePair, cq: CompletionQueue, mr: Any, slots: int, slot_size: int) -> None:
        self.qp, self.cq, self.mr = qp, cq, mr
        self.slot_size = slot_size
        self._free = list(range(slots))
        self._lock = threading.Lock()
        self.closed = False

    def acquire_slot(self, length: int) -> tuple[RdmaSlot, memoryview, int] | None:
        if length > self.slot_size:
            return None
        with self._lock:
            if self.closed or not self._free:
                return None
            index = self._free.pop()
        offset = index * self.slot_size
        return (RdmaSlot(self.mr.addr + offset, self.mr.rkey, self.slot_size),
                self.mr.view[offset : offset + self.slot_size], index)

    def release_slot(self, handle: int) -> None:
        with self._lock:
            if not self.closed and handle not in self._free:
                self._free.append(handle)

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
        self.qp.close()  # first: after this no WRITE can land in the slots
        self.mr.close()
        self.cq.close()


class RdmaClient:
    """Requester side: sets up a session per connection (see :class:`~..tcp.RdmaConnector`)."""

    def __init__(self, backend: VerbsBackend, *, device: str | None = None, slots: int = 8,
                 slot_size: int = 4 << 20, caps: QPCaps = QPCaps()) -> None:
        self.backend = backend
        self.device = device
        self.slots = slots
        self.slot_size = slot_size
        self.caps = caps
        self._ctx: Any = None
        self._lock = threading.Lock()

    def _context(self) -> Any:
        with self._lock:
            if self._ctx is None:
                self._ctx = self.backend.open(self.device)
            return self._ctx

    def connect(self, exchange: Callable[[bytes], tuple[MsgType, bytes]]) -> _ClientSession:
        ctx = self._context()
        cq = ctx.create_cq(_CQ_DEPTH)
        qp = mr = None
        try:
            qp = ctx.create_qp(cq, self.caps)
            qp.to_init(Access.LOCAL_WRITE | Access.REMOTE_WRITE)
            mr = ctx.reg_mr(ctx.alloc(self.slots * self.slot_size), Access.LOCAL_WRITE | Access.REMOTE_WRITE)
            kind, reply = exchange(qp.local_endpoint().encode())
            if kind is MsgType.RDMA_REJECT:
                raise RdmaUnavailable(f"peer refused RDMA: {decode_error(reply)[1]}")
            if kind is not MsgType.RDMA_ACCEPT:
                raise ProtocolError(f"expected RDMA_ACCEPT, got {kind.name}")
            remote = QPEndpoint.decode(reply)
            qp.to_rtr(remote)
            qp.to_rts()
            return _ClientSession(qp, cq, mr, self.slots, self.slot_size)
        except BaseException:
            for obj in (qp, mr, cq):
                if obj is not None:
                    obj.close()
            raise

    def close(self) -> None:
        with self._lock:
            if self._ctx is not None:
                self._ctx.close()
                self._ctx = None


class _ServerSession:
    """The owner's QP towards one requester."""

    def __init__(self, server: "RdmaServer", qp: QueuePair, cq: CompletionQueue) -> None:
        self.server = server
        self.qp = qp
        self.cq = cq
        self.completions = _Completions(cq)
        self.broken: str | None = None
        self._lock = threading.Lock()

    def push(self, served: ServedBlock, slot: RdmaSlot, timeout: float) -> None:
        length = len(served.data) if served.data is not None else served.length
        if self.broken:
            raise RdmaError(f"RDMA session unusable: {self.broken}")
        if length > slot.length or length > self.server.max_block:
            raise RdmaError(f"block of {length} bytes does not fit a slot ({slot.length} / {self.server.max_block})")
        if length == 0:
            return
        deadline = time.monotonic() + timeout
        index = self.server._acquire(deadline)
        try:
            base = index * self.server.max_block
            view = self.server.mr.view[base : base + length]
            if served.file is not None:
                _pread_into(served.file.fileno(), view, served.offset)
            else:
                view[:] = memoryview(served.data).cast("B")  # type: ignore[arg-type]
            wr_id = secrets.randbits(63)
            self.completions.expect(wr_id)
            with self._lock:  # one chain at a time per QP keeps send-queue accounting simple
                for start in range(0, length, WRITE_CHUNK):
                    n = min(WRITE_CHUNK, length - start)
                    self.qp.post_write(wr_id, self.server.mr, base + start, n, slot.addr + start, slot.rkey,
                                       signaled=start + n >= length)
            completion = self.completions.wait_for(wr_id, deadline)
            if completion is None:
                self._break("WRITE completion timed out")
                raise RdmaError("RDMA WRITE did not complete in time")
            if completion.status is not WCStatus.SUCCESS:
                self._break(completion.status.name)
                raise RdmaError(f"RDMA WRITE failed: {completion.status.name}")
            self.server.bytes_written += length
        finally:
            self.server._release(index)

    def _break(self, reason: str) -> None:
        self.broken = reason
        # Destroy the QP: a WRITE still in flight can no longer land in a slot
        # the requester is about to reuse.
        self.qp.close()

    def close(self) -> None:
        self.qp.close()
        self.cq.close()


def _pread_into(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise RdmaError("short read staging a block")
        done += n


class RdmaServer:
    """Owner side: accepts RDMA sessions and WRITEs blocks (see :class:`~..server.RdmaAcceptor`)."""

    def __init__(self, backend: VerbsBackend, *, device: str | None = None, staging_slots: int = 8,
                 max_block: int = 4 << 20, caps: QPCaps = QPCaps()) -> None:
        self.ctx = backend.open(device)
        self.caps = caps
        self.max_block = max_block
        self.mr = self.ctx.reg_mr(self.ctx.alloc(staging_slots * max_block), Access.LOCAL_WRITE)
        self._free = list(range(staging_slots))
        self._cond = threading.Condition()
        self.bytes_written = 0
        self.sessions = 0

    def accept(self, meta: bytes) -> tuple[bytes, _ServerSession]:
        remote = QPEndpoint.decode(meta)
        cq = self.ctx.create_cq(_CQ_DEPTH)
        qp = None
        try:
            qp = self.ctx.create_qp(cq, self.caps)
            qp.connect(remote, Access(0))  # the owner only WRITEs out: no remote access to it
            self.sessions += 1
            return qp.local_endpoint().encode(), _ServerSession(self, qp, cq)
        except BaseException:
            if qp is not None:
                qp.close()
            cq.close()
            raise

    def _acquire(self, deadline: float) -> int:
        with self._cond:
            if not self._cond.wait_for(lambda: bool(self._free), max(0.0, deadline - time.monotonic())):
                raise RdmaError("no free staging slot")
            return self._free.pop()

    def _release(self, index: int) -> None:
        with self._cond:
            self._free.append(index)
            self._cond.notify()

    def close(self) -> None:
        self.mr.close()
        self.ctx.close()


class RdmaTransport(TcpTransport):
    """The TCP transport with the RDMA data path enabled.

    ``mode="auto"`` uses RDMA with peers that offer it and fall back to TCP
    otherwise; ``mode="rdma"`` refuses TCP data (a failed handshake makes the
    peer unavailable).  Without a backend (no pyverbs / no device) ``auto``
    is plain TCP.
    """

    name = "rdma"

    def __init__(self, secret: bytes, *, backend: VerbsBackend | None = None, config: ClientConfig | None = None,
                 mode: str = "auto", device: str | None = None, slots: int = 8) -> None:
        backend = backend if backend is not None else detect_backend(device)
        if backend is None and mode == "rdma":
            raise RdmaUnavailable("SHOAL_TRANSPORT=rdma but no RDMA device is usable here "
                                  "(install python3-pyverbs and check ibv_devices)")
        cfg = config or ClientConfig()
        self.rdma_client = (RdmaClient(backend, device=device, slots=slots, slot_size=min(cfg.max_block, 4 << 20))
                            if backend is not None else None)
        super().__init__(secret, config=cfg, mode=mode if self.rdma_client else "tcp", rdma=self.rdma_client)

    def close(self) -> None:
        super().close()
        if self.rdma_client is not None:
            self.rdma_client.close()
