"""The coordinator's planner: a query becomes per-table scans split into fragments.

DuckDB plans the query over views of the tables' Parquet files (pinned file
lists); every Parquet scan in DuckDB's physical plan tells which columns it
needs and which filters it pushed down.  Those become the workers' scan-side
work.  The coordinator later runs the *original* query over the workers'
results, so a pushed filter only has to be implied by the query, never
complete: correctness does not depend on how much was pushed down.
"""

from __future__ import annotations

import json
import logging
import threading
import re
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import duckdb
import pyarrow.parquet as pq

from shoal.cache.nativereads import NativeReads
from shoal.cache import ObjectNotFoundError, ObjectVersion, ShoalFileSystem

from .aggregate import PartialAggregate, plan_partial_aggregate
from .catalog import Catalog, TableDef
from .errors import SqlSyntaxError, translate_duckdb_error
from .security import check_source, lock_down
from .sqlinfo import (column_references, named_columns, parse_tree, reads_only_named_columns, table_references,
                      top_level_conjuncts)

__all__ = ["Fragment", "TableScan", "QueryPlan", "Planner", "footer_range", "quote_ident", "quote_literal"]

logger = logging.getLogger(__name__)

_ADHOC_PREFIX = "__shoal_scan_"
_FOOTER_GUESS = 64 << 10


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def footer_range(version: ObjectVersion) -> tuple[int, int]:
    """The tail of a Parquet object that one read fetches to find its footer."""
    return max(0, version.size - _FOOTER_GUESS), version.size


def parquet_source(urls: Sequence[str], hive: bool) -> str:
    files = "[" + ", ".join(quote_literal(u) for u in urls) + "]"
    return f"read_parquet({files}, hive_partitioning={'true' if hive else 'false'})"


@dataclass(frozen=True)
class Fragment:
    """One unit of scan work: some files, or some row groups of one file."""

    table: str
    index: int
    files: tuple[ObjectVersion, ...]
    row_groups: tuple[int, ...] | None = None
    size: int = 0

    def describe(self) -> str:
        # The last path components: enough to tell partitions and parts apart.
        names = ", ".join("/".join(f.url.rsplit("/", 3)[-3:]) for f in self.files)
        if self.row_groups is None:
            return names
        groups = self.row_groups
        span = f"{groups[0]}" if len(groups) == 1 else f"{groups[0]}-{groups[-1]}"
        return f"{names} row groups {span}"


@dataclass
class TableScan:
    """What the workers read of one table."""

    table: TableDef
    alias: str
    all_columns: list[str]
    columns: list[str]
    filter: str | None
    partition_filter: str | None
    files_listed: int
    files: list[ObjectVersion]
    fragments: list[Fragment] = field(default_factory=list)
    #: Fused plans: the query reads whole rows, so every column is prefetched.
    all_named: bool = False

    @property
    def bytes_listed(self) -> int:
        return sum(f.size for f in self.files)


@dataclass
class QueryPlan:
    """The scans to run on workers and the SQL the coordinator finishes with."""

    sql: str
    scans: dict[str, TableScan]
    #: Set when workers aggregate their fragments and the coordinator merges.
    partial: PartialAggregate | None = None
    #: A plan for one DuckDB that runs the whole query (the embedded executor):
    #: scans hold the pinned files and the columns the query names (for
    #: prefetching); DuckDB pushes projections and filters into its scans itself.
    fused: bool = False
    #: Fused plans: DuckDB may be handed files holding only the named columns'
    #: bytes (local copies; see :func:`reads_only_named_columns`).
    native: bool = False


def _scan_nodes(plan: Any) -> Iterator[dict[str, Any]]:
    nodes = plan if isinstance(plan, list) else [plan]
    for node in nodes:
        info = node.get("extra_info", {})
        if info.get("Function") == "READ_PARQUET" or node.get("name") == "READ_PARQUET":
            yield info
        yield from _scan_nodes(node.get("children", []))


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list):
        return [str(v) for v in value]
    return [v for v in str(value).split("\n") if v]


