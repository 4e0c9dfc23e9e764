"""The scan side of a query, as run by a stateless worker.

A :class:`ScanTask` carries everything a worker needs (files at pinned
versions, columns, filter); the worker reads through its cached filesystem,
runs projection and filter in DuckDB, and returns Arrow.  Nothing survives
the task except cache contents, which are keyed by object version.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Sequence

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from shoal.cache import ObjectVersion, ShoalFileSystem

from .aggregate import PartialAggregate
from .planner import Fragment, TableScan, parquet_source, quote_ident
from .security import lock_down

__all__ = ["ScanTask", "ScanResult", "run_scan_task", "tasks_for"]


@dataclass(frozen=True)
class ScanTask:
    """One fragment of one table's scan."""

    table: str
    fragment: int
    files: tuple[ObjectVersion, ...]
    row_groups: tuple[int, ...] | None
    columns: tuple[str, ...]
    filter: str | None
    hive: bool
    threads: int = 1
    #: Partial aggregation: the select list, GROUP BY and exact WHERE to run
    #: instead of the projection and pushed filter (engine/aggregate.py).
    aggregate: tuple[str, str | None, str | None, str] | None = None
    #: Local directories SQL may read (None: unrestricted); see engine/security.py.
    allowed_paths: tuple[str, ...] | None = None


@dataclass(frozen=True)
class ScanResult:
    task: ScanTask
    table: pa.Table
    seconds: float
    worker: str


def tasks_for(scans: dict[str, TableScan], *, threads: int, partial: PartialAggregate | None = None,
              allowed_paths: tuple[str, ...] | None = None) -> list[ScanTask]:
    """The tasks of a plan, largest first (so stragglers start early)."""
    aggregate = (partial.worker_select, partial.worker_group_by, partial.where, partial.source_alias) if partial else None
    tasks = [
        ScanTask(table=name, fragment=f.index, files=f.files, row_groups=f.row_groups,
                 columns=tuple(scan.columns), filter=scan.filter, hive=scan.table.hive, threads=threads,
                 aggregate=aggregate, allowed_paths=allowed_paths)
        for name, scan in scans.items()
        for f in scan.fragments
    ]
    sizes = {(f.table, f.index): f.size for s in scans.values() for f in s.fragments}
    return sorted(tasks, key=lambda t: -sizes[(t.table, t.fragment)])


_local = threading.local()


def _connection(fs: ShoalFileSystem, threads: int, allowed_paths: tuple[str, ...] | None = None
                ) -> duckdb.DuckDBPyConnection:
    # One connection per worker thread, reused across tasks: it holds no query
    # state (no tables, DuckDB's external file cache off), only the registered fs.
    key = (id(fs), os.getpid(), allowed_paths)
    con = getattr(_local, "con", None)
    if con is None or getattr(_local, "key", None) != key:
        con = duckdb.connect()
        con.register_filesystem(fs)
        con.execute("SET enable_external_file_cache=false")
        lock_down(con, allowed_paths, fs.protocol)
        _local.con, _local.key, _local.threads = con, key, None
    if _local.threads != threads:
        con.execute(f"SET threads={max(1, threads)}")
        _local.threads = threads
    return con


def run_scan_task(task: ScanTask, fs: ShoalFileSystem) -> ScanResult:
    """Run one fragment: read, project, filter; return Arrow."""
    started = time.perf_counter()
    for version in task.files:
        fs.pin(version)
    con = _connection(fs, task.threads, task.allowed_paths)
    if task.aggregate is not None:
        select, group_by, where_sql, alias = task.aggregate
        where = f" WHERE {where_sql}" if where_sql else ""
        tail = f" AS {quote_ident(alias)}{where}" + (f" GROUP BY {group_by}" if group_by else "")
    else:
        select = ", ".join(quote_ident(c) for c in task.columns)
        tail = f" WHERE {task.filter}" if task.filter else ""
    if task.row_groups is None:
        source = parquet_source([v.url for v in task.files], task.hive)
        table = con.sql(f"SELECT {select} FROM {source}{tail}").to_arrow_table()
    else:
        with fs.open(task.files[0].url, "rb") as handle:
            raw = pq.ParquetFile(handle).read_row_groups(list(task.row_groups), columns=_file_columns(task, handle),
                                                         use_threads=False)
        con.register("__shoal_fragment", raw)
        try:
            table = con.sql(f"SELECT {select} FROM __shoal_fragment{tail}").to_arrow_table()
        finally:
            con.unregister("__shoal_fragment")
    return ScanResult(task=task, table=table, seconds=time.perf_counter() - started,
                      worker=f"{os.getpid()}/{threading.current_thread().name}")


def _file_columns(task: ScanTask, handle: object) -> list[str]:
    # The filter may use columns that the projection does not list.
    names = set(pq.ParquetFile(handle).schema_arrow.names)  # type: ignore[arg-type]
    wanted = set(task.columns)
    if task.filter:
        wanted |= {n for n in names if n in task.filter}
    return [n for n in pq.ParquetFile(handle).schema_arrow.names if n in wanted]  # type: ignore[arg-type]


def combine(results: Sequence[ScanResult], empty: pa.Table) -> pa.Table:
    """One Arrow table from a table's fragments (zero-copy when schemas agree)."""
    tables = [r.table for r in sorted(results, key=lambda r: r.task.fragment)]
    if not tables:
        return empty
    try:
        return pa.concat_tables(tables)
    except pa.ArrowInvalid:
        return pa.concat_tables([t.cast(tables[0].schema) for t in tables])
