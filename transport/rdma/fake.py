"""An in-process fake of the verbs backend, faithful where the transport depends on it.

It models what can go wrong on real hardware, so the RDMA transport's code
(handshake, slot bookkeeping, completion handling, fallback) runs in CI:

* memory regions with random 32-bit lkeys/rkeys and synthetic page-aligned
  addresses; remote access is checked against the rkey, the region's bounds,
  its access flags and the responder QP's access flags
  (``REM_ACCESS_ERR``); local access against the lkey and bounds
  (``LOC_PROT_ERR``);
* the RC queue-pair state machine RESET -> INIT -> RTR -> RTS (posting
  before RTS is refused like ``ibv_post_send``'s EINVAL), the send-queue
  depth (``max_send_wr``) and outstanding READs (``max_rd_atomic``);
* the connection itself: a WRITE/READ reaches the remote only if its QP
  exists, is RTR/RTS, is connected back to this QP and expects this PSN;
  otherwise ``RETRY_EXC_ERR`` (a dead or mis-wired peer);
* errors move the QP to ERR, after which every WR completes with
  ``WR_FLUSH_ERR``; a killed device (:meth:`FakeContext.kill`) errors all
  its QPs; faults can be injected per QP (:meth:`FakeFabric.inject`) and
  state transitions made to fail (:attr:`FakeFabric.fail_transitions`).

Data moves at post time (memcpy between the two regions); the completion
is queued for :meth:`FakeCQ.poll`.  Only one process: the fabric is a
Python object.
"""

from __future__ import annotations

import collections
import logging
import random
import threading
from typing import Any

from ..errors import RdmaError, RdmaUnavailable
from .verbs import (
    Access, Completion, CompletionQueue, MemoryRegion, Opcode, PortInfo, QPCaps, QPEndpoint, QPState,
    QueuePair, VerbsBackend, VerbsContext, WCStatus,
)

__all__ = ["FakeFabric", "FakeVerbs", "FakeContext", "DEFAULT_FABRIC"]

logger = logging.getLogger(__name__)

_PAGE = 4096


class FakeFabric:
    """The "wire": every fake device, QP and MR that can reach each other."""

    def __init__(self, seed: int | None = None) -> None:
        self._lock = threading.RLock()
        self._rng = random.Random(seed)
        self.qps: dict[int, "FakeQP"] = {}
        self.mrs: dict[int, "FakeMR"] = {}
        self._next_addr = 0x7F10_0000_0000
        self._next_lid = 1
        self._faults: dict[int | None, collections.deque[WCStatus]] = {}
        #: Names of transitions ("init", "rtr", "rts") that fail with EINVAL.
        self.fail_transitions: set[str] = set()
        self.posted = 0

    def _key(self, table: dict[int, Any], bits: int = 32) -> int:
        while True:
            key = self._rng.getrandbits(bits)
            if key and key not in table:
                return key

    def alloc_addr(self, size: int) -> int:
        with self._lock:
            addr = self._next_addr
            self._next_addr += (size + 2 * _PAGE - 1) // _PAGE * _PAGE  # a guard page between regions
            return addr

    def new_lid(self) -> int:
        with self._lock:
            lid = self._next_lid
            self._next_lid += 1
            return lid

    def inject(self, status: WCStatus, *, qpn: int | None = None, count: int = 1) -> None:
        """The next ``count`` WRs posted on ``qpn`` (any QP when None) complete with ``status``."""
        with self._lock:
            self._faults.setdefault(qpn, collections.deque()).extend([status] * count)

    def _take_fault(self, qpn: int) -> WCStatus | None:
        with self._lock:
            for key in (qpn, None):
                queue = self._faults.get(key)
                if queue:
                    return queue.popleft()
        return None


DEFAULT_FABRIC = FakeFabric()


class FakeMR(MemoryRegion):
    def __init__(self, ctx: "FakeContext", buffer: Any, access: Access) -> None:
        view = memoryview(buffer).cast("B")
        if view.readonly:
            raise RdmaError("EFAULT: cannot register read-only memory")
        fabric = ctx.fabric
        with fabric._lock:
            self.lkey = fabric._key(fabric.mrs)
            self.rkey = fabric._key(fabric.mrs)
            fabric.mrs[self.rkey] = self
        self.ctx = ctx
        self.view = view
        self.length = len(view)
        self.access = Access(access)
        self.addr = fabric.alloc_addr(self.length)
        self.closed = False
        ctx.lkeys[self.lkey] = self

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with self.ctx.fabric._lock:
                self.ctx.fabric.mrs.pop(self.rkey, None)
                self.ctx.lkeys.pop(self.lkey, None)


