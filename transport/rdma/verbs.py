"""The thin verbs backend every RDMA call goes through.

Two implementations: :mod:`.fake` (in-process, faithful enough for the RDMA
transport's code to run in CI) and :mod:`.pyverbs_backend` (real hardware via
Debian's ``python3-pyverbs``).  Constants use the libibverbs numeric values,
so the pyverbs backend can pass them through unchanged.

Objects and their life: a :class:`VerbsContext` (device + port + one PD)
registers :class:`MemoryRegion` s and creates :class:`CompletionQueue` s and
RC :class:`QueuePair` s.  A queue pair starts in RESET and must be moved
INIT -> RTR (needs the remote :class:`QPEndpoint`) -> RTS before it may post;
any error completion moves it to ERR, after which every posted work request
completes with ``WR_FLUSH_ERR``.
"""

from __future__ import annotations

import abc
import enum
from dataclasses import dataclass
from typing import Any

from ..errors import ProtocolError
from ..protocol import Reader, Writer

__all__ = [
    "Access", "QPState", "WCStatus", "Opcode", "MTU_BYTES", "PortInfo", "QPEndpoint", "Completion",
    "QPCaps", "MemoryRegion", "CompletionQueue", "QueuePair", "VerbsContext", "VerbsBackend",
]


class Access(enum.IntFlag):
    """``ibv_access_flags``."""

    LOCAL_WRITE = 1
    REMOTE_WRITE = 1 << 1
    REMOTE_READ = 1 << 2


class QPState(enum.IntEnum):
    """``ibv_qp_state``."""

    RESET = 0
    INIT = 1
    RTR = 2
    RTS = 3
    SQD = 4
    SQE = 5
    ERR = 6


class WCStatus(enum.IntEnum):
    """``ibv_wc_status`` (the ones the transport distinguishes)."""

    SUCCESS = 0
    LOC_LEN_ERR = 1
    LOC_QP_OP_ERR = 2
    LOC_PROT_ERR = 4
    WR_FLUSH_ERR = 5
    LOC_ACCESS_ERR = 8
    REM_INV_REQ_ERR = 9
    REM_ACCESS_ERR = 10
    REM_OP_ERR = 11
    RETRY_EXC_ERR = 12
    RNR_RETRY_EXC_ERR = 13
    GENERAL_ERR = 21

    @classmethod
    def of(cls, value: int) -> "WCStatus":
        try:
            return cls(value)
        except ValueError:
            return cls.GENERAL_ERR


class Opcode(enum.IntEnum):
    """``ibv_wr_opcode``."""

    RDMA_WRITE = 0
    RDMA_READ = 4


#: ``ibv_mtu`` enum value -> bytes.
MTU_BYTES = {1: 256, 2: 512, 3: 1024, 4: 2048, 5: 4096}


@dataclass(frozen=True)
class PortInfo:
    lid: int
    gid: bytes          # 16 bytes; all zero on IB without GRH
    active_mtu: int     # ibv_mtu enum value
    active: bool
    link_layer: str = "ethernet"


@dataclass(frozen=True)
class QPEndpoint:
    """What each side tells the other to connect an RC queue pair."""

    qpn: int
    psn: int
    lid: int
    gid: bytes
    mtu: int
    port: int = 1
    max_rd_atomic: int = 16

    def encode(self) -> bytes:
        return (Writer().u32(self.qpn).u32(self.psn).u16(self.lid).raw(self.gid).u8(self.mtu).u8(self.port)
                .u8(self.max_rd_atomic).getvalue())

    @classmethod
    def decode(cls, meta: bytes) -> "QPEndpoint":
        r = Reader(meta)
        endpoint = cls(r.u32(), r.u32(), r.u16(), r.raw(16), r.u8(), r.u8(), r.u8())
        r.done()
        if endpoint.mtu not in MTU_BYTES or endpoint.psn >= 1 << 24 or endpoint.qpn >= 1 << 24:
            raise ProtocolError("RDMA endpoint fields out of range")
        return endpoint


@dataclass(frozen=True)
class Completion:
    wr_id: int
    status: WCStatus
    opcode: Opcode
    byte_len: int = 0


@dataclass(frozen=True)
class QPCaps:
    max_send_wr: int = 256
    max_recv_wr: int = 16
    max_rd_atomic: int = 16


class MemoryRegion(abc.ABC):
    """Registered memory: ``view`` is the local memory, ``addr``/``rkey`` name it remotely."""

    addr: int
    length: int
    lkey: int
    rkey: int
    access: Access
    view: memoryview

    @abc.abstractmethod
    def close(self) -> None:
        """Deregister (the memory itself is released with the last reference)."""


class CompletionQueue(abc.ABC):
    @abc.abstractmethod
    def poll(self, max_entries: int = 32) -> list[Completion]:
        """Up to ``max_entries`` completions, without blocking."""

    @abc.abstractmethod
    def wait(self, timeout: float) -> bool:
        """Block until completions may be ready (True) or ``timeout`` passes (False)."""

    @abc.abstractmethod
    def close(self) -> None: ...


class QueuePair(abc.ABC):
    """An RC queue pair."""

    qpn: int

    @property
    @abc.abstractmethod
    def state(self) -> QPState: ...

    @abc.abstractmethod
    def local_endpoint(self) -> QPEndpoint:
        """This side's connection data (qpn, the send PSN, lid, gid, mtu)."""

    @abc.abstractmethod
    def to_init(self, access: Access) -> None: ...

    @abc.abstractmethod
    def to_rtr(self, remote: QPEndpoint) -> None: ...

    @abc.abstractmethod
    def to_rts(self) -> None: ...

    def connect(self, remote: QPEndpoint, access: Access) -> None:
        """RESET -> INIT -> RTR -> RTS."""
        if self.state is QPState.RESET:
            self.to_init(access)
        self.to_rtr(remote)
        self.to_rts()

    @abc.abstractmethod
    def post_write(self, wr_id: int, mr: MemoryRegion, offset: int, length: int, remote_addr: int,
                   rkey: int, *, signaled: bool = True) -> None:
        """RDMA WRITE ``mr[offset:offset+length]`` to ``remote_addr`` (rkey)."""

    @abc.abstractmethod
    def post_read(self, wr_id: int, mr: MemoryRegion, offset: int, length: int, remote_addr: int,
                  rkey: int, *, signaled: bool = True) -> None:
        """RDMA READ ``length`` bytes at ``remote_addr`` into ``mr[offset:]``."""

    @abc.abstractmethod
    def close(self) -> None: ...


class VerbsContext(abc.ABC):
    """One opened device (and port, and protection domain)."""

    name: str

    @abc.abstractmethod
    def port_info(self) -> PortInfo: ...

    @abc.abstractmethod
    def alloc(self, size: int) -> Any:
        """Page-aligned writable memory suitable for registration."""

    @abc.abstractmethod
    def reg_mr(self, buffer: Any, access: Access) -> MemoryRegion: ...

    @abc.abstractmethod
    def create_cq(self, depth: int) -> CompletionQueue: ...

    @abc.abstractmethod
    def create_qp(self, cq: CompletionQueue, caps: QPCaps = QPCaps()) -> QueuePair:
        """A new RC queue pair in RESET."""

    @abc.abstractmethod
    def close(self) -> None: ...


class VerbsBackend(abc.ABC):
    name: str

    @abc.abstractmethod
    def devices(self) -> list[str]:
        """Names of usable devices (empty, never raising, when there are none)."""

    @abc.abstractmethod
    def open(self, device: str | None = None) -> VerbsContext:
        """Open ``device`` (default: the first); raises :class:`~..errors.RdmaUnavailable`."""
