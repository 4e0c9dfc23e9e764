"""What SQL may touch: DuckDB's external access, locked to Shoal's filesystem.

By default (the embedded engine on your own machine) SQL may read local files,
as DuckDB itself does.  With ``allowed_paths`` (``Session(allowed_paths=...)``,
``SHOAL_ALLOWED_PATHS=/data:/srv/parquet``, or ``none``) every DuckDB
connection of the engine -- coordinator, planner and workers -- may reach only
the object stores behind Shoal's cached filesystem and local files under those
directories: no other local file (``read_csv('/etc/passwd')``), no ``..``
escape, no ``ATTACH``, no extension install.  DuckDB enforces it
(``enable_external_access=false`` with ``allowed_directories``); once set on a
connection it cannot be undone from SQL.  Reads Shoal makes itself, outside
DuckDB (the planner lists a table's files and prefetches their footers through
its filesystem), must be checked with :func:`check_source` before anything is
touched.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import duckdb

from .errors import AccessNotAllowedError

__all__ = ["allowed_paths_from_env", "lock_down", "check_source"]


def allowed_paths_from_env(env: Mapping[str, str] | None = None) -> tuple[str, ...] | None:
    """``SHOAL_ALLOWED_PATHS``: unset -> None (unrestricted), ``none`` -> no local files,
    else directories separated by ``os.pathsep``."""
    env = os.environ if env is None else env
    value = env.get("SHOAL_ALLOWED_PATHS", "").strip()
    if not value:
        return None
    if value.lower() == "none":
        return ()
    return tuple(p for p in value.split(os.pathsep) if p)


def lock_down(con: duckdb.DuckDBPyConnection, allowed_paths: Sequence[str] | None,
              protocols: Sequence[str]) -> None:
    """Restrict ``con`` to ``protocols`` (Shoal's filesystem) and ``allowed_paths``."""
    if allowed_paths is None:
        return
    entries = [f"{p}://" for p in protocols]
    entries += [os.path.join(os.path.realpath(p), "") for p in allowed_paths]
    listing = ", ".join("'" + e.replace("'", "''") + "'" for e in entries)
    con.execute(f"SET allowed_directories=[{listing}]").fetchall()
    con.execute("SET enable_external_access=false").fetchall()


def check_source(url: str, allowed_paths: Sequence[str] | None, protocols: Sequence[str]) -> None:
    """Refuse a table URL that SQL may not reach, before it is listed or read.

    With ``allowed_paths`` set, a table is an object in one of ``protocols``
    (Shoal's object stores) or a local path (or glob) under one of the allowed
    directories, after ``..`` and symbolic links are resolved; anything else
    (another scheme such as ``http://``, a local path elsewhere) raises
    :class:`AccessNotAllowedError` naming only what the user wrote.
    """
    if allowed_paths is None:
        return
    scheme = url.split("://", 1)[0].lower() if "://" in url else "file"
    if scheme != "file":
        if scheme in protocols:
            return
        raise AccessNotAllowedError(
            f"{scheme}:// URLs are not allowed: SQL may read "
            f"{', '.join(p + '://' for p in protocols)} objects and files under SHOAL_ALLOWED_PATHS")
    path = url.split("://", 1)[1] if "://" in url else url
    if "\x00" not in path:
        real = os.path.realpath(path)
        for root in allowed_paths:
            base = os.path.realpath(root)
            if real == base or real.startswith(os.path.join(base, "")):
                return
    raise AccessNotAllowedError(f"{url!r}: not allowed (local files are limited to SHOAL_ALLOWED_PATHS)")
