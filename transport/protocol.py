"""Shoal's framed binary peer protocol (TCP, and the RDMA control channel).

Every frame is a fixed 32-byte header, then ``meta_len`` bytes of metadata,
then ``payload_len`` bytes of payload (block data; only servers send any)::

    magic "SHL1" | version u8 | type u8 | flags u16 | request id u64
    | meta_len u32 | payload_len u32 | xxh32(meta) u32 | xxh32(header[:28]) u32

All integers are little-endian.  The receiver checks the magic, version,
header checksum, message type and both lengths against hard limits *before*
reading anything else, then the metadata checksum.  Block data is covered by
one xxh3_64 per ``chunk`` bytes carried in the BLOCK metadata: a server that
sends straight from a cache file (``sendfile``) reuses the checksums the cache
stored with the block, so the bytes are verified end to end, from the first
store read on the owner to the requester's buffer, without the server reading
them.  Metadata is a fixed sequence of integers and length-prefixed strings
(:class:`Writer` / :class:`Reader`); nothing is ever unpickled or evaluated.

Connection life: ``HELLO`` (client nonce, capabilities) -> ``CHALLENGE``
(server nonce) -> ``AUTH`` (client HMAC) -> ``AUTH_OK`` (server HMAC) or
``ERROR``; both HMACs are over the whole transcript with distinct labels, so
each side proves it knows the cluster secret and neither answer can be
replayed as the other.  Then ``GET`` / ``BLOCK`` (pipelined, matched by
request id, answered in any order), ``PING`` / ``PONG``, ``STATS``, the
RDMA handshake ``RDMA_CONNECT`` / ``RDMA_ACCEPT`` / ``RDMA_REJECT``, and
``LISTING`` / ``LISTING_REPLY`` (servers that offer ``CAP_LISTING``): a
client asks the owner of a listing key for the listing it remembers, or
gives it one to remember.  A listing is advice: the client plans on it only
while it lists the store itself, and re-runs on the store's answer if the
two differ (see ``shoal.engine.session``).

Ranged GETs (``FLAG_RANGE``, offered by servers that set ``CAP_RANGE``) ask
for bytes ``[offset, offset + length)`` of a block instead of all of it (a
Parquet column chunk).  When the slice starts on a checksum-chunk boundary of
the file the owner keeps it in (the piece it was filled as, or a block), the
owner sends it straight from that file with the sums it stored for the chunks
the slice covers (and, for a last chunk cut short, the sum of the part sent,
after checking the whole chunk); otherwise it reads the covering chunks,
checks them against the stored sums and sends the slice with sums of its own.
A client never sends one to a server that did not offer it (older servers
refuse unknown flags).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import struct
from dataclasses import dataclass
from typing import Iterable, Sequence

import xxhash

from .errors import FrameTooLarge, ProtocolError

__all__ = [
    "MAGIC", "VERSION", "HEADER", "MsgType", "Status", "Header", "Limits",
    "FLAG_FILL", "FLAG_RDMA", "FLAG_RANGE", "CAP_RDMA", "CAP_RANGE", "CAP_LISTING", "CHUNK",
    "encode_frame", "decode_header", "check_meta", "Writer", "Reader",
    "chunk_sums", "verify_chunks", "auth_mac",
]

MAGIC = b"SHL1"
VERSION = 1
HEADER = struct.Struct("<4sBBHQIIII")
assert HEADER.size == 32
_HEAD_BODY = struct.Struct("<4sBBHQIII")

#: GET: the owner may fill the block from the object store on a miss.
FLAG_FILL = 0x1
#: GET: deliver the data by RDMA WRITE into the slot named in the metadata;
#: BLOCK: the data was written by RDMA (no payload follows).
FLAG_RDMA = 0x2
#: GET: a byte range of the block (offset and block length follow in the metadata).
FLAG_RANGE = 0x4
#: Capability bit in HELLO / CHALLENGE: this side can do RDMA.
CAP_RDMA = 0x1
#: Capability bit in CHALLENGE: this server answers ranged GETs (``FLAG_RANGE``).
CAP_RANGE = 0x2
#: Capability bit in CHALLENGE: this server remembers listings (``LISTING``).
CAP_LISTING = 0x4

#: Checksum granularity when the sender computes the checksums itself.
CHUNK = 64 << 10

# Hard limits, independent of configuration: a frame above them is refused unread.
HARD_MAX_META = 64 << 10
HARD_MAX_PAYLOAD = 256 << 20
MAX_KEY = 512
MAX_TOKEN = 1024
MAX_ORIGIN = 8 << 10
MAX_TEXT = 1024
NONCE_BYTES = 32


class MsgType(enum.IntEnum):
    HELLO = 1
    CHALLENGE = 2
    AUTH = 3
    AUTH_OK = 4
    ERROR = 5
    GET = 16
    BLOCK = 17
    PING = 18
    PONG = 19
    STATS = 20
    STATS_REPLY = 21
    LISTING = 22
    LISTING_REPLY = 23
    RDMA_CONNECT = 32
    RDMA_ACCEPT = 33
    RDMA_REJECT = 34


_TYPES = frozenset(int(t) for t in MsgType)
#: Frames a client may send once authenticated (a server refuses anything else).
CLIENT_TYPES = frozenset({MsgType.GET, MsgType.PING, MsgType.STATS, MsgType.RDMA_CONNECT, MsgType.LISTING})


class Status(enum.IntEnum):
    """Per-request answer in a BLOCK frame."""

    FILLED = 0
    NOT_FOUND = 1
    STALE = 2
    BUSY = 3
    REJECTED = 4       # invalid request (too large, bad key, bad slot)
    UNAVAILABLE = 5    # the owner failed (store error on fill, internal error)
    RDMA_FAILED = 6    # the RDMA WRITE failed; retry over TCP


@dataclass(frozen=True)
class Limits:
    """Per-connection limits a receiver enforces (never above the hard limits)."""

    max_meta: int = HARD_MAX_META
    max_payload: int = 16 << 20

    def __post_init__(self) -> None:
        if not 0 < self.max_meta <= HARD_MAX_META or not 0 <= self.max_payload <= HARD_MAX_PAYLOAD:
            raise ValueError("limits above the protocol's hard limits")


@dataclass(frozen=True)
class Header:
    type: MsgType
    flags: int
    req_id: int
    meta_len: int
    payload_len: int
    meta_sum: int


def encode_frame(msg_type: MsgType, req_id: int = 0, meta: bytes = b"", *,
                 payload_len: int = 0, flags: int = 0) -> bytes:
    """Header plus metadata (the payload, if any, is sent separately)."""
    if len(meta) > HARD_MAX_META or payload_len > HARD_MAX_PAYLOAD:
        raise FrameTooLarge(f"frame too large: meta {len(meta)}, payload {payload_len}")
    body = _HEAD_BODY.pack(MAGIC, VERSION, int(msg_type), flags, req_id, len(meta), payload_len,
                           xxhash.xxh32_intdigest(meta))
    return body + struct.pack("<I", xxhash.xxh32_intdigest(body)) + meta


def decode_header(data: bytes | bytearray | memoryview, limits: Limits = Limits()) -> Header:
    """Parse and validate a 32-byte header; raises :class:`ProtocolError`."""
    if len(data) != HEADER.size:
        raise ProtocolError(f"header must be {HEADER.size} bytes, got {len(data)}")
    magic, version, msg_type, flags, req_id, meta_len, payload_len, meta_sum, head_sum = HEADER.unpack(data)
    if magic != MAGIC:
        raise ProtocolError("bad magic: not a Shoal peer")
    if version != VERSION:
        raise ProtocolError(f"unsupported protocol version {version}")
    if xxhash.xxh32_intdigest(bytes(data[:28])) != head_sum:
        raise ProtocolError("header checksum mismatch")
    if msg_type not in _TYPES:
        raise ProtocolError(f"unknown message type {msg_type}")
    if meta_len > limits.max_meta:
        raise FrameTooLarge(f"metadata length {meta_len} above limit {limits.max_meta}")
    if payload_len > limits.max_payload:
        raise FrameTooLarge(f"payload length {payload_len} above limit {limits.max_payload}")
    return Header(MsgType(msg_type), flags, req_id, meta_len, payload_len, meta_sum)


def check_meta(header: Header, meta: bytes | memoryview) -> None:
    if xxhash.xxh32_intdigest(meta) != header.meta_sum:
        raise ProtocolError("metadata checksum mismatch")


class Writer:
    """Builds metadata: fixed-width integers and length-prefixed byte strings."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def u8(self, v: int) -> "Writer":
        self._parts.append(struct.pack("<B", v))
        return self

    def u16(self, v: int) -> "Writer":
        self._parts.append(struct.pack("<H", v))
        return self

    def u32(self, v: int) -> "Writer":
        self._parts.append(struct.pack("<I", v))
        return self

    def u64(self, v: int) -> "Writer":
        self._parts.append(struct.pack("<Q", v))
        return self

    def raw(self, data: bytes) -> "Writer":
        self._parts.append(bytes(data))
        return self

    def blob(self, data: bytes, limit: int = HARD_MAX_META) -> "Writer":
        if len(data) > min(limit, 0xFFFF):
            raise FrameTooLarge(f"field of {len(data)} bytes above limit {limit}")
        self._parts.append(struct.pack("<H", len(data)))
        self._parts.append(bytes(data))
        return self

    def text(self, value: str, limit: int = MAX_TEXT) -> "Writer":
        return self.blob(value.encode("utf-8"), limit)

    def u64s(self, values: Sequence[int]) -> "Writer":
        self.u32(len(values))
        self._parts.append(struct.pack(f"<{len(values)}Q", *values))
        return self

    def getvalue(self) -> bytes:
        return b"".join(self._parts)


