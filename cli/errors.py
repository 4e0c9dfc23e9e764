"""Errors of the CLI layer and the one place that maps every error to an exit status.

Hierarchy::

    CliError(Exception)
     ├── UsageError(ValueError)    bad command line, missing file, wrong option combination
     └── ConfigError(ValueError)   bad config file or SHOAL_* value

Exit statuses (:func:`classify`):

* 0 success
* 1 runtime errors: storage (missing bucket/key, access denied, unreachable
  endpoint), non-Parquet file, writing the output file, unexpected errors
* 2 usage errors: command line, configuration, SQL (syntax, unknown table,
  binder), catalog file
* 130 the query was cancelled, or shoal was interrupted (Ctrl-C)
* 141 stdout was closed by its reader (``shoal sql ... | head``); nothing printed
"""

from __future__ import annotations

import os
import re


__all__ = ["CliError", "UsageError", "ConfigError", "classify", "redact",
           "EXIT_OK", "EXIT_RUNTIME", "EXIT_USAGE", "EXIT_CANCELLED", "EXIT_BROKEN_PIPE"]

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_CANCELLED = 130
EXIT_BROKEN_PIPE = 141   # 128 + SIGPIPE: stdout was closed by its reader

#: Environment variables whose values must never reach the terminal.
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")

#: DuckDB's "Catalog Error: " / "Binder Error: " prefixes; the message says enough.
_DUCKDB_PREFIX = re.compile(r"^(?:[A-Z][a-z]+ )+Error: ")


class CliError(Exception):
    """Base of the CLI's own errors."""


class UsageError(CliError, ValueError):
    """The command line asks for something that cannot be done."""


class ConfigError(CliError, ValueError):
    """The configuration (file or environment) is invalid."""


def redact(text: str) -> str:
    """Replace any secret found in the environment by ``***`` (defence in depth)."""
    for name in SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


def _message(exc: BaseException) -> str:
    if isinstance(exc, OSError) and len(exc.args) >= 2 and exc.strerror:
        text = exc.strerror
        if exc.filename and str(exc.filename) not in text:
            text = f"{text}: {exc.filename}"
    else:
        text = str(exc) or type(exc).__name__
    # One line, always: DuckDB adds "LINE 1: ..." excerpts, botocore adds context.
    text = " ".join(part.strip() for part in text.splitlines() if part.strip())
    return redact(_DUCKDB_PREFIX.sub("", text))


def classify(exc: BaseException) -> tuple[int, str]:
    """The exit status and the one-line message for an error."""
    # Imported here so that `shoal` can take Ctrl-C from its very start (see main.main).
    from shoal.cache import StorageConfigError, StorageError
    from shoal.engine import CatalogError, EngineError, QueryCancelled, QueryError

    if isinstance(exc, QueryCancelled):
        return EXIT_CANCELLED, "query cancelled"
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_CANCELLED, "interrupted"
    if isinstance(exc, (QueryError, CatalogError, StorageConfigError, CliError)):
        return EXIT_USAGE, _message(exc)
    if isinstance(exc, (EngineError, StorageError)):
        return EXIT_RUNTIME, _message(exc)
    if isinstance(exc, OSError):
        return EXIT_RUNTIME, _message(exc)
    if isinstance(exc, MemoryError):  # raised outside the engine (Arrow, printing): still one line
        return EXIT_RUNTIME, f"out of memory: {_message(exc) if str(exc) else 'the result does not fit in memory'}"
    return EXIT_RUNTIME, f"unexpected {type(exc).__name__}: {_message(exc)} (run with --debug for details)"
