"""What a loader reads: a source (URL, glob, table name or SQL) resolved into units.

A *unit* is one Parquet row group of one pinned object version, with the
rows of it that the source selects.  Resolution happens once, in the process
that builds the loader; the result is plain data (picklable) that every
DataLoader worker shares, so all of them read the same versions.

Three kinds of source:

* **files**: a URL, glob, prefix or catalog table name.  Listed once (object
  versions pinned), footers read through the cache; units are the row groups,
  and only the requested columns are ever decoded.
* **sql-stream**: a SQL query over one table that only selects columns
  (``SELECT a, b AS c FROM t WHERE ...``; no joins, aggregates, expressions,
  ORDER BY, LIMIT or DISTINCT).  The engine's planner lists the table (hive
  partitions pruned); if there is a WHERE clause, DuckDB evaluates it once over
  the filter columns only, with Parquet statistics skipping row groups, and
  returns the matching row numbers.  Units then stream the selected columns of
  the selected rows: only the needed columns and row groups are read.
* **sql-materialized**: any other query.  DuckDB runs it once (its scans go
  through the cache with projections and filters pushed down) and streams the
  result into a local Parquet file of bounded row groups (``COPY``, bounded
  memory), keyed by the query and the versions of its inputs and reused while
  they do not change; the loader then reads that file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from shoal.cache import ObjectNotFoundError, ObjectVersion, ShoalFile, ShoalFileSystem, StorageError
from shoal.cache.source import S3_PROTOCOLS, split_url

from .catalog import TableDef
from .errors import LoaderError, LoaderSchemaError, NotParquetError, translate_duckdb_error
from .loader_plan import fingerprint
from .planner import parquet_source, quote_ident, quote_literal
from .security import lock_down
from .sqlinfo import parse_tree

__all__ = ["LoaderError", "LoaderSchemaError", "SourceFile", "Unit", "ResolvedSource", "resolve_source",
           "open_version", "is_sql"]

logger = logging.getLogger(__name__)

_SQL_START = re.compile(r"^\s*\(?\s*(SELECT|WITH|FROM|VALUES|TABLE)\b", re.I)
#: Rows per row group of a materialized query result.
MATERIALIZED_ROW_GROUP = 16384


@dataclass(frozen=True)
class SourceFile:
    """One Parquet object at a pinned version, with its footer."""

    version: ObjectVersion
    metadata: pq.FileMetaData = field(compare=False, repr=False)


@dataclass(frozen=True)
class Unit:
    """A row group and the rows of it the source selects (``selection`` None: all)."""

    file: int
    row_group: int
    rows: int
    selection: np.ndarray | None = field(default=None, compare=False, repr=False)


@dataclass
class ResolvedSource:
    """A source, resolved: pinned files, units, the columns to decode and how to name them."""

    description: str
    kind: str
    files: list[SourceFile]
    units: list[Unit]
    columns: list[str]
    names: list[str]
    schema: pa.Schema
    fingerprint: str = ""

    def __post_init__(self) -> None:
        if not self.fingerprint:
            parts: list[bytes | str] = [self.kind, json.dumps(self.columns), json.dumps(self.names)]
            for unit in self.units:
                version = self.files[unit.file].version
                parts.append(f"{version.url}\0{version.token}\0{unit.row_group}\0{unit.rows}")
                if unit.selection is not None:
                    parts.append(unit.selection.tobytes())
            self.fingerprint = fingerprint(parts)

    @property
    def num_rows(self) -> int:
        return sum(u.rows for u in self.units)

    @property
    def counts(self) -> np.ndarray:
        return np.fromiter((u.rows for u in self.units), dtype=np.int64, count=len(self.units))


def is_sql(source: str) -> bool:
    """Whether ``source`` reads as a query rather than a URL, glob or table name."""
    return bool(_SQL_START.match(source))


class _DeferredS3Source:
    """``fs.source("s3")``, created on first use beyond its identity.

    Creating it imports s3fs, aiobotocore and aiohttp (~0.3 s); a read served by
    the cache needs only the store's identity (cache keys), so warm reads (and
    DataLoader workers on a warm cache) never pay for it, and a loader can read
    footers and its first window while another thread lists the store."""

    def __init__(self, fs: ShoalFileSystem, protocol: str) -> None:
        self._fs, self._protocol = fs, protocol
        self.store_id = fs.store_config.store_id  # what S3Source uses in cache keys

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fs.source(self._protocol), name)


def open_version(fs: ShoalFileSystem, version: ObjectVersion) -> ShoalFile:
    """A file over a pinned version (no request to learn the version again)."""
    protocol = version.url.split("://", 1)[0] if "://" in version.url else "file"
    if protocol in S3_PROTOCOLS:
        return ShoalFile(fs, _DeferredS3Source(fs, protocol), version)  # type: ignore[arg-type]
    return ShoalFile(fs, fs.source(protocol), version)


def read_footers(fs: ShoalFileSystem, versions: Sequence[ObjectVersion], threads: int = 8) -> list[SourceFile]:
    """Footers of many files, read concurrently through the cache."""

    def footer(version: ObjectVersion) -> SourceFile:
        try:
            with open_version(fs, version) as handle:
                return SourceFile(version, pq.ParquetFile(handle).metadata)
        except StorageError:
            raise
        except (pa.ArrowInvalid, OSError) as exc:
            raise NotParquetError(f"not a Parquet file: {version.url} ({exc})") from exc

    if len(versions) <= 1:
        return [footer(v) for v in versions]
    with ThreadPoolExecutor(max_workers=min(threads, len(versions)), thread_name_prefix="shoal-footer") as pool:
        return list(pool.map(footer, versions))


def _file_schema(source_file: SourceFile) -> pa.Schema:
    return source_file.metadata.schema.to_arrow_schema()


def _checked_schema(files: Sequence[SourceFile], columns: Sequence[str] | None) -> tuple[list[str], pa.Schema]:
    """The columns to read and their types; every file must have them, with one type each."""
    first = _file_schema(files[0])
    wanted = list(first.names) if columns is None else list(columns)
    for name in wanted:
        if first.get_field_index(name) < 0:
            raise LoaderSchemaError(
                f"column {name!r} not found in {files[0].version.url}; available: {', '.join(first.names)}")
    fields = [first.field(name) for name in wanted]
    for other in files[1:]:
        schema = _file_schema(other)
        for f in fields:
            index = schema.get_field_index(f.name)
            if index < 0:
                raise LoaderSchemaError(
                    f"column {f.name!r} is in {files[0].version.url} but not in {other.version.url}")
            if not schema.field(index).type.equals(f.type):
                raise LoaderSchemaError(
                    f"column {f.name!r} is {f.type} in {files[0].version.url} but "
                    f"{schema.field(index).type} in {other.version.url}")
    return wanted, pa.schema(fields)


def _units(files: Sequence[SourceFile], selections: dict[int, np.ndarray] | None = None) -> list[Unit]:
    """Row groups with rows; with ``selections`` (sorted row numbers per file), only the selected rows."""
    units: list[Unit] = []
    for index, source_file in enumerate(files):
        meta = source_file.metadata
        sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        if selections is None:
            units.extend(Unit(index, g, n) for g, n in enumerate(sizes) if n > 0)
            continue
        rows = selections.get(index)
        if rows is None or not len(rows):
            continue
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        cuts = np.searchsorted(rows, bounds)
        for g, n in enumerate(sizes):
            picked = rows[cuts[g]:cuts[g + 1]]
            if len(picked) == 0:
                continue
            local = (picked - bounds[g]).astype(np.uint32)
            units.append(Unit(index, g, len(local), None if len(local) == n else local))
    return units


def _list_files(fs: ShoalFileSystem, pattern: str, description: str) -> list[ObjectVersion]:
    with fs.snapshot():
        versions = [v for v in fs.versions(pattern) if v.size > 0]
    if not versions:
        raise ObjectNotFoundError(f"no Parquet files found for {description}")
    return versions


def _resolve_listed(fs: ShoalFileSystem, versions: Sequence[ObjectVersion], columns: Sequence[str] | None,
                    description: str) -> ResolvedSource:
    files = read_footers(fs, versions)
    wanted, schema = _checked_schema(files, columns)
    return ResolvedSource(description=description, kind="files", files=files, units=_units(files),
                          columns=wanted, names=list(wanted), schema=schema)


# -- remembered listings -------------------------------------------------------------
# A loader on a warm cache would spend most of its start-up creating an S3 client
# (importing s3fs and aiobotocore) to list files it has listed before.  The listing
# is remembered on the SSD; the next loader resolves its source from it at once
# (footers come from the cache) and reads its first window while another thread
# lists the store.  The store's listing always decides: when it differs, the source
# is resolved again from it, and nothing read meanwhile is used.


def _listing_key(fs: ShoalFileSystem, pattern: str) -> str | None:
    protocol, _ = split_url(pattern)
    if protocol not in S3_PROTOCOLS:
        return None  # local files list in microseconds
    identity = f"shoal.loader\0{fs.store_config.store_id}\0{fs.canonical(pattern)}"
    return hashlib.blake2b(identity.encode(), digest_size=16).hexdigest()


def _remembered(fs: ShoalFileSystem, key: str) -> list[ObjectVersion] | None:
    entries = fs.reader.cache.get_listing(key)
    if not entries:
        return None
    try:
        return [ObjectVersion(**entry) for entry in entries]
    except TypeError:  # written by another version of Shoal
        return None


def _same_listing(a: Sequence[ObjectVersion], b: Sequence[ObjectVersion]) -> bool:
    return [(v.url, v.token, v.size) for v in a] == [(v.url, v.token, v.size) for v in b]


def resolve_files(fs: ShoalFileSystem, url: str, columns: Sequence[str] | None, *,
                  hive: bool | None = None, description: str | None = None,
                  allowed_paths: Sequence[str] | None = None,
                  while_listing: Callable[[ResolvedSource], None] | None = None) -> ResolvedSource:
    """A URL, glob or prefix of Parquet files, at the versions the store lists now.

    With ``while_listing``, a listing of the same pattern remembered by an earlier
    loader is used while the store is listed (on another thread): the source
    resolved from it is handed to ``while_listing`` (to start reading), and
    returned if the store's listing is the same; otherwise the source is resolved
    again from the store's listing (a different object is returned).
    """
    check_allowed(url, allowed_paths)
    pattern = TableDef(name="source", url=url, hive_partitioning=hive).pattern
    description = description or url
    key = _listing_key(fs, pattern) if while_listing is not None else None
    remembered = _remembered(fs, key) if key is not None else None
    speculative: ResolvedSource | None = None
    if remembered is None:
        versions = _list_files(fs, pattern, description)
    else:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shoal-listing") as pool:
            listing = pool.submit(_list_files, fs, pattern, description)
            try:
                speculative = _resolve_listed(fs, remembered, columns, description)
                while_listing(speculative)  # type: ignore[misc]
            except Exception as exc:  # noqa: BLE001 - the store's listing decides below
                logger.debug("resolving %s from its remembered listing failed (%s); using the store's",
                             description, exc)
                speculative = None
            versions = listing.result()  # its errors (no such bucket, no access) are this call's
    if key is not None:
        fs.reader.cache.put_listing(key, [dataclasses.asdict(v) for v in versions])
    if remembered is not None and _same_listing(versions, remembered):
        if speculative is not None:
            return speculative
    elif remembered is not None:
        logger.info("the files of %s changed since they were last listed; resolving them again", description)
    return _resolve_listed(fs, versions, columns, description)


# -- SQL -------------------------------------------------------------------------------


def _connection(fs: ShoalFileSystem, allowed_paths: Sequence[str] | None,
                materialize_dir: Path) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection on Shoal's filesystem, as locked down as the session's own."""
    con = duckdb.connect()
    con.register_filesystem(fs)
    con.execute("SET enable_external_file_cache=false")
    if allowed_paths is not None:
        materialize_dir.mkdir(parents=True, exist_ok=True)
        lock_down(con, (*allowed_paths, str(materialize_dir)), fs.protocol)
    return con


