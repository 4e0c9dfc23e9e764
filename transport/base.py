"""The transport seam: "fetch these blocks from that peer into these buffers".

One small interface, :class:`BlockTransport`, with per-request
:class:`Outcome` values, and its server-side counterpart, a
:class:`BlockProvider` that answers one :class:`BlockRequest` with a
:class:`ServedBlock`.  Implementations are chosen by name
(:func:`make_transport`: ``tcp``, ``rdma``); ``SHOAL_TRANSPORT=auto|tcp|rdma``
picks the mode (:func:`transport_mode`).

Error contract of :meth:`BlockTransport.fetch`: for each request either the
outcome is ``FILLED`` and ``buffers[i][:request.length]`` holds the verified
bytes of exactly that key and version, or the outcome says why not and the
buffer's contents are undefined.  When ``fetch`` returns, the transport no
longer writes into any of the buffers (a late answer is drained elsewhere).
"""

from __future__ import annotations

import abc
import enum
import importlib
import json
import logging
import math
import os
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, ClassVar, Mapping, NamedTuple, Protocol, Sequence

from .errors import ProtocolError, TransportConfigError
from .protocol import CHUNK, MAX_ORIGIN, Status

__all__ = [
    "Outcome", "PeerAddress", "Origin", "BlockRequest", "BlockTransport", "BlockProvider",
    "ServedBlock", "TransportMetrics", "LatencyHistogram", "make_transport", "transport_names",
    "transport_mode", "load_secret", "MODES",
]

logger = logging.getLogger(__name__)

MODES = ("auto", "tcp", "rdma")
MIN_SECRET_BYTES = 16


class Outcome(enum.Enum):
    """What happened to one requested block."""

    FILLED = "filled"            # buffer holds the verified bytes
    NOT_FOUND = "not_found"      # the peer does not have it (and could not fill it)
    STALE = "stale"              # the peer has / sees another version
    BUSY = "busy"                # the peer shed load; try the store
    UNAVAILABLE = "unavailable"  # cannot connect, connection lost, QP error, owner failure
    TIMEOUT = "timeout"          # no answer in time
    CORRUPT = "corrupt"          # bytes arrived but failed the checksums
    REJECTED = "rejected"        # invalid request (too large, malformed key, range outside the block)
    UNSUPPORTED = "unsupported"  # the peer does not serve this kind of request (a ranged GET): ask for the block

    @classmethod
    def from_status(cls, status: Status) -> "Outcome":
        return _FROM_STATUS[status]


_FROM_STATUS = {
    Status.FILLED: Outcome.FILLED, Status.NOT_FOUND: Outcome.NOT_FOUND, Status.STALE: Outcome.STALE,
    Status.BUSY: Outcome.BUSY, Status.REJECTED: Outcome.REJECTED, Status.UNAVAILABLE: Outcome.UNAVAILABLE,
    Status.RDMA_FAILED: Outcome.UNAVAILABLE,
}


