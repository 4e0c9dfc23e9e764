"""Spilling large scan results to the object store as Parquet (the ray executor).

A task whose result is larger than the limit it was sent with (the executor's
``spill_threshold``, lowered to what is left of the coordinator's
``memory_budget``) is written by its worker as one Parquet object under the
query's spill prefix, ``<spill url>/<query id>/``, and the worker returns the
object's URL and version instead of the rows.  A result that arrives in
memory but would take the coordinator past its budget (several tasks sent
while there was room) is spilled the same way by the coordinator.  The
coordinator's DuckDB then reads the spilled objects through Shoal's
filesystem, next to the in-memory results (:class:`SpilledResult` carries
the URLs; the session turns them into a view over ``read_parquet``).

The spill URL is the executor's ``spill_url``, else ``SHOAL_SPILL_URL``, else
``s3://<bucket of the query's first object>/.shoal-spill/``.  A query's prefix
is deleted when the coordinator releases its results (after the finish
step), at once when the query fails or is cancelled, and at the executor's
close for anything left over.

No Ray import: the worker actor and the dispatcher both use it.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from shoal.cache import ObjectVersion, ShoalFileSystem, StorageError

from .errors import EngineError, WorkerError
from .worker import ScanResult, ScanTask

__all__ = ["SpilledResult", "SPILL_DIR", "check_spill_url", "spill_base", "spill_object", "write_spill",
           "delete_prefix"]

logger = logging.getLogger(__name__)

#: Folder under a bucket that holds the spill prefixes when no spill URL is configured.
SPILL_DIR = ".shoal-spill"

_SCHEMES = ("s3://", "s3a://")


@dataclass(frozen=True)
class SpilledResult(ScanResult):
    """A scan result whose rows are in Parquet objects (``table`` holds only the schema)."""

    spilled: tuple[str, ...] = ()
    spilled_rows: int = 0
    spilled_bytes: int = 0
    spill_prefix: str = ""


def check_spill_url(url: str) -> str:
    """``url`` as a spill location (``s3://bucket/path/``), or :class:`EngineError`."""
    if not url.startswith(_SCHEMES) or not url.split("://", 1)[1].split("/", 1)[0]:
        raise EngineError(f"the spill URL must be an s3:// bucket or prefix every worker can write, got {url!r}")
    return url.rstrip("/") + "/"


def spill_base(configured: str | None, tasks: Sequence[ScanTask]) -> str | None:
    """Where a query's results spill: ``configured``, ``SHOAL_SPILL_URL``, or the
    bucket of the query's first object-store file; None when there is none."""
    base = configured or os.environ.get("SHOAL_SPILL_URL")
    if base:
        return check_spill_url(base)
    for task in tasks:
        for version in task.files:
            if version.url.startswith(_SCHEMES):
                scheme, rest = version.url.split("://", 1)
                return f"{scheme}://{rest.split('/', 1)[0]}/{SPILL_DIR}/"
    return None


def spill_object(prefix: str, task: ScanTask) -> str:
    """A new object URL under ``prefix`` for one result of ``task`` (unique per attempt)."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", task.table)[:64] or "table"
    return f"{prefix}{name}-{task.fragment:05d}-{uuid.uuid4().hex[:12]}.parquet"


def write_spill(fs: ShoalFileSystem, url: str, table: pa.Table) -> dict[str, Any]:
    """Write ``table`` as Parquet to ``url``; returns the object's version as plain data."""
    try:
        with fs.open(url, "wb") as handle:
            pq.write_table(table, handle)
        version = fs.source(url.split("://", 1)[0]).stat(fs.canonical(url))
    except (StorageError, OSError) as exc:
        raise WorkerError(f"cannot spill a scan result to {url}: {exc}; set SHOAL_SPILL_URL (or the "
                          f"executor's spill_url) to a location every worker can write") from None
    return asdict(version)


def pin_spilled(fs: ShoalFileSystem, version: dict[str, Any]) -> str:
    """Pin a spilled object's version in ``fs``'s current snapshot (no HEAD when DuckDB opens it)."""
    return fs.pin(ObjectVersion(**version)).url


def delete_prefix(fs: ShoalFileSystem, prefix: str) -> int | None:
    """Delete every object under ``prefix``; the number deleted, or None when that
    failed (logged, never raised: it runs while a query's own outcome is reported)."""
    protocol, _, rest = prefix.partition("://")
    try:
        store = fs.source(protocol).fs
        store.invalidate_cache(rest)
        paths = [p for p in store.find(rest)]
        if paths:
            store.rm(paths)
        return len(paths)
    except FileNotFoundError:
        return 0
    except Exception as exc:  # noqa: BLE001 - cleanup must not hide the query's result
        logger.warning("could not delete the spill files under %s: %s", prefix, type(exc).__name__)
        return None