def check_allowed(url: str, allowed_paths: Sequence[str] | None) -> None:
    """With ``allowed_paths`` (see :mod:`shoal.engine.security`), local sources must lie under one of them."""
    if allowed_paths is None or "://" in url and not url.startswith("file://"):
        return
    path = os.path.realpath(url.removeprefix("file://").split("*", 1)[0] or ".")
    for root in allowed_paths:
        root = os.path.realpath(root)
        if path == root or path.startswith(os.path.join(root, "")):
            return
    raise LoaderError(f"local path {url!r} is outside the allowed paths (SHOAL_ALLOWED_PATHS / allowed_paths)")


def _simple_select(tree: dict[str, Any]) -> tuple[str, list[tuple[str, str]] | None, dict[str, Any] | None] | None:
    """For ``SELECT cols FROM table [WHERE ...]``: (table, [(column, output name)] or None for ``*``, where).
    None for anything else."""
    statements = tree.get("statements", [])
    if len(statements) != 1:
        return None
    node = statements[0].get("node", {})
    source = node.get("from_table") or {}
    if (node.get("type") != "SELECT_NODE" or node.get("modifiers") or node.get("group_expressions")
            or node.get("group_sets") or node.get("having") or node.get("qualify") or node.get("sample")
            or (node.get("cte_map") or {}).get("map") or node.get("aggregate_handling") != "STANDARD_HANDLING"
            or source.get("type") != "BASE_TABLE" or source.get("sample") or source.get("schema_name")
            or source.get("catalog_name") or source.get("at_clause")):
        return None
    if "SUBQUERY" in json.dumps(node.get("where_clause")):
        return None
    columns: list[tuple[str, str]] = []
    for expr in node.get("select_list", []):
        if expr.get("class") == "STAR" and not expr.get("exclude_list") and not expr.get("replace_list") \
                and not expr.get("relation_name") and not expr.get("columns") and len(node["select_list"]) == 1 \
                and not expr.get("expr") and not expr.get("rename_list"):
            return source["table_name"], None, node.get("where_clause")
        if expr.get("class") != "COLUMN_REF" or len(expr.get("column_names", [])) != 1:
            return None
        name = expr["column_names"][0]
        columns.append((name, expr.get("alias") or name))
    return source["table_name"], columns, node.get("where_clause")