class Reader:
    """Parses metadata written by :class:`Writer`; every underrun or over-limit
    field raises :class:`ProtocolError`."""

    def __init__(self, data: bytes | memoryview) -> None:
        self._data = memoryview(data)
        self._pos = 0

    def _take(self, n: int) -> memoryview:
        if n < 0 or self._pos + n > len(self._data):
            raise ProtocolError("metadata truncated")
        view = self._data[self._pos : self._pos + n]
        self._pos += n
        return view

    def u8(self) -> int:
        return self._take(1)[0]

    def u16(self) -> int:
        return int(struct.unpack("<H", self._take(2))[0])

    def u32(self) -> int:
        return int(struct.unpack("<I", self._take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack("<Q", self._take(8))[0])

    def raw(self, n: int) -> bytes:
        return bytes(self._take(n))

    def blob(self, limit: int = HARD_MAX_META) -> bytes:
        n = self.u16()
        if n > limit:
            raise FrameTooLarge(f"field of {n} bytes above limit {limit}")
        return bytes(self._take(n))

    def text(self, limit: int = MAX_TEXT) -> str:
        try:
            return self.blob(limit).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError("invalid UTF-8 in metadata") from exc

    def u64s(self, limit: int) -> list[int]:
        n = self.u32()
        if n > limit:
            raise FrameTooLarge(f"{n} values above limit {limit}")
        return list(struct.unpack(f"<{n}Q", self._take(8 * n)))

    def done(self) -> None:
        if self._pos != len(self._data):
            raise ProtocolError("trailing bytes in metadata")


def chunk_sums(data: bytes | bytearray | memoryview, chunk: int = CHUNK) -> list[int]:
    """One xxh3_64 per ``chunk`` bytes (the last chunk may be short)."""
    view = memoryview(data)
    return [xxhash.xxh3_64_intdigest(view[i : i + chunk]) for i in range(0, len(view), chunk)]


def verify_chunks(data: bytes | bytearray | memoryview, chunk: int, sums: Sequence[int]) -> bool:
    """True when ``data`` matches the per-chunk checksums exactly."""
    if chunk <= 0:
        return False
    view = memoryview(data)
    if len(sums) != (len(view) + chunk - 1) // chunk:
        return False
    return all(xxhash.xxh3_64_intdigest(view[n * chunk : (n + 1) * chunk]) == s for n, s in enumerate(sums))


def auth_mac(secret: bytes, label: bytes, parts: Iterable[bytes]) -> bytes:
    """HMAC-SHA256 of a handshake transcript (each part length-prefixed)."""
    mac = hmac.new(secret, label, hashlib.sha256)
    for part in parts:
        mac.update(struct.pack("<I", len(part)))
        mac.update(part)
    return mac.digest()
