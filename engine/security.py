"""What SQL may touch: DuckDB's external access, locked to Shoal's filesystem.

By default (the embedded engine on your own machine) SQL may read local files,
as DuckDB itself does.  With ``allowed_paths`` (``Session(allowed_paths=...)``,
``SHOAL_ALLOWED_PATHS=/data:/srv/parquet``, or ``none``) every DuckDB
connection of the engine -- coordinator, planner and workers -- may reach only
the object stores behind Shoal's cached filesystem and local files under those
directories: no other local file (``read_csv('/etc/passwd')``), no ``..``
escape, no ``ATTACH``, no extension install.  DuckDB enforces it
(``enable_external_access=false`` with ``allowed_directories``); once set on a
connection it cannot be undone from SQL.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import duckdb

__all__ = ["allowed_paths_from_env", "lock_down"]


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