def _selected_rows(con: duckdb.DuckDBPyConnection, tree: dict[str, Any], table: str,
                   files: Sequence[ObjectVersion], hive: bool) -> dict[int, np.ndarray]:
    """Row numbers (per file, sorted) of the rows the query's WHERE keeps: one DuckDB pass
    over the filter columns, Parquet statistics skipping row groups."""
    template = parse_tree(con, "SELECT CAST(list_position($files, filename) AS INTEGER) AS __f, "
                               "file_row_number AS __r FROM t")
    statement = json.loads(json.dumps(tree))
    statement["statements"][0]["node"]["select_list"] = template["statements"][0]["node"]["select_list"]
    sql = con.execute("SELECT json_deserialize_sql(?)", [json.dumps(statement)]).fetchall()[0][0]
    urls = [v.url for v in files]
    source = (f"read_parquet([{', '.join(quote_literal(u) for u in urls)}], hive_partitioning="
              f"{'true' if hive else 'false'}, filename=true, file_row_number=true)")
    con.execute(f"CREATE OR REPLACE TEMP VIEW {quote_ident(table)} AS SELECT * FROM {source}").fetchall()
    result = con.sql(sql, params={"files": urls}).to_arrow_table()
    index = result.column("__f").to_numpy(zero_copy_only=False).astype(np.int64) - 1
    rows = result.column("__r").to_numpy(zero_copy_only=False).astype(np.int64)
    order = np.lexsort((rows, index))
    index, rows = index[order], rows[order]
    cuts = np.searchsorted(index, np.arange(len(urls) + 1))
    return {f: rows[cuts[f]:cuts[f + 1]] for f in range(len(urls)) if cuts[f + 1] > cuts[f]}