class FakeCQ(CompletionQueue):
    def __init__(self, depth: int) -> None:
        self.depth = depth
        self._entries: collections.deque[Completion] = collections.deque()
        self._cond = threading.Condition()
        self.closed = False

    def push(self, completion: Completion) -> None:
        with self._cond:
            if len(self._entries) >= self.depth:
                raise RdmaError("CQ overrun")
            self._entries.append(completion)
            self._cond.notify_all()

    def poll(self, max_entries: int = 32) -> list[Completion]:
        with self._cond:
            out = []
            while self._entries and len(out) < max_entries:
                out.append(self._entries.popleft())
            return out

    def wait(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: bool(self._entries) or self.closed, timeout)

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()


class FakeQP(QueuePair):
    def __init__(self, ctx: "FakeContext", cq: FakeCQ, caps: QPCaps) -> None:
        fabric = ctx.fabric
        with fabric._lock:
            self.qpn = fabric._key(fabric.qps, 24)
            fabric.qps[self.qpn] = self
        self.ctx = ctx
        self.cq = cq
        self.caps = caps
        self._state = QPState.RESET
        self.access = Access(0)
        self.psn = fabric._rng.getrandbits(24)
        self.remote: QPEndpoint | None = None
        self.path_mtu = 0
        self._outstanding = 0
        self._reads = 0
        self._lock = threading.Lock()
        ctx.qps.add(self)

    @property
    def state(self) -> QPState:
        return self._state

    def local_endpoint(self) -> QPEndpoint:
        port = self.ctx.port_info()
        return QPEndpoint(self.qpn, self.psn, port.lid, port.gid, port.active_mtu,
                          max_rd_atomic=self.caps.max_rd_atomic)

    def _transition(self, name: str, expected: QPState, new: QPState) -> None:
        if name in self.ctx.fabric.fail_transitions:
            raise RdmaError(f"EINVAL: failed to modify QP state to {name.upper()} (injected)")
        if self._state is not expected:
            raise RdmaError(f"EINVAL: cannot move QP from {self._state.name} to {new.name}")
        self._state = new

    def to_init(self, access: Access) -> None:
        self._transition("init", QPState.RESET, QPState.INIT)
        self.access = Access(access)

    def to_rtr(self, remote: QPEndpoint) -> None:
        port = self.ctx.port_info()
        if port.link_layer == "ethernet" and not any(remote.gid):
            raise RdmaError("EINVAL: RoCE needs the remote GID (GRH required)")
        self._transition("rtr", QPState.INIT, QPState.RTR)
        self.remote = remote
        self.path_mtu = min(remote.mtu, port.active_mtu)

    def to_rts(self) -> None:
        self._transition("rts", QPState.RTR, QPState.RTS)

    def _error(self) -> None:
        self._state = QPState.ERR

    def post_write(self, wr_id: int, mr: MemoryRegion, offset: int, length: int, remote_addr: int,
                   rkey: int, *, signaled: bool = True) -> None:
        self._post(Opcode.RDMA_WRITE, wr_id, mr, offset, length, remote_addr, rkey, signaled)

    def post_read(self, wr_id: int, mr: MemoryRegion, offset: int, length: int, remote_addr: int,
                  rkey: int, *, signaled: bool = True) -> None:
        self._post(Opcode.RDMA_READ, wr_id, mr, offset, length, remote_addr, rkey, signaled)

    def _post(self, opcode: Opcode, wr_id: int, mr: MemoryRegion, offset: int, length: int,
              remote_addr: int, rkey: int, signaled: bool) -> None:
        with self._lock:
            if self._state in (QPState.RESET, QPState.INIT, QPState.RTR):
                raise RdmaError(f"EINVAL: cannot post on a QP in {self._state.name}")
            if self._outstanding >= self.caps.max_send_wr:
                raise RdmaError("ENOMEM: send queue full")
            if opcode is Opcode.RDMA_READ and self._reads >= self.caps.max_rd_atomic:
                raise RdmaError("ENOMEM: more RDMA READs outstanding than max_rd_atomic")
            self._outstanding += 1
            if opcode is Opcode.RDMA_READ:
                self._reads += 1
            self.ctx.fabric.posted += 1
            status = self._execute(opcode, mr, offset, length, remote_addr, rkey)
            if status is not WCStatus.SUCCESS and self._state is not QPState.ERR:
                logger.debug("fake QP %d: %s -> ERR", self.qpn, status.name)
                self._error()
            if signaled or status is not WCStatus.SUCCESS:
                self._outstanding = 0
                self._reads = 0
                try:
                    self.cq.push(Completion(wr_id, status, opcode, length if status is WCStatus.SUCCESS else 0))
                except RdmaError:
                    self._error()
                    raise

    def _execute(self, opcode: Opcode, mr: MemoryRegion, offset: int, length: int,
                 remote_addr: int, rkey: int) -> WCStatus:
        if self._state is QPState.ERR or self.ctx.dead:
            return WCStatus.WR_FLUSH_ERR
        fault = self.ctx.fabric._take_fault(self.qpn)
        if fault is not None:
            return fault
        local = self.ctx.lkeys.get(getattr(mr, "lkey", -1))
        if local is None or local is not mr or offset < 0 or length < 0 or offset + length > local.length:
            return WCStatus.LOC_PROT_ERR
        if opcode is Opcode.RDMA_READ and not local.access & Access.LOCAL_WRITE:
            return WCStatus.LOC_PROT_ERR
        remote = self.remote
        with self.ctx.fabric._lock:
            peer = self.ctx.fabric.qps.get(remote.qpn) if remote is not None else None
            target = self.ctx.fabric.mrs.get(rkey)
        if (peer is None or peer.ctx.dead or peer.state not in (QPState.RTR, QPState.RTS)
                or peer.remote is None or peer.remote.qpn != self.qpn or peer.remote.psn != self.psn):
            return WCStatus.RETRY_EXC_ERR
        needed = Access.REMOTE_WRITE if opcode is Opcode.RDMA_WRITE else Access.REMOTE_READ
        if (target is None or target.closed or target.ctx is not peer.ctx or not target.access & needed
                or not peer.access & needed):
            return WCStatus.REM_ACCESS_ERR
        start = remote_addr - target.addr
        if start < 0 or start + length > target.length:
            return WCStatus.REM_ACCESS_ERR
        if opcode is Opcode.RDMA_WRITE:
            target.view[start : start + length] = local.view[offset : offset + length]
        else:
            local.view[offset : offset + length] = target.view[start : start + length]
        return WCStatus.SUCCESS

    def close(self) -> None:
        with self.ctx.fabric._lock:
            self.ctx.fabric.qps.pop(self.qpn, None)
        self._state = QPState.RESET
        self.remote = None
        self.ctx.qps.discard(self)


