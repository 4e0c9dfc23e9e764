"""Streaming batches of one worker's lane: reading row groups ahead, batching, converting.

:class:`BatchStream` is what a :class:`~shoal.engine.loader.BatchLoader` (and the
PyTorch dataset) iterates: a background thread reads the next window's row
groups on ``read_threads`` threads while the current window's batches are cut,
converted and queued (``prefetch`` ahead), so I/O and decoding overlap the
training step.  :class:`ProcessFileSystem` gives every process (DataLoader
workers fork) its own cached filesystem on the shared cache directory.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from shoal.cache import CacheConfig, ShoalFileSystem, StoreConfig

from .loader_plan import EpochPlan, Item
from .loader_source import ResolvedSource, open_version

__all__ = ["ProcessFileSystem", "UnitReader", "BatchStream", "empty_batch", "item_rows", "item_units", "cut_batch"]

logger = logging.getLogger(__name__)


def empty_batch(schema: pa.Schema) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays([pa.array([], type=f.type) for f in schema], schema=schema)


def item_rows(plan: EpochPlan, item: Item) -> tuple[int, int]:
    """(first row, rows) of an item's window to read: all when shuffled (a batch takes
    rows from anywhere in it), else only those of the item's batches."""
    if plan.shuffle:
        return 0, item.rows
    lo = min(item.b0 * plan.batch_size, item.rows)
    return lo, min(item.b1 * plan.batch_size, item.rows) - lo


def item_units(plan: EpochPlan, item: Item) -> list[int]:
    """The units an item reads, in order."""
    offset, rows = item_rows(plan, item)
    return list(dict.fromkeys(piece.unit for piece in plan.pieces(item.start + offset, rows)))


class ProcessFileSystem:
    """A cached filesystem per process: DataLoader workers fork, and the parent's S3
    client (an asyncio loop in a thread) does not survive a fork.  Every process
    opens its own, on the same cache directory."""

    def __init__(self, fs: ShoalFileSystem | None, cache: CacheConfig | None, store: StoreConfig | None) -> None:
        if fs is None:
            fs = ShoalFileSystem(cache=cache, store=store)
            self.owned = True
        else:
            self.owned = False
        self.cache_config, self.store_config = fs.cache_config, fs.store_config
        self._fs: ShoalFileSystem | None = fs
        self._pid = os.getpid()
        self._lock = threading.Lock()

    def get(self) -> ShoalFileSystem:
        with self._lock:
            if self._fs is None or self._pid != os.getpid():
                self._fs = ShoalFileSystem(cache=self.cache_config, store=self.store_config)
                self._pid = os.getpid()
                self.owned = True
            return self._fs

    def quiesce(self) -> None:
        """Finish this process's cache writes: call before forking workers.

        Blocks fetched here are then on the SSD for the workers (not fetched again),
        and the fork finds no write in progress.  (A fork while another thread is
        inside the cache's SQLite index is held back by the block cache itself:
        a child forked then would inherit SQLite's locks and hang.)"""
        fs = self._fs
        if fs is not None and self._pid == os.getpid():
            fs.reader.flush()

    def flush(self) -> None:
        """Finish write-behind and publish this process's counters (a worker may exit next)."""
        fs = self._fs
        if fs is not None and self._pid == os.getpid():
            fs.reader.flush()
            fs.reader.cache.flush_stats()

    def close(self) -> None:
        if self._fs is not None and self.owned and self._pid == os.getpid():
            self._fs.close()
        self._fs = None

    def __getstate__(self) -> dict[str, Any]:
        return {"cache_config": self.cache_config, "store_config": self.store_config}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.cache_config, self.store_config = state["cache_config"], state["store_config"]
        self._fs, self._pid, self.owned, self._lock = None, -1, True, threading.Lock()


class UnitReader:
    """Decodes units (row groups, projected, selected, renamed) through the cached filesystem.

    :meth:`preload` decodes units ahead, in this process, for the next read of
    each: a DataLoader worker forked afterwards inherits them (copy-on-write)
    and starts with its first window already decoded.
    """

    def __init__(self, source: ResolvedSource, fs: ProcessFileSystem) -> None:
        self.source = source
        self.fs = fs
        self._preloaded: dict[int, pa.Table] = {}

    def preload(self, units: Sequence[int], threads: int) -> None:
        """Decode ``units`` now (``threads`` at a time); the next :meth:`read` of each returns it."""
        wanted = [u for u in dict.fromkeys(units) if u not in self._preloaded]
        if not wanted:
            return
        if len(wanted) == 1 or threads <= 1:
            tables = [self._decode(u) for u in wanted]
        else:
            with ThreadPoolExecutor(max_workers=min(threads, len(wanted)), thread_name_prefix="shoal-preload") as pool:
                tables = list(pool.map(self._decode, wanted))
        self._preloaded.update(zip(wanted, tables))

    def drop_preloaded(self) -> None:
        """Forget units decoded ahead and not read (their memory is freed)."""
        self._preloaded = {}

    def keep_preloaded(self, units: Sequence[int]) -> None:
        """Forget units decoded ahead except ``units``."""
        keep = set(units)
        self._preloaded = {u: t for u, t in self._preloaded.items() if u in keep}

    def read(self, index: int) -> pa.Table:
        table = self._preloaded.pop(index, None)
        return table if table is not None else self._decode(index)

    def peek(self, index: int) -> pa.Table:
        """A unit, leaving a preloaded one preloaded (for the next :meth:`read`)."""
        table = self._preloaded.get(index)
        return table if table is not None else self._decode(index)

    def _decode(self, index: int) -> pa.Table:
        unit = self.source.units[index]
        source_file = self.source.files[unit.file]
        with open_version(self.fs.get(), source_file.version) as handle:
            parquet = pq.ParquetFile(handle, metadata=source_file.metadata)
            table = parquet.read_row_group(unit.row_group, columns=self.source.columns, use_threads=False)
        if unit.selection is not None:
            table = table.take(unit.selection)
        return table.rename_columns(self.source.names)

    def __getstate__(self) -> dict[str, Any]:
        return {"source": self.source, "fs": self.fs, "_preloaded": {}}  # a spawned worker reads for itself


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_END = object()


