"""Object sources: the one seam between Shoal and an object store.

An :class:`ObjectSource` answers three questions: what version does an object
have now (:meth:`~ObjectSource.stat`), which objects match a pattern
(:meth:`~ObjectSource.glob`), and what are the bytes of these ranges *of that
version* (:meth:`~ObjectSource.fetch`).  Fetches are pinned: S3 reads carry
``If-Match: <etag>`` (or the version id), so an object overwritten mid-query
raises :class:`~shoal.cache.errors.ObjectChangedError` instead of returning a
mix of two versions (an object deleted since its version was learnt counts as
changed: the read was of a version that no longer exists).

Retries are bounded: ``StoreConfig.max_attempts`` attempts per request in all.
botocore retries a request that fails before its response is returned (503
SlowDown and other 5xx, resets, first-byte timeouts; for HEAD and LIST also a
body cut short) with its jittered, capped backoff; a GET whose streamed body
breaks off (reset or truncated mid-body, stalled past ``read_timeout``) is
retried here, with the same bound.  s3fs's own retry loop is switched off so
that the two never multiply.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import random
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol, Sequence, TypeVar

import fsspec
from fsspec.asyn import sync
from fsspec.utils import glob_translate

from .config import StoreConfig
from .errors import (
    BucketNotFoundError, ObjectChangedError, ObjectNotFoundError, StoreError, translate_store_error,
)
from .hedge import HedgePolicy, Hedger

__all__ = ["ObjectVersion", "ObjectSource", "S3Source", "FsspecSource", "open_source", "split_url",
           "versions_from_entries"]

logger = logging.getLogger(__name__)

_LIST_INITIAL_HEDGE_S = 0.1

S3_PROTOCOLS = ("s3", "s3a")

T = TypeVar("T")

_THROTTLING = {"SlowDown", "ServiceUnavailable", "Throttling", "ThrottlingException", "RequestLimitExceeded",
               "TooManyRequestsException", "503"}
_BACKOFF_BASE_S = 0.05
_BACKOFF_CAP_S = 2.0


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _backoff(attempt: int) -> float:
    """Seconds to wait before attempt ``attempt + 1``: exponential, jittered, capped."""
    return min(_BACKOFF_CAP_S, _BACKOFF_BASE_S * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)


def _store_error(exc: BaseException, url: str, attempts: int) -> StoreError:
    """:func:`translate_store_error`, naming what the store answered where that gives no more than
    "failed" (s3fs turns e.g. 503 SlowDown into a bare ``OSError``)."""
    error = translate_store_error(exc, url)
    if type(error) is not StoreError:
        return error
    codes = [link.response.get("Error", {}).get("Code") for link in _chain(exc)
             if isinstance(getattr(link, "response", None), dict)]
    code = next((str(c) for c in codes if c), None)
    if code in _THROTTLING:
        return StoreError(f"the object store kept refusing requests for {url} ({code}: too many requests) "
                          f"after {attempts} attempts; try again later or lower the read concurrency")
    return StoreError(f"object store request for {url} failed: {code or type(exc).__name__}")


def _deleted(error: StoreError, url: str) -> StoreError:
    """A pinned read of an object that is gone: the object changed under the reader."""
    if isinstance(error, ObjectNotFoundError) and not isinstance(error, BucketNotFoundError):
        return ObjectChangedError(f"object was deleted while it was being read: {url}")
    return error


def split_url(url: str) -> tuple[str, str]:
    """``"s3://b/k"`` -> ``("s3", "b/k")``; a plain path -> ``("file", "/abs/path")``."""
    if "://" in url:
        protocol, rest = url.split("://", 1)
        protocol = protocol.lower()
        if protocol == "file":
            return "file", rest
        return protocol, rest.lstrip("/") if protocol in S3_PROTOCOLS else rest
    return "file", url


@dataclass(frozen=True)
class ObjectVersion:
    """One object at one version: what the cache keys on."""

    url: str
    size: int
    etag: str | None = None
    version_id: str | None = None
    mtime: float | None = None

    @property
    def token(self) -> str:
        """The version part of the cache key (never empty)."""
        if self.version_id:
            return f"v:{self.version_id}"
        if self.etag:
            return f"e:{self.etag.strip(chr(34))}"
        return f"m:{self.mtime}"


class ObjectSource(Protocol):
    """Reads objects of one store at pinned versions."""

    #: Identity of the store in cache keys (endpoint; never credentials).
    store_id: str
    #: The fsspec filesystem, for listing and for writes.
    fs: fsspec.AbstractFileSystem
    #: Whether fetches are checked against the version by the store itself.
    pins_versions: bool

    def stat(self, url: str) -> ObjectVersion:
        """Current version of one object."""
        ...

    def glob(self, pattern: str) -> list[ObjectVersion]:
        """Objects matching a glob (or a single path), with their versions."""
        ...

    def fetch(self, version: ObjectVersion, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """Bytes ``[start, end)`` of each range, all of ``version``, concurrently."""
        ...


_VERSION_FIELDS = frozenset(f.name for f in dataclasses.fields(ObjectVersion))


def is_glob(path: str) -> bool:
    """Whether a path has glob wildcards."""
    return any(ch in path for ch in "*?[")


def _fixed_part(path: str) -> str:
    """A glob's path up to its first wildcard."""
    return re.split(r"[*?\[]", path, maxsplit=1)[0]


