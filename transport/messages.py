"""Metadata codecs of the peer protocol's messages (see :mod:`.protocol`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .base import BlockRequest, Origin
from .errors import ProtocolError
from .protocol import (
    FLAG_FILL, FLAG_RANGE, FLAG_RDMA, HARD_MAX_PAYLOAD, MAX_KEY, MAX_ORIGIN, MAX_TEXT, MAX_TOKEN, NONCE_BYTES,
    Reader, Status, Writer,
)

__all__ = ["Hello", "RdmaSlot", "BlockReply", "encode_get", "decode_get", "encode_error", "decode_error"]

#: Most checksums one BLOCK may carry (a 256 MiB block in 4 KiB chunks).
MAX_SUMS = 65536
MIN_CHUNK = 4096


@dataclass(frozen=True)
class Hello:
    """HELLO (client) and CHALLENGE (server) carry the same fields."""

    nonce: bytes
    caps: int
    max_block: int
    max_inflight: int
    node: str

    def encode(self) -> bytes:
        return (Writer().raw(self.nonce).u32(self.caps).u32(self.max_block).u32(self.max_inflight)
                .text(self.node, 256).getvalue())

    @classmethod
    def decode(cls, meta: bytes) -> "Hello":
        r = Reader(meta)
        hello = cls(r.raw(NONCE_BYTES), r.u32(), r.u32(), r.u32(), r.text(256))
        r.done()
        return hello


@dataclass(frozen=True)
class RdmaSlot:
    """A requester's registered buffer the owner may RDMA WRITE one block into."""

    addr: int
    rkey: int
    length: int


def encode_get(request: BlockRequest, slot: RdmaSlot | None = None) -> tuple[bytes, int]:
    """GET metadata and flags for one request.

    Layout: length u32 | key | token | [origin, FLAG_FILL] | [slot, FLAG_RDMA]
    | [offset u32, block length u32, FLAG_RANGE]: a request without a range is
    encoded exactly as before ranges existed."""
    flags = 0
    w = Writer().u32(request.length).text(request.key, MAX_KEY).text(request.token, MAX_TOKEN)
    if request.origin is not None:
        flags |= FLAG_FILL
        w.blob(request.origin.encode(), MAX_ORIGIN)
    if slot is not None:
        flags |= FLAG_RDMA
        w.u64(slot.addr).u32(slot.rkey).u32(slot.length)
    if request.block_length is not None:
        flags |= FLAG_RANGE
        w.u32(request.offset).u32(request.block_length)
    return w.getvalue(), flags


def decode_get(meta: bytes, flags: int) -> tuple[BlockRequest, RdmaSlot | None]:
    """Parse GET metadata; raises :class:`ProtocolError` when malformed.  (Whether a
    range lies inside its block is the server's check: a per-request REJECTED.)"""
    if flags & ~(FLAG_FILL | FLAG_RDMA | FLAG_RANGE):
        raise ProtocolError(f"unknown GET flags {flags:#x}")
    r = Reader(meta)
    length = r.u32()
    key = r.text(MAX_KEY)
    token = r.text(MAX_TOKEN)
    origin = Origin.decode(r.blob(MAX_ORIGIN)) if flags & FLAG_FILL else None
    slot = RdmaSlot(r.u64(), r.u32(), r.u32()) if flags & FLAG_RDMA else None
    offset, block_length = (r.u32(), r.u32()) if flags & FLAG_RANGE else (0, None)
    r.done()
    if not key:
        raise ProtocolError("empty block key")
    return BlockRequest(key=key, token=token, length=length, origin=origin, offset=offset,
                        block_length=block_length), slot


@dataclass(frozen=True)
class BlockReply:
    """BLOCK metadata: the status and, when filled, the data's checksums."""

    status: Status
    length: int = 0
    chunk: int = 0
    token: str = ""
    sums: Sequence[int] = ()
    detail: str = ""

    def encode(self) -> bytes:
        return (Writer().u8(int(self.status)).u32(self.length).u32(self.chunk).text(self.token, MAX_TOKEN)
                .u64s(list(self.sums)).text(self.detail[:MAX_TEXT], MAX_TEXT).getvalue())

    @classmethod
    def decode(cls, meta: bytes) -> "BlockReply":
        r = Reader(meta)
        raw_status = r.u8()
        length, chunk = r.u32(), r.u32()
        token = r.text(MAX_TOKEN)
        sums = r.u64s(MAX_SUMS)
        detail = r.text(MAX_TEXT)
        r.done()
        try:
            status = Status(raw_status)
        except ValueError as exc:
            raise ProtocolError(f"unknown block status {raw_status}") from exc
        if length > HARD_MAX_PAYLOAD:
            raise ProtocolError("block length above the hard limit")
        if status is Status.FILLED and length and (chunk < MIN_CHUNK or len(sums) != -(-length // chunk)):
            raise ProtocolError("checksum table does not match the block length")
        return cls(status, length, chunk, token, sums, detail)


def encode_error(code: int, message: str) -> bytes:
    return Writer().u16(code).text(message[:MAX_TEXT], MAX_TEXT).getvalue()


def decode_error(meta: bytes) -> tuple[int, str]:
    try:
        r = Reader(meta)
        return r.u16(), r.text(MAX_TEXT)
    except ProtocolError:
        return 0, "unreadable error frame"


#: ERROR codes.
ERR_PROTOCOL = 1
ERR_AUTH = 2
ERR_BUSY = 3
ERR_SHUTDOWN = 4
