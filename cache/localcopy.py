"""Sparse local copies of cached objects, for readers that open files themselves.

DuckDB reads a Parquet file through a Python (fsspec) filesystem at about
1.15x the time it takes over the same bytes on local disk, before Shoal looks
anything up or verifies a byte (``benchmarks/tpch_peer_floor.py``, its ``fsspec`` mode): every
read crosses into Python from DuckDB's threads.  A warm query whose bytes are
all on this SSD can instead be handed a *local copy*: a sparse file the size
of the object, holding at their own offsets exactly the byte ranges the query
may read (the footer, the column chunks of the columns it names, their bloom
filters), with holes elsewhere.  DuckDB then reads it natively.

Why this is safe:

* A copy belongs to one object version (the same key as the blocks it was
  made from: store, URL, ETag/version, size), so an overwritten object gets a
  new copy, never old bytes.
* Bytes enter a copy only from cache blocks whose checksums were verified on
  the way, and the copy's sidecar records an xxh3 of every range written.  The
  first use after a boot, or after the file changed, hashes every recorded
  range; once checked (or written by Shoal), the file gets an mtime no write
  can produce, and the sidecar remembers its identity (boot id, that mtime,
  inode, size): later uses compare it instead of hashing again, and any
  write to the file, which sets its mtime, makes the next use hash again.  A mismatch or a short file
  discards the copy (counted as ``local_copy_corrupt``) and the query reads
  through the cache, whose blocks are verified on every read.
* The caller names the parts it needs of the object's layout (for Parquet:
  the footer and the chunks of each column it names); a copy is handed over
  only when every byte of them is present.  A part not on this SSD yet means
  no copy: the query reads through the cache as before, which stores what it
  fetches, and a later query finds it.  (Copies are never made from bytes in
  flight: that would double the cost of a cold query's cache fill.)
* A hole read by mistake is zeros, which a Parquet reader cannot decode as a
  page header: DuckDB raises, and the engine re-runs the query through the
  cache (``shoal.engine``); a test pins this behaviour.

Several processes share the directory: a copy is extended under an exclusive
``flock`` of its file, only into ranges not yet recorded, and its sidecar is
replaced atomically, so a reader never sees a recorded range that is not fully
written.  Copies are bounded (``CacheConfig.local_copies_size``): the least
recently used are removed first.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import mmap
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import xxhash

from .blockcache import CacheMetrics

__all__ = ["Layout", "LocalCopies", "merge_ranges"]

logger = logging.getLogger(__name__)

_SIDECAR = ".json"
_COPY = ".parquet"
# A use touches the sidecar (LRU order) at most this often.
_TOUCH_EVERY_S = 60.0

ReadCached = Callable[[int, int], "bytes | memoryview | None"]
#: Named byte ranges of an object (a Parquet file: its footer and each column's
#: chunks); None for a part that cannot be copied.
Layout = dict[str, "list[tuple[int, int]] | None"]


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, non-empty, non-overlapping ranges (touching ones joined)."""
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(r for r in ranges if r[1] > r[0]):
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return merged