class PeerAddress(NamedTuple):
    """``host:port`` of a worker; its string form is its identity in hashing."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: "str | PeerAddress | tuple[str, int]") -> "PeerAddress":
        if isinstance(text, PeerAddress):
            return text
        if isinstance(text, tuple) and len(text) >= 2:  # a socket address
            return cls(str(text[0]), int(text[1]))
        value = str(text).strip()
        if value.startswith("["):
            host, sep, port = value[1:].partition("]:")
        else:
            host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise TransportConfigError(f"invalid peer address {text!r}: use HOST:PORT")
        return cls(host, int(port))

    @classmethod
    def parse_list(cls, text: str | Sequence[str] | None) -> list["PeerAddress"]:
        """``"h1:p1,h2:p2"`` (or a list) -> addresses, duplicates dropped, order kept."""
        if not text:
            return []
        items = text.replace(" ", ",").split(",") if isinstance(text, str) else list(text)
        out: list[PeerAddress] = []
        for item in items:
            if str(item).strip():
                address = cls.parse(item)
                if address not in out:
                    out.append(address)
        return out


@dataclass(frozen=True)
class Origin:
    """Where the owner can read a block on a miss (so it can fill its cache).

    The owner recomputes the block key from these fields and refuses a
    request whose key does not match: a peer can never make it cache bytes
    under a key they do not belong to.
    """

    store_id: str
    url: str
    size: int
    block_size: int
    index: int
    etag: str | None = None
    version_id: str | None = None
    mtime: float | None = None

    def encode(self) -> bytes:
        data = json.dumps({k: v for k, v in self.__dict__.items()}, separators=(",", ":")).encode()
        if len(data) > MAX_ORIGIN:
            raise ProtocolError(f"origin description too long ({len(data)} bytes)")
        return data

    @classmethod
    def decode(cls, data: bytes) -> "Origin":
        try:
            raw = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # nesting fits in 8 KiB
            raise ProtocolError("origin is not valid JSON") from exc
        if not isinstance(raw, dict):
            raise ProtocolError("origin must be an object")
        try:
            origin = cls(
                store_id=_typed(raw, "store_id", str), url=_typed(raw, "url", str),
                size=_typed(raw, "size", int), block_size=_typed(raw, "block_size", int),
                index=_typed(raw, "index", int), etag=_typed(raw, "etag", str, optional=True),
                version_id=_typed(raw, "version_id", str, optional=True),
                mtime=_typed(raw, "mtime", (int, float), optional=True),
            )
        except (KeyError, TypeError) as exc:
            raise ProtocolError(f"bad origin field: {exc}") from exc
        if origin.size < 0 or origin.block_size <= 0 or origin.index < 0 or set(raw) - set(cls.__dataclass_fields__):
            raise ProtocolError("origin fields out of range")
        return origin


def _typed(raw: Mapping[str, Any], name: str, kind: Any, optional: bool = False) -> Any:
    value = raw.get(name) if optional else raw[name]
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(name)
    return value


@dataclass(frozen=True)
class BlockRequest:
    """One block wanted from a peer: its cache key, version token and exact length.

    A *ranged* request (``block_length`` set) wants only bytes
    ``[offset, offset + length)`` of a block of exactly ``block_length`` bytes.
    """

    key: str
    token: str
    length: int
    origin: Origin | None = None
    offset: int = 0
    block_length: int | None = None

    @property
    def ranged(self) -> bool:
        return self.block_length is not None


@dataclass
class ServedBlock:
    """A provider's answer.  Data comes from ``data`` (memory) or from
    ``file[offset:offset+length]`` (sent with ``sendfile``); ``sums`` are the
    per-``chunk`` xxh3_64 checksums (computed from ``data`` when None)."""

    status: Status
    token: str = ""
    data: bytes | bytearray | memoryview | None = None
    file: BinaryIO | None = None
    offset: int = 0
    length: int = 0
    chunk: int = CHUNK
    sums: Sequence[int] | None = None
    detail: str = ""

    def close(self) -> None:
        if self.file is not None:
            try:
                self.file.close()
            except OSError:
                pass
            self.file = None


class BlockProvider(Protocol):
    """What a server serves blocks from (a block cache, a test dict...)."""

    def lookup(self, request: BlockRequest) -> ServedBlock:
        """Answer one request; never raises for a missing or stale block."""
        ...

    def stats(self) -> dict[str, Any]:
        """Counters for the STATS frame."""
        ...


class LatencyHistogram:
    """Power-of-two microsecond buckets: cheap to add, good enough for p50/p99."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.buckets: dict[int, int] = {}
        self.count = 0

    def add(self, seconds: float) -> None:
        bucket = max(0, math.ceil(math.log2(max(seconds * 1e6, 1.0))))
        with self._lock:
            self.buckets[bucket] = self.buckets.get(bucket, 0) + 1
            self.count += 1

    def quantile(self, q: float) -> float:
        """Upper bound (seconds) of the bucket holding quantile ``q``."""
        with self._lock:
            if not self.count:
                return 0.0
            target, seen = q * self.count, 0
            for bucket in sorted(self.buckets):
                seen += self.buckets[bucket]
                if seen >= target:
                    return (2 ** bucket) / 1e6
            return (2 ** max(self.buckets)) / 1e6

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            buckets = {f"le_{2 ** b}us": n for b, n in sorted(self.buckets.items())}
            count = self.count
        return {"count": count, "p50_s": self.quantile(0.5), "p99_s": self.quantile(0.99), "buckets": buckets}


