"""shoal.engine: SQL over Parquet in object storage, coordinator and workers."""

from .catalog import Catalog, TableDef
from .errors import (
    AccessNotAllowedError,
    BindError,
    CatalogError,
    EngineError,
    NotParquetError,
    QueryCancelled,
    QueryError,
    SqlSyntaxError,
    UnknownTableError,
    WorkerError,
)
from .executor import EXECUTORS, Executor, ThreadExecutor, create_executor
from .profile import QueryProfile, TableIO
from .session import QueryResult, Session

__all__ = [
    "AccessNotAllowedError",
    "BindError",
    "Catalog",
    "CatalogError",
    "EXECUTORS",
    "EngineError",
    "Executor",
    "NotParquetError",
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