def _materialize(fs: ShoalFileSystem, con: duckdb.DuckDBPyConnection, plan: Any, directory: Path) -> str:
    """Run the query once into a local Parquet file (reused while its inputs are unchanged)."""
    inputs = [f"{name}\0{scan.table.hive}\0" + "\0".join(f"{v.url}\0{v.token}" for v in scan.files)
              for name, scan in sorted(plan.scans.items())]
    key = fingerprint([plan.sql, *inputs, str(MATERIALIZED_ROW_GROUP)])
    target = directory / f"{key}.parquet"
    if target.exists():
        logger.debug("reusing materialized query result %s", target)
        return str(target)
    directory.mkdir(parents=True, exist_ok=True)
    for name, scan in plan.scans.items():
        if scan.files:
            body = f"SELECT * FROM {parquet_source([v.url for v in scan.files], scan.table.hive)}"
        else:  # every file pruned: an empty relation with the table's columns
            body = f"SELECT * FROM (SELECT {', '.join(quote_ident(c) for c in scan.all_columns)}) WHERE false"
        con.execute(f"CREATE OR REPLACE TEMP VIEW {quote_ident(name)} AS {body}").fetchall()
    partial = directory / f".{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        con.execute(f"COPY ({plan.sql}) TO {quote_literal(str(partial))} "
                    f"(FORMAT parquet, ROW_GROUP_SIZE {MATERIALIZED_ROW_GROUP})").fetchall()
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return str(target)


