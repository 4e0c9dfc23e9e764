"""Errors of the storage layer (object store access and the SSD cache).

Hierarchy (each subclasses the builtin a caller would already catch)::

    StorageError(OSError)
     ├── StoreError                       the object store refused or failed
     │    ├── ObjectNotFoundError(FileNotFoundError)
     │    │    └── BucketNotFoundError
     │    ├── AccessDeniedError(PermissionError)      bad or missing credentials
     │    ├── EndpointUnreachableError(ConnectionError)
     │    └── ObjectChangedError          object overwritten while it was being read
     └── CacheError                       the local cache failed (never escapes a read:
                                          the reader counts it and reads through)
    StorageConfigError(ValueError)        bad configuration (size strings, URLs)

Foreign errors (botocore, aiohttp, fsspec) are translated once, in
:func:`translate_store_error`, at the boundary of :mod:`shoal.cache.source`.
Messages never contain credentials.
"""

from __future__ import annotations

import asyncio
import errno
import socket

__all__ = [
    "StorageError",
    "StoreError",
    "ObjectNotFoundError",
    "BucketNotFoundError",
    "AccessDeniedError",
    "EndpointUnreachableError",
    "ObjectChangedError",
    "CacheError",
    "StorageConfigError",
    "translate_store_error",
]


class StorageError(OSError):
    """Base of every storage-layer error."""


class StoreError(StorageError):
    """The object store failed or refused a request."""


class ObjectNotFoundError(StoreError, FileNotFoundError):
    """The object (key) does not exist."""


class BucketNotFoundError(ObjectNotFoundError):
    """The bucket does not exist."""


class AccessDeniedError(StoreError, PermissionError):
    """Credentials are missing, wrong, or lack permission."""


class EndpointUnreachableError(StoreError, ConnectionError):
    """The object store endpoint cannot be reached."""


class ObjectChangedError(StoreError):
    """An object changed (new ETag/size) while a query was reading it.

    Shoal never mixes bytes of two versions; re-running the query reads the
    new version consistently.
    """


class CacheError(StorageError):
    """The local block cache failed (disk full, unwritable, corrupt)."""


class StorageConfigError(ValueError):
    """Invalid storage or cache configuration."""


_ACCESS_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "AllAccessDisabled",
    "AuthorizationHeaderMalformed",
}
_NOT_FOUND_CODES = {"NoSuchKey", "NotFound", "404"}


def _error_code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        if code:
            return str(code)
    return None


def _walk(exc: BaseException):
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def translate_store_error(exc: BaseException, url: str) -> StoreError:
    """Map an exception from fsspec/s3fs/botocore to a :class:`StoreError`.

    ``url`` is the object or bucket the request was for; it is the only
    detail put in the message besides the store's own error code.
    """
    if isinstance(exc, StoreError):
        return exc
    for link in _walk(exc):
        code = _error_code(link)
        if code == "NoSuchBucket":
            return BucketNotFoundError(errno.ENOENT, f"bucket does not exist: {_bucket_of(url)}")
        if code in _NOT_FOUND_CODES:
            return ObjectNotFoundError(errno.ENOENT, f"object not found: {url}")
        if code in _ACCESS_CODES:
            return AccessDeniedError(
                errno.EACCES, f"access denied to {url} ({code}): check the credentials"
            )
        if code in {"PreconditionFailed", "412"}:
            return ObjectChangedError(f"object changed while it was being read: {url}")
        name = type(link).__name__
        if name in {"EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError"} or isinstance(
            link, (ConnectionRefusedError, socket.gaierror)
        ):
            return EndpointUnreachableError(
                errno.ECONNREFUSED, f"cannot reach the object store for {url}: {name}"
            )
        if isinstance(link, NoCredentialsLike):
            return AccessDeniedError(errno.EACCES, f"no credentials found for {url}")
    for link in _walk(exc):
        if isinstance(link, PermissionError):
            return AccessDeniedError(errno.EACCES, f"access denied to {url}")
        if isinstance(link, FileNotFoundError):
            return ObjectNotFoundError(errno.ENOENT, f"not found: {url}")
        if isinstance(link, (ConnectionError, asyncio.TimeoutError, TimeoutError)):
            return EndpointUnreachableError(
                errno.ETIMEDOUT, f"object store did not answer for {url}: {type(link).__name__}"
            )
    code = _error_code(exc)
    detail = code or type(exc).__name__
    return StoreError(f"object store request for {url} failed: {detail}")


def _bucket_of(url: str) -> str:
    rest = url.split("://", 1)[-1]
    return rest.split("/", 1)[0]


class _NoCredentialsMeta(type):
    def __instancecheck__(cls, instance: object) -> bool:
        return type(instance).__name__ in {"NoCredentialsError", "PartialCredentialsError"}


class NoCredentialsLike(metaclass=_NoCredentialsMeta):
    """Matches botocore's credential errors without importing botocore."""
