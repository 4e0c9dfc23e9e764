"""The README's first command: Shoal's main job on the embedded default.

Starts a loopback SeaweedFS (a real S3 server), loads TPC-H (SF 0.1) into it as
Parquet, then runs queries with the ``shoal`` CLI: cold (empty SSD cache), warm
(a new process: bytes now come from the local cache, zero GETs), and shows the
cache's counters.  Everything lives under ``.shoal-demo/`` and the server is
stopped at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

from s3servers import start_seaweedfs  # noqa: E402

TABLES = ("lineitem", "orders", "partsupp", "part", "customer", "supplier", "nation", "region")


def banner(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def shoal(env: dict[str, str], *args: str) -> None:
    command = [str(REPO / ".venv" / "bin" / "shoal"), *args]
    print("$ shoal " + " ".join(f'"{a}"' if " " in a else a for a in args), flush=True)
    subprocess.run(command, env=env, check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sf", type=float, default=0.1, help="TPC-H scale factor (default 0.1)")
    args = parser.parse_args()
    work = REPO / ".shoal-demo"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()

    banner(f"Generating TPC-H SF {args.sf:g} as Parquet (DuckDB's tpch extension)")
    data = work / "tpch"
    venv155 = Path(os.environ.get("SHOAL_DUCKDB155_VENV", REPO / ".venv-duckdb155"))
    subprocess.run([str(venv155 / "bin" / "python"), str(REPO / "benchmarks" / "tpch_data.py"),
                    "--sf", str(args.sf), "--out", str(data)], check=True, capture_output=True)

    banner("Starting a SeaweedFS S3 server on loopback")
    endpoint, stop = start_seaweedfs(work / "seaweedfs")
    try:
        print(f"S3 endpoint: {endpoint.endpoint_url}")
        client = endpoint.boto3_client()
        client.create_bucket(Bucket="warehouse")
        total = 0
        for path in sorted(data.rglob("*.parquet")):
            client.put_object(Bucket="warehouse", Key=f"tpch/{path.relative_to(data).as_posix()}",
                              Body=path.read_bytes())
            total += path.stat().st_size
        print(f"uploaded {total / 2**20:.1f} MiB of Parquet to s3://warehouse/tpch/")

        catalog = work / "catalog.toml"
        catalog.write_text("".join(f'[tables.{t}]\nurl = "s3://warehouse/tpch/{t}/*.parquet"\n\n' for t in TABLES))
        config = work / "config.toml"
        config.write_text(f'[cache]\ndir = "{work / "cache"}"\nsize = "2GB"\n\n[sql]\ncatalog = "{catalog}"\n')
        print(f"catalog: {catalog}\nconfig:  {config}\n" + config.read_text())
        # Credentials reach shoal the standard way: the AWS environment variables.
        env = {
            **os.environ,
            "AWS_ENDPOINT_URL_S3": endpoint.endpoint_url,
            "AWS_ACCESS_KEY_ID": endpoint.access_key,
            "AWS_SECRET_ACCESS_KEY": endpoint.secret_key,
            "AWS_REGION": endpoint.region,
            "SHOAL_CONFIG": str(config),
        }
        queries = REPO / "benchmarks" / "tpch" / "queries"
        banner("TPC-H Q1, cold: every byte comes from the object store")
        shoal(env, "sql", "--profile", "-f", str(queries / "q01.sql"))
        banner("TPC-H Q1 again, in a new process: warm, served by the local SSD cache (0 GETs)")
        shoal(env, "sql", "--profile", "-f", str(queries / "q01.sql"))
        banner("An ad-hoc query straight on a glob, as CSV")
        shoal(env, "sql", "--format", "csv",
              "SELECT n_name, count(*) AS suppliers FROM 's3://warehouse/tpch/supplier/*.parquet' "
              "JOIN 's3://warehouse/tpch/nation/*.parquet' ON s_nationkey = n_nationkey "
              "GROUP BY n_name ORDER BY suppliers DESC LIMIT 5")
        banner("EXPLAIN: the fragments, and the columns and filters pushed down to the scan")
        explain = work / "explain_q06.sql"
        explain.write_text("EXPLAIN " + (queries / "q06.sql").read_text())
        shoal(env, "sql", "-f", str(explain))
        banner("The cache, across all the processes above")
        shoal(env, "cache", "stats")
    finally:
        stop()
    print("\nDone. Try it yourself:  source .venv/bin/activate && shoal --help")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
