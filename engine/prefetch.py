"""Scan-aware prefetch: fetch what a query will read before DuckDB asks for it.

After planning, the coordinator knows each scan's files and columns.  The
Parquet footers (all requested at once, one round trip) give the byte range of
every column chunk, so the blocks covering the projected columns can be
requested all at once, with the cache's full GET concurrency, while DuckDB
starts executing.  Row-group pruning by statistics is not predicted, so this is
a superset of what DuckDB reads; it is bounded by the projected columns.

A file whose footer and named columns are all on this SSD already is not
prefetched: DuckDB is handed a local copy of those ranges to read natively
(see :mod:`shoal.cache.localcopy`); its layout comes from the copy's sidecar,
so a warm query parses no footer.
"""

from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from shoal.cache import ObjectVersion, ShoalFileSystem, StorageError
from shoal.cache.nativereads import QueryPieces

from .planner import QueryPlan, footer_range

__all__ = ["column_chunk_ranges", "native_layout", "prefetch_plan", "prepare_local_copies", "remote_files"]

logger = logging.getLogger(__name__)

_FOOTER_TAIL = 8  # footer length (4 bytes) + "PAR1"


def _chunk_ranges(chunk: pq.ColumnChunkMetaData, bloom_filters: bool) -> list[tuple[int, int]]:
    """Where one column chunk lies (from its dictionary page on), and its bloom filter."""
    start = chunk.data_page_offset
    if chunk.has_dictionary_page and chunk.dictionary_page_offset:
        start = min(start, chunk.dictionary_page_offset)
    ranges = [(start, start + chunk.total_compressed_size)]
    if bloom_filters and chunk.bloom_filter_offset and chunk.bloom_filter_length:
        ranges.append((chunk.bloom_filter_offset, chunk.bloom_filter_offset + chunk.bloom_filter_length))
    return ranges


def column_chunk_ranges(metadata: pq.FileMetaData, columns: set[str] | None, *,
                        bloom_filters: bool = False) -> list[tuple[int, int]]:
    """Byte ranges of the chunks of ``columns`` (top-level names, any case; None:
    all) in every row group, and with ``bloom_filters`` their bloom filters."""
    wanted = None if columns is None else {c.lower() for c in columns}
    ranges = []
    for group in range(metadata.num_row_groups):
        row_group = metadata.row_group(group)
        for index in range(row_group.num_columns):
            chunk = row_group.column(index)
            if wanted is None or chunk.path_in_schema.split(".", 1)[0].lower() in wanted:
                ranges += _chunk_ranges(chunk, bloom_filters)
    return ranges


def native_layout(metadata: pq.FileMetaData, size: int) -> dict[str, list[tuple[int, int]] | None]:
    """Where a Parquet reader finds what it may use of a ``size``-byte file: the
    footer (key ``""``) and, per top-level column (lower-cased), its chunks and
    bloom filters.  A column with a page index maps to None: pyarrow does not
    expose where the index is, so a copy could not be known to hold it."""
    layout: dict[str, list[tuple[int, int]] | None] = {"": [(size - _FOOTER_TAIL - metadata.serialized_size, size)]}
    for group in range(metadata.num_row_groups):
        row_group = metadata.row_group(group)
        for index in range(row_group.num_columns):
            chunk = row_group.column(index)
            name = chunk.path_in_schema.split(".", 1)[0].lower()
            ranges = layout.setdefault(name, [])
            if ranges is None:
                continue
            if chunk.has_column_index or chunk.has_offset_index:
                layout[name] = None
                continue
            ranges += _chunk_ranges(chunk, bloom_filters=True)
    return layout


