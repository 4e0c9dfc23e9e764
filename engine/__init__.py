"""shoal.engine: SQL over Parquet in object storage, coordinator and workers."""

from .catalog import Catalog, TableDef
from .errors import (
    AccessNotAllowedError,
    BindError,
    CatalogError,
    EngineError,
    LoaderError,
    LoaderSchemaError,
    LoaderStateError,
    NotParquetError,
    OutOfMemoryError,
    QueryCancelled,
    QueryError,
    SqlSyntaxError,
    UnknownTableError,
    WorkerError,
)
from .executor import EXECUTORS, Executor, ThreadExecutor, create_executor
from .loader import BatchLoader
from .profile import QueryProfile, TableIO
from .session import QueryResult, Session

__all__ = [
    "AccessNotAllowedError",
    "BatchLoader",
    "BindError",
    "Catalog",
    "CatalogError",
    "EXECUTORS",
    "EngineError",
    "Executor",
    "LoaderError",
    "LoaderSchemaError",
    "LoaderStateError",
    "NotParquetError",
    "OutOfMemoryError",
    "QueryCancelled",
    "QueryError",
    "QueryProfile",
    "QueryResult",
    "Session",
    "SqlSyntaxError",
    "TableDef",
    "TableIO",
    "ThreadExecutor",
    "UnknownTableError",
    "WorkerError",
    "create_executor",
]
