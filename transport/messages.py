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

__all__ = ["Hello", "RdmaSlot", "BlockReply", "encode_get", "decode_get", "encode_error", "decode_error",
           "LISTING_GET", "LISTING_PUT", "MAX_LISTING", "encode_listing", "decode_listing",
           "encode_listing_reply", "decode_listing_reply"]

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


# -- LISTING / LISTING_REPLY ------------------------------------------------------------

LISTING_GET = 0
LISTING_PUT = 1
#: Largest listing body (JSON) one frame carries; longer listings are not shared.
MAX_LISTING = 60 << 10
_LISTING_KEY = 64


def encode_listing(op: int, key: str, body: bytes = b"") -> bytes:
    """LISTING metadata: op u8 (get / put) | key | body (a put's listing, JSON)."""
    if op not in (LISTING_GET, LISTING_PUT) or len(body) > MAX_LISTING:
        raise ValueError("bad listing request")
    return Writer().u8(op).text(key, _LISTING_KEY).blob(body, MAX_LISTING).getvalue()


def decode_listing(meta: bytes) -> tuple[int, str, bytes]:
    r = Reader(meta)
    op, key, body = r.u8(), r.text(_LISTING_KEY), r.blob(MAX_LISTING)
    r.done()
    if op not in (LISTING_GET, LISTING_PUT) or not key or (op == LISTING_GET and body):
        raise ProtocolError("bad LISTING request")
    return op, key, body


def encode_listing_reply(body: bytes | None) -> bytes:
    """LISTING_REPLY metadata: found u8 | body (the remembered listing for a get)."""
    return Writer().u8(0 if body is None else 1).blob(body or b"", MAX_LISTING).getvalue()


def decode_listing_reply(meta: bytes) -> bytes | None:
    r = Reader(meta)
    found, body = r.u8(), r.blob(MAX_LISTING)
    r.done()
    if found not in (0, 1):
        raise ProtocolError("bad LISTING_REPLY")
    return body if found else None