def _glob_matcher(path: str) -> re.Pattern[str]:
    """The regular expression of a glob over ``bucket/key`` paths (fsspec's rules)."""
    return re.compile(glob_translate(path))


def versions_from_entries(entries: Any, pattern: str) -> list[ObjectVersion] | None:
    """A listing kept or received as JSON (``dataclasses.asdict`` of each version),
    checked: every entry well-formed and an object the pattern matches; else None."""
    if not isinstance(entries, list):
        return None
    scheme, _, path = pattern.partition("://")
    matcher = _glob_matcher(path) if is_glob(path) else None
    out = []
    for entry in entries:
        if not isinstance(entry, dict) or not set(entry) <= _VERSION_FIELDS:
            return None
        url, size, mtime = entry.get("url"), entry.get("size"), entry.get("mtime")
        if (not isinstance(url, str) or not isinstance(size, int) or isinstance(size, bool) or size < 0
                or any(entry.get(k) is not None and not isinstance(entry[k], str) for k in ("etag", "version_id"))
                or (mtime is not None and (not isinstance(mtime, (int, float)) or isinstance(mtime, bool)))):
            return None
        url_scheme, _, url_path = url.partition("://")
        inside = (matcher.fullmatch(url_path) is not None if matcher is not None
                  else url_path == path or url_path.startswith(path.rstrip("/") + "/"))
        if url_scheme != scheme or not inside:
            return None
        out.append(ObjectVersion(**entry))
    return out


def _version_from_info(protocol: str, info: dict[str, Any]) -> ObjectVersion:
    name = info["name"]
    url = f"{protocol}://{name}" if protocol != "file" else name
    mtime = info.get("mtime") or info.get("created") or info.get("LastModified")
    if hasattr(mtime, "timestamp"):  # fsspec backends disagree: datetime or float
        mtime = mtime.timestamp()
    return ObjectVersion(
        url=url,
        size=int(info.get("size") or info.get("Size") or 0),
        etag=info.get("ETag") or info.get("etag"),
        version_id=info.get("VersionId") or None,
        mtime=float(mtime) if isinstance(mtime, (int, float)) else None,
    )