def prefetch_plan(fs: ShoalFileSystem, plan: QueryPlan, *, max_bytes: int,
                  native: bool = False, pieces: QueryPieces | None = None,
                  pieces_bytes: int = 0) -> dict[str, str]:
    """Start background fetches for the plan's column chunks (and their bloom
    filters).  With ``native``, a file whose ranges are all on this SSD is not
    fetched but handed over as a local copy (:meth:`ShoalFileSystem.local_copy`):
    returns ``{url: local path}`` of those.  With ``pieces`` (DuckDB has Shoal's
    extension), the other files whose prefetched ranges fit in ``pieces_bytes``
    are handed over as paths DuckDB reads from the prefetched memory natively
    (:mod:`shoal.cache.nativereads`), also in the returned mapping; their column
    chunks are then planned and registered in the background, while DuckDB
    starts on their footers.

    Stops adding objects once ``max_bytes`` of column chunks are requested, so a
    query far larger than the cache's memory tier is not prefetched wholesale.
    """
    remote = remote_files(plan)
    copies = _local_copies(fs, remote, use=True) if native else {}
    # The footers of the rest, all at once (each is a round trip to the store when cold).
    rest = [(scan, version) for scan, version in remote if version.url not in copies]
    in_memory = 0  # of what DuckDB reads natively, all kept until the query ends
    for _, version in rest:
        tail = footer_range(version)
        native_file = pieces is not None and in_memory + (tail[1] - tail[0]) <= pieces_bytes
        footer: list[tuple[int, int, Any]] = []
        fs.prefetch(version.url, [tail], collect=footer if native_file else None)
        if native_file:
            in_memory += tail[1] - tail[0]
            # DuckDB may start on the footer while the file's chunks are planned.
            copies[version.url] = pieces.add(version, footer, complete=False)  # type: ignore[union-attr]

    def chunks() -> None:
        nonlocal in_memory
        requested = 0
        for scan, version in rest:
            if requested >= max_bytes:
                break
            wanted = None if scan.all_named else set(scan.columns)
            try:
                ranges = column_chunk_ranges(_metadata(fs, version), wanted, bloom_filters=True)
            except (StorageError, OSError, ValueError) as exc:
                logger.debug("no prefetch for %s: %s", version.url, exc)
                continue
            size = sum(end - start for start, end in ranges)
            if requested + size > max_bytes:
                break
            requested += size
            native_file = pieces is not None and version.url in copies
            held: list[tuple[int, int, Any]] = []
            fs.prefetch(version.url, ranges, collect=held if native_file else None)
            if native_file:
                if in_memory + size <= pieces_bytes:  # beyond it, DuckDB reads them through the cache
                    in_memory += size
                    pieces.extend(version, held)  # type: ignore[union-attr]
                pieces.complete(version)  # type: ignore[union-attr]

    if pieces is None:
        chunks()
    else:  # registered as their footers arrive, while DuckDB reads those footers too
        pieces.in_background(chunks)
    return copies


def prepare_local_copies(fs: ShoalFileSystem, plan: QueryPlan) -> int:
    """Make the local copies a later run of ``plan`` would use, from what this SSD
    holds (nothing is fetched); returns how many files have one."""
    return len(_local_copies(fs, remote_files(plan), use=False))


def remote_files(plan: QueryPlan) -> list[tuple[Any, ObjectVersion]]:
    """(scan, version) of each file of the plan in an object store."""
    return [(scan, version) for scan in plan.scans.values() for version in scan.files
            if "://" in version.url and not version.url.startswith("file://")]  # local files are read in place


def _local_copies(fs: ShoalFileSystem, remote: list[tuple[Any, ObjectVersion]], *, use: bool) -> dict[str, str]:
    """``{url: local path}`` of the files whose footer and named columns are all on
    this SSD (``use=False``: made for a later query, not counted as used)."""
    copies: dict[str, str] = {}
    for scan, version in remote:
        parts = None if scan.all_named else ["", *sorted(c.lower() for c in scan.columns)]
        try:
            local = fs.local_copy(version.url, parts, lambda v=version: _cached_layout(fs, v, count=use),
                                  version=version, use=use)
        except (StorageError, OSError, ValueError) as exc:
            logger.debug("no local copy of %s: %s", version.url, exc)
            local = None
        if local is not None:
            copies[version.url] = local
    return copies


def _metadata(fs: ShoalFileSystem, version: ObjectVersion) -> pq.FileMetaData:
    with fs.open(version.url, "rb") as handle:
        return pq.ParquetFile(handle).metadata


def _cached_layout(fs: ShoalFileSystem, version: ObjectVersion, *,
                   count: bool = True) -> dict[str, list[tuple[int, int]] | None] | None:
    """The object's layout from its footer if the footer is on this SSD (a local
    copy needs every byte cached anyway: a cold footer would be a GET for nothing)."""
    tail = fs.cached_range(version.url, *footer_range(version), version=version, count=count)
    if tail is None or len(tail) < 8 or tail[-4:] != b"PAR1":
        return None
    length = int.from_bytes(tail[-8:-4], "little")
    if length + 8 > len(tail):  # a footer larger than the guess
        tail = fs.cached_range(version.url, max(0, version.size - 8 - length), version.size, version=version,
                               count=count)
        if tail is None or length + 8 > len(tail):
            return None
    metadata = pq.read_metadata(pa.BufferReader(tail[len(tail) - 8 - length:]))
    return native_layout(metadata, version.size)
