"""The cached filesystem that DuckDB and pyarrow read through.

:class:`ShoalFileSystem` is an fsspec filesystem over one or more object
sources (``s3://``, ``memory://``, ``file://``...).  Reads go through a
:class:`~shoal.cache.reader.BlockReader` (memory, SSD cache, store); listing
and writes go to the source's own fsspec filesystem.  Register it with DuckDB
(``con.register_filesystem(fs)``) or hand :meth:`ShoalFileSystem.to_pyarrow`
to pyarrow: Parquet projection and row-group pruning then fetch only the
byte ranges they need.

Versions are pinned per *snapshot*: inside ``with fs.snapshot():`` the first
listing or ``info`` of an object fixes its version, and every later read of it
in that snapshot is of that version (no torn reads).  Outside a snapshot
every ``open`` looks the version up afresh.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import functools
import datetime
import io
import json
import os
import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from fsspec import AbstractFileSystem

from .config import CacheConfig, StoreConfig
from .nativereads import NativeReads
from .localcopy import Layout, LocalCopies
from .errors import StorageConfigError, StorageError, translate_store_error
from .reader import BlockReader, ReadCursor
from .source import (ObjectSource, ObjectVersion, common_glob_prefix, is_glob, matching, open_source,
                     split_url, versions_from_entries)
from .threadlocal import ThreadSlots

__all__ = ["ShoalFileSystem", "ShoalFile"]

logger = logging.getLogger(__name__)

_SUPPORTED = ("s3", "s3a", "file", "memory")
# Contiguous reads after which a file handle counts as a sequential scan.
_SEQUENTIAL_AFTER = 3
_JOINT_LISTING_KEYS = 1000  # one page of an S3 LIST
# A folder found too wide for one LIST page is tried again after this long
# (files may have been removed): one request, then per-table LISTs if still wide.
_TOO_WIDE_RECHECK_S = 3600.0


def _url(protocol: str, path: str) -> str:
    return f"{protocol}://{path}" if protocol != "file" else path


def _peers_from_env() -> Any:
    """The peer cache tier when ``SHOAL_PEERS`` names workers (else None)."""
    if not os.environ.get("SHOAL_PEERS"):
        return None
    from shoal.transport.peercache import PeerTier  # only peer users pay for the transport

    return PeerTier.from_env()


def _recorded(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def wrapper(self: "ShoalFileSystem", *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except StorageError as exc:
            self.record_error(exc)
            raise

    return wrapper


def _found_too_wide_lately(remembered: list[dict[str, Any]] | None) -> bool:
    """Whether a remembered "too wide for one LIST page" is recent enough to trust."""
    if not isinstance(remembered, list) or not remembered or not isinstance(remembered[0], dict):
        return False
    checked_at = remembered[0].get("checked_at")
    return isinstance(checked_at, (int, float)) and 0 <= time.time() - checked_at < _TOO_WIDE_RECHECK_S


class ShoalFileSystem(AbstractFileSystem):
    """fsspec filesystem reading object stores through Shoal's block cache.

    Parameters
    ----------
    cache:
        Cache placement and behaviour; default from ``SHOAL_CACHE_*``.
    store:
        S3 endpoint and credentials; default from the standard AWS variables.
    protocols:
        URL schemes this instance answers to (DuckDB routes by them).
    """

    cachable = False
    root_marker = ""

    def __init__(
        self,
        *,
        cache: CacheConfig | None = None,
        store: StoreConfig | None = None,
        protocols: tuple[str, ...] = ("s3", "s3a", "memory"),
        reader: BlockReader | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        unknown = [p for p in protocols if p not in _SUPPORTED]
        if unknown:
            raise StorageConfigError(f"unsupported URL scheme(s): {', '.join(unknown)}")
        self.protocol = tuple(protocols)
        self.cache_config = cache or CacheConfig.from_env()
        self.store_config = store or StoreConfig.from_env()
        self.reader = reader or BlockReader(self.cache_config, peers=_peers_from_env())
        self._sources: dict[str, ObjectSource] = {}
        self._sources_lock = threading.Lock()
        self._shared_listings: dict[str, bytes] = {}  # listing key -> digest of what was shared
        self._pins: dict[str, ObjectVersion] | None = None
        self._pins_lock = threading.Lock()
        self._last_error: StorageError | None = None
        self._local_copies: LocalCopies | None = None

    # -- sources and versions -------------------------------------------------

    def source(self, protocol: str) -> ObjectSource:
        """The object source for a URL scheme (created on first use)."""
        protocol = "s3" if protocol == "s3a" else protocol
        if protocol not in self.protocol and protocol != "file":
            # fsspec would open any scheme it knows (ftp://, zip://...): only ours.
            raise StorageConfigError(
                f"unsupported URL scheme {protocol}://: use one of "
                f"{', '.join(p + '://' for p in self.protocol if p != 's3a')} or a local path")
        with self._sources_lock:
            if protocol not in self._sources:
                self._sources[protocol] = open_source(
                    protocol, self.store_config, max_concurrency=self.cache_config.max_concurrency
                )
            return self._sources[protocol]

    def _split(self, path: str) -> tuple[str, str]:
        # A path without a scheme is a local file, as everywhere else in Shoal.
        return split_url(path)

    def canonical(self, path: str) -> str:
        protocol, rest = self._split(path)
        return _url("s3" if protocol == "s3a" else protocol, rest)

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[None]:
        """Pin every object version first seen inside the block (one query)."""
        with self._pins_lock:
            outer = self._pins
            self._pins = {} if outer is None else outer
        try:
            yield
        finally:
            with self._pins_lock:
                self._pins = outer

    def pin(self, version: ObjectVersion) -> ObjectVersion:
        """Pin a version learnt elsewhere (a worker's task) in the current snapshot."""
        return self._pin(version)

    # DuckDB calls this filesystem from its own threads and wraps whatever we
    # raise in its own exception type; the engine asks here for the original.
    def record_error(self, exc: BaseException) -> None:
        if isinstance(exc, StorageError):
            with self._pins_lock:
                self._last_error = exc

    def take_error(self) -> StorageError | None:
        """The last storage error raised to a caller (and forget it)."""
        with self._pins_lock:
            exc, self._last_error = self._last_error, None
        return exc

    def _pin(self, version: ObjectVersion) -> ObjectVersion:
        with self._pins_lock:
            if self._pins is None:
                return version
            return self._pins.setdefault(version.url, version)

    def version(self, path: str) -> ObjectVersion:
        """The (pinned) version of one object."""
        url = self.canonical(path)
        with self._pins_lock:
            pinned = self._pins.get(url) if self._pins is not None else None
        if pinned is not None:
            return pinned
        protocol, _ = self._split(path)
        return self._pin(self.source(protocol).stat(url))

    def versions(self, pattern: str) -> list[ObjectVersion]:
        """Objects matching a glob / prefix / path, pinned."""
        protocol, _ = self._split(pattern)
        url = self.canonical(pattern)
        if not is_glob(url):
            # DuckDB globs every file of a read_parquet list: answer pinned
            # objects from the snapshot instead of listing the store again.
            with self._pins_lock:
                pinned = self._pins.get(url) if self._pins is not None else None
            if pinned is not None:
                return [pinned]
        return [self._pin(v) for v in self.source(protocol).glob(url)]

    # -- remembered listings (speculative planning) ------------------------------

    def _listing_key(self, pattern: str) -> str:
        protocol, _ = self._split(pattern)
        identity = f"{self.source(protocol).store_id}\0{self.canonical(pattern)}"
        return hashlib.blake2b(identity.encode(), digest_size=16).hexdigest()

    def remembered_versions(self, pattern: str) -> list[ObjectVersion] | None:
        """The listing of ``pattern`` an earlier query stored on the SSD, else the one the
        peer tier's owner of the listing remembers (from any client), or None.  Advice:
        the caller checks it against the store's listing (see ``Session._select``)."""
        if "://" not in pattern or pattern.startswith("file://"):
            return None
        key = self._listing_key(pattern)
        entries = self.reader.cache.get_listing(key)
        if entries is None:
            ask = getattr(self.reader.peers, "remembered_listing", None)
            body = ask(key) if ask is not None else None
            try:
                entries = json.loads(body) if body is not None else None
            except ValueError:
                entries = None
        return versions_from_entries(entries, self.canonical(pattern)) if entries is not None else None

    def remember_versions(self, pattern: str, versions: list[ObjectVersion]) -> None:
        """Keep the store's listing of ``pattern`` on the SSD, and with its owner peer."""
        if "://" not in pattern or pattern.startswith("file://"):
            return
        key, entries = self._listing_key(pattern), [dataclasses.asdict(v) for v in versions]
        self.reader.cache.put_listing(key, entries)
        share = getattr(self.reader.peers, "share_listing", None)
        if share is not None:
            body = json.dumps(entries).encode()
            digest = hashlib.blake2b(body, digest_size=16).digest()
            if self._shared_listings.get(key) != digest:  # once per listing and process
                self._shared_listings[key] = digest
                share(key, body)

    def list_versions(self, pattern: str) -> list[ObjectVersion]:
        """List the store now, without pinning (to check a remembered listing)."""
        protocol, _ = self._split(pattern)
        return self.source(protocol).glob(self.canonical(pattern))

    def list_versions_together(self, patterns: Sequence[str]) -> list[list[ObjectVersion]] | None:
        """The store's listings of several globs from one LIST of the prefix they
        share (a query's tables side by side in one folder), or None where that
        is not possible: different stores, a source without it, or a prefix that
        holds more than one page (remembered, so later calls go straight to
        listing each glob).  One request instead of one per table: a query
        waits for the slowest of its listings, and the store's latency has a tail."""
        canonical = [self.canonical(p) for p in patterns]
        prefix = common_glob_prefix(canonical)  # None unless all share a scheme and bucket
        if prefix is None:
            return None
        source = self.source(self._split(prefix)[0])
        list_prefix = getattr(source, "list_prefix", None)
        if list_prefix is None:
            return None
        too_wide = self._listing_key(prefix) + "-too-wide"
        if _found_too_wide_lately(self.reader.cache.get_listing(too_wide)):
            return None
        versions = list_prefix(prefix, max_keys=_JOINT_LISTING_KEYS)
        if versions is None:
            self.reader.cache.put_listing(too_wide, [{"checked_at": time.time()}])
            return None
        return [matching(versions, pattern) for pattern in canonical]

    # -- fsspec API -------------------------------------------------------------

    def _info_dict(self, version: ObjectVersion) -> dict[str, Any]:
        return {"name": version.url, "size": version.size, "type": "file", "ETag": version.etag,
                "mtime": version.mtime}

    @_recorded
    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        protocol, rest = self._split(path)
        try:
            return self._info_dict(self.version(path))
        except FileNotFoundError:
            fs = self.source(protocol).fs
            try:
                info = fs.info(rest)
            except Exception as exc:  # noqa: BLE001
                raise translate_store_error(exc, self.canonical(path)) from exc
            return {**info, "name": _url(protocol, info["name"])}

    @_recorded
    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        protocol, rest = self._split(path)
        try:
            entries = self.source(protocol).fs.ls(rest, detail=True)
        except Exception as exc:  # noqa: BLE001
            raise translate_store_error(exc, self.canonical(path)) from exc
        out = []
        for entry in entries:
            entry = {**entry, "name": _url(protocol, entry["name"])}
            out.append(entry)
        return out if detail else [e["name"] for e in out]

    @_recorded
    def glob(self, path: str, maxdepth: int | None = None, **kwargs: Any) -> Any:  # type: ignore[override]
        versions = self.versions(path)
        if kwargs.get("detail"):
            return {v.url: self._info_dict(v) for v in versions}
        return [v.url for v in versions]

    @_recorded
    def exists(self, path: str, **kwargs: Any) -> bool:
        protocol, rest = self._split(path)
        try:
            return bool(self.source(protocol).fs.exists(rest))
        except Exception as exc:  # noqa: BLE001
            raise translate_store_error(exc, self.canonical(path)) from exc

    @_recorded
    def modified(self, path: str) -> datetime.datetime:
        """Last-modified time (DuckDB asks for it); epoch 0 where the store has none."""
        mtime = self.version(path).mtime or 0.0
        return datetime.datetime.fromtimestamp(mtime, tz=datetime.timezone.utc)

    def created(self, path: str) -> datetime.datetime:
        return self.modified(path)

    @_recorded
    def size(self, path: str) -> int:
        return self.version(path).size

    @_recorded
    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        version = self.version(path)
        protocol, _ = self._split(path)
        start = 0 if start is None else (start if start >= 0 else version.size + start)
        end = version.size if end is None else (end if end >= 0 else version.size + end)
        return self.reader.read(self.source(protocol), version, start, end)

    @_recorded
    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        protocol, rest = self._split(path)
        if "r" in mode:
            version = self.version(path)
            return ShoalFile(self, self.source(protocol), version)
        # Writes go straight to the store; the new object gets a new version key.
        with self._pins_lock:
            if self._pins is not None:
                self._pins.pop(self.canonical(path), None)
        fs = self.source(protocol).fs
        try:
            if protocol == "file":
                fs.makedirs(fs._parent(rest), exist_ok=True)
            return fs.open(rest, mode, **kwargs)
        except Exception as exc:  # noqa: BLE001
            raise translate_store_error(exc, self.canonical(path)) from exc

    def rm_file(self, path: str) -> None:
        protocol, rest = self._split(path)
        self.source(protocol).fs.rm_file(rest)

    def rm(self, path: str, recursive: bool = False, maxdepth: int | None = None) -> None:
        protocol, rest = self._split(path)
        self.source(protocol).fs.rm(rest, recursive=recursive, maxdepth=maxdepth)

    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        protocol, rest = self._split(path)
        if protocol == "file":
            self.source(protocol).fs.makedirs(rest, exist_ok=True)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        self.mkdir(path)

    def prefetch(self, path: str, ranges: list[tuple[int, int]], *,
                 collect: list[tuple[int, int, Any]] | None = None) -> int:
        """Start fetching, in the background, exactly the byte ``ranges`` of an
        object that are not cached yet; returns the bytes requested.  The engine
        calls it with the column chunks a query will read, so a cold scan finds
        its bytes arriving instead of waiting on one GET after another.
        ``collect``: see :meth:`BlockReader.prefetch_ranges`."""
        version = self.version(path)
        protocol, _ = self._split(path)
        return self.reader.prefetch_ranges(self.source(protocol), version, ranges, collect=collect)

    @property
    def local_copies_directory(self) -> Path:
        """Where :meth:`local_copy` keeps its files (inside the cache directory)."""
        return self.cache_config.directory / "local-copies"

    def local_copy(self, path: str, parts: Sequence[str] | None, layout: Callable[[], Layout | None], *,
                   version: ObjectVersion | None = None, use: bool = True) -> str | None:
        """A local file holding the object's bytes of ``parts`` of its ``layout``
        (None: all; holes elsewhere), made from this SSD's verified blocks, for a
        reader that opens files itself (DuckDB's own Parquet reader); None when
        some of them are not on this SSD, the object is a local file already, or
        local copies are off.  ``layout`` is called only for an object without a
        copy yet.  ``version``: the object's version if the caller has it pinned
        (else it is looked up); ``use=False`` prepares a copy for a later reader
        without counting a use.  See :mod:`shoal.cache.localcopy` for what makes it safe."""
        protocol, _ = self._split(path)
        if not self.cache_config.local_copies or protocol == "file" or not self.reader.cache.available:
            return None
        cached = self._cached_object(path, version)
        if cached is None or cached[0].size == 0:
            return None
        version, key = cached
        local = self._copies().path(key, version.size, parts, layout,
                                    lambda lo, hi: self.reader.read_cached(key, version, lo, hi, count=use),
                                    use=use)
        if local is not None and use:
            self.reader.ledger.add(version.url, local_copies=1)
        return local

    def cached_range(self, path: str, start: int, end: int, *, version: ObjectVersion | None = None,
                     count: bool = True) -> bytes | None:
        """Bytes ``[start, end)`` of the object if this SSD holds them all, else None
        (never fetches)."""
        cached = self._cached_object(path, version)
        return None if cached is None else self.reader.read_cached(cached[1], cached[0], start, end, count=count)

    def _cached_object(self, path: str, version: ObjectVersion | None = None) -> tuple[ObjectVersion, str] | None:
        """The object's pinned version and cache key, or None if it is not cached (a local file)."""
        protocol, _ = self._split(path)
        source = self.source(protocol)
        version = self.version(path) if version is None else version
        if not self.reader.caches(source):
            return None
        return version, self.reader.object_key(source, version)

    def _copies(self) -> LocalCopies:
        with self._sources_lock:
            if self._local_copies is None:
                self._local_copies = LocalCopies(self.local_copies_directory,
                                                 size_limit=self.cache_config.local_copies_limit,
                                                 metrics=self.reader.metrics)
            return self._local_copies

    def clear_local_copies(self) -> int:
        """Remove every local copy (``shoal cache clear``); returns how many."""
        return self._copies().clear()

    def to_pyarrow(self) -> Any:
        """This filesystem as a ``pyarrow.fs.FileSystem``."""
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        return PyFileSystem(FSSpecHandler(self))

    def stats(self) -> dict[str, Any]:
        """Cache metrics of this process plus the cache's size on disk."""
        data = self.reader.metrics.snapshot()
        data.update(
            directory=str(self.cache_config.directory),
            size_limit=self.cache_config.size_limit,
            block_size=self.cache_config.block_size,
            volume=self.reader.cache.volume(),
            enabled=self.reader.cache.available,
        )
        with self._sources_lock:
            hedgers = [h for s in self._sources.values()
                       for h in (getattr(s, "hedger", None), getattr(s, "list_hedger", None)) if h is not None]
        if hedgers:  # second copies of slow store requests (see shoal.cache.hedge)
            data["store_hedged"] = sum(h.hedged for h in hedgers)
            data["store_hedge_wins"] = sum(h.hedge_wins for h in hedgers)
        if NativeReads._instance is not None:  # DuckDB's native reads of prefetched bytes (this process)
            data.update({f"duckdb_{name}": value for name, value in NativeReads._instance.stats().items()})
        if self.reader.peers is not None:
            data["tiers"] = self.reader.peers.stats(data)
        return data

    def close(self) -> None:
        self.reader.close()
        if self.reader.peers is not None:
            self.reader.peers.close()


class ShoalFile(io.RawIOBase):
    """A read-only, seekable file over one pinned object version.

    The position is per thread: DuckDB shares one handle between its threads
    and calls ``seek`` then ``read`` without holding a lock across both (the
    GIL is released while a read waits on the store), so a shared position
    would let one thread read at another thread's offset.
    """

    def __init__(self, fs: ShoalFileSystem, source: ObjectSource, version: ObjectVersion) -> None:
        super().__init__()
        self.fs = fs
        self.source = source
        self.version = version
        self.path = version.url
        self.size = version.size
        self._position = ThreadSlots()  # DuckDB's threads lose a threading.local between calls
        self._sequential_end = -1
        self._streak = 0
        self._scanning = False
        self._prefetched_to = -1
        self._window = 0
        self._cursors: list[ReadCursor] = []
        self._cursors_lock = threading.Lock()
        # Per-read constants (a 1 MiB warm read is ~200 us, so attribute chains show).
        self._block_size = fs.cache_config.block_size
        self._readahead_depth = fs.cache_config.readahead_blocks
        self._readahead_limit = max(self._readahead_depth, fs.reader.readahead_limit())

    @property
    def loc(self) -> int:
        return getattr(self._position, "loc", 0)

    @loc.setter
    def loc(self, value: int) -> None:
        self._position.loc = value

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.loc

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            target = offset
        elif whence == io.SEEK_CUR:
            target = self.loc + offset
        elif whence == io.SEEK_END:
            target = self.size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if target < 0:
            raise ValueError("negative seek position")
        self.loc = target
        return self.loc

    def read(self, size: int = -1) -> bytes:  # type: ignore[override]
        if self.closed:
            raise ValueError("I/O operation on closed file")
        position = self._position
        start = getattr(position, "loc", 0)
        end = self.size if size is None or size < 0 else min(start + size, self.size)
        if end <= start:
            return b""
        self._note_access(start, end)
        if self._scanning:
            cursor = self._cursor()
        else:
            cursor = None
            left = getattr(self._position, "cursor", None)
            if left is not None and (left.plan is not None or left.ahead is not None):
                self.fs.reader.settle(left)  # no longer sequential: the helper's reads for it stop
        try:
            # A sequential reader fetches whole blocks (read-ahead keeps them
            # coming); scattered reads (Parquet column chunks) fetch exact pieces.
            data = self.fs.reader.read(self.source, self.version, start, end, whole_blocks=self._scanning,
                                       cursor=cursor)
        except StorageError as exc:
            self.fs.record_error(exc)
            raise
        position.loc = end
        bs = self._block_size
        if self._scanning and end // bs > start // bs:
            self.fs.reader.release(self.source, self.version, start // bs, end // bs)
        return data

    def _cursor(self) -> ReadCursor:
        """This thread's cursor (threads sharing the file read at their own places)."""
        cursor = getattr(self._position, "cursor", None)
        if cursor is None:
            cursor = self._position.cursor = ReadCursor()
            with self._cursors_lock:
                self._cursors.append(cursor)
        return cursor

    def close(self) -> None:
        with self._cursors_lock:
            cursors, self._cursors = self._cursors, []
        for cursor in cursors:
            self.fs.reader.settle(cursor)
        super().close()

    def readinto(self, buffer: Any) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)

    def readall(self) -> bytes:
        return self.read(-1)

    def _note_access(self, start: int, end: int) -> None:
        """Detect a sequential reader and keep blocks in flight ahead of it.

        The window is ``readahead_blocks`` when a scan is detected (a read at
        offset 0, or one that starts where the last ended) and doubles with
        every further sequential read up to :meth:`BlockReader.readahead_limit`
        (enough to keep ``max_concurrency`` GETs busy), like the kernel's
        read-ahead: a short run of adjacent reads costs little, a long scan
        gets full concurrency.
        """
        sequential = start == self._sequential_end
        self._streak = self._streak + 1 if sequential else 0
        self._sequential_end = end
        if not sequential:
            self._window = 0
            self._prefetched_to = -1  # a jump: blocks ahead of the old position do not count
        # A scan starts at offset 0 or after a few contiguous reads: DuckDB reads
        # neighbouring column chunks back to back, which is not yet a scan.
        self._scanning = (self._scanning and sequential) or start == 0 or self._streak >= _SEQUENTIAL_AFTER
        depth = self._readahead_depth
        if depth == 0 or not self._scanning:
            return
        if self._window < depth:
            # Like the kernel's first read-ahead window, sized by the request:
            # a read of a whole block or more is a bulk reader, which gets the
            # full window at once (its second read would come only when its
            # first block has arrived, a whole GET later).
            self._window = self._readahead_limit if end - start >= self._block_size else depth
        else:
            self._window = min(self._window * 2, self._readahead_limit)
        window = self._window
        bs = self._block_size
        next_block = (end + bs - 1) // bs
        if next_block + window <= self._prefetched_to:
            return
        # The blocks of this read go first when they are not yet under way: the
        # pool's requests leave in order, and this read waits for its own.
        first = max(min(start // bs, next_block), self._prefetched_to)
        target = next_block + window
        self.fs.reader.prefetch(self.source, self.version, first, target - first)
        self._prefetched_to = target

    def __enter__(self) -> "ShoalFile":
        return self
