"""The floor of reading Parquet through a Python filesystem: DuckDB over a minimal
pread-based fsspec filesystem against DuckDB's native reads of the same local files.

Any design in which DuckDB reads cached bytes through a registered fsspec
filesystem (Shoal's warm path) pays at least this, before it lists, looks up or
verifies anything.  Each run is a fresh process, timed like ``bench_tpch.py``
(view creation plus the query to an Arrow table)::

    .venv/bin/python benchmarks/tpch_fsspec_floor.py --queries q01,q05,q06,q19,q09 --runs 5

Needs the SF 1 data in ``benchmarks/data/tpch-sf1`` (``bench_tpch.py`` makes it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

_CHILD = r'''
import io, json, os, sys, time
sys.path.insert(0, sys.argv[3])
import duckdb, pyarrow  # noqa: F401 - pyarrow before the timed region, as bench_tpch's runner does
from fsspec.implementations.local import LocalFileSystem
import tpch_answers

class PreadFile(io.RawIOBase):
    def __init__(self, path):
        self.fd, self.pos = os.open(path, os.O_RDONLY), 0
        self.size = os.fstat(self.fd).st_size
    def readable(self): return True
    def seekable(self): return True
    def seek(self, offset, whence=0):
        self.pos = offset if whence == 0 else (self.pos + offset if whence == 1 else self.size + offset)
        return self.pos
    def tell(self): return self.pos
    def read(self, n=-1):
        n = self.size - self.pos if n is None or n < 0 else n
        data = os.pread(self.fd, n, self.pos)
        self.pos += len(data)
        return data
    def close(self):
        if not self.closed:
            os.close(self.fd)
        super().close()

class PreadFileSystem(LocalFileSystem):
    protocol = ("pyfile",)
    root_marker = "/"
    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        return path[len("pyfile://"):] if path.startswith("pyfile://") else path
    def _open(self, path, mode="rb", **kwargs):
        return PreadFile(self._strip_protocol(path))

mode, query, _, data = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
con = duckdb.connect()
con.execute("SET threads=2")
con.execute("SET enable_external_file_cache=false")
prefix = ""
if mode == "fsspec":
    con.register_filesystem(PreadFileSystem())
    prefix = "pyfile://"
sql = tpch_answers.load_queries()[query]
start = time.perf_counter()
for table in ("lineitem", "orders", "partsupp", "part", "customer", "supplier", "nation", "region"):
    con.execute(f"CREATE VIEW {table} AS FROM read_parquet('{prefix}{data}/{table}/*.parquet')")
con.sql(sql).to_arrow_table()
print(json.dumps(time.perf_counter() - start))
'''


def _run(mode: str, query: str, data: Path) -> float:
    out = subprocess.run([sys.executable, "-c", _CHILD, mode, query, str(HERE), str(data)],
                         capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--queries", default="q01,q05,q06,q19,q09")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--data", type=Path, default=HERE / "data" / "tpch-sf1")
    args = parser.parse_args()
    ratios = []
    for query in args.queries.split(","):
        times: dict[str, list[float]] = {"native": [], "fsspec": []}
        for _ in range(args.runs):
            for mode in times:  # interleaved
                times[mode].append(_run(mode, query, args.data))
        native, fsspec = statistics.median(times["native"]), statistics.median(times["fsspec"])
        ratios.append(fsspec / native)
        print(f"{query}: native {native:.3f} s, pread fsspec {fsspec:.3f} s, ratio {fsspec / native:.2f}", flush=True)
    print(f"geometric mean {statistics.geometric_mean(ratios):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