def resolve_sql(session: Any, sql: str, columns: Sequence[str] | None, *, materialize_dir: Path) -> ResolvedSource:
    """A query: streamed from its table when it only selects columns, else materialized once."""
    fs: ShoalFileSystem = session.fs
    allowed = getattr(session, "allowed_paths", None)
    con = _connection(fs, allowed, materialize_dir)
    plan = None
    try:
        try:
            statements = con.extract_statements(sql)
        except duckdb.Error as exc:
            raise translate_duckdb_error(exc) from exc
        if len(statements) != 1 or statements[0].type.name != "SELECT":
            raise LoaderError("a SQL source must be exactly one SELECT statement")
        with fs.snapshot():
            # Views made with CREATE VIEW in the session become CTEs first, as Session.sql does.
            expand = getattr(session, "_expand_views", None)
            try:
                plan = session.planner.plan(expand(sql) if expand is not None else sql)
            except duckdb.Error as exc:
                raise translate_duckdb_error(exc, fs.take_error()) from exc
            for scan in plan.scans.values():
                for version in scan.files:
                    fs.pin(version)
            simple = _simple_select(parse_tree(con, plan.sql))
            if simple is not None:
                resolved = _stream_sql(fs, con, sql, plan, simple, columns)
                if resolved is not None:
                    return resolved
            try:
                path = _materialize(fs, con, plan, materialize_dir)
            except duckdb.Error as exc:
                raise translate_duckdb_error(exc, fs.take_error()) from exc
        resolved = resolve_files(fs, path, columns, hive=False, description=f"query result of {sql.strip()!r}",
                                 allowed_paths=None)
        resolved.kind = "sql-materialized"
        return resolved
    finally:
        if plan is not None:
            session.planner.drop_views(list(plan.scans))
        con.close()


def _stream_sql(fs: ShoalFileSystem, con: duckdb.DuckDBPyConnection, sql: str, plan: Any,
                simple: tuple[str, list[tuple[str, str]] | None, Any], columns: Sequence[str] | None) -> ResolvedSource | None:
    table, selected, where = simple
    scan = plan.scans.get(table)
    if scan is None:
        return None
    description = f"query {sql.strip()!r}"
    if not scan.files:  # every file pruned by a partition filter
        return ResolvedSource(description=description, kind="sql-stream", files=[], units=[], columns=[], names=[],
                              schema=pa.schema([]))
    files = read_footers(fs, scan.files)
    file_columns = set(_file_schema(files[0]).names)
    pairs = [(c, c) for c in scan.all_columns] if selected is None else selected
    if any(c not in file_columns for c, _ in pairs):
        return None  # hive partition columns: not in the files, the materialized path adds them
    names = [n for _, n in pairs]
    if len(set(names)) != len(names):
        return None
    if columns is not None:
        missing = [c for c in columns if c not in names]
        if missing:
            raise LoaderSchemaError(f"column(s) {', '.join(map(repr, missing))} not in the result of {description}; "
                                    f"available: {', '.join(names)}")
        pairs = [pairs[names.index(c)] for c in columns]
        names = list(columns)
    wanted, schema = _checked_schema(files, [c for c, _ in pairs])
    schema = pa.schema([schema.field(i).with_name(n) for i, n in enumerate(names)])
    selections = None
    if where is not None:
        try:
            selections = _selected_rows(con, parse_tree(con, plan.sql), table, scan.files, scan.table.hive)
        except duckdb.Error as exc:
            error = translate_duckdb_error(exc, fs.take_error())
            if isinstance(error, StorageError):
                raise error from exc
            # e.g. a column named like DuckDB's filename/file_row_number: the general path still works
            logger.debug("cannot stream %s (%s); materializing it", description, error)
            return None
    return ResolvedSource(description=description, kind="sql-stream", files=files,
                          units=_units(files, selections), columns=wanted, names=names, schema=schema)


def resolve_source(source: str, *, columns: Sequence[str] | None, fs: ShoalFileSystem,
                   session_factory: Callable[[], Any], materialize_dir: Path,
                   allowed_paths: Sequence[str] | None = None,
                   while_listing: Callable[[ResolvedSource], None] | None = None) -> ResolvedSource:
    """Resolve a URL / glob / prefix, a catalog table name, or a SQL query.

    ``while_listing``: see :func:`resolve_files` (used for URL sources)."""
    if not isinstance(source, str) or not source.strip():
        raise LoaderError("source must be a URL, a glob, a table name or a SQL query")
    if columns is not None and (isinstance(columns, str) or not all(isinstance(c, str) for c in columns)):
        raise LoaderError("columns must be a list of column names")
    if is_sql(source):
        return resolve_sql(session_factory(), source, columns, materialize_dir=materialize_dir)
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", source):
        session = session_factory()
        table = session.catalog.get(source)
        if table is None:
            raise LoaderError(f"unknown table {source!r}: register it in the session, or give a URL or a query")
        return resolve_files(session.fs, table.url, columns, hive=table.hive_partitioning,
                             description=f"table {table.name} ({table.url})",
                             allowed_paths=getattr(session, "allowed_paths", None))
    return resolve_files(fs, source, columns, allowed_paths=allowed_paths, while_listing=while_listing)