@dataclass
class TransportMetrics:
    """Counters of one transport (client side); what tests and stats read."""

    requests: int = 0
    bytes: int = 0
    connections: int = 0
    rdma_fallbacks: int = 0
    rdma_demotions: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    by_transport: dict[str, int] = field(default_factory=dict)
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)

    def record(self, outcome: Outcome, nbytes: int, via: str) -> None:
        with self._lock:
            self.requests += 1
            self.outcomes[outcome.value] = self.outcomes.get(outcome.value, 0) + 1
            if outcome is Outcome.FILLED:
                self.bytes += nbytes
                self.by_transport[via] = self.by_transport.get(via, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            data = {"requests": self.requests, "bytes": self.bytes, "connections": self.connections,
                    "rdma_fallbacks": self.rdma_fallbacks, "rdma_demotions": self.rdma_demotions,
                    "outcomes": dict(self.outcomes), "by_transport": dict(self.by_transport)}
        data["latency"] = self.latency.snapshot()
        return data


class BlockTransport(abc.ABC):
    """Client side of a block transport."""

    name: ClassVar[str]

    @abc.abstractmethod
    def fetch(self, peer: PeerAddress, requests: Sequence[BlockRequest],
              buffers: Sequence[memoryview], *, timeout: float) -> list[Outcome]:
        """Fetch ``requests`` from ``peer`` into ``buffers`` (one each, at least
        ``request.length`` bytes); returns one :class:`Outcome` per request
        within about ``timeout`` seconds."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close every connection."""

    def peer_transport(self, peer: PeerAddress) -> str | None:
        """Which data path ``peer`` currently uses (``"tcp"``/``"rdma"``), if connected."""
        return None


_REGISTRY: dict[str, str] = {
    "tcp": "shoal.transport.tcp:TcpTransport",
    "rdma": "shoal.transport.rdma.transport:RdmaTransport",
}


def transport_names() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def make_transport(name: str, **kwargs: Any) -> BlockTransport:
    """Instantiate a transport by name (imported lazily)."""
    target = _REGISTRY.get(name)
    if target is None:
        raise TransportConfigError(f"unknown transport {name!r}; choose one of {', '.join(transport_names())}")
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)(**kwargs)


def transport_mode(value: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """``auto`` | ``tcp`` | ``rdma``: explicit value, else ``SHOAL_TRANSPORT``, else auto."""
    env = os.environ if env is None else env
    mode = (value or env.get("SHOAL_TRANSPORT") or "auto").strip().lower()
    if mode not in MODES:
        raise TransportConfigError(f"SHOAL_TRANSPORT must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def load_secret(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> bytes:
    """The cluster secret from ``path`` or ``SHOAL_CLUSTER_SECRET_FILE`` (never from a value
    on the command line).  Surrounding whitespace is stripped; at least 16 bytes."""
    env = os.environ if env is None else env
    chosen = path or env.get("SHOAL_CLUSTER_SECRET_FILE")
    if not chosen:
        raise TransportConfigError(
            "no cluster secret: set SHOAL_CLUSTER_SECRET_FILE or pass --secret-file "
            "(create one with: head -c 32 /dev/urandom | base64 > secret; chmod 600 secret)")
    file = Path(chosen).expanduser()
    try:
        secret = file.read_bytes().strip()
        mode = file.stat().st_mode
    except OSError as exc:
        raise TransportConfigError(f"cannot read the cluster secret file {file}: {exc.strerror}") from exc
    if len(secret) < MIN_SECRET_BYTES:
        raise TransportConfigError(f"cluster secret in {file} is shorter than {MIN_SECRET_BYTES} bytes")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning("cluster secret file %s is readable by others; chmod 600 it", file)
    return secret
