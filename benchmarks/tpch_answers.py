"""Reference TPC-H answers from local Parquet (main env, duckdb 2.0.x) and result comparison.

``reference_results(data_dir, sql)`` runs a query with the main env's DuckDB
over views named after the TPC-H tables, each a ``read_parquet`` of
``data_dir/<table>/*.parquet`` (the layout written by ``tpch_data.py``).
``rows_equal`` / ``rows_difference`` compare two results as multisets of rows:
floats and Decimals within a tolerance, ints exactly, dates equal to
midnight datetimes, None only equal to None.

CLI (runs every query and prints timings)::

    .venv/bin/python benchmarks/tpch_answers.py --data /tmp/tpch-sf0.01
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import math
import sys
import time
from collections import defaultdict
from decimal import Decimal
from pathlib import Path
from typing import Any, Sequence

import duckdb

log = logging.getLogger("tpch_answers")

TPCH_TABLES = ("lineitem", "orders", "partsupp", "part", "customer", "supplier", "nation", "region")
QUERIES_DIR = Path(__file__).resolve().parent / "tpch" / "queries"
_NUM = object()  # placeholder for numeric values in a row's exact-match bucket key


def connect_reference(data_dir: str | Path) -> duckdb.DuckDBPyConnection:
    """Open an in-memory DuckDB with one view per TPC-H table over its Parquet files."""
    root = Path(data_dir).resolve()
    con = duckdb.connect()
    for table in TPCH_TABLES:
        if not (root / table).is_dir():
            raise FileNotFoundError(f"no {table}/ under {root}")
        glob = str(root / table / "*.parquet").replace("'", "''")
        con.execute(f"CREATE VIEW {table} AS SELECT * FROM read_parquet('{glob}')")
    return con


def reference_results(
    data_dir: str | Path, query_sql: str, con: duckdb.DuckDBPyConnection | None = None
) -> list[tuple]:
    """Run ``query_sql`` with the main env's DuckDB over ``data_dir``; return all rows.

    Pass ``con`` from :func:`connect_reference` to reuse the views across queries.
    """
    own = con is None
    con = connect_reference(data_dir) if own else con
    try:
        return con.execute(query_sql).fetchall()
    finally:
        if own:
            con.close()


def load_queries(qdir: Path = QUERIES_DIR) -> dict[str, str]:
    """Return ``{"q01": sql, ...}`` from ``qdir/qNN.sql``."""
    return {p.stem: p.read_text() for p in sorted(qdir.glob("q*.sql"))}


# --- comparison -------------------------------------------------------------

def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float, Decimal)) and not isinstance(v, bool)


def _norm_date(v: Any) -> Any:
    """Map a midnight, naive datetime to its date so it equals/sorts with a date."""
    if isinstance(v, dt.datetime) and v.tzinfo is None and v.time() == dt.time():
        return v.date()
    return v


def _value_key(v: Any) -> tuple:
    """Total-order key for one value: None < bool < numbers < str < dates < others."""
    if v is None:
        return (0,)
    if isinstance(v, bool):
        return (1, v)
    if _is_num(v):
        f = float(v)
        return (2, 1, 0.0) if math.isnan(f) else (2, 0, f)
    if isinstance(v, str):
        return (3, v)
    v = _norm_date(v)
    if isinstance(v, (dt.date, dt.time)):  # datetime is a date subclass
        return (4, type(v).__name__ == "time", v.isoformat())
    return (5, type(v).__name__, repr(v))


def _bucket_key(row: Sequence[Any]) -> tuple:
    """Key of a row's non-numeric values (numbers masked), for exact grouping."""
    return tuple(_NUM if _is_num(v) else _value_key(v) for v in row)


def _row_sort_key(row: Sequence[Any]) -> tuple:
    """Sort by non-numeric columns first, then numbers, so near-equal floats rarely reorder rows."""
    exact = tuple(_value_key(v) for v in row if not _is_num(v))
    return exact + tuple(_value_key(v) for v in row if _is_num(v))


