"""PyTorch datasets over Parquet in object storage, read through Shoal's cache.

>>> from shoal.engine.torch import ShoalDataset, ShoalDataLoader
>>> ds = ShoalDataset("s3://data/train/*.parquet", batch_size=256,        # doctest: +SKIP
...                   columns=["tokens", "label"], shuffle=True, seed=1)
>>> loader = ShoalDataLoader(ds, num_workers=4)                             # doctest: +SKIP
>>> for epoch in range(3):                                                  # doctest: +SKIP
...     ds.set_epoch(epoch)
...     for batch in loader:
...         batch["tokens"], batch["tokens_lengths"], batch["label"]
...         state = loader.state_dict()        # resume exactly from here later

* :class:`ShoalDataset`: an ``IterableDataset`` yielding whole batches (dicts of
  tensors), sharded over ``torch.distributed`` ranks and DataLoader workers.
* :class:`ShoalDataLoader`: a ``DataLoader`` for it (``batch_size=None``,
  ``in_order=True``) that counts the batches it hands out, so that
  ``state_dict()`` is exact with worker processes.
* :class:`ShoalMapDataset`: random access by row index, for samplers.
* :func:`arrow_to_torch` / :func:`collate`: how Arrow columns become tensors.

How columns become batch values (:func:`arrow_to_torch`):

=================================  ==================================================
Arrow type                         batch value
=================================  ==================================================
integers, floats (no nulls)        1-D tensor sharing the Arrow buffer (DLPack, no copy)
floats with nulls                  1-D tensor, nulls as NaN (a copy)
integers with nulls                error (filter or ``COALESCE`` them, or ``collate=``)
bool                               bool tensor (a copy: Arrow packs bits)
timestamp, date, time, duration    int64 (or int32) tensor of the stored unit
fixed_size_list<numeric>           2-D tensor ``(rows, size)`` (nested: 3-D, ...), no copy
list<numeric>, large_list          padded 2-D tensor ``name`` (``pad_value``) plus
                                   ``name + "_lengths"`` (int64)
binary, string (and large_*)       list of ``bytes`` / ``str``, for ``transform``
anything else (struct, map, ...)   list of Python objects (``to_pylist``)
=================================  ==================================================

Tensors may share memory with Arrow buffers that no one else uses; treat
them as read-only.  torch is imported by this module only; ``import
shoal.engine`` never imports it.
"""

from __future__ import annotations

import inspect
import logging
import multiprocessing
import multiprocessing.context
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

try:
    import torch
    from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
except ImportError as exc:  # pragma: no cover - exercised only without torch
    raise ImportError("shoal.engine.torch needs PyTorch: pip install 'shoal[torch]' (or pip install torch)") from exc

from shoal.cache import CacheConfig, StoreConfig

from .loader import BatchLoader, BatchStream, LoaderError, LoaderSchemaError, LoaderStateError

__all__ = ["ShoalDataset", "ShoalDataLoader", "ShoalMapDataset", "arrow_to_torch", "collate",
           "LoaderError", "LoaderSchemaError", "LoaderStateError"]

logger = logging.getLogger(__name__)

Convert = Callable[[pa.RecordBatch], Any]


# -- Arrow -> tensors --------------------------------------------------------------------


def _numeric(name: str, array: pa.Array) -> torch.Tensor:
    if array.null_count:
        if pa.types.is_floating(array.type):
            array = array.fill_null(float("nan"))
        else:
            raise LoaderSchemaError(
                f"column {name!r} has null values: filter them (WHERE {name} IS NOT NULL), fill them "
                "(COALESCE) in a SQL source, or convert batches yourself with collate=")
    if len(array) == 0:
        return torch.from_numpy(np.empty(0, dtype=array.type.to_pandas_dtype()))
    return torch.from_dlpack(array)


def _fixed_values(name: str, array: pa.Array) -> torch.Tensor | None:
    """A tensor of shape (rows, size, ...) for (nested) fixed-size lists of numbers, else None."""
    if array.null_count:
        raise LoaderSchemaError(f"column {name!r} has null lists; filter them or use collate=")
    size = array.type.list_size
    values = array.flatten()
    if pa.types.is_fixed_size_list(values.type):
        inner = _fixed_values(name, values)
    elif pa.types.is_integer(values.type) or pa.types.is_floating(values.type):
        inner = _numeric(name, values)
    elif pa.types.is_boolean(values.type):
        inner = torch.from_numpy(values.to_numpy(zero_copy_only=False))
    else:
        return None
    if inner is None:
        return None
    return inner.reshape(len(array), size, *inner.shape[1:])


