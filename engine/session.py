"""The Python API: a :class:`Session` runs SQL over Parquet in object storage.

>>> from shoal.engine import Session
>>> with Session() as s:                                     # doctest: +SKIP
...     s.register("trips", "s3://data/trips/*.parquet")
...     s.sql("SELECT count(*) FROM trips").table

Each SELECT is planned by the coordinator into per-table scan fragments, run
by stateless workers (threads here; Ray when configured), and finished by the
coordinator's DuckDB over the workers' Arrow results.  Every object is read
at one version per query.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import duckdb
import pyarrow as pa

from shoal.cache import (
    CacheConfig, ObjectChangedError, ShoalFileSystem, StorageConfigError, StorageError, StoreConfig, parse_size,
)
from shoal.cache.nativereads import PREFIX as PIECES_PREFIX

from .aggregate import PARTIAL_TABLE
from .catalog import Catalog, TableDef
from .errors import EngineError, QueryCancelled, QueryError, translate_duckdb_error
from .executor import Executor, create_executor
from .planner import Planner, parquet_source, quote_ident, quote_literal
from .prefetch import prefetch_plan, prepare_local_copies, remote_files
from .profile import QueryProfile, TableIO, render_explain
from .security import allowed_paths_from_env
from .worker import combine, tasks_for

__all__ = ["Session", "QueryResult"]

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]

_COPY = re.compile(r"^\s*COPY\s*\((?P<query>.*)\)\s*TO\s*'(?P<url>(?:[^']|'')+)'\s*(?P<options>\(.*\))?\s*;?\s*$", re.I | re.S)
_EXPLAIN = re.compile(r"^\s*EXPLAIN\s+(?P<analyze>ANALYZE\s+)?(?P<query>.*?);?\s*$", re.I | re.S)
_CREATE_VIEW = re.compile(r"^\s*CREATE\s+(?P<replace>OR\s+REPLACE\s+)?(?:TEMP(?:ORARY)?\s+)?VIEW\s+(?P<name>\"?[A-Za-z_][A-Za-z0-9_]*\"?)\s+AS\s+(?P<query>.*?);?\s*$", re.I | re.S)
_SIMPLE_SOURCE = re.compile(r"^\s*(?:SELECT\s+\*\s+)?FROM\s+(?:'(?P<url>[^']+)'|read_parquet\(\s*'(?P<url2>[^']+)'\s*(?:,\s*hive_partitioning\s*=\s*(?P<hive>true|false))?\s*\))\s*;?\s*$", re.I | re.S)
_DROP_VIEW = re.compile(r"^\s*DROP\s+VIEW\s+(?:IF\s+EXISTS\s+)?(?P<name>\"?[A-Za-z_][A-Za-z0-9_]*\"?)\s*;?\s*$", re.I)


# DuckDB statement types Shoal runs (everything else is refused before running):
# CREATE is only CREATE VIEW, DROP only DROP VIEW, SHOW/DESCRIBE are SELECTs.
_SUPPORTED_STATEMENTS = {"SELECT", "EXPLAIN", "COPY", "CREATE", "DROP"}


@dataclass
class QueryResult:
    """Rows (as Arrow) and what it took to get them."""

    table: pa.Table
    profile: QueryProfile = field(default_factory=QueryProfile)
    message: str | None = None

    @property
    def num_rows(self) -> int:
        return self.table.num_rows


class _ProgressReporter:
    """Reports bytes read for the plan's objects while a query runs (a daemon thread)."""

    def __init__(self, fs: ShoalFileSystem, plan: Any, progress: Progress, interval: float = 0.2) -> None:
        self.fs, self.progress, self.interval = fs, progress, interval
        self.urls = {v.url for s in plan.scans.values() for v in s.files}
        self.total = sum(v.size for s in plan.scans.values() for v in s.files)
        self.start = self._read()
        self._done = threading.Event()
        progress(0, self.total)
        self._thread = threading.Thread(target=self._loop, name="shoal-progress", daemon=True)
        self._thread.start()

    def _read(self) -> int:
        snapshot = self.fs.reader.ledger.snapshot()
        return sum(io.bytes_from_store + io.bytes_from_cache + io.bytes_from_memory + io.bytes_from_peers
                   for url, io in snapshot.items() if url in self.urls)

    def _loop(self) -> None:
        while not self._done.wait(self.interval):
            self.progress(min(self._read() - self.start, self.total), self.total)

    def stop(self) -> None:
        self._done.set()
        self._thread.join()
        self.progress(self.total, self.total)



