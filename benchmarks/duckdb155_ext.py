"""Load pip-packaged DuckDB extensions by file path (duckdb 1.5.5 env only).

The PyPI packages ``duckdb-extension-<name>`` (e.g. ``duckdb-extension-tpch``,
``duckdb-extension-httpfs``) install a plain package ``duckdb_extension_<name>``
with no code; the binary lies at::

    site-packages/duckdb_extension_<name>/extensions/v<duckdb version>/<name>.duckdb_extension

This module finds that file without importing the package and LOADs it by
path, so nothing is ever downloaded. Run it with the interpreter of the env
made by ``benchmarks/duckdb155_env.sh``::

    .venv-duckdb155/bin/python benchmarks/duckdb155_ext.py tpch httpfs
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from pathlib import Path

import duckdb

log = logging.getLogger(__name__)


def extension_path(name: str) -> str:
    """Return the absolute path of the packaged ``<name>.duckdb_extension``.

    Prefers the directory matching the running duckdb version
    (``extensions/v1.5.5``); falls back to any version directory present.
    Raises ``FileNotFoundError`` when the package is missing.
    """
    pkg = f"duckdb_extension_{name.replace('-', '_')}"
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {pkg} not installed (pip install duckdb-extension-{name}=={duckdb.__version__})"
        )
    fname = f"{name}.duckdb_extension"
    for root in map(Path, spec.submodule_search_locations):
        exact = root / "extensions" / f"v{duckdb.__version__}" / fname
        if exact.is_file():
            return str(exact.resolve())
        found = sorted(root.glob(f"extensions/*/{fname}"))
        if found:
            log.warning("no %s for duckdb v%s; using %s", fname, duckdb.__version__, found[-1])
            return str(found[-1].resolve())
    raise FileNotFoundError(f"{fname} not found in package {pkg}")


def connect_with(*names: str, database: str = ":memory:") -> duckdb.DuckDBPyConnection:
    """Open a connection and LOAD each named extension from its packaged file.

    Auto-install/auto-load of known extensions is switched off so a missing
    extension fails fast instead of trying the network.
    """
    con = duckdb.connect(database)
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")
    for name in names:
        path = extension_path(name)
        log.debug("LOAD %s", path)
        con.execute(f"LOAD '{path}'")
    return con


def main(argv: list[str] | None = None) -> int:
    """CLI: print each extension's path and check it loads."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="+", help="extension names, e.g. tpch httpfs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    for name in args.names:
        print(f"{name}\t{extension_path(name)}")
    con = connect_with(*args.names)
    rows = con.execute(
        "SELECT extension_name, extension_version FROM duckdb_extensions() "
        "WHERE loaded AND list_contains(?, extension_name)",
        [list(args.names)],
    ).fetchall()
    log.info("duckdb %s loaded: %s", duckdb.__version__, rows)
    return 0 if len(rows) == len(set(args.names)) else 1


if __name__ == "__main__":
    sys.exit(main())
