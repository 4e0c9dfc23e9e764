"""The framework-agnostic training-data loader: Arrow batches from Parquet in object storage.

>>> from shoal.engine.loader import BatchLoader
>>> loader = BatchLoader("s3://data/train/*.parquet", batch_size=256,       # doctest: +SKIP
...                      columns=["tokens", "label"], shuffle=True, seed=1)
>>> for batch in loader:                                                   # doctest: +SKIP
...     ...                                                                # a pyarrow.RecordBatch

Sharding, shuffling and resumption are computed from the source's row
groups (:mod:`shoal.engine.loader_plan`); sources are resolved once
(:mod:`shoal.engine.loader_source`).  Reads go through Shoal's cached
filesystem: row groups are decoded by pyarrow from byte ranges served by the
memory tier, the local-SSD cache or the store, so a second epoch reads
nothing from the store.  A background thread per stream reads the next
window's row groups (on ``read_threads`` threads) while the current window's
batches are handed out, and keeps up to ``prefetch`` converted batches ready.

The PyTorch adapter is :mod:`shoal.engine.torch`.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa

from shoal.cache import CacheConfig, StoreConfig

from .errors import LoaderError, LoaderSchemaError, LoaderStateError
from .loader_plan import REMAINDER_POLICIES, EpochPlan, Item, Schedule
from .loader_source import ResolvedSource, resolve_source
from .loader_stream import BatchStream, ProcessFileSystem, UnitReader, cut_batch, empty_batch, item_rows, item_units
from .security import allowed_paths_from_env

__all__ = ["BatchLoader", "LoaderError", "LoaderSchemaError", "LoaderStateError", "UnitReader",
           "BatchStream", "empty_batch", "STATE_FORMAT"]

logger = logging.getLogger(__name__)

STATE_FORMAT = "shoal.loader/1"
#: Default shuffle buffer, in decoded bytes (rows = this / bytes per row, within the bounds below).
DEFAULT_WINDOW_BYTES = 64 << 20
DEFAULT_WINDOW_ROWS = (4096, 65536)


def _window_rows(source: ResolvedSource, batch_size: int, shuffle_buffer: int | None) -> int:
    if shuffle_buffer is not None:
        if shuffle_buffer < 1:
            raise LoaderError("shuffle_buffer must be at least 1 row")
        rows = shuffle_buffer
    else:
        # About two row groups, bounded by DEFAULT_WINDOW_BYTES of decoded data.
        units = source.units
        median = int(np.median(source.counts)) if units else 0
        lo, hi = DEFAULT_WINDOW_ROWS
        rows = min(max(2 * median, lo), hi)
        row_bytes = _row_bytes(source)
        if row_bytes:
            rows = min(rows, max(1, DEFAULT_WINDOW_BYTES // row_bytes))
    return max(batch_size, -(-rows // batch_size) * batch_size)


def _row_bytes(source: ResolvedSource) -> int:
    """Decoded bytes per row of the projected columns (from footers)."""
    total = rows = 0
    wanted = set(source.columns)
    for source_file in source.files[:8]:
        meta = source_file.metadata
        for g in range(min(meta.num_row_groups, 4)):
            group = meta.row_group(g)
            rows += group.num_rows
            for c in range(group.num_columns):
                column = group.column(c)
                if column.path_in_schema.split(".", 1)[0] in wanted:
                    total += column.total_uncompressed_size
    return total // rows if rows else 0


class BatchLoader:
    """Batches of Arrow record batches over a Parquet source, per rank and worker.

    Parameters (all keyword-only but ``source``)
    ----------
    source:
        URL, glob or prefix of Parquet files (``s3://bucket/train/*.parquet``), a
        table name registered in ``session``, or a SQL query (see
        :mod:`shoal.engine.loader_source` for what is streamed and what is
        materialized).
    batch_size:
        Rows per batch.
    columns:
        Columns to read (default: all of the source's columns).
    shuffle, seed:
        Shuffle row-group order globally and rows within a window, deterministically
        from ``(seed, epoch)``.
    shuffle_buffer:
        Rows per window (rounded up to a multiple of ``batch_size``); rows move
        only within their window.  Default: about two row groups, at most 64 MiB
        of decoded data.  Without ``shuffle`` it only sizes the unit of work.
    remainder:
        ``"partial"`` (every row exactly once; each rank's last batch may be
        short), ``"drop"`` (full batches only; leftover rows skipped) or ``"pad"``
        (full batches only; leftover filled by repeating rows from the start).
    rank, world_size:
        This process's shard of the job.
    session:
        A :class:`~shoal.engine.Session`: its catalog, filesystem and cache.
    cache, store:
        Cache and store configuration when no session is given (default: environment).
    prefetch:
        Converted batches kept ready per stream by the background thread.
    read_threads:
        Row groups decoded concurrently per stream.
    materialize_dir:
        Where results of general queries are written (default: ``loader-results``
        under the cache directory).
    preload_first:
        Read the first window of epoch 0 during construction when that overlaps
        listing the store (a URL source listed before: the remembered listing is
        used while the store confirms it), so that the first batch is ready sooner.
    """

    def __init__(self, source: str, *, batch_size: int, columns: Sequence[str] | None = None,
                 shuffle: bool = False, seed: int = 0, shuffle_buffer: int | None = None,
                 remainder: str = "partial", rank: int = 0, world_size: int = 1, session: Any = None,
                 cache: CacheConfig | None = None, store: StoreConfig | None = None, prefetch: int = 4,
                 read_threads: int = 4, materialize_dir: str | Path | None = None,
                 preload_first: bool = True) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise LoaderError(f"batch_size must be a positive integer, got {batch_size!r}")
        if remainder not in REMAINDER_POLICIES:
            raise LoaderError(f"remainder must be one of {', '.join(REMAINDER_POLICIES)}, got {remainder!r}")
        if prefetch < 1 or read_threads < 1:
            raise LoaderError("prefetch and read_threads must be at least 1")
        self.batch_size, self.shuffle, self.seed, self.remainder = batch_size, bool(shuffle), int(seed), remainder
        self.prefetch, self.read_threads = prefetch, read_threads
        self._check_shard(rank, world_size)
        self.rank, self.world_size = rank, world_size
        self._fs = ProcessFileSystem(session.fs if session is not None else None, cache, store)
        fs = self._fs.get()
        directory = Path(materialize_dir) if materialize_dir else fs.cache_config.directory / "loader-results"
        allowed = getattr(session, "allowed_paths", None) if session is not None else allowed_paths_from_env()
        self._epoch = 0
        self._resume: tuple[int, Schedule] | None = None
        self._active: tuple[int, Schedule] | None = None
        self._delivered = 0
        early: list[ResolvedSource] = []

        def while_listing(resolved: ResolvedSource) -> None:
            # Resolved from a remembered listing while the store is listed: start reading.
            self._use(resolved, shuffle_buffer)
            early.append(resolved)
            if preload_first:
                self.preload(Schedule.fresh(self.plan().windows(), 1))

        self.source = resolve_source(source, columns=columns, fs=fs, session_factory=self._session_factory(session),
                                     materialize_dir=directory, allowed_paths=allowed, while_listing=while_listing)
        if not early or early[-1] is not self.source:  # no remembered listing, or the store's differs
            self._use(self.source, shuffle_buffer)
        self._fs.flush()  # footers fetched above are written before any DataLoader forks

    def _use(self, source: ResolvedSource, shuffle_buffer: int | None) -> None:
        self.source = source
        self.window = _window_rows(source, self.batch_size, shuffle_buffer)
        self.reader = UnitReader(source, self._fs)
        self._plans: dict[tuple[int, int, int], EpochPlan] = {}

    @staticmethod
    def _check_shard(rank: int, world_size: int) -> None:
        if not isinstance(world_size, int) or world_size < 1 or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise LoaderError(f"rank must be in [0, world_size), got rank={rank!r}, world_size={world_size!r}")

    def _session_factory(self, session: Any) -> Callable[[], Any]:
        made: list[Any] = []

        def factory() -> Any:
            if session is not None:
                return session
            if not made:
                from .session import Session

                made.append(Session(fs=self._fs.get(), workers=1))
            return made[0]

        self._made_sessions = made
        return factory

    # -- properties -------------------------------------------------------------------

    @property
    def schema(self) -> pa.Schema:
        return self.source.schema

    @property
    def num_rows(self) -> int:
        """Rows of the source (after any filter), over all ranks."""
        return self.source.num_rows

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (its shuffle).  A pending resume state for another epoch is dropped."""
        epoch = int(epoch)
        if epoch != self._epoch:
            self._active = None
            self.reader.drop_preloaded()  # another epoch's first window
            if self._resume is not None and self._resume[0] != epoch:
                logger.info("set_epoch(%d) drops the resume state saved in epoch %d", epoch, self._resume[0])
                self._resume = None
        self._epoch = epoch

    def plan(self, epoch: int | None = None) -> EpochPlan:
        epoch = self._epoch if epoch is None else epoch
        key = (epoch, self.rank, self.world_size)
        if key not in self._plans:
            self._plans.clear()  # one epoch at a time
            self._plans[key] = self._plan_for(epoch, self.rank, self.world_size)
        return self._plans[key]

    def _plan_for(self, epoch: int, rank: int, world_size: int) -> EpochPlan:
        return EpochPlan(self.source.counts, epoch=epoch, seed=self.seed, shuffle=self.shuffle,
                         batch_size=self.batch_size, window=self.window, world_size=world_size, rank=rank,
                         remainder=self.remainder)

    def num_batches(self) -> int:
        """Batches per rank per epoch (the same on every rank)."""
        return self.plan().num_batches

    def __len__(self) -> int:
        return self.num_batches()

    # -- iteration --------------------------------------------------------------------

    def schedule(self, workers: int, *, consume: bool = True) -> Schedule:
        """The lanes of this epoch's iteration over ``workers`` streams (resuming if a
        state was loaded for this epoch; ``consume`` forgets that state afterwards)."""
        if self._resume is not None and self._resume[0] == self._epoch:
            schedule = self._resume[1].regroup(workers)
            if consume:
                self._resume = None
        else:
            schedule = Schedule.fresh(self.plan().windows(), workers)
        return schedule

    def first_units(self, schedule: Schedule, lane: int = 0) -> list[int]:
        """The units the first item of a lane reads."""
        items = schedule.lanes[lane] if lane < len(schedule.lanes) else ()
        return item_units(self.plan(), items[0]) if items else []

    def begin(self, workers: int, *, consume: bool = True) -> Schedule:
        """Start tracking an iteration in this process: progress for :meth:`state_dict`."""
        schedule = self.schedule(workers, consume=consume)
        self._active = (self._epoch, schedule)
        self._delivered = 0
        self.reader.keep_preloaded(self.first_units(schedule))  # only what this iteration reads first
        return schedule

    def before_fork(self) -> None:
        """Make this process safe to fork (see :meth:`ProcessFileSystem.quiesce`)."""
        self._fs.quiesce()

    def preload(self, schedule: Schedule) -> None:
        """Decode the first window of the schedule's first lane now, in this process.

        Done while the store is listed (see ``preload_first``) and before DataLoader
        workers start: this process then makes the epoch's first batch itself
        (:meth:`first_batch`) while they start, and the worker that continues the
        lane inherits the window decoded when it is forked (time to first batch).
        Forgotten with :meth:`drop_preloaded` once the workers started."""
        units = self.first_units(schedule)
        if units:
            self.reader.preload(units, self.read_threads)

    def drop_preloaded(self) -> None:
        self.reader.drop_preloaded()

    def first_batch(self, schedule: Schedule) -> pa.RecordBatch | None:
        """The schedule's first batch (lane 0's), made in this process from the units
        :meth:`preload` decoded, which stay preloaded; None when there is no batch."""
        lane = schedule.lanes[0] if schedule.lanes else ()
        if not lane:
            return None
        item, plan = lane[0], self.plan()
        offset, rows = item_rows(plan, item)
        parts = [self.reader.peek(p.unit).slice(p.lo, p.hi - p.lo) for p in plan.pieces(item.start + offset, rows)]
        # One batch's rows are taken from the pieces as they are (no copy of the whole window).
        window = pa.concat_tables(parts) if parts else self.schema.empty_table()
        return cut_batch(plan, item, item.b0, window, plan.permutation(item.start, item.rows), self.schema)

    @contextlib.contextmanager
    def workers_continue(self, schedule: Schedule, delivered: int) -> Iterator[None]:
        """While worker processes start: they continue ``schedule`` after its first ``delivered``
        batches (which this process hands out).  Call :meth:`consume_resume` once they started."""
        if not delivered:
            yield
            return
        saved = self._resume
        self._resume = (self._epoch, schedule.advance(delivered))
        try:
            yield
        except BaseException:
            self._resume = saved
            raise

    def consume_resume(self) -> None:
        if self._resume is not None and self._resume[0] == self._epoch:
            self._resume = None

    def note_delivered(self, count: int = 1) -> None:
        self._delivered += count

    def stream(self, items: Sequence[Item], *, convert: Callable[[pa.RecordBatch], Any] | None = None,
               on_batch: Callable[[], None] | None = None) -> BatchStream:
        """Batches of one lane (items of :meth:`schedule`)."""
        return BatchStream(self.plan(), items, self.reader, self.schema, prefetch=self.prefetch,
                           read_threads=self.read_threads, convert=convert, on_batch=on_batch,
                           on_end=self._fs.flush)

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        schedule = self.begin(1)
        return self.stream(schedule.lanes[0], on_batch=self.note_delivered)

    # -- state ------------------------------------------------------------------------

    def _remaining(self) -> Schedule | None:
        if self._active is not None and self._active[0] == self._epoch:
            return self._active[1].advance(self._delivered)
        if self._resume is not None and self._resume[0] == self._epoch:
            return self._resume[1]
        return None

    def state_dict(self) -> dict[str, Any]:
        """Where this rank is in the epoch: enough to continue exactly (plain data, JSON-able)."""
        remaining = self._remaining()
        total = self.num_batches()
        return {
            "format": STATE_FORMAT,
            "fingerprint": self.source.fingerprint,
            "epoch": self._epoch,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "batch_size": self.batch_size,
            "window": self.window,
            "remainder": self.remainder,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_batches": total,
            "batches_done": total - remaining.total if remaining is not None else 0,
            "lanes": remaining.to_state() if remaining is not None else None,
        }

    def load_state_dict(self, state: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> None:
        """Continue from a state: the next iteration yields exactly the batches that were still to come.

        ``state`` is this rank's state, or the list of every rank's states (from
        ``all_gather_object``), which also works after the world size changed:
        the rest of the epoch is then shared out anew (see :meth:`_reshard`)."""
        states = [state] if isinstance(state, Mapping) else list(state)
        if not states:
            raise LoaderStateError("no state given")
        for one in states:
            self._check_state(one)
        epochs = {int(s["epoch"]) for s in states}
        if len(epochs) != 1:
            raise LoaderStateError(f"states of different epochs: {sorted(epochs)}")
        epoch = epochs.pop()
        saved_world = {int(s["world_size"]) for s in states}
        if len(saved_world) != 1:
            raise LoaderStateError("states of different world sizes")
        world = saved_world.pop()
        if len(states) == 1:
            one = states[0]
            if world != self.world_size:
                raise LoaderStateError(
                    f"state saved with world_size={world}, loaded with world_size={self.world_size}: pass the list "
                    "of every rank's state (torch.distributed.all_gather_object) to reshard the rest of the epoch")
            if int(one["rank"]) != self.rank:
                raise LoaderStateError(f"state of rank {one['rank']} loaded on rank {self.rank}")
            schedule = self._saved_schedule(one, epoch)
        else:
            by_rank = {int(s["rank"]): s for s in states}
            if sorted(by_rank) != list(range(world)):
                raise LoaderStateError(f"need the states of all {world} ranks, got ranks {sorted(by_rank)}")
            if world == self.world_size:
                schedule = self._saved_schedule(by_rank[self.rank], epoch)
            else:
                schedule = self._reshard([self._saved_schedule(by_rank[r], epoch, rank=r, world=world)
                                          for r in range(world)], epoch)
        self._epoch = epoch
        self._resume = (epoch, schedule)
        self._active = None
        self._delivered = 0

    def _check_state(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            raise LoaderStateError(f"not a Shoal loader state (expected format {STATE_FORMAT!r})")
        if state["fingerprint"] != self.source.fingerprint:
            raise LoaderStateError("the state was saved for other data (files, row groups, filter or columns differ)")
        for key in ("seed", "shuffle", "batch_size", "window", "remainder"):
            if state[key] != getattr(self, key):
                raise LoaderStateError(f"the state was saved with {key}={state[key]!r}, this loader has "
                                       f"{key}={getattr(self, key)!r}")

    def _saved_schedule(self, state: Mapping[str, Any], epoch: int, *, rank: int | None = None,
                        world: int | None = None) -> Schedule:
        if state["lanes"] is not None:
            return Schedule.from_state(state["lanes"])
        rank = self.rank if rank is None else rank
        world = self.world_size if world is None else world
        return Schedule.fresh(self._plan_for(epoch, rank, world).windows(), 1)

    def _reshard(self, remaining: Sequence[Schedule], epoch: int) -> Schedule:
        """This rank's share of every old rank's remaining batches after a world-size change.

        Items describe their windows completely, so any rank can read any of them.
        All remaining batches, in stream order, are cut into ``world_size`` runs of
        equal length; when they do not divide evenly the remainder policy decides:
        ``drop`` leaves out the last few batches, ``pad`` repeats the first batches,
        ``partial`` gives the short ranks one empty batch."""
        items = sorted((item for schedule in remaining for lane in schedule.lanes for item in lane),
                       key=lambda it: (it.start, it.b0))
        singles = [item._replace(b0=b, b1=b + 1) for item in items for b in range(item.b0, item.b1)]
        world, total = self.world_size, len(singles)
        share, extra = divmod(total, world)
        if self.remainder == "drop" or not extra:
            mine = singles[self.rank * share:(self.rank + 1) * share]
        else:
            begin = self.rank * share + min(self.rank, extra)
            mine = singles[begin:begin + share + (self.rank < extra)]
            if self.rank >= extra:  # one batch short of the others
                if self.remainder == "pad":
                    mine.append(singles[self.rank - extra])
                else:
                    mine.append(Item(self._plan_for(epoch, self.rank, world).total, 0, 0, 1))
        return Schedule(((*mine,),))

    def close(self) -> None:
        for session in self._made_sessions:
            session.executor.close()
            session.planner.close()
        self._made_sessions.clear()
        self.reader.drop_preloaded()
        self._fs.close()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_made_sessions"] = []
        state["_plans"] = {}
        return state

    def __enter__(self) -> "BatchLoader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"BatchLoader({self.source.description}, {self.num_rows} rows in {len(self.source.units)} row groups, "
                f"batch_size={self.batch_size}, shuffle={self.shuffle}, window={self.window}, "
                f"rank={self.rank}/{self.world_size})")
