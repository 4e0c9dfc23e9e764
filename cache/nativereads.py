"""DuckDB reading prefetched bytes natively, through Shoal's DuckDB extension.

DuckDB reads through a Python (fsspec) filesystem with a call into Python,
under the GIL, for every read, plus a copy into a ``bytes`` object.  For a
client whose bytes come from peers that is most of the difference from a
local-warm client (which reads sparse local copies natively): see
``benchmarks/results/peer-tpch-notes.md``.  With the extension
(:mod:`shoal.cache.nativebuild` builds it), a query's prefetched files are
handed to DuckDB as ``shoalpieces://<token>/<url>``: each prefetched byte range
is registered as it is requested, its memory address is handed over once its
bytes have arrived and been verified, and a DuckDB thread that wants them
earlier waits in C++, not holding the GIL.  Bytes not registered (or whose
fetch failed) are read through the cached filesystem, by a callback into
Python: the ordinary path, with its versions and checksums.

The memory of every registered range is kept alive by :class:`QueryPieces`
until the query has finished and its files are dropped.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import uuid
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:
    import duckdb

    from .filesystem import ShoalFileSystem
    from .source import ObjectVersion

__all__ = ["NativeReads", "QueryPieces"]

logger = logging.getLogger(__name__)

PREFIX = "shoalpieces://"
_FALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_char_p, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_void_p)


class NativeReads:
    """The loaded extension (one per process) and the queries using it."""

    _instance: "NativeReads | None" = None
    _instance_lock = threading.Lock()

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lib = ctypes.CDLL(str(path))  # the handle DuckDB's LOAD gets too: one registry
        self._lib.shoal_pieces_add_file.argtypes = [ctypes.c_char_p, ctypes.c_uint64, ctypes.c_int]
        self._lib.shoal_pieces_complete_file.argtypes = [ctypes.c_char_p]
        self._lib.shoal_pieces_add_range.argtypes = [ctypes.c_char_p, ctypes.c_uint64, ctypes.c_uint64]
        self._lib.shoal_pieces_add_range.restype = ctypes.c_int64
        self._lib.shoal_pieces_settle.argtypes = [ctypes.c_int64, ctypes.c_void_p]
        self._lib.shoal_pieces_drop_file.argtypes = [ctypes.c_char_p]
        self._lib.shoal_pieces_configure.argtypes = [_FALLBACK, ctypes.c_double]
        self._lib.shoal_pieces_stats.argtypes = [ctypes.POINTER(ctypes.c_uint64)]
        self._reset()
        os.register_at_fork(after_in_child=self._reset)
        self._callback = _FALLBACK(self._fallback)  # referenced: ctypes must not free it
        self._lib.shoal_pieces_configure(self._callback, 60.0)

    def _reset(self) -> None:
        # A forked child starts with a lock nobody holds and none of its parent's queries.
        self._queries: dict[str, QueryPieces] = {}
        self._lock = threading.Lock()

    @classmethod
    def get(cls) -> "NativeReads | None":
        """The process's instance, or None when the extension is not built or
        ``SHOAL_NATIVE_READS=0``."""
        if os.environ.get("SHOAL_NATIVE_READS", "1") == "0":
            return None
        with cls._instance_lock:
            if cls._instance is None:
                path = _find_extension()
                if path is None:
                    return None
                try:
                    _share_duckdb_symbols()
                    cls._instance = cls(path)
                except (ImportError, OSError, AttributeError) as exc:
                    logger.warning("cannot use %s (%s): DuckDB reads through Python", path, exc)
                    return None
            return cls._instance

    def attach(self, con: "duckdb.DuckDBPyConnection") -> bool:
        """Load the extension into ``con``'s database (opened with
        ``allow_unsigned_extensions``), then forbid any further unsigned one."""
        try:
            con.execute(f"LOAD '{self.path.as_posix()}'").fetchall()
            return True
        except Exception as exc:  # noqa: BLE001 - reading through Python still works
            logger.warning("DuckDB could not load %s (%s): reading through Python", self.path, exc)
            return False
        finally:
            con.execute("SET allow_unsigned_extensions=false").fetchall()

    def stats(self) -> dict[str, int]:
        out = (ctypes.c_uint64 * 6)()
        self._lib.shoal_pieces_stats(out)
        names = ("native_reads", "native_bytes", "fallback_reads", "fallback_bytes", "reads_that_waited",
                 "fallback_reads_unregistered")
        return dict(zip(names, (int(v) for v in out)))

    def query(self, fs: "ShoalFileSystem") -> "QueryPieces":
        pieces = QueryPieces(self, fs)
        with self._lock:
            self._queries[pieces.token] = pieces
        return pieces

    def _forget(self, pieces: "QueryPieces") -> None:
        with self._lock:
            self._queries.pop(pieces.token, None)

    def _fallback(self, path: bytes, offset: int, length: int, dest: int) -> int:
        """A read of bytes not held in memory: through the cached filesystem."""
        try:
            token = path[len(PREFIX):].split(b"/", 1)[0].decode()
            with self._lock:
                pieces = self._queries.get(token)
            if pieces is None:
                return -1
            data = pieces.read(path.decode(), offset, length)
            if len(data) != length:
                return -1
            ctypes.memmove(dest, data, length)
            return 0
        except BaseException as exc:  # noqa: BLE001 - never raise into C++; DuckDB reports an IO error
            # The engine runs the query again through the cached filesystem, which raises it.
            logger.debug("native read of %s failed: %s", path[:200], exc)
            return -1


class QueryPieces:
    """The files one query reads through the extension, and the memory they point at."""

    def __init__(self, native: NativeReads, fs: "ShoalFileSystem") -> None:
        self.native = native
        self.fs = fs
        self.token = uuid.uuid4().hex
        self._files: dict[str, str] = {}  # extension path -> URL
        self._keep: list[Any] = []  # the filled ranges' buffers
        self._lock = threading.Lock()
        self._closed = False
        self._background: threading.Thread | None = None

    def add(self, version: "ObjectVersion", pieces: Sequence[tuple[int, int, Future]] = (), *,
            complete: bool = True) -> str:
        """Register the object's ``(start, end, future of its bytes)`` ranges;
        returns the path DuckDB is to read instead of its URL.  With ``complete``
        false, more ranges may follow (:meth:`extend`) until :meth:`complete`:
        meanwhile a read of bytes not registered waits instead of falling back."""
        path = self.path_of(version)
        self.native._lib.shoal_pieces_add_file(path.encode(), version.size, 1 if complete else 0)
        with self._lock:
            self._files[path] = version.url
        self.extend(version, pieces)
        return path

    def path_of(self, version: "ObjectVersion") -> str:
        return f"{PREFIX}{self.token}/{version.url}"

    def extend(self, version: "ObjectVersion", pieces: Sequence[tuple[int, int, Future]]) -> None:
        """More ranges of a file :meth:`add` registered."""
        key = self.path_of(version).encode()
        lib = self.native._lib
        for start, end, future in pieces:
            if end <= start:
                continue
            range_id = lib.shoal_pieces_add_range(key, start, end)
            if range_id < 0:
                continue
            future.add_done_callback(lambda f, i=range_id, n=end - start: self._settle(i, n, f))

    def complete(self, version: "ObjectVersion") -> None:
        """No more ranges of the file: reads of other bytes go through the cached filesystem."""
        self.native._lib.shoal_pieces_complete_file(self.path_of(version).encode())

    def _settle(self, range_id: int, length: int, future: Future) -> None:
        address = None
        if not future.cancelled() and future.exception() is None:
            data = future.result()
            if len(data) == length:
                import pyarrow as pa  # a buffer's address for any buffer (read-only ones too)

                buffer = pa.py_buffer(data)
                with self._lock:
                    if not self._closed:
                        self._keep.append(buffer)
                        address = buffer.address
        self.native._lib.shoal_pieces_settle(range_id, address)

    def read(self, path: str, offset: int, length: int) -> bytes:
        with self._lock:
            url = self._files.get(path)
        if url is None:
            raise FileNotFoundError(path)
        return self.fs.cat_file(url, offset, offset + length)

    def in_background(self, work: Callable[[], None]) -> None:
        """Run ``work`` (registering the rest of the query's ranges) while DuckDB
        starts; :meth:`close` waits for it."""
        def run() -> None:
            try:
                work()
            except BaseException as exc:  # noqa: BLE001 - reads of what is not registered fall back
                logger.warning("registering a query's prefetched ranges failed: %s", exc)
            finally:
                with self._lock:
                    files = list(self._files)
                for path in files:  # whatever work did not finish: no reader waits for it
                    self.native._lib.shoal_pieces_complete_file(path.encode())

        self._background = threading.Thread(target=run, name="shoal-native-plan", daemon=True)
        self._background.start()

    def close(self) -> None:
        """Drop the query's files (DuckDB is done with them) and release the memory."""
        if self._background is not None:
            self._background.join()
        with self._lock:
            self._closed = True
            files = list(self._files)
            self._files.clear()
        for path in files:
            self.native._lib.shoal_pieces_drop_file(path.encode())
        with self._lock:
            self._keep.clear()
        self.native._forget(self)

    def __enter__(self) -> "QueryPieces":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _find_extension() -> Path | None:
    explicit = os.environ.get("SHOAL_NATIVE_EXTENSION")
    if explicit:
        return Path(explicit) if Path(explicit).exists() else None
    try:
        from .nativebuild import extension_path

        path = extension_path()
    except Exception:  # noqa: BLE001
        return None
    return path if path.exists() else None


def _share_duckdb_symbols() -> None:
    """Make DuckDB's own symbols visible to extensions it loads: Python opened
    ``_duckdb`` with RTLD_LOCAL, so a C++ extension could not link against the
    classes it extends; reopening it RTLD_GLOBAL promotes the loaded copy."""
    import _duckdb  # type: ignore[import-not-found]

    ctypes.CDLL(_duckdb.__file__, mode=ctypes.RTLD_GLOBAL)