def _padded(name: str, array: pa.Array, pad_value: float | int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(rows x longest) padded values and the lengths, for lists of numbers; else None."""
    value_type = array.type.value_type
    if not (pa.types.is_integer(value_type) or pa.types.is_floating(value_type) or pa.types.is_boolean(value_type)):
        return None
    lengths = pc.list_value_length(array).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    values = array.flatten()
    if values.null_count:
        raise LoaderSchemaError(f"column {name!r} has null values inside lists; use collate=")
    flat = values.to_numpy(zero_copy_only=False)
    longest = int(lengths.max()) if len(lengths) else 0
    out = np.full((len(lengths), longest), pad_value, dtype=flat.dtype)
    out[np.arange(longest) < lengths[:, None]] = flat
    return torch.from_numpy(out), torch.from_numpy(lengths)


def arrow_to_torch(batch: pa.RecordBatch | pa.Table, *, pad_value: float | int = 0) -> dict[str, Any]:
    """A dict of tensors (and lists, for binary and other columns) from an Arrow batch."""
    out: dict[str, Any] = {}
    for name, column in zip(batch.column_names, batch.columns):
        array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        kind = array.type
        if pa.types.is_dictionary(kind):
            array = array.dictionary_decode()
            kind = array.type
        if pa.types.is_integer(kind) or pa.types.is_floating(kind):
            out[name] = _numeric(name, array)
        elif pa.types.is_boolean(kind):
            if array.null_count:
                raise LoaderSchemaError(f"column {name!r} has null values; filter them or use collate=")
            out[name] = torch.from_numpy(array.to_numpy(zero_copy_only=False))
        elif pa.types.is_temporal(kind):
            width = kind.bit_width
            out[name] = _numeric(name, array.view(pa.int64() if width == 64 else pa.int32()))
        elif pa.types.is_fixed_size_list(kind) and (value := _fixed_values(name, array)) is not None:
            out[name] = value
        elif (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and \
                (padded := _padded(name, array, pad_value)) is not None:
            out[name], out[f"{name}_lengths"] = padded
        else:
            out[name] = array.to_pylist()
    return out


def collate(samples: Sequence[Mapping[str, Any]], *, pad_value: float | int = 0) -> dict[str, Any]:
    """Samples (dicts, as :class:`ShoalMapDataset` returns them) into one batch: equal-shaped
    tensors stacked, 1-D tensors of different lengths padded (plus ``name_lengths``),
    anything else as a list."""
    if not samples:
        return {}
    out: dict[str, Any] = {}
    for key in samples[0]:
        values = [sample[key] for sample in samples]
        if all(isinstance(v, torch.Tensor) for v in values):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) == 1:
                out[key] = torch.stack(values)
                continue
            if all(v.dim() == 1 for v in values):
                lengths = torch.tensor([len(v) for v in values], dtype=torch.int64)
                padded = torch.full((len(values), int(lengths.max())), pad_value, dtype=values[0].dtype)
                for row, value in enumerate(values):
                    padded[row, : len(value)] = value
                out[key], out[f"{key}_lengths"] = padded, lengths
                continue
        out[key] = values
    return out


# -- shared between the main process and its DataLoader workers ---------------------------


class _Shared:
    """Epoch and state generation in shared memory: persistent DataLoader workers keep
    the dataset copy they started with, so ``set_epoch`` reaches them through here."""

    EPOCH, GENERATION, WORKER_STARTS = range(3)

    def __init__(self, epoch: int = 0, generation: int = 0) -> None:
        self.values = multiprocessing.RawArray("q", 3)
        self.values[self.EPOCH], self.values[self.GENERATION] = epoch, generation

    def __getstate__(self) -> dict[str, Any]:
        if multiprocessing.context.get_spawning_popen() is not None:  # a worker being started: share
            return {"values": self.values}
        return {"copy": list(self.values)}  # any other pickle: a detached copy

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "values" in state:
            self.values = state["values"]
        else:
            self.values = multiprocessing.RawArray("q", 3)
            self.values[:] = state["copy"]


def _remainder(remainder: str | None, drop_last: bool | None) -> str:
    if drop_last is not None and remainder is not None and remainder != ("drop" if drop_last else "partial"):
        raise LoaderError(f"drop_last={drop_last} contradicts remainder={remainder!r}")
    if remainder is not None:
        return remainder
    return "drop" if drop_last else "partial"


class ShoalDataset(IterableDataset):
    """Batches (dicts of tensors) from a Parquet source in object storage.

    Parameters
    ----------
    source:
        URL, glob or prefix of Parquet files (``"s3://bucket/train/*.parquet"``,
        ``"s3://bucket/train/"``), a table registered in ``session``, or a SQL query.
        A query that only selects columns of one table, with any WHERE clause
        (``SELECT tokens, label FROM 's3://b/t/*.parquet' WHERE split = 'train'``),
        streams that table: only the selected columns, and only row groups with
        matching rows, are read; the filter is evaluated once, at construction,
        over the filter columns.  Any other query (joins, aggregates,
        expressions, ORDER BY, LIMIT) runs once in DuckDB and is streamed into a
        local Parquet file (bounded memory) that the dataset then reads; it is
        reused while the query's input files are unchanged.
    batch_size:
        Rows per batch; batching happens here (use ``ShoalDataLoader`` or
        ``DataLoader(ds, batch_size=None)``).
    columns:
        Columns to load (default: all; for a query, among its result columns).
    shuffle:
        Shuffle each epoch: row-group order over the whole source, then rows
        within a window of ``shuffle_buffer`` rows.  Deterministic in
        ``(seed, epoch)``.  Without it, rows come in file order (per worker).
    seed:
        Shuffle seed; use the same on every rank.
    shuffle_buffer:
        Rows per shuffle window, rounded up to a multiple of ``batch_size``
        (default: about two row groups, at most 64 MiB decoded).  Quality: a row
        lands uniformly anywhere in its window; rows of one row group stay within
        one window (``shuffle_buffer`` consecutive rows of the rank's stream),
        while the windows themselves hold row groups from all over the source.
        :func:`shoal.engine.loader_plan.shuffle_quality` measures it; on 1M rows in
        8192-row row groups with the default 16384-row window: mean displacement
        0.30 of the epoch (uniform shuffle: 0.33), a batch of 256 holds rows of
        about 3 row groups (uniform: about 110), and two rows adjacent in a file
        share a batch with probability 1.6% (uniform: 0.03%).  Raise
        ``shuffle_buffer`` or write smaller row groups to mix more.
        Memory: about two windows per stream.
    remainder:
        What happens to rows that do not fill ``world_size * batch_size``:
        ``"partial"`` (default: every row exactly once; each rank's last batch
        may be short, or even empty when fewer rows than ranks remain),
        ``"drop"`` (full batches only; up to ``world_size * batch_size - 1`` rows
        are skipped this epoch, different ones each epoch when shuffling),
        ``"pad"`` (full batches only; rows from the start of the epoch repeat).
        Every rank always gets the same number of batches.
    drop_last:
        Shorthand: ``True`` is ``remainder="drop"``, ``False`` is ``"partial"``.
    rank, world_size:
        This process's shard (both or neither).  Default: from ``torch.distributed``
        when it is initialised, else a single process.
    session:
        A :class:`~shoal.engine.Session` whose catalog (table names, for SQL),
        filesystem and cache are used.
    cache, store:
        :class:`~shoal.cache.CacheConfig` / :class:`~shoal.cache.StoreConfig`
        without a session (default: ``SHOAL_CACHE_*`` / ``AWS_*`` environment).
        DataLoader workers open their own filesystem on the same cache directory.
    prefetch:
        Batches converted ahead by the background thread of each stream (in each
        worker): reading and decoding overlap the training step.
    read_threads:
        Row groups read and decoded concurrently per stream.
    transform:
        ``transform(batch_dict) -> anything``, applied to each batch in the
        worker (e.g. decode images from the ``bytes`` of a binary column); see
        :class:`ShoalDataLoader` for the first batch of an epoch.
    collate:
        ``collate(pyarrow.RecordBatch) -> anything``: replaces the Arrow-to-tensor
        conversion (``transform`` then applies to its result).
    pad_value:
        Padding of variable-length list columns.
    materialize_dir:
        Where general queries are materialized (default: ``loader-results`` in the
        cache directory).

    Resuming: :meth:`state_dict` / :meth:`load_state_dict` (and the same on
    :class:`ShoalDataLoader`).  A state continues the epoch exactly, with the same
    or another number of DataLoader workers (with the same number, the batches
    come in the very order the interrupted run would have produced).  After a
    change of world size, load the list of *all* ranks' states (gathered with
    ``torch.distributed.all_gather_object``) on every rank: the rest of the epoch
    is shared out anew, every remaining row exactly once, equal batch counts per
    rank (the remainder policy settles a leftover of fewer batches than ranks).
    A single rank's state with another world size is refused.
    """

    def __init__(self, source: str, *, batch_size: int, columns: Sequence[str] | None = None,
                 shuffle: bool = False, seed: int = 0, shuffle_buffer: int | None = None,
                 remainder: str | None = None, drop_last: bool | None = None, rank: int | None = None,
                 world_size: int | None = None, session: Any = None, cache: CacheConfig | None = None,
                 store: StoreConfig | None = None, prefetch: int = 4, read_threads: int = 4,
                 transform: Callable[[dict[str, Any]], Any] | None = None, collate: Convert | None = None,
                 pad_value: float | int = 0, materialize_dir: str | Path | None = None) -> None:
        super().__init__()
        if (rank is None) != (world_size is None):
            raise LoaderError("give both rank and world_size, or neither (then torch.distributed decides)")
        self._explicit = (rank, world_size) if rank is not None else None
        first_rank, first_world = self._distributed()
        self.loader = BatchLoader(source, batch_size=batch_size, columns=columns, shuffle=shuffle, seed=seed,
                                  shuffle_buffer=shuffle_buffer, remainder=_remainder(remainder, drop_last),
                                  rank=first_rank, world_size=first_world, session=session, cache=cache,
                                  store=store, prefetch=prefetch, read_threads=read_threads,
                                  materialize_dir=materialize_dir)
        self.transform, self.collate, self.pad_value = transform, collate, pad_value
        self._shared = _Shared()
        self._generation = 0
        self._tracked = False

    # -- shard ------------------------------------------------------------------------

    def _distributed(self) -> tuple[int, int]:
        if self._explicit is not None:
            return self._explicit  # type: ignore[return-value]
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def _sync(self) -> None:
        """Main process: follow torch.distributed (it may be initialised after construction)."""
        rank, world = self._distributed()
        if (rank, world) != (self.loader.rank, self.loader.world_size):
            BatchLoader._check_shard(rank, world)
            self.loader.rank, self.loader.world_size = rank, world

    # -- public -----------------------------------------------------------------------

    @property
    def schema(self) -> pa.Schema:
        return self.loader.schema

    @property
    def num_rows(self) -> int:
        return self.loader.num_rows

    @property
    def epoch(self) -> int:
        return self.loader.epoch

    def set_epoch(self, epoch: int) -> None:
        """The epoch to iterate next (its shuffle); reaches persistent workers too."""
        self.loader.set_epoch(epoch)
        self._shared.values[_Shared.EPOCH] = self.loader.epoch

    def __len__(self) -> int:
        """Batches per rank and epoch."""
        self._sync()
        return self.loader.num_batches()

    def _convert(self, batch: pa.RecordBatch) -> Any:
        out = self.collate(batch) if self.collate is not None else arrow_to_torch(batch, pad_value=self.pad_value)
        return self.transform(out) if self.transform is not None else out

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        if info is None:  # the main process iterates itself (num_workers=0)
            self._sync()
            schedule = self.loader.begin(1)
            return self.loader.stream(schedule.lanes[0], convert=self._convert, on_batch=self.loader.note_delivered)
        shared = self._shared.values
        if shared[_Shared.GENERATION] != self._generation:
            raise LoaderStateError("load_state_dict() was called after persistent DataLoader workers started; "
                                   "use ShoalDataLoader (it restarts them) or persistent_workers=False")
        shared[_Shared.WORKER_STARTS] += 1
        self.loader.set_epoch(shared[_Shared.EPOCH])
        schedule = self.loader.schedule(info.num_workers)
        # A window decoded by the parent before the fork (ShoalDataLoader): kept by the worker that reads it first.
        self.loader.reader.keep_preloaded(self.loader.first_units(schedule, info.id))
        return self.loader.stream(schedule.lanes[info.id], convert=self._convert)

    def state_dict(self) -> dict[str, Any]:
        """This rank's position in the epoch (plain data)."""
        if self._shared.values[_Shared.WORKER_STARTS] and not self._tracked:
            raise LoaderStateError("this dataset is iterated by DataLoader worker processes, where the batches "
                                   "handed to the training loop cannot be counted: use ShoalDataLoader")
        self._sync()
        return self.loader.state_dict()

    def load_state_dict(self, state: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> None:
        """Resume from :meth:`state_dict` (or from the list of all ranks' states)."""
        self._sync()
        self.loader.load_state_dict(state)
        self._generation += 1
        self._shared.values[_Shared.GENERATION] = self._generation
        self._shared.values[_Shared.EPOCH] = self.loader.epoch

    def close(self) -> None:
        self.loader.close()

    def __repr__(self) -> str:
        return f"ShoalDataset({self.loader!r})"


def _identity(batch: Any) -> Any:
    return batch


class ShoalDataLoader(DataLoader):
    """A DataLoader for :class:`ShoalDataset` that can checkpoint with worker processes.

    It fixes ``batch_size=None`` (the dataset batches), ``in_order=True`` (the
    round-robin order the resume logic relies on) and an identity collate, and
    counts the batches it hands to the training loop, which is what
    :meth:`state_dict` needs when ``num_workers > 0``.

    Time to first batch: when an iteration starts worker processes (every
    epoch, unless ``persistent_workers`` keeps them), the epoch's first batch is
    made in the main process, from a window decoded there (while the store was
    listed, or now), and handed out while the workers start; they continue after
    it in the same order, and forked ones inherit the decoded window.  So
    ``transform`` / ``collate`` run in the main process for that one batch
    (with ``pin_memory`` the workers make it, as usual).  Other arguments are
    DataLoader's (``num_workers``, ``pin_memory``, ``prefetch_factor``,
    ``persistent_workers``, ``multiprocessing_context``, ``worker_init_fn``,
    ``timeout``, ``pin_memory_device``).
    """

    def __init__(self, dataset: ShoalDataset, **kwargs: Any) -> None:
        if not isinstance(dataset, ShoalDataset):
            raise TypeError("ShoalDataLoader needs a ShoalDataset")
        fixed = {"batch_size", "batch_sampler", "sampler", "shuffle", "drop_last", "collate_fn", "in_order"}
        given = fixed & set(kwargs)
        if given:
            raise TypeError(f"ShoalDataLoader sets {', '.join(sorted(given))} itself (batching, shuffling and "
                            "dropping are the dataset's options)")
        if "in_order" in inspect.signature(DataLoader.__init__).parameters:  # torch >= 2.6; before, always in order
            kwargs["in_order"] = True
        super().__init__(dataset, batch_size=None, collate_fn=_identity, **kwargs)
        self._workers_generation: int | None = None

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        dataset: ShoalDataset = self.dataset  # type: ignore[assignment]
        if self.num_workers == 0:
            yield from super().__iter__()  # the dataset runs here and counts what it yields
            return
        dataset._sync()
        dataset._tracked = True
        if self._iterator is not None and self._workers_generation != dataset._generation:
            self._iterator._shutdown_workers()  # persistent workers hold a stale state
            self._iterator = None
        loader = dataset.loader
        schedule = loader.begin(self.num_workers, consume=False)
        first = None
        if self._starts_workers() and not self.pin_memory:
            # Time to first batch: the first batch is made here, from its window decoded here
            # (during construction, or now), while the workers start; they continue after it
            # (round robin, rotated: the order is the same) and the one continuing lane 0
            # inherits the window when forked.
            loader.preload(schedule)
            batch = loader.first_batch(schedule)
            first = None if batch is None else dataset._convert(batch)
        loader.before_fork()
        try:
            with loader.workers_continue(schedule, 1 if first is not None else 0):
                iterator = super().__iter__()  # workers start here, with the resume state still pending
        finally:
            loader.drop_preloaded()
        self._workers_generation = dataset._generation
        loader.consume_resume()
        if first is not None:
            loader.note_delivered()
            yield first
        for batch in iterator:
            loader.note_delivered()
            yield batch

    def _starts_workers(self) -> bool:
        """Whether the next ``iter()`` starts worker processes (not persistent ones reused)."""
        return not (self.persistent_workers and self._iterator is not None)

    def state_dict(self) -> dict[str, Any]:
        return self.dataset.state_dict()  # type: ignore[attr-defined]

    def load_state_dict(self, state: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> None:
        self.dataset.load_state_dict(state)  # type: ignore[attr-defined]


class ShoalMapDataset(Dataset):
    """Random access by row index (for samplers): ``ds[i]`` is one row as a dict.

    Rows are numbered in the source's order (files sorted by URL, row groups in
    file order, the filtered rows of a query).  A row's whole row group is read
    and decoded, then kept in a per-process LRU of ``cache_bytes``; random access
    over more data than that decodes row groups again (the bytes come from the
    SSD cache).  ``__getitems__`` serves a DataLoader's batch of indices with
    one read per row group; :meth:`get_batch` returns a batch directly as
    :func:`arrow_to_torch` does.  Per-row values: numbers as 0-d tensors, lists
    as 1-D tensors (unpadded; use ``collate_fn=shoal.engine.torch.collate`` to
    pad them), binary and strings as ``bytes`` / ``str``.  ``transform`` applies
    to each row; ``pad_value`` pads list columns in :meth:`get_batch`.
    ``source``, ``columns``, ``session``, ``cache``, ``store`` and
    ``materialize_dir`` are as for :class:`ShoalDataset`.
    """

    def __init__(self, source: str, *, columns: Sequence[str] | None = None, session: Any = None,
                 cache: CacheConfig | None = None, store: StoreConfig | None = None,
                 transform: Callable[[dict[str, Any]], Any] | None = None, pad_value: float | int = 0,
                 cache_bytes: int = 256 << 20, materialize_dir: str | Path | None = None) -> None:
        self.loader = BatchLoader(source, batch_size=1, columns=columns, session=session, cache=cache, store=store,
                                  materialize_dir=materialize_dir, preload_first=False)
        self.transform, self.pad_value, self.cache_bytes = transform, pad_value, cache_bytes
        self._offsets = np.concatenate([[0], np.cumsum(self.loader.source.counts)]).astype(np.int64)
        self._lru: OrderedDict[int, pa.Table] = OrderedDict()
        self._lru_bytes = 0

    @property
    def schema(self) -> pa.Schema:
        return self.loader.schema

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def _unit(self, index: int) -> pa.Table:
        table = self._lru.get(index)
        if table is not None:
            self._lru.move_to_end(index)
            return table
        table = self.loader.reader.read(index)
        self._lru[index] = table
        self._lru_bytes += table.nbytes
        while self._lru_bytes > self.cache_bytes and len(self._lru) > 1:
            _, dropped = self._lru.popitem(last=False)
            self._lru_bytes -= dropped.nbytes
        return table

    def rows(self, indices: Sequence[int] | np.ndarray) -> pa.Table:
        """The rows at ``indices`` (negative counts from the end), in that order, as Arrow."""
        wanted = np.asarray(indices, dtype=np.int64).reshape(-1)
        total = len(self)
        wanted = np.where(wanted < 0, wanted + total, wanted)
        if len(wanted) and (wanted.min() < 0 or wanted.max() >= total):
            raise IndexError(f"row index out of range for a dataset of {total} rows")
        if not len(wanted):
            return self.schema.empty_table()
        units = np.searchsorted(self._offsets, wanted, side="right") - 1
        order = np.argsort(units, kind="stable")
        parts = []
        for unit in np.unique(units):
            picked = wanted[units == unit] - self._offsets[unit]
            parts.append(self._unit(int(unit)).take(pa.array(picked)))
        grouped = pa.concat_tables(parts).combine_chunks()
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return grouped.take(pa.array(inverse))

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> dict[str, Any]:
        """The rows at ``indices`` as one batch (the conversion of :class:`ShoalDataset`)."""
        return arrow_to_torch(self.rows(indices), pad_value=self.pad_value)

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        table = self.rows(indices)
        batch = arrow_to_torch(table, pad_value=self.pad_value)
        samples = []
        for row in range(table.num_rows):
            sample: dict[str, Any] = {}
            for name in table.column_names:
                value = batch[name]
                if f"{name}_lengths" in batch and isinstance(value, torch.Tensor):
                    sample[name] = value[row, : int(batch[f"{name}_lengths"][row])]
                else:
                    sample[name] = value[row]
            samples.append(self.transform(sample) if self.transform is not None else sample)
        return samples

    def __getitem__(self, index: int) -> Any:
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"row index must be an integer, got {type(index).__name__}")
        return self.__getitems__([int(index)])[0]

    def close(self) -> None:
        self.loader.close()

    def __repr__(self) -> str:
        return f"ShoalMapDataset({self.loader.source.description}, {len(self)} rows)"


# A stream is what ``iter(ShoalDataset)`` returns; exported for type hints.
BatchIterator = BatchStream
