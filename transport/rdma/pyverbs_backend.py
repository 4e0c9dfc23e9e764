"""The verbs backend on real hardware, through pyverbs (Debian's ``python3-pyverbs``).

NOT exercised on RDMA hardware in this project's CI (these machines have no
RDMA device and no kernel support); it follows rdma-core's own pyverbs tests
and ``rc_pingpong.c``.  The transport code above it runs against the fake
backend (:mod:`.fake`); the ``rdma``-marked tests run it for real where a
device is listed.

Version shim: constants moved from ``pyverbs.enums`` (flat names, rdma-core
< v59) to ``pyverbs.libibverbs_enums`` (members of enum classes such as
``ibv_qp_type.IBV_QPT_RC``); :func:`const` finds a name in either.
pyverbs is a system package: use a virtualenv made with
``--system-site-packages`` to see it.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import mmap
import os
import select
import threading
from functools import lru_cache
from typing import Any

from ..errors import RdmaError, RdmaUnavailable
from .verbs import (
    Access, Completion, CompletionQueue, MemoryRegion, Opcode, PortInfo, QPCaps, QPEndpoint, QPState,
    QueuePair, VerbsBackend, VerbsContext, WCStatus,
)

__all__ = ["PyverbsBackend", "const"]

logger = logging.getLogger(__name__)

_INSTALL_HINT = ("pyverbs is not importable: apt install python3-pyverbs (rdma-core) and use a "
                 "virtualenv created with --system-site-packages")


def _module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise RdmaUnavailable(_INSTALL_HINT) from exc


@lru_cache(maxsize=None)
def const(name: str) -> int:
    """A libibverbs constant by name, from whichever pyverbs enum module exists."""
    for module_name in ("pyverbs.enums", "pyverbs.libibverbs_enums"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if hasattr(module, name):
            return int(getattr(module, name))
        for attr in vars(module).values():  # v59+: ibv_qp_type.IBV_QPT_RC and friends
            if isinstance(attr, type) and hasattr(attr, name):
                return int(getattr(attr, name))
    raise RdmaUnavailable(f"pyverbs has no constant {name}: unsupported rdma-core version")


def _gid_bytes(gid: Any) -> bytes:
    text = str(getattr(gid, "gid", gid))
    raw = bytes.fromhex(text.replace(":", ""))
    if len(raw) != 16:
        raise RdmaError(f"unexpected GID format {text!r}")
    return raw


def _gid_text(raw: bytes) -> str:
    hexed = raw.hex()
    return ":".join(hexed[i : i + 4] for i in range(0, 32, 4))


class _MR(MemoryRegion):
    def __init__(self, pd: Any, buffer: Any, access: Access) -> None:
        mr_mod = _module("pyverbs.mr")
        self.buffer = buffer  # keep the memory alive as long as the registration
        self.view = memoryview(buffer).cast("B")
        self.length = len(self.view)
        self.addr = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
        try:
            self._mr = mr_mod.MR(pd, self.length, int(access), address=self.addr)
        except Exception as exc:  # noqa: BLE001 - PyverbsRDMAError (memlock limit, EFAULT)
            raise RdmaError(f"cannot register {self.length} bytes: {exc}") from exc
        self.lkey = int(self._mr.lkey)
        self.rkey = int(self._mr.rkey)
        self.access = Access(access)

    def close(self) -> None:
        self._mr.close()


class _CQ(CompletionQueue):
    def __init__(self, ctx: Any, depth: int) -> None:
        cq_mod = _module("pyverbs.cq")
        self._channel = cq_mod.CompChannel(ctx)
        self._cq = cq_mod.CQ(ctx, depth, None, self._channel, 0)
        self._cq.req_notify()
        self._lock = threading.Lock()

    def poll(self, max_entries: int = 32) -> list[Completion]:
        try:
            _, wcs = self._cq.poll(max_entries)
        except Exception as exc:  # noqa: BLE001
            raise RdmaError(f"polling the CQ failed: {exc}") from exc
        return [Completion(int(wc.wr_id), WCStatus.of(int(wc.status)),
                           Opcode.RDMA_READ if int(wc.opcode) == const("IBV_WC_RDMA_READ") else Opcode.RDMA_WRITE,
                           int(wc.byte_len)) for wc in wcs]

    def wait(self, timeout: float) -> bool:
        # get_cq_event holds the GIL while blocking: only call it once the fd is readable.
        ready, _, _ = select.select([self._channel.fd], [], [], max(0.0, timeout))
        if not ready:
            return False
        with self._lock:
            self._channel.get_cq_event(self._cq)
            self._cq.ack_events(1)
            self._cq.req_notify()
        return True

    def close(self) -> None:
        self._cq.close()
        self._channel.close()


class _QP(QueuePair):
    def __init__(self, owner: "_Context", cq: _CQ, caps: QPCaps) -> None:
        qp_mod = _module("pyverbs.qp")
        self.owner = owner
        self.caps = caps
        cap = qp_mod.QPCap(max_send_wr=caps.max_send_wr, max_recv_wr=caps.max_recv_wr, max_send_sge=1,
                           max_recv_sge=1)
        init = qp_mod.QPInitAttr(qp_type=const("IBV_QPT_RC"), scq=cq._cq, rcq=cq._cq, cap=cap, sq_sig_all=0)
        try:
            self._qp = qp_mod.QP(owner.pd, init)  # no QPAttr: stays in RESET
        except Exception as exc:  # noqa: BLE001
            raise RdmaError(f"cannot create a QP: {exc}") from exc
        self.qpn = int(self._qp.qp_num)
        self.psn = int.from_bytes(os.urandom(3), "little")
        self._remote: QPEndpoint | None = None

    @property
    def state(self) -> QPState:
        return QPState(int(self._qp.qp_state))

    def local_endpoint(self) -> QPEndpoint:
        port = self.owner.port_info()
        return QPEndpoint(self.qpn, self.psn, port.lid, port.gid, port.active_mtu,
                          port=self.owner.port_num, max_rd_atomic=self.caps.max_rd_atomic)

    def _attr(self) -> Any:
        return _module("pyverbs.qp").QPAttr(port_num=self.owner.port_num)

    def to_init(self, access: Access) -> None:
        attr = self._attr()
        attr.qp_access_flags = int(access)
        attr.pkey_index = 0
        self._modify("to_init", attr)

    def to_rtr(self, remote: QPEndpoint) -> None:
        addr = _module("pyverbs.addr")
        port = self.owner.port_info()
        attr = self._attr()
        attr.path_mtu = min(remote.mtu, port.active_mtu)
        attr.dest_qp_num = remote.qpn
        attr.rq_psn = remote.psn
        attr.max_dest_rd_atomic = min(remote.max_rd_atomic, self.caps.max_rd_atomic)
        attr.min_rnr_timer = 12
        is_global = 1 if any(remote.gid) else 0
        route = addr.GlobalRoute(dgid=addr.GID(val=_gid_text(remote.gid)), sgid_index=self.owner.gid_index)
        attr.ah_attr = addr.AHAttr(port_num=self.owner.port_num, is_global=is_global, dlid=remote.lid, gr=route)
        self._remote = remote
        self._modify("to_rtr", attr)

    def to_rts(self) -> None:
        attr = self._attr()
        attr.sq_psn = self.psn
        attr.timeout, attr.retry_cnt, attr.rnr_retry = 14, 7, 7
        attr.max_rd_atomic = self.caps.max_rd_atomic
        self._modify("to_rts", attr)

    def _modify(self, method: str, attr: Any) -> None:
        try:
            getattr(self._qp, method)(attr)
        except Exception as exc:  # noqa: BLE001 - PyverbsRDMAError
            raise RdmaError(f"QP {method} failed: {exc}") from exc

    def _post(self, opcode: str, wr_id: int, mr: MemoryRegion, offset: int, length: int, remote_addr: int,
              rkey: int, signaled: bool) -> None:
        wr_mod = _module("pyverbs.wr")
        sge = wr_mod.SGE(mr.addr + offset, length, mr.lkey)
        flags = const("IBV_SEND_SIGNALED") if signaled else 0
        wr = wr_mod.SendWR(wr_id=wr_id, opcode=const(opcode), num_sge=1, sg=[sge], send_flags=flags)
        wr.set_wr_rdma(rkey, remote_addr)
        try:
            self._qp.post_send(wr)
        except Exception as exc:  # noqa: BLE001
            raise RdmaError(f"post_send failed: {exc}") from exc

    def post_write(self, wr_id: int, mr: MemoryRegion, offset: int, length: int, remote_addr: int,
                   rkey: int, *, signaled: bool = True) -> None:
        self._post("IBV_WR_RDMA_WRITE", wr_id, mr, offset, length, remote_addr, rkey, signaled)

    def post_read(self, wr_id: int, mr: MemoryRegion, offset: int, length: int, remote_addr: int,
                  rkey: int, *, signaled: bool = True) -> None:
        self._post("IBV_WR_RDMA_READ", wr_id, mr, offset, length, remote_addr, rkey, signaled)

    def close(self) -> None:
        self._qp.close()


class _Context(VerbsContext):
    def __init__(self, name: str, port_num: int, gid_index: int) -> None:
        device = _module("pyverbs.device")
        pd_mod = _module("pyverbs.pd")
        try:
            self.ctx = device.Context(name=name)
            self.pd = pd_mod.PD(self.ctx)
        except Exception as exc:  # noqa: BLE001
            raise RdmaUnavailable(f"cannot open RDMA device {name}: {exc}") from exc
        self.name = name
        self.port_num = port_num
        self.gid_index = gid_index
        self._port: PortInfo | None = None

    def port_info(self) -> PortInfo:
        if self._port is None:
            port = self.ctx.query_port(self.port_num)
            gid = _gid_bytes(self.ctx.query_gid(self.port_num, self.gid_index))
            layer = "ethernet" if int(port.link_layer) == const("IBV_LINK_LAYER_ETHERNET") else "infiniband"
            self._port = PortInfo(lid=int(port.lid), gid=gid, active_mtu=int(port.active_mtu),
                                  active=int(port.state) == const("IBV_PORT_ACTIVE"), link_layer=layer)
        return self._port

    def alloc(self, size: int) -> mmap.mmap:
        return mmap.mmap(-1, size)  # page-aligned, zero-filled

    def reg_mr(self, buffer: Any, access: Access) -> _MR:
        return _MR(self.pd, buffer, access)

    def create_cq(self, depth: int) -> _CQ:
        return _CQ(self.ctx, depth)

    def create_qp(self, cq: CompletionQueue, caps: QPCaps = QPCaps()) -> _QP:
        if not isinstance(cq, _CQ):
            raise RdmaError("CQ of another backend")
        return _QP(self, cq, caps)

    def close(self) -> None:
        self.pd.close()
        self.ctx.close()


class PyverbsBackend(VerbsBackend):
    """Real devices.  ``SHOAL_RDMA_PORT`` / ``SHOAL_RDMA_GID_INDEX`` pick the port and GID."""

    name = "pyverbs"

    def __init__(self, *, port: int | None = None, gid_index: int | None = None) -> None:
        self.port = port if port is not None else int(os.environ.get("SHOAL_RDMA_PORT", "1"))
        self.gid_index = gid_index if gid_index is not None else int(os.environ.get("SHOAL_RDMA_GID_INDEX", "0"))

    def devices(self) -> list[str]:
        try:
            device = importlib.import_module("pyverbs.device")
            return [d.name.decode() if isinstance(d.name, bytes) else str(d.name) for d in device.get_device_list()]
        except Exception as exc:  # noqa: BLE001 - ImportError, or PyverbsRDMAError (ENOSYS) without kernel support
            logger.debug("no RDMA devices: %s", exc)
            return []

    def open(self, device: str | None = None) -> _Context:
        names = self.devices()
        if not names:
            raise RdmaUnavailable("no RDMA device (ibv_devices lists none)")
        name = device or names[0]
        if name not in names:
            raise RdmaUnavailable(f"no RDMA device named {name!r} (have {', '.join(names)})")
        ctx = _Context(name, self.port, self.gid_index)
        if not ctx.port_info().active:
            ctx.close()
            raise RdmaUnavailable(f"RDMA device {name} port {self.port} is not ACTIVE")
        return ctx