def common_glob_prefix(patterns: Sequence[str]) -> str | None:
    """The longest ``scheme://bucket/dir/`` prefix shared by globs (each with a
    wildcard, all in one bucket), or None: the prefix one LIST could answer
    them all from."""
    fixed = []
    for pattern in patterns:
        scheme, sep, path = pattern.partition("://")
        if not sep or not is_glob(path):
            return None
        head = _fixed_part(path)
        fixed.append(f"{scheme}://{head[: head.rfind('/') + 1]}")
    common = os.path.commonprefix(fixed)
    common = common[: common.rfind("/") + 1]
    scheme, _, path = common.partition("://")
    return common if "/" in path and path.split("/", 1)[0] else None  # at least "bucket/"


def matching(versions: Sequence[ObjectVersion], pattern: str) -> list[ObjectVersion]:
    """The ``versions`` (of one store) that a glob matches, as ``glob`` would list them."""
    matcher = _glob_matcher(pattern.partition("://")[2])
    return [v for v in versions if matcher.match(v.url.partition("://")[2])]


class S3Source:
    """An S3-compatible store through s3fs, with concurrent pinned range GETs."""

    pins_versions = True

    def __init__(self, config: StoreConfig, *, max_concurrency: int = 16) -> None:
        import s3fs  # imported here: only S3 users pay for aiobotocore

        self.config = config
        self.store_id = config.store_id
        # Listings are not cached by s3fs: every query must see current versions.
        options = config.s3fs_options()
        self.attempts = max(1, config.max_attempts)
        # botocore's pool holds 10 connections by default: more concurrent GETs
        # would queue for one instead of running, and a hedged GET needs a
        # second connection while its first copy still holds one.  Its
        # "max_attempts" counts retries; StoreConfig's counts attempts.
        options["config_kwargs"] = {**options.get("config_kwargs", {}),
                                    "max_pool_connections": max(10, 2 * max_concurrency),
                                    "retries": {"total_max_attempts": self.attempts, "mode": "standard"}}
        self.fs = s3fs.S3FileSystem(use_listings_cache=False, skip_instance_cache=True, **options)
        # One retry loop per request: botocore's (plus ours for broken bodies), not also s3fs's,
        # which would multiply the attempts (and the backoff) by five.
        self.fs.retries = 1
        self.max_concurrency = max_concurrency
        self.hedger = Hedger(HedgePolicy(enabled=config.hedge, after_s=config.hedge_after))
        # Before a process has seen enough LISTs: S3 answers one in tens of ms, and a
        # warm query waits for its LIST, so a slow one gets a second copy sooner than a GET.
        self.list_hedger = Hedger(HedgePolicy(enabled=config.hedge, after_s=config.hedge_after,
                                              initial_after_s=_LIST_INITIAL_HEDGE_S))
        self._semaphores: dict[int, asyncio.Semaphore] = {}
        self.requests = 0
        self.bytes_fetched = 0
        self._lock = threading.Lock()

    def _metadata(self, url: str, call: Callable[[], T]) -> T:
        """``call()`` (a HEAD or LIST; botocore retries it), its errors translated."""
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - translated at this boundary
            raise _store_error(exc, url, self.attempts) from exc

    def stat(self, url: str) -> ObjectVersion:
        path = split_url(url)[1]
        info = self._metadata(url, lambda: sync(self.fs.loop, self.hedger.run, lambda: self.fs._info(path),
                                                what="HEAD"))
        if info.get("type") == "directory":
            raise translate_store_error(FileNotFoundError(url), url)
        return _version_from_info("s3", info)

    def glob(self, pattern: str) -> list[ObjectVersion]:
        path = split_url(pattern)[1]
        # Hedged like GETs, with a delay of their own: a LIST takes longer than a GET's
        # first byte, and a query planned on a remembered listing waits for the store's.
        infos = self._metadata(pattern, lambda: sync(self.fs.loop, self.list_hedger.run,
                                                     lambda: self._listing(path), what="LIST"))
        return sorted((_version_from_info("s3", i) for i in infos), key=lambda v: v.url)

    def list_prefix(self, prefix_url: str, *, max_keys: int = 1000) -> list[ObjectVersion] | None:
        """Every object under ``s3://bucket/prefix/`` from one LIST request, or None
        when they do not fit in one page of ``max_keys``."""
        bucket, _, prefix = split_url(prefix_url)[1].partition("/")
        page = self._metadata(prefix_url, lambda: sync(
            self.fs.loop, self.list_hedger.run,
            lambda: self.fs._call_s3("list_objects_v2", Bucket=bucket, Prefix=prefix, MaxKeys=max_keys),
            what="LIST"))
        if page.get("IsTruncated"):
            return None
        return sorted((_version_from_info("s3", {**item, "name": f"{bucket}/{item['Key']}", "size": item["Size"]})
                       for item in page.get("Contents", []) if not item["Key"].endswith("/")),
                      key=lambda v: v.url)

    async def _listing(self, path: str) -> list[dict[str, Any]]:
        if is_glob(path):
            return await self._list_matching(path)
        info = await self.fs._info(path)
        if info.get("type") == "directory":
            return list((await self.fs._find(path, detail=True)).values())
        return [info]

    def warm_up(self, url: str | None = None) -> None:
        """Create the S3 client now (session, credentials, service model), not on
        first use; with ``url``, also send one HEAD to its bucket: the first
        request of a process builds the HTTP session (its TLS contexts load the
        CA bundle, even for plain HTTP) and costs ~0.1 s, better paid before
        a query needs its answer.  Errors are the caller's to ignore."""
        sync(self.fs.loop, self.fs.set_session)
        if url:
            bucket = split_url(url)[1].split("/", 1)[0]
            if bucket:
                sync(self.fs.loop, self.fs._call_s3, "head_bucket", Bucket=bucket)

    async def _list_matching(self, path: str) -> list[dict[str, Any]]:
        # One recursive listing under the pattern's fixed prefix, filtered here:
        # s3fs's own glob costs several requests (info, exists, per-level ls).
        fixed = _fixed_part(path)
        root = fixed.rsplit("/", 1)[0] if "/" in fixed else fixed
        if "/" not in root:  # the bucket itself: let s3fs check that it exists
            await self.fs._info(root)
        matcher = _glob_matcher(path)
        found = await self.fs._find(root, detail=True)
        return [i for name, i in found.items() if i.get("type") != "directory" and matcher.match(name)]

    def fetch(self, version: ObjectVersion, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        if not ranges:
            return []
        try:
            return sync(self.fs.loop, self._fetch_all, version, list(ranges))
        except StoreError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise _deleted(_store_error(exc, version.url, self.attempts), version.url) from exc

    def _semaphore(self) -> asyncio.Semaphore:
        loop_id = id(self.fs.loop)
        if loop_id not in self._semaphores:
            self._semaphores[loop_id] = asyncio.Semaphore(self.max_concurrency)
        return self._semaphores[loop_id]

    async def _fetch_all(self, version: ObjectVersion, ranges: list[tuple[int, int]]) -> list[bytes]:
        return list(await asyncio.gather(*(self._fetch_one(version, s, e) for s, e in ranges)))

    async def _fetch_one(self, version: ObjectVersion, start: int, end: int) -> bytes:
        if end <= start:
            return b""
        bucket, key, _ = self.fs.split_path(split_url(version.url)[1])
        condition: dict[str, str] = (
            {"VersionId": version.version_id} if version.version_id else {"IfMatch": version.etag or ""}
        )
        if not version.version_id and not version.etag:
            condition = {}
        for attempt in range(1, self.attempts + 1):
            broken: BaseException | None = None
            async with self._semaphore():
                try:
                    response = await self.hedger.run(
                        lambda: self.fs._call_s3(
                            "get_object", Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}", **condition),
                        on_loser=lambda late: late["Body"].close(), what="GET")
                except Exception as exc:  # noqa: BLE001 - botocore has retried what is worth retrying
                    raise _deleted(_store_error(exc, version.url, self.attempts), version.url) from exc
                etag = response.get("ETag")
                if version.etag and etag and etag != version.etag and not version.version_id:
                    response["Body"].close()
                    # A store that ignores If-Match must still never hand us another version.
                    raise ObjectChangedError(f"object changed while it was being read: {version.url}")
                try:
                    data = await response["Body"].read()
                except Exception as exc:  # noqa: BLE001 - the body broke off: retried below
                    broken = exc
                finally:
                    response["Body"].close()
            if broken is None and len(data) == end - start:
                break
            if broken is None:
                broken = StoreError(f"short read from {version.url}: wanted {end - start} bytes at {start}, "
                                    f"got {len(data)}")
            if attempt == self.attempts:
                detail = str(broken) if isinstance(broken, StoreError) else type(broken).__name__
                raise StoreError(f"the connection to the object store broke while reading {version.url} "
                                 f"({detail}) after {attempt} attempts") from broken
            logger.debug("GET %s [%d, %d) broke off (%s); retrying", version.url, start, end, type(broken).__name__)
            await asyncio.sleep(_backoff(attempt))
        with self._lock:
            self.requests += 1
            self.bytes_fetched += len(data)
        return data


class FsspecSource:
    """Any fsspec filesystem (``file://``, ``memory://``, ...).

    Such stores cannot pin a version on read, so each fetch re-checks the
    object's size and mtime afterwards and refuses bytes of a changed object.
    """

    pins_versions = False

    def __init__(self, protocol: str, *, max_concurrency: int = 8, **storage_options: Any) -> None:
        self.protocol = protocol
        self.fs = fsspec.filesystem(protocol, **storage_options)
        self.store_id = protocol
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="shoal-fetch")
        self.requests = 0
        self.bytes_fetched = 0
        self._lock = threading.Lock()

    def stat(self, url: str) -> ObjectVersion:
        try:
            info = self.fs.info(split_url(url)[1])
        except Exception as exc:  # noqa: BLE001
            raise translate_store_error(exc, url) from exc
        if info.get("type") == "directory":
            raise translate_store_error(FileNotFoundError(url), url)
        return _version_from_info(self.protocol, info)

    def glob(self, pattern: str) -> list[ObjectVersion]:
        path = split_url(pattern)[1]
        try:
            if is_glob(path):
                infos = [i for i in self.fs.glob(path, detail=True).values() if i.get("type") != "directory"]
            elif self.fs.isdir(path):
                infos = list(self.fs.find(path, detail=True).values())
            else:
                infos = [self.fs.info(path)]
        except Exception as exc:  # noqa: BLE001
            raise translate_store_error(exc, pattern) from exc
        return sorted((_version_from_info(self.protocol, i) for i in infos), key=lambda v: v.url)

    def fetch(self, version: ObjectVersion, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        path = split_url(version.url)[1]

        def one(bounds: tuple[int, int]) -> bytes:
            start, end = bounds
            return self.fs.cat_file(path, start=start, end=end) if end > start else b""

        try:
            if len(ranges) == 1:
                results = [one(ranges[0])]
            else:
                results = list(self._pool.map(one, ranges))
        except Exception as exc:  # noqa: BLE001
            raise _deleted(translate_store_error(exc, version.url), version.url) from exc
        try:
            current = self.stat(version.url)
        except ObjectNotFoundError as exc:
            raise _deleted(exc, version.url) from exc
        if current.token != version.token:
            raise ObjectChangedError(f"object changed while it was being read: {version.url}")
        with self._lock:
            self.requests += len(ranges)
            self.bytes_fetched += sum(len(r) for r in results)
        return results


def open_source(protocol: str, store: StoreConfig | None = None, *, max_concurrency: int = 16) -> ObjectSource:
    """The source for a URL protocol (``s3``, ``file``, ``memory``, ...)."""
    if protocol in S3_PROTOCOLS:
        return S3Source(store or StoreConfig.from_env(), max_concurrency=max_concurrency)
    return FsspecSource(protocol, max_concurrency=max_concurrency)