class BatchStream:
    """Batches of one lane of a schedule, produced by a background thread.

    The thread reads the next window's row groups while it converts and queues
    the current window's batches (at most ``prefetch`` ahead); ``close()`` (or
    garbage collection) stops it.  ``on_batch`` is called as each batch is
    handed to the consumer (progress for ``state_dict``)."""

    def __init__(self, plan: EpochPlan, items: Sequence[Item], reader: UnitReader, schema: pa.Schema, *,
                 prefetch: int, read_threads: int, convert: Callable[[pa.RecordBatch], Any] | None = None,
                 on_batch: Callable[[], None] | None = None, on_end: Callable[[], None] | None = None) -> None:
        self.plan, self.items, self.reader, self.schema = plan, list(items), reader, schema
        self.convert = convert
        self.on_batch, self.on_end = on_batch, on_end
        self.read_threads = max(1, read_threads)
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, prefetch))
        self._stop = threading.Event()
        self._finished = False
        self._thread = threading.Thread(target=self._produce, name="shoal-loader", daemon=True)
        self._thread.start()

    # -- producer ---------------------------------------------------------------------

    def _put(self, value: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        pool = ThreadPoolExecutor(max_workers=self.read_threads, thread_name_prefix="shoal-loader-read")
        units: dict[int, Future[pa.Table]] = {}

        def request(item: Item | None) -> list[Any]:
            if item is None:
                return []
            offset, rows = item_rows(self.plan, item)
            pieces = self.plan.pieces(item.start + offset, rows)
            for piece in pieces:
                if piece.unit not in units:
                    units[piece.unit] = pool.submit(self.reader.read, piece.unit)
            return pieces

        try:
            upcoming = request(self.items[0] if self.items else None)
            for position, item in enumerate(self.items):
                window = self._window(upcoming, units)
                if self._stop.is_set():
                    return
                following = self.items[position + 1] if position + 1 < len(self.items) else None
                upcoming = []
                order = self.plan.permutation(item.start, item.rows)
                for number in range(item.b0, item.b1):
                    batch = cut_batch(self.plan, item, number, window, order, self.schema)
                    if not self._put(batch if self.convert is None else self.convert(batch)):
                        return
                    if number == item.b0:
                        # The next window is read while this one's batches are handed out; asked
                        # for only now, so that the first window had every read thread and this
                        # window's first batch the CPU (time to first batch).
                        upcoming = self._request_next(request, following, units)
                if item.b1 <= item.b0:
                    upcoming = self._request_next(request, following, units)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self._put(_Failure(exc))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            self._put(_END)

    @staticmethod
    def _request_next(request: Callable[[Item | None], list[Any]], item: Item | None,
                      units: dict[int, Future[pa.Table]]) -> list[Any]:
        """Ask for ``item``'s units and forget those of windows already assembled."""
        pieces = request(item)
        needed = {piece.unit for piece in pieces}
        for unit in [u for u in units if u not in needed]:
            del units[unit]
        return pieces

    def _window(self, pieces: Sequence[Any], units: Mapping[int, Future[pa.Table]]) -> pa.Table:
        parts = [units[p.unit].result().slice(p.lo, p.hi - p.lo) for p in pieces]
        if not parts:
            return self.schema.empty_table()
        # One copy into contiguous arrays: taking rows of a chunked table concatenates it for every batch.
        return pa.concat_tables(parts).combine_chunks() if len(parts) > 1 else parts[0]

    # -- consumer ---------------------------------------------------------------------

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> Any:
        if self._finished:
            raise StopIteration
        value = self._queue.get()
        if value is _END or isinstance(value, _Failure):
            self._finish()
            if isinstance(value, _Failure):
                raise value.exc
            raise StopIteration
        if self.on_batch is not None:
            self.on_batch()
        return value

    def _finish(self) -> None:
        self._finished = True
        self._thread.join()
        if self.on_end is not None:
            self.on_end()

    def close(self) -> None:
        """Stop the producer (an abandoned iteration)."""
        if self._finished:
            return
        self._stop.set()
        self._finished = True
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.1)
            except queue.Empty:
                pass

    def __del__(self) -> None:
        self._stop.set()


def cut_batch(plan: EpochPlan, item: Item, number: int, window: pa.Table, order: Any,
              schema: pa.Schema) -> pa.RecordBatch:
    """Batch ``number`` of an item, from its window (the rows :func:`item_rows` names)
    and the window's permutation (``plan.permutation``; None: in order)."""
    lo, hi = plan.batch_rows(item, number)
    if hi <= lo:
        return empty_batch(schema)
    if order is None:
        offset = item_rows(plan, item)[0]
        return _record_batch(window.slice(lo - offset, hi - lo))
    return _record_batch(window.take(order[lo:hi]))


def _record_batch(table: pa.Table) -> pa.RecordBatch:
    batches = table.to_batches()
    if len(batches) == 1:
        return batches[0]
    return table.combine_chunks().to_batches()[0] if table.num_rows else empty_batch(table.schema)
