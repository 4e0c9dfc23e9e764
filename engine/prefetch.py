"""Scan-aware prefetch: fetch what a query will read before DuckDB asks for it.

After planning, the coordinator knows each scan's files and columns.  The
Parquet footers (already read, and cached, while planning) give the byte range
of every column chunk, so the blocks covering the projected columns can be
requested all at once, with the cache's full GET concurrency, while DuckDB
starts executing.  Row-group pruning by statistics is not predicted, so this is
a superset of what DuckDB reads; it is bounded by the projected columns.
"""

from __future__ import annotations

import logging

import pyarrow.parquet as pq

from shoal.cache import ShoalFileSystem, StorageError

from .planner import QueryPlan

__all__ = ["column_chunk_ranges", "prefetch_plan"]

logger = logging.getLogger(__name__)


def column_chunk_ranges(metadata: pq.FileMetaData, columns: set[str] | None) -> list[tuple[int, int]]:
    """Byte ranges of the chunks of ``columns`` (top-level names, any case; None:
    all) in every row group."""
    wanted = None if columns is None else {c.lower() for c in columns}
    ranges = []
    for group in range(metadata.num_row_groups):
        row_group = metadata.row_group(group)
        for index in range(row_group.num_columns):
            chunk = row_group.column(index)
            if wanted is not None and chunk.path_in_schema.split(".", 1)[0].lower() not in wanted:
                continue
            start = chunk.data_page_offset
            if chunk.has_dictionary_page and chunk.dictionary_page_offset:
                start = min(start, chunk.dictionary_page_offset)
            ranges.append((start, start + chunk.total_compressed_size))
    return ranges


def prefetch_plan(fs: ShoalFileSystem, plan: QueryPlan, *, max_bytes: int) -> int:
    """Start background fetches for the plan's column chunks; returns blocks covered.

    Stops adding objects once ``max_bytes`` of column chunks are requested, so a
    query far larger than the cache's memory tier is not prefetched wholesale.
    """
    requested = blocks = 0
    for scan in plan.scans.values():
        wanted = None if scan.all_named else set(scan.columns)
        for version in scan.files:
            if "://" not in version.url or version.url.startswith("file://"):
                continue  # local files are read in place
            try:
                with fs.open(version.url, "rb") as handle:
                    metadata = pq.ParquetFile(handle).metadata
            except (StorageError, OSError, ValueError) as exc:
                logger.debug("no prefetch for %s: %s", version.url, exc)
                continue
            ranges = column_chunk_ranges(metadata, wanted)
            size = sum(end - start for start, end in ranges)
            if requested + size > max_bytes:
                return blocks
            requested += size
            blocks += fs.prefetch(version.url, ranges)
    return blocks
