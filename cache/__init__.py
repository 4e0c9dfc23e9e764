"""shoal.cache: object-store access and the version-keyed local-SSD block cache."""

from .blockcache import BlockCache, CacheMetrics
from .config import CacheConfig, StoreConfig, default_cache_dir, parse_size
from .errors import (
    AccessDeniedError,
    BucketNotFoundError,
    CacheError,
    EndpointUnreachableError,
    ObjectChangedError,
    ObjectNotFoundError,
    StorageConfigError,
    StorageError,
    StoreError,
)
from .filesystem import ShoalFile, ShoalFileSystem
from .reader import BlockReader, IOLedger
from .source import FsspecSource, ObjectSource, ObjectVersion, S3Source, open_source

__all__ = [
    "AccessDeniedError",
    "BlockCache",
    "BlockReader",
    "BucketNotFoundError",
    "CacheConfig",
    "CacheError",
    "CacheMetrics",
    "EndpointUnreachableError",
    "FsspecSource",
    "IOLedger",
    "ObjectChangedError",
    "ObjectNotFoundError",
    "ObjectSource",
    "ObjectVersion",
    "S3Source",
    "ShoalFile",
    "ShoalFileSystem",
    "StorageConfigError",
    "StorageError",
    "StoreConfig",
    "StoreError",
    "default_cache_dir",
    "open_source",
    "parse_size",
]
