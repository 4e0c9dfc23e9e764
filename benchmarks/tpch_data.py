"""Generate TPC-H data as multi-file Parquet, and the 22 official query texts.

Runs with the duckdb 1.5.5 env (``bash benchmarks/duckdb155_env.sh``), whose
pip-packaged ``tpch`` extension is LOADed by file path::

    .venv-duckdb155/bin/python benchmarks/tpch_data.py --sf 0.01 --out /tmp/tpch-sf0.01
    .venv-duckdb155/bin/python benchmarks/tpch_data.py --queries-out benchmarks/tpch/queries

Layout: ``OUT/<table>/part-0000.parquet`` ..., snappy, row groups of 122,880
rows. Large tables are split into files over disjoint, ascending ranges of
their primary key (lineitem uses the orders boundaries and partsupp the part
boundaries, so related files line up); each file is sorted by its key.
``OUT/_manifest.json`` is written last; a run whose manifest already has the
same SF (and file counts, when ``--files-per-table`` is given) does nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import duckdb

sys.path.insert(0, str(Path(__file__).resolve().parent))
from duckdb155_ext import connect_with  # noqa: E402

log = logging.getLogger("tpch_data")

ROW_GROUP_SIZE = 122_880
LINEITEM_ROWS_PER_FILE = 1_500_000
MANIFEST = "_manifest.json"

# table -> (sort key columns, split column, table whose key quantiles set the split boundaries)
TABLES: dict[str, tuple[list[str], str | None, str | None]] = {
    "lineitem": (["l_orderkey", "l_linenumber"], "l_orderkey", "orders"),
    "orders": (["o_orderkey"], "o_orderkey", "orders"),
    "partsupp": (["ps_partkey", "ps_suppkey"], "ps_partkey", "part"),
    "part": (["p_partkey"], "p_partkey", "part"),
    "customer": (["c_custkey"], "c_custkey", "customer"),
    "supplier": (["s_suppkey"], None, None),
    "nation": (["n_nationkey"], None, None),
    "region": (["r_regionkey"], None, None),
}
BOUNDARY_KEY = {"orders": "o_orderkey", "part": "p_partkey", "customer": "c_custkey"}
MIN_FILES = {"lineitem": 2, "orders": 2}  # always exercise multi-file paths


def default_file_counts(sf: float, files_per_table: int | None) -> dict[str, int]:
    """Files per table: ~one per 1.5M lineitem rows for the large tables, 1 for small ones."""
    if files_per_table is not None:
        n = max(1, files_per_table)
    else:
        n = max(1, round(6_000_000 * sf / LINEITEM_ROWS_PER_FILE))
    counts: dict[str, int] = {}
    for table, (_, split_col, _) in TABLES.items():
        counts[table] = 1 if split_col is None else max(n, MIN_FILES.get(table, 1))
    return counts


def split_bounds(con: duckdb.DuckDBPyConnection, table: str, n: int) -> list[int]:
    """Return n-1 ascending key boundaries (approx. equal row counts) for ``table``."""
    if n <= 1:
        return []
    key = BOUNDARY_KEY[table]
    fracs = [i / n for i in range(1, n)]
    (bounds,) = con.execute(f"SELECT quantile_disc({key}, ?) FROM {table}", [fracs]).fetchone()
    return sorted(set(int(b) for b in bounds))


def write_table(
    con: duckdb.DuckDBPyConnection, out: Path, table: str, n_files: int
) -> list[dict[str, object]]:
    """Write ``table`` as ``out/table/part-XXXX.parquet`` files; return per-file info."""
    sort_cols, split_col, bounds_from = TABLES[table]
    tdir = out / table
    if tdir.exists():
        shutil.rmtree(tdir)
    tdir.mkdir(parents=True)
    bounds = split_bounds(con, bounds_from, n_files) if split_col else []
    edges: list[int | None] = [None, *bounds, None]
    files: list[dict[str, object]] = []
    for i in range(len(edges) - 1):
        lo, hi = edges[i], edges[i + 1]
        conds = []
        if lo is not None:
            conds.append(f"{split_col} >= {lo}")
        if hi is not None:
            conds.append(f"{split_col} < {hi}")
        where = f"WHERE {' AND '.join(conds)}" if conds else ""
        path = tdir / f"part-{i:04d}.parquet"
        con.execute(
            f"COPY (SELECT * FROM {table} {where} ORDER BY {', '.join(sort_cols)}) "
            f"TO '{path}' (FORMAT parquet, COMPRESSION snappy, ROW_GROUP_SIZE {ROW_GROUP_SIZE})"
        )
        rows, kmin, kmax = con.execute(
            f"SELECT count(*), min({sort_cols[0]}), max({sort_cols[0]}) FROM read_parquet('{path}')"
        ).fetchone()
        files.append(
            {
                "path": f"{table}/{path.name}",
                "rows": rows,
                "bytes": path.stat().st_size,
                "key": sort_cols[0],
                "key_min": kmin,
                "key_max": kmax,
            }
        )
    return files


def read_manifest(out: Path) -> dict | None:
    """Return the parsed manifest in ``out``, or None if absent/unreadable."""
    try:
        return json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def generate(out: Path, sf: float, files_per_table: int | None = None, force: bool = False) -> dict:
    """Generate TPC-H at scale factor ``sf`` into ``out`` unless already there; return the manifest."""
    counts = default_file_counts(sf, files_per_table)
    old = read_manifest(out)
    if old is not None and not force and float(old.get("sf", -1)) == sf:
        old_counts = {t: len(v["files"]) for t, v in old.get("tables", {}).items()}
        if files_per_table is None or old_counts == counts:
            log.info("%s already holds TPC-H sf=%s; nothing to do", out, sf)
            return old
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)

    t0 = time.perf_counter()
    con = connect_with("tpch")
    con.execute(f"CALL dbgen(sf={sf!r})")
    t_gen = time.perf_counter() - t0
    log.info("dbgen(sf=%s) took %.1fs", sf, t_gen)

    tables: dict[str, dict] = {}
    for table, n in counts.items():
        t1 = time.perf_counter()
        files = write_table(con, out, table, n)
        rows = sum(int(f["rows"]) for f in files)
        (expected,) = con.execute(f"SELECT count(*) FROM {table}").fetchone()
        if rows != expected:
            raise RuntimeError(f"{table}: wrote {rows} rows, expected {expected}")
        tables[table] = {"rows": rows, "bytes": sum(int(f["bytes"]) for f in files), "files": files}
        log.info("%-8s %9d rows in %d file(s), %.1fs", table, rows, len(files), time.perf_counter() - t1)
    (ext_version,) = con.execute(
        "SELECT extension_version FROM duckdb_extensions() WHERE extension_name = 'tpch'"
    ).fetchone()
    con.close()

    manifest = {
        "sf": sf,
        "duckdb_version": duckdb.__version__,
        "tpch_extension_version": ext_version,
        "compression": "snappy",
        "row_group_size": ROW_GROUP_SIZE,
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dbgen_seconds": round(t_gen, 3),
        "total_seconds": round(time.perf_counter() - t0, 3),
        "total_bytes": sum(t["bytes"] for t in tables.values()),
        "tables": tables,
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out / MANIFEST)
    log.info(
        "TPC-H sf=%s -> %s: %.1f MiB in %.1fs",
        sf, out, manifest["total_bytes"] / 2**20, manifest["total_seconds"],
    )
    return manifest


def write_queries(qdir: Path) -> list[Path]:
    """Write the 22 official TPC-H queries from ``tpch_queries()`` as ``qNN.sql``."""
    qdir.mkdir(parents=True, exist_ok=True)
    con = connect_with("tpch")
    rows = con.execute("SELECT query_nr, query FROM tpch_queries() ORDER BY query_nr").fetchall()
    con.close()
    paths = []
    for nr, sql in rows:
        path = qdir / f"q{int(nr):02d}.sql"
        path.write_text(sql.strip() + "\n")
        paths.append(path)
    log.info("wrote %d queries to %s", len(paths), qdir)
    return paths


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    p = argparse.ArgumentParser(description="Generate TPC-H Parquet data and/or query files (duckdb 1.5.5 env).")
    p.add_argument("--sf", type=float, help="scale factor, e.g. 0.01, 0.1, 1")
    p.add_argument("--out", type=Path, help="output directory for <table>/part-XXXX.parquet + _manifest.json")
    p.add_argument("--files-per-table", type=int, default=None,
                   help="files per large table (default: ~1 per 1.5M lineitem rows; lineitem/orders >= 2)")
    p.add_argument("--queries-out", type=Path, help="directory to write q01.sql .. q22.sql")
    p.add_argument("--force", action="store_true", help="regenerate even if the manifest matches")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s")
    if args.out is None and args.queries_out is None:
        p.error("give --out (with --sf) and/or --queries-out")
    if args.out is not None:
        if args.sf is None or not math.isfinite(args.sf) or args.sf <= 0:
            p.error("--out needs a positive --sf")
        generate(args.out, args.sf, args.files_per_table, args.force)
    if args.queries_out is not None:
        write_queries(args.queries_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