def values_equal(x: Any, y: Any, rel_tol: float = 1e-6, abs_tol: float = 1e-6) -> bool:
    """Compare two result values; floats/Decimals with tolerance, ints exactly."""
    if x is None or y is None:
        return x is None and y is None
    if isinstance(x, bool) or isinstance(y, bool):
        return isinstance(x, bool) and isinstance(y, bool) and x == y
    if _is_num(x) and _is_num(y):
        if isinstance(x, int) and isinstance(y, int):
            return x == y
        fx, fy = float(x), float(y)
        if math.isnan(fx) or math.isnan(fy):
            return math.isnan(fx) and math.isnan(fy)
        return math.isclose(fx, fy, rel_tol=rel_tol, abs_tol=abs_tol)
    return _norm_date(x) == _norm_date(y)


def _row_equal(ra: Sequence[Any], rb: Sequence[Any], rel_tol: float, abs_tol: float) -> bool:
    return len(ra) == len(rb) and all(values_equal(x, y, rel_tol, abs_tol) for x, y in zip(ra, rb))


def rows_difference(
    a: Sequence[Sequence[Any]], b: Sequence[Sequence[Any]], rel_tol: float = 1e-6, abs_tol: float = 1e-6
) -> str | None:
    """Return None if ``a`` and ``b`` hold the same rows (any order), else the first difference.

    Rows are sorted and compared pairwise; if that fails (e.g. near-equal
    floats sorted differently), rows are matched greedily within groups of
    equal non-numeric values before a difference is reported.
    """
    if len(a) != len(b):
        return f"row count differs: {len(a)} vs {len(b)}"
    sa, sb = sorted(a, key=_row_sort_key), sorted(b, key=_row_sort_key)
    first: str | None = None
    for i, (ra, rb) in enumerate(zip(sa, sb)):
        if len(ra) != len(rb):
            return f"row {i}: column count differs: {len(ra)} vs {len(rb)}"
        if not _row_equal(ra, rb, rel_tol, abs_tol):
            col = next(j for j, (x, y) in enumerate(zip(ra, rb)) if not values_equal(x, y, rel_tol, abs_tol))
            first = f"sorted row {i}, column {col}: {ra[col]!r} != {rb[col]!r}\n  a: {tuple(ra)!r}\n  b: {tuple(rb)!r}"
            break
    if first is None:
        return None
    # Fallback: multiset matching within buckets of equal non-numeric values.
    buckets: dict[tuple, list[Sequence[Any]]] = defaultdict(list)
    for rb in sb:
        buckets[_bucket_key(rb)].append(rb)
    for ra in sa:
        cands = buckets.get(_bucket_key(ra), [])
        j = next((k for k, rb in enumerate(cands) if _row_equal(ra, rb, rel_tol, abs_tol)), None)
        if j is None:
            near = f"\n  closest b: {tuple(cands[0])!r}" if cands else " (no b row with the same non-numeric values)"
            return f"{first}\nunmatched a row: {tuple(ra)!r}{near}"
        cands.pop(j)
    return None


def rows_equal(
    a: Sequence[Sequence[Any]], b: Sequence[Sequence[Any]], rel_tol: float = 1e-6, abs_tol: float = 1e-6
) -> bool:
    """True if ``a`` and ``b`` hold the same rows in any order (see :func:`rows_difference`)."""
    return rows_difference(a, b, rel_tol, abs_tol) is None


def main(argv: list[str] | None = None) -> int:
    """CLI: run the TPC-H queries over ``--data`` and print rows and timings."""
    p = argparse.ArgumentParser(description="Run TPC-H queries with the main env's DuckDB over local Parquet.")
    p.add_argument("--data", type=Path, required=True, help="dir written by tpch_data.py")
    p.add_argument("--queries", type=Path, default=QUERIES_DIR, help="dir of qNN.sql")
    p.add_argument("--only", nargs="*", help="query names, e.g. q01 q06")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    queries = load_queries(args.queries)
    if args.only:
        queries = {k: v for k, v in queries.items() if k in set(args.only)}
    con = connect_reference(args.data)
    total = 0.0
    for name, sql in queries.items():
        t0 = time.perf_counter()
        rows = reference_results(args.data, sql, con)
        elapsed = time.perf_counter() - t0
        total += elapsed
        if not rows_equal(rows, list(reversed(rows))):
            raise AssertionError(f"{name}: result not equal to itself reversed")
        log.info("%s %6d rows %8.3fs", name, len(rows), elapsed)
    log.info("duckdb %s: %d queries in %.3fs", duckdb.__version__, len(queries), total)
    return 0


if __name__ == "__main__":
    sys.exit(main())