class FakeContext(VerbsContext):
    def __init__(self, fabric: FakeFabric, name: str, *, mtu: int = 5, link_layer: str = "ethernet") -> None:
        self.fabric = fabric
        self.name = name
        self.lid = fabric.new_lid()
        self.gid = bytes.fromhex("fe80000000000000") + self.lid.to_bytes(8, "big")
        self.mtu = mtu
        self.link_layer = link_layer
        self.lkeys: dict[int, FakeMR] = {}
        self.qps: set[FakeQP] = set()
        self.dead = False

    def port_info(self) -> PortInfo:
        return PortInfo(lid=self.lid, gid=self.gid, active_mtu=self.mtu, active=not self.dead,
                        link_layer=self.link_layer)

    def alloc(self, size: int) -> bytearray:
        return bytearray(size)

    def reg_mr(self, buffer: Any, access: Access) -> FakeMR:
        if self.dead:
            raise RdmaError("ENODEV: device removed")
        return FakeMR(self, buffer, access)

    def create_cq(self, depth: int) -> FakeCQ:
        return FakeCQ(depth)

    def create_qp(self, cq: CompletionQueue, caps: QPCaps = QPCaps()) -> FakeQP:
        if self.dead:
            raise RdmaError("ENODEV: device removed")
        if not isinstance(cq, FakeCQ):
            raise RdmaError("EINVAL: CQ of another backend")
        return FakeQP(self, cq, caps)

    def kill(self) -> None:
        """The device disappears: its QPs go to ERR, peers' WRs to it fail."""
        self.dead = True
        for qp in list(self.qps):
            qp._error()

    def close(self) -> None:
        for qp in list(self.qps):
            qp.close()
        for mr in list(self.lkeys.values()):
            mr.close()


class FakeVerbs(VerbsBackend):
    """A backend whose devices live on ``fabric`` (one per process by default)."""

    name = "fake"

    def __init__(self, fabric: FakeFabric | None = None, devices: tuple[str, ...] = ("fake0",), *,
                 mtu: int = 5, link_layer: str = "ethernet") -> None:
        self.fabric = fabric or DEFAULT_FABRIC
        self._devices = devices
        self.mtu = mtu
        self.link_layer = link_layer
        self.contexts: list[FakeContext] = []

    def devices(self) -> list[str]:
        return list(self._devices)

    def open(self, device: str | None = None) -> FakeContext:
        if not self._devices:
            raise RdmaUnavailable("no RDMA device (fake backend with no devices)")
        name = device or self._devices[0]
        if name not in self._devices:
            raise RdmaUnavailable(f"no RDMA device named {name!r}")
        ctx = FakeContext(self.fabric, name, mtu=self.mtu, link_layer=self.link_layer)
        self.contexts.append(ctx)
        return ctx