def _local_copy_failure(exc: duckdb.Error, copies: dict[str, str]) -> bool:
    """Whether DuckDB failed on a local copy: a file gone (evicted by another
    process), or a hole read as a page header (zeros are not valid Thrift)."""
    if not copies:
        return False
    text = str(exc)
    return (isinstance(exc, duckdb.IOException) or "TProtocolException" in text
            or any(path in text for path in copies.values()))


def _temp_directory() -> str:
    """Where the coordinator's DuckDB spills: ``SHOAL_TEMP_DIR``, else a per-user
    folder in the system temp directory."""
    return os.environ.get("SHOAL_TEMP_DIR") or os.path.join(tempfile.gettempdir(), f"shoal-duckdb-{os.getuid()}")


def _parse_memory_limit(text: str) -> int:
    try:
        return parse_size(text)
    except StorageConfigError as exc:
        raise QueryError(f"SHOAL_MEMORY_LIMIT: {exc}") from exc


def _refuse_unsupported(statement: str) -> None:
    """Raise :class:`QueryError` for a statement of a supported type in a form
    Shoal does not run (CREATE TABLE, CREATE SECRET, COPY ... FROM, ...)."""
    if _EXPLAIN.match(statement) or _COPY.match(statement) or _CREATE_VIEW.match(statement) \
            or _DROP_VIEW.match(statement):
        return
    if re.match(r"^\s*(CREATE|DROP)\b", statement, re.I):
        raise QueryError("only CREATE VIEW and DROP VIEW are supported (tables live in the object store)")
    if re.match(r"^\s*COPY\b", statement, re.I):
        raise QueryError("only COPY (SELECT ...) TO 'url' is supported")