def _split_groups(text: str) -> list[str]:
    """``"(a)(b)"`` -> ``["(a)", "(b)"]``: DuckDB prints several file filters back to back."""
    parts: list[str] = []
    depth, start, quote = 0, 0, False
    for i, ch in enumerate(text):
        if ch == "'":
            quote = not quote
        elif not quote and ch == "(":
            depth += 1
        elif not quote and ch == ")":
            depth -= 1
            if depth == 0 and text[i + 1 : i + 2] == "(":
                parts.append(text[start : i + 1])
                start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


_DYNAMIC = re.compile(r"dynamic|optional: *$", re.I)


class Planner:
    """Plans queries against a catalog; owns the coordinator's planning connection."""

    def __init__(self, fs: ShoalFileSystem, catalog: Catalog, *, workers: int,
                 allowed_paths: tuple[str, ...] | None = None, settings: Mapping[str, str] | None = None) -> None:
        """``settings``: DuckDB settings for the database (before it is locked down)."""
        self.fs = fs
        self.catalog = catalog
        self.workers = workers
        native = NativeReads.get()
        # Shoal's own DuckDB extension is unsigned: allowed for its LOAD only (attach turns it off).
        self.con = duckdb.connect(config={"allow_unsigned_extensions": "true"} if native else {})
        #: DuckDB reads prefetched bytes natively through Shoal's extension (None: through Python).
        self.native = native if native is not None and native.attach(self.con) else None
        self.con.register_filesystem(fs)
        self.con.execute("SET enable_external_file_cache=false")
        for name, value in (settings or {}).items():
            self.con.execute(f"SET {name}={quote_literal(value)}")
        # DuckDB reads local copies of cached files itself (see shoal.cache.localcopy).
        readable = None if allowed_paths is None else (*allowed_paths, str(fs.local_copies_directory))
        protocols = (*fs.protocol, "shoalpieces") if self.native is not None else fs.protocol
        lock_down(self.con, readable, protocols)
        self.allowed_paths = allowed_paths
        self._listing_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="shoal-list")
        # Its threads now, not while a query plans (starting one waits for the GIL).
        started = threading.Barrier(9)
        for _ in range(8):
            self._listing_pool.submit(started.wait, 5)
        started.wait(5)
        # DuckDB initialises its statement serializer on first use (~20 ms): here,
        # once per session, not in the first query's planning.
        self.con.execute("SELECT json_serialize_sql('SELECT 1')").fetchall()
        #: Use listings remembered on the SSD and check them in the background.
        self.speculate = False
        #: Per table of the last plan: (pattern, listing used, future of the fresh listing).
        self.revalidate: dict[str, tuple[str, list[ObjectVersion], Any]] = {}

    # -- step 1: which tables ---------------------------------------------------

    def bind_tables(self, sql: str, tree: dict[str, Any] | None = None) -> tuple[str, dict[str, TableDef]]:
        """Replace ad-hoc paths by internal names; return the SQL and its tables."""
        tree = parse_tree(self.con, sql) if tree is None else tree
        tables: dict[str, TableDef] = {}
        for n, ref in enumerate(table_references(tree)):
            table = self.catalog.get(ref)
            if table is not None:
                tables[table.name] = table
            elif "://" in ref or ref.endswith(".parquet") or "/" in ref:
                name = f"{_ADHOC_PREFIX}{n}"
                tables[name] = TableDef(name=name, url=ref)
                for quoted in (quote_literal(ref), quote_ident(ref)):
                    sql = sql.replace(quoted, quote_ident(name))
        return sql, tables

    # -- step 2: files and views ---------------------------------------------------

    def _list_tables(self, tables: dict[str, TableDef], *, footers: bool = True) -> dict[str, list[ObjectVersion]]:
        """Each table's objects (versions pinned by the caller's snapshot), listed
        together; with ``footers``, their footers are prefetched."""
        for table in tables.values():
            # Before anything is listed or read: DuckDB's lock covers DuckDB's own
            # reads, not the listing and footer reads Shoal makes for it.
            check_source(table.url, self.allowed_paths, self.fs.protocol)
        listings: dict[str, list[ObjectVersion]] = {}
        to_list = []
        remembered_by_name: dict[str, tuple[str, list[ObjectVersion]]] = {}
        for name, table in tables.items():
            remembered = self.fs.remembered_versions(table.pattern) if self.speculate else None
            if remembered is None:
                to_list.append(name)
                continue
            # Plan and run on the listing an earlier query saw; the store is
            # listed meanwhile and the session re-runs the query if it changed.
            listings[name] = [self.fs.pin(v) for v in remembered]
            remembered_by_name[name] = (table.pattern, remembered)
        # Listing is one request per table: issue them together (each costs a
        # round trip to the store, ~27 ms on S3).
        fresh = self._listing_pool.map(lambda n: self.fs.versions(tables[n].pattern), to_list)
        self._revalidate(remembered_by_name)
        for name, versions in zip(to_list, fresh):
            listings[name] = versions
            self.fs.remember_versions(tables[name].pattern, versions)
        for versions in listings.values() if footers else ():
            for version in versions:
                if version.size > 0 and "://" in version.url and not version.url.startswith("file://"):
                    # Footers: DuckDB reads them one file at a time while binding and
                    # estimating; fetching every file's tail at once hides that latency.
                    self.fs.prefetch(version.url, [footer_range(version)])
        return listings

    def _revalidate(self, remembered: dict[str, tuple[str, list[ObjectVersion]]]) -> None:
        """List the store for the tables planned on ``remembered`` listings (name:
        (pattern, listing)), in the background, as soon as the plan knows them;
        the session compares before it returns the result (``revalidate``)."""
        if len(remembered) > 1:
            # One LIST of the folder the tables share, when it fits in a page: the
            # query waits for its slowest listing, and each request risks the tail.
            parts = self._listings_together([pattern for pattern, _ in remembered.values()])
        else:
            parts = [self._listing_pool.submit(self.fs.list_versions, pattern) for pattern, _ in remembered.values()]
        for (name, (pattern, used)), part in zip(remembered.items(), parts):
            self.revalidate[name] = (pattern, used, part)

    def _listings_together(self, patterns: list[str]) -> list[Future]:
        """A future listing per pattern, all answered by one request where the
        store allows (``list_versions_together``), else one request each."""
        parts: list[Future] = [Future() for _ in patterns]
        joint = self._listing_pool.submit(self.fs.list_versions_together, patterns)

        def pass_on(source: Future, part: Future) -> None:
            if source.exception() is not None:
                part.set_exception(source.exception())
            else:
                part.set_result(source.result())

        def split(done: Future) -> None:
            lists = None if done.exception() is not None else done.result()
            if lists is not None:
                for part, versions in zip(parts, lists):
                    part.set_result(versions)
                return
            for pattern, part in zip(patterns, parts):  # a LIST per pattern, as usual
                try:
                    listed = self._listing_pool.submit(self.fs.list_versions, pattern)
                except RuntimeError as exc:  # the session closed meanwhile
                    part.set_exception(exc)
                    continue
                listed.add_done_callback(lambda listed, part=part: pass_on(listed, part))

        joint.add_done_callback(split)
        return parts

    def _define_views(self, tables: dict[str, TableDef]) -> dict[str, tuple[list[ObjectVersion], list[str]]]:
        listings = self._list_tables(tables)
        listed: dict[str, tuple[list[ObjectVersion], list[str]]] = {}
        for name, table in tables.items():
            files = [v for v in listings[name] if v.size > 0]
            if not files:
                raise ObjectNotFoundError(f"no Parquet files found for table {name} at {table.url}")
            self.con.execute(
                f"CREATE OR REPLACE VIEW {quote_ident(name)} AS SELECT * FROM "
                f"{parquet_source([f.url for f in files], table.hive)}"
            ).fetchall()
            columns = [r[0] for r in self.con.execute(f"DESCRIBE {quote_ident(name)}").fetchall()]
            listed[name] = (files, columns)
        return listed

    def close(self) -> None:
        self._listing_pool.shutdown(wait=False)
        self.con.close()

    def drop_views(self, names: Sequence[str]) -> None:
        for name in names:
            self.con.execute(f"DROP VIEW IF EXISTS {quote_ident(name)}").fetchall()

    # -- step 3: what each scan needs ----------------------------------------------

    def _pushdown(self, sql: str, listed: dict[str, tuple[list[ObjectVersion], list[str]]]) -> dict[str, tuple[set[str], list[str] | None]]:
        """Per table: columns needed and the filters of each scan (None: a scan had none)."""
        row = self.con.execute(f"EXPLAIN (FORMAT json) {sql}").fetchall()
        plan = json.loads(row[0][1])
        needs: dict[str, tuple[set[str], list[str] | None]] = {}
        unresolved = False
        for info in _scan_nodes(plan):
            projected = set(_as_list(info.get("Projections")))
            candidates = [
                group
                for f in _as_list(info.get("Filters")) + _as_list(info.get("File Filters"))
                if not _DYNAMIC.search(f)
                for group in _split_groups(f.removeprefix("optional: ").strip())
            ]
            filters, filter_columns = [], set()
            for candidate in candidates:
                try:
                    filter_columns |= column_references(parse_tree(self.con, f"SELECT 1 WHERE {candidate}"))
                except SqlSyntaxError:
                    continue  # not pushed; the coordinator applies the query's filters anyway
                filters.append(candidate)
            filter_sql = " AND ".join(f"({f})" for f in filters) if filters else None
            wanted = projected | filter_columns
            owners = [n for n, (_, cols) in listed.items() if wanted and wanted <= set(cols)]
            if len(owners) != 1 and len(listed) == 1:
                owners = list(listed)
            if len(owners) != 1:
                unresolved = True
                continue
            owner = owners[0]
            columns, scan_filters = needs.get(owner, (set(), []))
            columns |= wanted
            if scan_filters is not None:
                scan_filters = scan_filters + [filter_sql] if filter_sql else None
            needs[owner] = (columns, scan_filters)
        if unresolved:
            # A scan we cannot attribute (same column names in two tables): read
            # those tables whole; the coordinator's query still filters them.
            for name, (_, cols) in listed.items():
                if name not in needs:
                    needs[name] = (set(cols), None)
        for name, (_, cols) in listed.items():
            needs.setdefault(name, (set(cols[:1]), None))
        return needs

    def _validated_filter(self, name: str, filters: list[str] | None) -> str | None:
        if not filters:
            return None
        combined = filters[0] if len(filters) == 1 else " OR ".join(f"({f})" for f in filters)
        try:
            self.con.execute(f"EXPLAIN SELECT 1 FROM {quote_ident(name)} WHERE {combined}").fetchall()
        except duckdb.Error as exc:
            logger.debug("filter %r not pushed down for %s: %s", combined, name, exc)
            return None
        return combined

    # -- step 4: partitions and fragments -------------------------------------------

    def _prune_partitions(self, table: TableDef, files: list[ObjectVersion], filter_sql: str | None,
                          columns: list[str]) -> tuple[list[ObjectVersion], str | None]:
        if not table.hive or not filter_sql:
            return files, None
        values = [dict(p.split("=", 1) for p in f.url.split("/") if "=" in p) for f in files]
        keys = sorted({k for v in values for k in v} & set(columns))
        if not keys:
            return files, None
        conjuncts = [c for c, cols in top_level_conjuncts(self.con, filter_sql) if cols and cols <= set(keys)]
        if not conjuncts:
            return files, None
        predicate = " AND ".join(conjuncts)
        types = dict(self.con.execute(f"SELECT column_name, column_type FROM (DESCRIBE {quote_ident(table.name)})").fetchall())
        rows = ", ".join(
            "(" + ", ".join([str(i)] + [f"TRY_CAST({quote_literal(v.get(k, ''))} AS {types.get(k, 'VARCHAR')})" for k in keys]) + ")"
            for i, v in enumerate(values)
        )
        names = ", ".join(["__i"] + [quote_ident(k) for k in keys])
        kept = self.con.execute(f"SELECT __i FROM (VALUES {rows}) AS p({names}) WHERE {predicate}").fetchall()
        keep = {r[0] for r in kept}
        return [f for i, f in enumerate(files) if i in keep], predicate

    def _fragments(self, name: str, files: list[ObjectVersion], hive: bool) -> list[Fragment]:
        target = max(2 * self.workers, 1)
        if self.workers == 1 or len(files) >= target or hive:
            return [Fragment(table=name, index=i, files=(f,), size=f.size) for i, f in enumerate(files)]
        fragments: list[Fragment] = []
        per_file = -(-target // len(files))
        for version in files:
            with self.fs.open(version.url, "rb") as handle:
                meta = pq.ParquetFile(handle).metadata
            groups = list(range(meta.num_row_groups))
            if len(groups) <= 1:
                fragments.append(Fragment(table=name, index=len(fragments), files=(version,), size=version.size))
                continue
            chunk = -(-len(groups) // min(per_file, len(groups)))
            for start in range(0, len(groups), chunk):
                part = tuple(groups[start : start + chunk])
                size = sum(meta.row_group(g).total_byte_size for g in part)
                fragments.append(Fragment(table=name, index=len(fragments), files=(version,), row_groups=part, size=size))
        return fragments

    # -- all steps ----------------------------------------------------------------

    def plan_fused(self, sql: str) -> QueryPlan:
        """Plan for an executor that runs the whole query in one DuckDB (call inside
        ``fs.snapshot()``): list and pin the tables' files and note the columns the
        query names, for prefetching.  No views, DESCRIBE or EXPLAIN here: DuckDB
        binds and pushes down on its own, and in a fresh process that planning
        cost as much as a warm scan of a small query.  Hive-partitioned tables
        take :meth:`plan`, whose partition pruning also bounds the prefetch."""
        tree = parse_tree(self.con, sql)
        bound, tables = self.bind_tables(sql, tree)
        if any(table.hive for table in tables.values()):
            return self.plan(sql)
        self.revalidate = {}
        listings = self._list_tables(tables, footers=False)  # prefetch_plan fetches the footers it needs
        names, all_named = named_columns(tree)
        scans: dict[str, TableScan] = {}
        for name, table in tables.items():
            files = [v for v in listings[name] if v.size > 0]
            if not files:
                raise ObjectNotFoundError(f"no Parquet files found for table {name} at {table.url}")
            scans[name] = TableScan(
                table=table, alias=name, all_columns=[], columns=sorted(names), filter=None,
                partition_filter=None, files_listed=len(files), files=files,
                fragments=[Fragment(table=name, index=i, files=(f,), size=f.size) for i, f in enumerate(files)],
                all_named=all_named)
        return QueryPlan(sql=bound, scans=scans, fused=True, native=reads_only_named_columns(tree))

    def plan(self, sql: str, *, partial_aggregation: bool = False) -> QueryPlan:
        """Plan one SELECT (call inside ``fs.snapshot()`` so versions stay pinned).

        With ``partial_aggregation``, a single-table aggregate query is split
        into per-fragment partial aggregates and a merge (see engine/aggregate.py).
        """
        sql, tables = self.bind_tables(sql)
        self.revalidate = {}
        listed = self._define_views(tables)
        try:
            needs = self._pushdown(sql, listed)
            scans: dict[str, TableScan] = {}
            for name, table in tables.items():
                files, all_columns = listed[name]
                wanted, filters = needs[name]
                columns = [c for c in all_columns if c in wanted] or all_columns[:1]
                filter_sql = self._validated_filter(name, filters)
                kept, partition_filter = self._prune_partitions(table, files, filter_sql, all_columns)
                scan = TableScan(table=table, alias=name, all_columns=all_columns, columns=columns,
                                 filter=filter_sql, partition_filter=partition_filter,
                                 files_listed=len(files), files=kept)
                scan.fragments = self._fragments(name, kept, table.hive)
                scans[name] = scan
            partial = None
            if partial_aggregation and len(scans) == 1:
                partial = plan_partial_aggregate(self.con, sql, next(iter(scans)))
        except duckdb.CatalogException as exc:
            raise translate_duckdb_error(exc) from exc
        return QueryPlan(sql=sql, scans=scans, partial=partial)