def _subtract(wanted: Sequence[tuple[int, int]], have: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Parts of ``wanted`` not covered by ``have`` (both merged)."""
    gaps: list[tuple[int, int]] = []
    j = 0
    for lo, hi in wanted:
        while j < len(have) and have[j][1] <= lo:
            j += 1
        k, pos = j, lo
        while pos < hi and k < len(have) and have[k][0] < hi:
            if have[k][0] > pos:
                gaps.append((pos, have[k][0]))
            pos = max(pos, have[k][1])
            k += 1
        if pos < hi:
            gaps.append((pos, hi))
    return gaps


def _digest(view: memoryview | bytes) -> str:
    return xxhash.xxh3_64_hexdigest(view)


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return f"unknown-{os.getpid()}"  # no boot id: a check lasts one process


_BOOT = _boot_id()


def _mark(fd: int) -> list[Any]:
    """Give the file an mtime that no write produces, and return the identity a
    checked copy must keep (JSON-comparable).  A write sets mtime to the
    kernel's coarse clock, which may not move for a few ms; one nanosecond
    before it is a value the next write, in this tick or a later one, cannot
    leave behind."""
    st = os.fstat(fd)
    marker = st.st_mtime_ns - 1
    os.utime(fd, ns=(st.st_atime_ns, marker))
    return [_BOOT, marker, st.st_ino, st.st_size]


def _identity(st: os.stat_result) -> list[Any]:
    return [_BOOT, st.st_mtime_ns, st.st_ino, st.st_size]


class LocalCopies:
    """A directory of sparse, verified local copies, keyed like the block cache.

    ``directory`` is created on first use; ``size_limit`` bounds the bytes the
    copies hold (allocated blocks, holes not counted).
    """

    def __init__(self, directory: Path, *, size_limit: int, metrics: CacheMetrics) -> None:
        self.directory = directory
        self.size_limit = size_limit
        self.metrics = metrics
        self._touched: dict[str, float] = {}
        self._lock = threading.Lock()

    def _paths(self, key: str) -> tuple[str, str]:
        base = os.path.join(self.directory, key)
        return base + _COPY, base + _SIDECAR

    def path(self, key: str, size: int, parts: Sequence[str] | None, layout: Callable[[], Layout | None],
             read_cached: ReadCached, *, use: bool = True) -> str | None:
        """A local file (``size`` bytes long) holding the object's bytes of
        ``parts`` (None: all of them), or None when some of them are not in the
        cache or cannot be copied.

        ``layout()`` names the object's byte ranges (for Parquet: the footer and
        each column's chunks); it is called only the first time, then kept in
        the copy's sidecar, so a warm use reads no footer.  A part the layout
        does not name is not in the object and needs nothing; a part it maps to
        None cannot be copied.  ``read_cached(lo, hi)`` returns verified cached
        bytes, or None if they are not all cached."""
        copy, sidecar = self._paths(key)
        meta = self._sidecar(sidecar, size)
        known = meta["layout"] if meta is not None else layout()
        if known is None:
            return None
        chosen = [known[p] for p in (known if parts is None else parts) if p in known]
        if any(ranges is None for ranges in chosen):
            return None
        wanted = merge_ranges((max(0, lo), min(hi, size)) for ranges in chosen for lo, hi in ranges)
        if meta is not None and self._verified(key, copy, sidecar, size, meta):
            if not _subtract(wanted, merge_ranges((lo, hi) for lo, hi, _ in meta["ranges"])):
                self._touch(key, sidecar)
                if use:
                    self.metrics.add(local_copy_uses=1)
                return copy
        try:
            return self._extend(key, size, known, wanted, read_cached, use)
        except OSError as exc:
            self.metrics.add(write_failures=1)
            logger.warning("cannot write a local copy in %s (%s); reading through the cache", self.directory, exc)
            return None

    # -- reading ------------------------------------------------------------------

    @staticmethod
    def _sidecar(sidecar: str, size: int) -> dict[str, Any] | None:
        """The sidecar's layout and recorded ``(lo, hi, xxh3)`` ranges, or None."""
        try:
            with open(sidecar, "rb") as f:
                meta = json.loads(f.read())
            if meta.get("size") != size or not isinstance(meta.get("layout"), dict):
                return None
            return {"layout": {name: None if ranges is None else [(int(lo), int(hi)) for lo, hi in ranges]
                               for name, ranges in meta["layout"].items()},
                    "ranges": [(int(lo), int(hi), str(digest)) for lo, hi, digest in meta["ranges"]],
                    "checked": meta.get("checked")}
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            logger.debug("unreadable local-copy sidecar %s (%s)", sidecar, exc)
            return None

    def _verified(self, key: str, copy: str, sidecar: str, size: int, meta: dict[str, Any]) -> bool:
        """Whether the copy holds what its sidecar records.  Every recorded range is
        hashed the first time the copy is used after a boot or after the file was
        changed; the sidecar then remembers the file's identity (boot, mtime,
        inode, size), and later uses only compare it (a write to the file, ours
        or anyone's, changes its mtime)."""
        try:
            with open(copy, "rb") as f:
                st = os.fstat(f.fileno())
                if st.st_size != size:
                    raise ValueError(f"size {st.st_size}, expected {size}")
                if meta["checked"] == _identity(st):
                    return True
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                    view = memoryview(mapped)
                    try:
                        for lo, hi, digest in meta["ranges"]:
                            if _digest(view[lo:hi]) != digest:
                                raise ValueError(f"bytes {lo}-{hi} changed")
                    finally:
                        view.release()
                # Under the copy's lock, on the sidecar as it is now: another
                # process may have added ranges (hashed as it wrote them).
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
                current = self._sidecar(sidecar, size) or meta
                self._write_sidecar(sidecar, size, current["layout"], current["ranges"], _mark(f.fileno()))
        except FileNotFoundError:
            self._remove(key)
            return False
        except (OSError, ValueError) as exc:
            self.metrics.add(local_copy_corrupt=1)
            logger.warning("local copy %s discarded (%s); rebuilding it from the cache", copy, exc)
            self._remove(key)
            return False
        return True

    def _touch(self, key: str, sidecar: str) -> None:
        now = time.time()
        with self._lock:
            if now - self._touched.get(key, 0.0) < _TOUCH_EVERY_S:
                return
            self._touched[key] = now
        try:
            os.utime(sidecar)
        except OSError:
            pass

    # -- writing ------------------------------------------------------------------

    def _extend(self, key: str, size: int, layout: Layout, wanted: Sequence[tuple[int, int]],
                read_cached: ReadCached, use: bool = True) -> str | None:
        copy, sidecar = self._paths(key)
        # Everything missing must be cached before anything is written: a partial
        # copy would be of no use to this query.
        meta = self._sidecar(sidecar, size)
        known = meta["ranges"] if meta is not None else []
        gaps = _subtract(wanted, merge_ranges((lo, hi) for lo, hi, _ in known))
        pieces: list[tuple[int, int, bytes | memoryview]] = []
        for lo, hi in gaps:
            data = read_cached(lo, hi)
            if data is None or len(data) != hi - lo:
                return None
            pieces.append((lo, hi, data))
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(copy, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            # Another process may have extended (or replaced) it meanwhile.
            meta = self._sidecar(sidecar, size)
            recorded = meta["ranges"] if meta is not None else []
            if os.fstat(fd).st_size != size:
                os.ftruncate(fd, 0)  # a new copy, or one of another size: start over
                os.ftruncate(fd, size)
                recorded = []
            have = merge_ranges((lo, hi) for lo, hi, _ in recorded)
            written = 0
            for lo, hi, data in pieces:
                for glo, ghi in _subtract([(lo, hi)], have):
                    part = memoryview(data)[glo - lo:ghi - lo]
                    os.pwrite(fd, part, glo)
                    recorded.append((glo, ghi, _digest(part)))
                    written += ghi - glo
            if written or meta is None:
                recorded.sort()
                # What was there was verified (path()) or written by a process that
                # hashed what it wrote: the file as it is now is checked.
                self._write_sidecar(sidecar, size, layout, recorded, _mark(fd))
                self.metrics.add(local_copy_bytes=written)
        finally:
            os.close(fd)  # releases the lock
        if use:
            self.metrics.add(local_copy_uses=1)
        if written:
            self._evict(keep=key)
        return copy

    @staticmethod
    def _write_sidecar(sidecar: str, size: int, layout: Layout, ranges: Sequence[tuple[int, int, str]],
                       checked: list[Any]) -> None:
        tmp = f"{sidecar}.{os.getpid()}.{threading.get_ident()}"
        try:
            with open(tmp, "w") as f:
                json.dump({"size": size, "layout": layout, "ranges": ranges, "checked": checked}, f,
                          separators=(",", ":"))
            os.replace(tmp, sidecar)  # readers see the old sidecar or the new one, whole
        except OSError as exc:
            logger.debug("cannot write %s (%s)", sidecar, exc)
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def _remove(self, key: str) -> None:
        copy, sidecar = self._paths(key)
        for path in (sidecar, copy):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                logger.debug("cannot remove %s (%s)", path, exc)

    def _evict(self, *, keep: str) -> None:
        """Remove the least recently used copies while over the size limit."""
        entries = []
        total = 0
        try:
            scan = list(os.scandir(self.directory))
        except OSError:
            return
        for entry in scan:
            if not entry.name.endswith(_COPY):
                continue
            key = entry.name[: -len(_COPY)]
            try:
                used = entry.stat().st_blocks * 512
                sidecar = os.stat(os.path.join(self.directory, key + _SIDECAR)).st_mtime
            except OSError:
                used, sidecar = 0, 0.0
            total += used
            entries.append((sidecar, key, used))
        for _, key, used in sorted(entries):
            if total <= self.size_limit:
                break
            if key == keep:
                continue
            self._remove(key)
            total -= used
            self.metrics.add(local_copy_evictions=1)

    # -- housekeeping ---------------------------------------------------------------

    def volume(self) -> int:
        """Bytes the copies hold on disk."""
        try:
            return sum(e.stat().st_blocks * 512 for e in os.scandir(self.directory) if e.name.endswith(_COPY))
        except OSError:
            return 0

    def clear(self) -> int:
        """Remove every copy; returns how many."""
        removed = 0
        try:
            names = [e.name for e in os.scandir(self.directory)]
        except OSError:
            return 0
        for name in names:
            if name.endswith(_COPY):
                self._remove(name[: -len(_COPY)])
                removed += 1
            elif _SIDECAR in name:  # a sidecar without its copy, or a temporary one
                try:
                    os.unlink(os.path.join(self.directory, name))
                except OSError:
                    pass
        return removed
