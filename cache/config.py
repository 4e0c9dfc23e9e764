"""Configuration value objects for the storage layer.

Sources are layered in one place, :meth:`CacheConfig.from_env` and
:meth:`StoreConfig.from_env`: explicit arguments win over ``SHOAL_*`` / ``AWS_*``
environment variables, which win over defaults.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .errors import StorageConfigError

__all__ = ["CacheConfig", "StoreConfig", "parse_size", "default_cache_dir"]

MiB = 1 << 20
GiB = 1 << 30

# 8 MiB blocks, chosen with the block-size sweep of benchmarks/bench_cache.py
# (benchmarks/RESULTS.md, "Cache tier"): an 8 MiB read of a warm 8 MiB block is
# one pread into the returned bytes (4 MiB blocks cost a join: ~1.5x the CPU
# per warm GiB); a cold 8 MiB GET spends ~83% of its time moving bytes at
# S3's ~27 ms first byte and 60 MiB/s (4 MiB: ~70%) and halves the GETs (AWS
# recommends 8-16 MB ranges).  The price is over-fetch for projected Parquet
# columns: only blocks at or below the column-chunk size avoid it, and
# 1-2 MiB blocks would multiply GETs and per-read costs for every scan.
DEFAULT_BLOCK_SIZE = 8 * MiB
DEFAULT_CACHE_SIZE = 10 * GiB

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1 << 10,
    "m": 1000**2, "mb": 1000**2, "mib": 1 << 20,
    "g": 1000**3, "gb": 1000**3, "gib": 1 << 30,
    "t": 1000**4, "tb": 1000**4, "tib": 1 << 40,
}
# ASCII digits only (``\d`` would also take other scripts' digits).
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")
#: Largest size accepted (what an int64 -- SQLite, os.stat -- can hold).
MAX_SIZE = (1 << 63) - 1


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def parse_size(value: str | int) -> int:
    """Parse ``"20GB"``, ``"512MiB"``, ``"4m"`` or a plain byte count (at most :data:`MAX_SIZE`)."""
    if isinstance(value, bool):
        raise StorageConfigError(f"invalid size {value!r}: use a number with an optional unit, e.g. 20GB, 512MiB")
    if isinstance(value, int):
        if value < 0:
            raise StorageConfigError(f"size must not be negative: {value}")
        if value > MAX_SIZE:
            raise StorageConfigError(f"size {_shown(value)} is too large")
        return value
    match = _SIZE_RE.match(str(value))
    if not match or match.group(2).lower() not in _UNITS:
        raise StorageConfigError(
            f"invalid size {_shown(value)}: use a number with an optional unit, e.g. 20GB, 512MiB"
        )
    whole, _, fraction = match.group(1).partition(".")
    if len(whole) > 20:  # above MAX_SIZE whatever the unit
        raise StorageConfigError(f"size {_shown(value)} is too large")
    # Exact integer arithmetic (a float would overflow or round "1.1GB").  Digits past
    # the 50th cannot change the result: a multiple of any unit has at most 40 decimals.
    fraction = fraction[:50]
    unit = _UNITS[match.group(2).lower()]
    size = int(whole) * unit + (int(fraction) * unit // 10 ** len(fraction) if fraction else 0)
    if size > MAX_SIZE:
        raise StorageConfigError(f"size {_shown(value)} is too large")
    return size


def default_cache_dir() -> Path:
    """Per-user default: ``$XDG_CACHE_HOME/shoal`` or ``~/.cache/shoal``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "shoal"


