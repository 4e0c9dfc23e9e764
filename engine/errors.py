"""Errors of the engine layer.

Hierarchy::

    EngineError(RuntimeError)
     ├── QueryError(ValueError)            the SQL cannot run as written
     │    ├── SqlSyntaxError               parser error
     │    ├── UnknownTableError(LookupError)
     │    └── BindError                    unknown column, type mismatch, ...
     ├── CatalogError(ValueError)          bad catalog file or table definition
     ├── NotParquetError(ValueError)       a table's file is not Parquet
     ├── AccessNotAllowedError(PermissionError)  SQL reached outside the allowed paths
     ├── QueryCancelled                    interrupted by the user
     ├── OutOfMemoryError(MemoryError)     the query or its result does not fit in memory
     ├── WorkerError                       a fragment failed on a worker
     └── LoaderError                       a training-data loader cannot run as asked
          ├── LoaderSchemaError(ValueError)   a column is missing, differs, or cannot become a batch value
          └── LoaderStateError(ValueError)    a resume state does not fit the loader

Storage problems keep their own types from :mod:`shoal.cache.errors`
(``StoreError`` and subclasses): a missing bucket is a storage error whether the
engine or a loader hit it.  :func:`translate_duckdb_error` maps DuckDB's
exceptions once, at the engine boundary.
"""

from __future__ import annotations

import re

import duckdb

from shoal.cache.errors import StorageError

__all__ = [
    "EngineError",
    "QueryError",
    "SqlSyntaxError",
    "UnknownTableError",
    "BindError",
    "CatalogError",
    "NotParquetError",
    "QueryCancelled",
    "OutOfMemoryError",
    "AccessNotAllowedError",
    "WorkerError",
    "LoaderError",
    "LoaderSchemaError",
    "LoaderStateError",
    "translate_duckdb_error",
]


class EngineError(RuntimeError):
    """Base of every engine error."""


class QueryError(EngineError, ValueError):
    """The query cannot run as written."""


class SqlSyntaxError(QueryError):
    """The SQL does not parse."""


class UnknownTableError(QueryError, LookupError):
    """A table or view name is not registered."""


class BindError(QueryError):
    """Unknown column, wrong types, or another binder error."""


class CatalogError(EngineError, ValueError):
    """A catalog file or table definition is invalid."""


class NotParquetError(EngineError, ValueError):
    """A file of a table is not a Parquet file."""


class AccessNotAllowedError(EngineError, PermissionError):
    """The SQL tried to read a local file or URL outside the allowed paths."""


class QueryCancelled(EngineError):
    """The query was cancelled (Ctrl-C)."""


class OutOfMemoryError(EngineError, MemoryError):
    """The query, or its result, needs more memory than the process may use."""


class WorkerError(EngineError):
    """A query fragment failed on a worker."""


class LoaderError(EngineError):
    """Base of the training-data loader's errors (bad arguments, sources, states)."""


class LoaderSchemaError(LoaderError, ValueError):
    """A column is missing, differs between files, or cannot become a batch value."""


class LoaderStateError(LoaderError, ValueError):
    """A state dict does not fit this loader (other data, options or world size)."""


_FIRST_LINE = re.compile(r"^(?:[A-Za-z ]+ Error: )?(.*)$", re.S)


def _clean(message: str) -> str:
    # DuckDB messages may carry a Python traceback of a filesystem callback and
    # a "LINE 1: ..." excerpt; the first line is the useful part.
    first = message.strip().splitlines()[0] if message.strip() else message
    match = _FIRST_LINE.match(first)
    return match.group(1) if match else first


def translate_duckdb_error(exc: BaseException, storage_error: StorageError | None = None) -> Exception:
    """Map a DuckDB exception to the engine hierarchy (or to the storage error behind it)."""
    if storage_error is not None:
        return storage_error
    if isinstance(exc, (EngineError, StorageError)):
        return exc
    message = str(exc)
    text = _clean(message)
    if isinstance(exc, duckdb.ParserException):
        return SqlSyntaxError(f"SQL syntax error: {text}")
    if isinstance(exc, duckdb.CatalogException):
        return UnknownTableError(text)
    if isinstance(exc, duckdb.BinderException):
        return BindError(text)
    if isinstance(exc, duckdb.PermissionException):
        return AccessNotAllowedError(
            f"{text.split(' - ')[0]}: not allowed (local files are limited to SHOAL_ALLOWED_PATHS)"
        )
    if isinstance(exc, duckdb.InterruptException):
        return QueryCancelled("query cancelled")
    if isinstance(exc, duckdb.OutOfMemoryException):
        # DuckDB's advice (SET threads / memory_limit) is not something Shoal SQL can do.
        return OutOfMemoryError(f"out of memory: {text} (the query or its result does not fit in memory: "
                                "aggregate, filter or add a LIMIT)")
    if "No magic bytes found" in message or "not a parquet file" in message.lower() or "too small to be a Parquet file" in message:
        return NotParquetError(f"not a Parquet file: {text}")
    if isinstance(exc, (duckdb.ConversionException, duckdb.InvalidInputException, duckdb.OutOfRangeException)):
        return QueryError(text)
    return EngineError(text)