class Session:
    """An embedded Shoal engine: catalog, cached filesystem, planner, executor.

    Parameters
    ----------
    cache, store:
        Storage-layer configuration (default: from ``SHOAL_CACHE_*`` and ``AWS_*``).
    workers:
        Scan workers (default: ``SHOAL_WORKERS`` or the number of CPUs).
    executor:
        ``"local"`` (embedded default: scans fused into the coordinator's DuckDB),
        ``"threads"`` (a pool of stateless worker threads exchanging Arrow), or
        another registered executor.
    catalog:
        Path of a TOML catalog file to load.
    executor_options:
        Passed to the executor, e.g. ``{"address": "ray://head:10001"}`` for ``ray``.
    allowed_paths:
        Local directories SQL may read (default ``SHOAL_ALLOWED_PATHS``, else
        unrestricted); object stores stay reachable through Shoal's filesystem.
    """

    def __init__(
        self,
        *,
        cache: CacheConfig | None = None,
        store: StoreConfig | None = None,
        workers: int | None = None,
        executor: str = "local",
        catalog: str | Path | None = None,
        fs: ShoalFileSystem | None = None,
        allowed_paths: Sequence[str] | None = None,
        executor_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.fs = fs or ShoalFileSystem(cache=cache, store=store)
        self.catalog = Catalog()
        if catalog is not None:
            self.catalog.load_toml(catalog)
        env_workers = os.environ.get("SHOAL_WORKERS")
        self.workers = workers or (int(env_workers) if env_workers else (os.cpu_count() or 1))
        if self.workers < 1:
            raise EngineError("workers must be at least 1")
        self.executor: Executor = create_executor(executor, self.fs, workers=self.workers,
                                                  **dict(executor_options or {}))
        # Fused scans are parallel inside DuckDB: no need to split files into row groups.
        self.allowed_paths = allowed_paths_from_env() if allowed_paths is None else tuple(allowed_paths)
        # Database-wide: joins and sorts larger than memory spill to Shoal's temp
        # directory, not to ./.tmp of whatever directory the user happens to be in.
        settings = {"temp_directory": _temp_directory()}
        if limit := os.environ.get("SHOAL_MEMORY_LIMIT"):
            settings["memory_limit"] = f"{_parse_memory_limit(limit)}B"
        self.planner = Planner(self.fs, self.catalog, workers=1 if self.executor.fused else self.workers,
                               allowed_paths=self.allowed_paths, settings=settings)
        self._warming: threading.Thread | None = None
        for table in self.catalog:
            self._warm_up_store(table.url)
        self._views: dict[str, str] = {}
        #: Plan on remembered listings, checked against the store in the background.
        self.speculative_listing = os.environ.get("SHOAL_SPECULATIVE_LISTING", "1") != "0"
        self._lock = threading.RLock()
        self._cancel = threading.Event()
        self._finish_con: duckdb.DuckDBPyConnection | None = None

    # -- catalog ------------------------------------------------------------------

    def register(self, name: str, url: str, *, hive_partitioning: bool | None = None) -> None:
        """Name a table: a URL, glob or prefix of Parquet files."""
        self.catalog.register(TableDef(name=name, url=url, hive_partitioning=hive_partitioning))
        self._warm_up_store(url)

    def _warm_up_store(self, url: str) -> None:
        """Create the object-store client in the background: its first use in a
        process costs ~0.3 s (botocore's models and session), better spent before
        the first query than inside it."""
        protocol = url.split("://", 1)[0].lower() if "://" in url else "file"
        if protocol not in ("s3", "s3a") or self._warming is not None:
            return

        def warm() -> None:
            try:
                source = self.fs.source(protocol)
                if hasattr(source, "warm_up"):
                    source.warm_up(url)
            except Exception as exc:  # noqa: BLE001 - the first query reports real errors
                logger.debug("store warm-up failed: %s", exc)

        self._warming = threading.Thread(target=warm, name="shoal-warm-up", daemon=True)
        self._warming.start()

    def tables(self) -> list[TableDef]:
        return list(self.catalog)

    # -- SQL ----------------------------------------------------------------------

    def sql(self, text: str, *, progress: Progress | None = None) -> QueryResult:
        """Run one or more statements; returns the last one's result."""
        try:
            statements = [(s.type.name, s.query) for s in self.planner.con.extract_statements(text)]
        except duckdb.Error as exc:
            raise translate_duckdb_error(exc) from exc
        if not statements:
            raise QueryError("no SQL statement given")
        for kind, _ in statements:
            if kind not in _SUPPORTED_STATEMENTS:
                raise QueryError(
                    f"{kind} statements are not supported: Shoal runs SELECT, EXPLAIN [ANALYZE], "
                    "COPY (SELECT ...) TO, CREATE VIEW, DROP VIEW, SHOW TABLES and DESCRIBE"
                )
        for _, statement in statements:  # all of a script is checked before any of it runs
            _refuse_unsupported(statement)
        result = QueryResult(table=pa.table({}))
        for _, statement in statements:
            result = self._statement(statement, progress)
        return result

    def explain(self, query: str, *, analyze: bool = False) -> str:
        """The plan (fragments, pushed-down columns and filters); with ``analyze``, run it and add I/O."""
        if analyze:
            return render_explain(self._select(query, None).profile, analyze=True)
        with self.fs.snapshot():
            plan = self._plan(query, full=True)
        return render_explain(QueryProfile(plan=plan, executor=self.executor.name, workers=self.workers), analyze=False)

    def copy_to(self, query: str, url: str, *, options: str = "(FORMAT parquet)") -> QueryResult:
        """Write a query's result to ``url`` (Parquet by default) through the store."""
        result = self._select(query, None)
        con = self._finish_connection()
        con.register("__shoal_result", result.table)
        try:
            con.execute(f"COPY (SELECT * FROM __shoal_result) TO {quote_literal(url)} {options}").fetchall()
        except duckdb.Error as exc:
            raise translate_duckdb_error(exc, self.fs.take_error()) from exc
        finally:
            con.unregister("__shoal_result")
        result.message = f"wrote {result.num_rows} rows to {url}"
        return result

    def interrupt(self) -> None:
        """Cancel the running query (from another thread or a signal handler)."""
        self._cancel.set()
        if self._finish_con is not None:
            self._finish_con.interrupt()

    # -- statements ---------------------------------------------------------------

    def _statement(self, statement: str, progress: Progress | None) -> QueryResult:
        if match := _EXPLAIN.match(statement):
            text = self.explain(match["query"], analyze=bool(match["analyze"]))
            return QueryResult(table=pa.table({"plan": text.splitlines()}), message=text)
        if match := _COPY.match(statement):
            return self.copy_to(match["query"], match["url"].replace("''", "'"),
                                options=match["options"] or "(FORMAT parquet)")
        if match := _CREATE_VIEW.match(statement):
            return self._create_view(match["name"].strip('"'), match["query"], bool(match["replace"]))
        if match := _DROP_VIEW.match(statement):
            name = match["name"].strip('"')
            self.catalog.unregister(name)
            self._views.pop(name.lower(), None)
            return QueryResult(table=pa.table({}), message=f"dropped {name}")
        if re.match(r"^\s*SHOW\s+TABLES\s*;?\s*$", statement, re.I):
            rows = [(t.name, t.url) for t in self.catalog] + [(n, "(view)") for n in sorted(self._views)]
            return QueryResult(table=pa.table({"name": [r[0] for r in rows], "url": [r[1] for r in rows]}))
        if match := re.match(r"^\s*(?:DESCRIBE|DESC)\s+(?P<name>\"?[A-Za-z_][A-Za-z0-9_]*\"?)\s*;?\s*$", statement, re.I):
            return self._select(f"DESCRIBE SELECT * FROM {match['name']}", progress)
        return self._select(statement, progress)  # sql() refused unsupported forms up front

    def _create_view(self, name: str, query: str, replace: bool) -> QueryResult:
        if not replace and (name in self.catalog or name.lower() in self._views):
            raise QueryError(f"table or view {name} already exists (use CREATE OR REPLACE VIEW)")
        if simple := _SIMPLE_SOURCE.match(query):
            hive = simple["hive"]
            self.register(name, simple["url"] or simple["url2"],
                          hive_partitioning=None if hive is None else hive.lower() == "true")
            self._views.pop(name.lower(), None)
        else:
            self._views[name.lower()] = query.strip().rstrip(";")
            self.catalog.unregister(name)
        return QueryResult(table=pa.table({}), message=f"created view {name}")

    def _expand_views(self, sql: str) -> str:
        if not self._views:
            return sql
        ctes = ", ".join(f"{quote_ident(n)} AS ({q})" for n, q in self._views.items())
        # User views become CTEs so that the planner sees the tables under them.
        if re.match(r"^\s*WITH\s", sql, re.I):
            return re.sub(r"^\s*WITH\s+(RECURSIVE\s+)?", lambda m: f"WITH {m.group(1) or ''}{ctes}, ", sql, count=1, flags=re.I)
        return f"WITH {ctes} {sql}"

    def _plan(self, query: str, *, full: bool = False):
        """The query's plan; for the fused (embedded) executor a lighter one that
        leaves pushdown to DuckDB, unless ``full`` (EXPLAIN shows the pushdown)."""
        try:
            if self.executor.fused and not full:
                return self.planner.plan_fused(self._expand_views(query))
            return self.planner.plan(self._expand_views(query), partial_aggregation=not self.executor.fused)
        except duckdb.Error as exc:
            raise translate_duckdb_error(exc, self.fs.take_error()) from exc

    def _select(self, query: str, progress: Progress | None) -> QueryResult:
        """Run a query.  With the SSD cache on, tables are planned on the listing an
        earlier query remembered while the store is listed in the background; if
        the store's listing differs (or an object changed under the query), the
        query runs again on the fresh listing, so results are never stale."""
        with self._lock:
            speculate = self.speculative_listing and self.fs.reader.cache.available
            try:
                result = self._select_once(query, progress, speculate=speculate)
            except ObjectChangedError:
                if not speculate:
                    raise
                logger.info("an object changed under a query planned on a remembered listing; re-running")
                return self._select_once(query, progress, speculate=False)
            if speculate and self._listing_changed():
                logger.info("the store's listing changed since it was remembered; re-running the query")
                return self._select_once(query, progress, speculate=False)
            return result

    def _listing_changed(self) -> bool:
        changed = False
        for pattern, used, future in self.planner.revalidate.values():
            fresh = future.result()  # a failed listing (bucket gone, access denied) is the query's error
            self.fs.remember_versions(pattern, fresh)
            if {v.url: v.token for v in fresh if v.size > 0} != {v.url: v.token for v in used if v.size > 0}:
                changed = True
        return changed

    def _select_once(self, query: str, progress: Progress | None, *, speculate: bool) -> QueryResult:
        self.planner.speculate = speculate
        self._cancel.clear()
        self.fs.take_error()
        profile = QueryProfile(executor=self.executor.name, workers=self.workers,
                               peer_tier=self.fs.reader.peers is not None)
        started = time.perf_counter()
        try:
            before = self.fs.reader.ledger.snapshot()
            # The query's SSD writes wait for its result (BlockReader.hold_writes): filling
            # the cache then takes no CPU or GIL from the query itself.
            with self.fs.snapshot(), self.fs.reader.hold_writes():
                plan = self._plan(query)
                profile.plan = plan
                profile.stages["plan"] = time.perf_counter() - started
                table = self._execute(plan, profile, progress, before)
        except KeyboardInterrupt:
            self._cancel.set()
            raise QueryCancelled("query cancelled") from None
        finally:
            if profile.plan is not None and not profile.plan.fused:
                self.planner.drop_views(list(profile.plan.scans))
            self.fs.reader.cache.flush_stats()
        profile.rows = table.num_rows
        profile.stages["total"] = time.perf_counter() - started
        return QueryResult(table=table, profile=profile)

    def _execute(self, plan: Any, profile: QueryProfile, progress: Progress | None,
                 before: dict[str, Any]) -> pa.Table:
        """Scan (on workers, or fused into the coordinator), then finish on the coordinator.
        I/O is counted from ``before``: planning reads footers, which count too."""
        for name in plan.scans:
            profile.tables[name] = TableIO()
        reporter = _ProgressReporter(self.fs, plan, progress) if progress is not None else None
        try:
            if self.executor.fused:
                table = self._execute_fused(plan, profile)
            else:
                table = self._execute_on_workers(plan, profile)
        finally:
            if reporter is not None:
                reporter.stop()
        self._account_io(plan, profile, before)
        return table

    def _execute_fused(self, plan: Any, profile: QueryProfile) -> pa.Table:
        started = time.perf_counter()
        # Fetched pieces wait on the SSD (or, without a cache, in memory) until read.
        config = self.fs.cache_config
        budget = config.size_limit // 2 if self.fs.reader.cache.available else config.memory_size // 2
        # Prefetched bytes read natively by DuckDB (Shoal's extension), up to the memory tier's size.
        pieces = self.planner.native.query(self.fs) if self.planner.native is not None and plan.native else None
        try:
            copies = prefetch_plan(self.fs, plan, max_bytes=budget, native=plan.native, pieces=pieces,
                                   pieces_bytes=config.memory_size)
            profile.stages["prefetch"] = time.perf_counter() - started
            table = self._execute_prefetched(plan, copies, budget)
        finally:
            if pieces is not None:
                pieces.close()
        profile.stages["scan+finish"] = time.perf_counter() - started
        local = [path for path in copies.values() if not path.startswith(PIECES_PREFIX)]
        if plan.native and len(local) < len(remote_files(plan)) and self.fs.reader.cache.available:
            # Cold files: once the cache writer has stored what this query fetched,
            # it also makes their local copies, so the next run reads natively from
            # its start (making them then cost that run up to a tenth of a second).
            self.fs.reader.after_writes(lambda: prepare_local_copies(self.fs, plan))
        return table

    def _execute_prefetched(self, plan: Any, copies: dict[str, str], budget: int) -> pa.Table:
        try:
            return self._run_fused(plan, copies)
        except duckdb.Error as exc:
            in_memory = {path: url for url, path in copies.items() if path.startswith(PIECES_PREFIX)}
            text = str(exc)
            named = [path for path in in_memory if path in text]
            if named and not isinstance(exc, duckdb.IOException):
                # The bytes themselves (a file that is not Parquet, ...): said of the URL.
                for path in named:
                    text = text.replace(path, in_memory[path])
                raise translate_duckdb_error(type(exc)(text), self.fs.take_error()) from exc
            local = {url: path for url, path in copies.items() if path not in in_memory}
            if not named and not _local_copy_failure(exc, local):
                raise translate_duckdb_error(exc, self.fs.take_error()) from exc
            if named:  # a read the cached filesystem could not serve: again through it, which says why
                logger.debug("native read failed (%s); reading through the cache", text.splitlines()[0])
            else:
                # A local copy DuckDB could not read (evicted meanwhile, or a byte range
                # it wanted that the copy lacks): the same query through the cache.
                logger.warning("DuckDB could not use local copies of cached files (%s); reading through the cache",
                               text.strip().splitlines()[0] if text.strip() else type(exc).__name__)
                self.fs.reader.metrics.add(local_copy_fallbacks=1)
            prefetch_plan(self.fs, plan, max_bytes=budget)
            try:
                return self._run_fused(plan, {})
            except duckdb.Error as again:
                raise translate_duckdb_error(again, self.fs.take_error()) from again

    def _run_fused(self, plan: Any, copies: dict[str, str]) -> pa.Table:
        """The plan's SQL on the finishing connection, each table a view over its
        pinned files (``copies``: local files to read instead of some URLs)."""
        con = self._finish_connection()
        con.execute(f"SET threads={self.workers}").fetchall()
        views = []
        try:
            for name, scan in plan.scans.items():
                columns = "*" if plan.fused else ", ".join(quote_ident(c) for c in scan.columns)
                if scan.files:
                    where = f" WHERE {scan.filter}" if scan.filter else ""
                    urls = [copies.get(f.url, f.url) for f in scan.files]
                    body = f"SELECT {columns} FROM {parquet_source(urls, scan.table.hive)}{where}"
                else:
                    body = f"SELECT {columns} FROM {quote_ident(name)} LIMIT 0"
                    con.register(name, self.planner.con.sql(body).to_arrow_table())
                    views.append((name, True))
                    continue
                con.execute(f"CREATE OR REPLACE TEMP VIEW {quote_ident(name)} AS {body}").fetchall()
                views.append((name, False))
            return con.sql(plan.sql).to_arrow_table()
        finally:
            for name, registered in views:
                if registered:
                    con.unregister(name)
                else:
                    con.execute(f"DROP VIEW IF EXISTS {quote_ident(name)}").fetchall()

    def _execute_on_workers(self, plan: Any, profile: QueryProfile) -> pa.Table:
        scan_started = time.perf_counter()
        threads = max(1, (os.cpu_count() or 1) // self.workers)
        tasks = tasks_for(plan.scans, threads=threads, partial=plan.partial, allowed_paths=self.allowed_paths)
        try:
            results = self.executor.run(tasks, self._cancel) if tasks else []
        except StorageError:
            raise
        except duckdb.Error as exc:
            raise translate_duckdb_error(exc, self.fs.take_error()) from exc
        profile.stages["scan"] = time.perf_counter() - scan_started

        finish_started = time.perf_counter()
        con = self._finish_connection()
        con.execute(f"SET threads={os.cpu_count() or 1}").fetchall()
        registered: list[str] = []
        views: list[str] = []
        try:
            for name, scan in plan.scans.items():
                if plan.partial is not None:
                    # Partial rows of the fragments; the merge query reads them.
                    partial = plan.partial
                    group = f" GROUP BY {partial.worker_group_by}" if partial.worker_group_by else ""
                    target = PARTIAL_TABLE
                    sql = (f"SELECT {partial.worker_select} FROM {quote_ident(name)} AS "
                           f"{quote_ident(partial.source_alias)}{group} LIMIT 0")
                else:
                    target, sql = name, f"SELECT {', '.join(quote_ident(c) for c in scan.columns)} FROM {quote_ident(name)} LIMIT 0"
                empty = self.planner.con.sql(sql).to_arrow_table()
                mine = [r for r in results if r.task.table == name]
                combined = combine(mine, empty)
                # Results a worker spilled to the object store as Parquet (ray executor).
                spilled = [url for r in mine for url in getattr(r, "spilled", ())]
                profile.tables[name].rows_out = combined.num_rows + sum(getattr(r, "spilled_rows", 0) for r in mine)
                profile.tables[name].seconds = sum(r.seconds for r in mine)
                if spilled:
                    memory = f"__shoal_in_memory_{len(registered)}"
                    con.register(memory, combined)
                    registered.append(memory)
                    files = ", ".join(quote_literal(u) for u in spilled)
                    con.execute(f"CREATE OR REPLACE TEMP VIEW {quote_ident(target)} AS SELECT * FROM {memory} "
                                f"UNION ALL BY NAME SELECT * FROM read_parquet([{files}])").fetchall()
                    views.append(target)
                    continue
                con.register(target, combined)
                registered.append(target)
            table = con.sql(plan.partial.merge_sql if plan.partial else plan.sql).to_arrow_table()
        except duckdb.Error as exc:
            raise translate_duckdb_error(exc, self.fs.take_error()) from exc
        finally:
            for name in views:
                con.execute(f"DROP VIEW IF EXISTS {quote_ident(name)}").fetchall()
            for name in registered:
                con.unregister(name)
            release = getattr(self.executor, "release", None)  # e.g. delete spilled results
            if release is not None:
                release(results)
        profile.stages["finish"] = time.perf_counter() - finish_started
        return table

    def _account_io(self, plan: Any, profile: QueryProfile, before: dict[str, Any]) -> None:
        after = self.fs.reader.ledger.snapshot()
        url_table = {v.url: name for name, s in plan.scans.items() for v in s.files}
        for url, io in after.items():
            name = url_table.get(url)
            if name is None:
                continue
            prior = before.get(url)
            delta = type(io)(**{k: v - (getattr(prior, k) if prior else 0) for k, v in vars(io).items()})
            profile.tables[name].add(delta)

    def _finish_connection(self) -> duckdb.DuckDBPyConnection:
        if self._finish_con is None:
            # A cursor shares the planner's database: its filesystem, settings,
            # lock-down and one buffer pool; a second database cost a fresh
            # process ~12 ms per query, a tenth of a warm TPC-H query.
            self._finish_con = self.planner.con.cursor()
        return self._finish_con

    # -- cache ---------------------------------------------------------------------

    def cache_stats(self) -> dict[str, Any]:
        """This process's cache counters, the totals of all processes, and disk use."""
        stats = self.fs.stats()
        stats["all_processes"] = self.fs.reader.cache.persisted_stats()
        return stats

    def close(self) -> None:
        self.executor.close()
        if self._finish_con is not None:
            self._finish_con.close()
        self.planner.close()
        self.fs.close()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