@dataclass(frozen=True, kw_only=True)
class CacheConfig:
    """Where the SSD block cache lives and how it behaves.

    ``enabled=False`` reads straight through (used by benchmarks as a baseline).
    """

    directory: Path = field(default_factory=default_cache_dir)
    size_limit: int = DEFAULT_CACHE_SIZE
    block_size: int = DEFAULT_BLOCK_SIZE
    enabled: bool = True
    #: Largest single GET when adjacent missing blocks are coalesced.
    max_request_size: int = 16 * MiB
    #: Concurrent GETs per read and for read-ahead.
    max_concurrency: int = 16
    #: Blocks fetched ahead of a sequential reader.
    readahead_blocks: int = 8
    #: Decoded blocks kept in process memory (bytes), shared by open files.
    memory_size: int = 256 * MiB
    #: Also cache ``file://`` objects (off: a local file is already local).
    cache_local_files: bool = False
    #: Also store on this SSD what the peer tier served (off: the cluster keeps
    #: each block once, at its owner, so the peers' SSDs add up instead of all
    #: holding the same hot blocks; what peers sent stays in the memory tier,
    #: and reaches this SSD only when memory runs short).
    keep_peer_copies: bool = False
    #: Hand warm Parquet files to DuckDB as sparse local copies of their cached
    #: ranges, which it reads natively (see cache/localcopy.py); off: every
    #: read goes through the filesystem.
    local_copies: bool = True
    #: Bytes the local copies may hold, in the cache directory beside the
    #: blocks (default: a quarter of ``size_limit``).
    local_copies_size: int | None = None

    def __post_init__(self) -> None:
        try:
            directory = Path(self.directory).expanduser()
        except RuntimeError as exc:  # "~user" of an unknown user
            raise StorageConfigError(f"invalid cache directory {str(self.directory)!r}: {exc}") from None
        if "\x00" in str(directory):
            raise StorageConfigError(f"invalid cache directory {str(self.directory)!r}: contains a NUL byte")
        object.__setattr__(self, "directory", directory)
        if self.block_size < 4096 or self.block_size & (self.block_size - 1):
            raise StorageConfigError(
                f"block_size must be a power of two >= 4096, got {self.block_size}"
            )
        if self.size_limit < self.block_size:
            raise StorageConfigError("cache size limit must hold at least one block")
        if self.max_concurrency < 1 or self.readahead_blocks < 0:
            raise StorageConfigError("max_concurrency must be >= 1 and readahead_blocks >= 0")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> "CacheConfig":
        """Build from ``SHOAL_CACHE_DIR``, ``SHOAL_CACHE_SIZE``, ``SHOAL_CACHE_BLOCK_SIZE``,
        ``SHOAL_CACHE`` (``off`` disables), ``SHOAL_PEER_LOCAL_COPIES`` (``1`` keeps
        copies of what peers served), ``SHOAL_LOCAL_COPIES`` (``off``: DuckDB reads
        every file through the filesystem), with explicit ``overrides`` winning."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        if env.get("SHOAL_CACHE_DIR"):
            values["directory"] = Path(env["SHOAL_CACHE_DIR"])
        if env.get("SHOAL_CACHE_SIZE"):
            values["size_limit"] = parse_size(env["SHOAL_CACHE_SIZE"])
        if env.get("SHOAL_CACHE_BLOCK_SIZE"):
            values["block_size"] = parse_size(env["SHOAL_CACHE_BLOCK_SIZE"])
        if env.get("SHOAL_CACHE", "").lower() in {"off", "0", "false", "no"}:
            values["enabled"] = False
        if env.get("SHOAL_PEER_LOCAL_COPIES", "").lower() in {"1", "true", "yes", "on"}:
            values["keep_peer_copies"] = True
        if env.get("SHOAL_LOCAL_COPIES", "").lower() in {"off", "0", "false", "no"}:
            values["local_copies"] = False
        values.update({k: v for k, v in overrides.items() if v is not None})
        for key in ("size_limit", "block_size", "max_request_size", "memory_size", "local_copies_size"):
            if key in values:
                values[key] = parse_size(values[key])
        return cls(**values)

    @property
    def local_copies_limit(self) -> int:
        """Bytes the local copies may hold (``local_copies_size``, default a quarter of ``size_limit``)."""
        return self.size_limit // 4 if self.local_copies_size is None else self.local_copies_size

    def replace(self, **changes: Any) -> "CacheConfig":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True, kw_only=True)
class StoreConfig:
    """How to reach an S3-compatible object store.

    Unset fields fall back to the standard AWS configuration (environment,
    profiles, the credential chain) exactly as boto3 resolves it.
    """

    endpoint_url: str | None = None
    region: str | None = None
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    profile: str | None = None
    anonymous: bool = False
    #: Seconds to wait for a connection / for a response.
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    #: Attempts for retryable errors (503 SlowDown, resets), with backoff.
    max_attempts: int = 5
    #: Send a second copy of a GET, HEAD or LIST whose answer is late (see
    #: :mod:`shoal.cache.hedge`); ``hedge_after`` fixes the delay in seconds,
    #: ``None`` adapts it to the store (3x the median time of recent ones).
    hedge: bool = True
    hedge_after: float | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> "StoreConfig":
        """Explicit ``overrides`` win over ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``,
        ``AWS_REGION`` / ``AWS_DEFAULT_REGION`` and ``SHOAL_S3_ANONYMOUS``.
        Keys and profiles are left to botocore's own chain unless given."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {
            "endpoint_url": env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
            "region": env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
            "anonymous": env.get("SHOAL_S3_ANONYMOUS", "").lower() in {"1", "true", "yes"},
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def s3fs_options(self) -> dict[str, Any]:
        """Keyword arguments for :class:`s3fs.S3FileSystem`."""
        options: dict[str, Any] = {"anon": self.anonymous}
        client_kwargs: dict[str, Any] = {}
        if self.endpoint_url:
            options["endpoint_url"] = self.endpoint_url
            if self.endpoint_url.lower().startswith("http://"):
                # No TLS to verify.  Left on, a process's first request builds an SSL
                # context from the CA bundle anyway (~20 ms of CPU, holding the GIL
                # while a warm query plans and its freshness LIST waits).  TLS
                # endpoints (https, AWS) keep botocore's verification.
                client_kwargs["verify"] = False
        if self.region:
            client_kwargs["region_name"] = self.region
        if self.access_key and not self.anonymous:
            options["key"] = self.access_key
            options["secret"] = self.secret_key
            if self.session_token:
                options["token"] = self.session_token
        if self.profile and not self.anonymous:
            options["profile"] = self.profile
        options["client_kwargs"] = client_kwargs
        options["config_kwargs"] = {
            "connect_timeout": self.connect_timeout,
            "read_timeout": self.read_timeout,
            "retries": {"max_attempts": self.max_attempts, "mode": "standard"},
        }
        return options

    @property
    def store_id(self) -> str:
        """Identity of the store in cache keys: the endpoint (never credentials)."""
        return self.endpoint_url or f"aws:{self.region or 'default'}"
