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

__all__ = ["ProcessFileSystem", "UnitReader", "BatchStream", "empty_batch"]

logger = logging.getLogger(__name__)


def empty_batch(schema: pa.Schema) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays([pa.array([], type=f.type) for f in schema], schema=schema)


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
        """Wait until this process writes nothing to the cache: call before forking workers.

        SQLite (the cache's index) is not fork-safe while a connection is in a write:
        a child forked then inherits a lock that no one will release, and waits on it
        (seen: DataLoader workers stalled 60 s, then read through without the cache)."""
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
    """Decodes units (row groups, projected, selected, renamed) through the cached filesystem."""

    def __init__(self, source: ResolvedSource, fs: ProcessFileSystem) -> None:
        self.source = source
        self.fs = fs

    def read(self, index: int) -> pa.Table:
        unit = self.source.units[index]
        source_file = self.source.files[unit.file]
        with open_version(self.fs.get(), source_file.version) as handle:
            parquet = pq.ParquetFile(handle, metadata=source_file.metadata)
            table = parquet.read_row_group(unit.row_group, columns=self.source.columns, use_threads=False)
        if unit.selection is not None:
            table = table.take(unit.selection)
        return table.rename_columns(self.source.names)


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
            offset, rows = self._rows(item)
            pieces = self.plan.pieces(item.start + offset, rows)
            for piece in pieces:
                if piece.unit not in units:
                    units[piece.unit] = pool.submit(self.reader.read, piece.unit)
            return pieces

        try:
            upcoming = request(self.items[0] if self.items else None)
            for position, item in enumerate(self.items):
                pieces = upcoming
                window = self._window(pieces, units)
                if self._stop.is_set():
                    return
                # The next window is read while this one's batches are handed out; asked for
                # only now, so that the first window has every read thread (time to first batch).
                upcoming = request(self.items[position + 1] if position + 1 < len(self.items) else None)
                needed = {piece.unit for piece in upcoming}
                for unit in [u for u in units if u not in needed]:
                    del units[unit]
                order = self.plan.permutation(item.start, item.rows)
                offset = self._rows(item)[0]
                for number in range(item.b0, item.b1):
                    lo, hi = self.plan.batch_rows(item, number)
                    if hi <= lo:
                        batch = empty_batch(self.schema)
                    elif order is None:
                        batch = _record_batch(window.slice(lo - offset, hi - lo))
                    else:
                        batch = _record_batch(window.take(order[lo:hi]))
                    if not self._put(batch if self.convert is None else self.convert(batch)):
                        return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self._put(_Failure(exc))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            self._put(_END)

    def _rows(self, item: Item) -> tuple[int, int]:
        """The rows of an item's window to read: all when shuffled (a batch takes rows
        from anywhere in it), else only those of the item's batches."""
        if self.plan.shuffle:
            return 0, item.rows
        lo = min(item.b0 * self.plan.batch_size, item.rows)
        return lo, min(item.b1 * self.plan.batch_size, item.rows) - lo

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


def _record_batch(table: pa.Table) -> pa.RecordBatch:
    batches = table.to_batches()
    if len(batches) == 1:
        return batches[0]
    return table.combine_chunks().to_batches()[0] if table.num_rows else empty_batch(table.schema)
