"""All 22 TPC-H queries through Shoal equal DuckDB on the same local files,
on real S3 servers, with 1, 2 and 4 workers."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Iterator

import pytest

from shoal.cache import CacheConfig, StoreConfig
from shoal.engine import Session

from tpch_fixtures import TPCH_TABLES, answers, queries, upload  # type: ignore[import-not-found]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def tpch_bucket(s3_endpoint, tpch_dir: Path) -> Iterator[str]:
    client = s3_endpoint.boto3_client()
    bucket = f"shoal-tpch-{uuid.uuid4().hex[:10]}"
    client.create_bucket(Bucket=bucket)
    upload(client, bucket, tpch_dir)
    yield bucket
    from s3servers import empty_and_delete_bucket  # type: ignore[import-not-found]

    empty_and_delete_bucket(client, bucket)


def _store(endpoint) -> StoreConfig:
    return StoreConfig(endpoint_url=endpoint.endpoint_url, access_key=endpoint.access_key,
                       secret_key=endpoint.secret_key, region=endpoint.region)


@pytest.mark.parametrize(("executor", "workers"), [("threads", 1), ("threads", 2), ("threads", 4), ("local", 2)])
def test_tpch_equals_duckdb(s3_endpoint, tpch_bucket: str, reference, executor: str, workers: int,
                            tmp_path: Path) -> None:
    session = Session(workers=workers, executor=executor, cache=CacheConfig(directory=tmp_path / "cache"),
                      store=_store(s3_endpoint))
    for table in TPCH_TABLES:
        session.register(table, f"s3://{tpch_bucket}/tpch/{table}/*.parquet")
    failures = {}
    with session:
        for name, sql in queries().items():
            got = [tuple(row.values()) for row in session.sql(sql).table.to_pylist()]
            difference = answers.rows_difference(got, reference[name])
            if difference:
                failures[name] = difference
        assert session.fs.stats()["store_requests"] > 0
    assert failures == {}


def test_second_run_reads_only_from_cache(s3_endpoint, tpch_bucket: str, tmp_path: Path) -> None:
    sql = queries()["q03"]
    results = []
    for run in range(2):
        # A new session each time: nothing carried in memory, only the SSD cache.
        with Session(workers=2, executor="threads", cache=CacheConfig(directory=tmp_path / "cache"),
                     store=_store(s3_endpoint)) as s:
            for table in TPCH_TABLES:
                s.register(table, f"s3://{tpch_bucket}/tpch/{table}/*.parquet")
            result = s.sql(sql)
            results.append((result.table, result.profile))
    (cold_rows, cold), (warm_rows, warm) = results
    assert cold_rows.equals(warm_rows)
    assert cold.store_requests > 0 and cold.bytes_from_store > 0
    assert warm.store_requests == 0 and warm.bytes_from_store == 0
    assert warm.bytes_from_cache >= cold.bytes_from_store * 0.5
    assert set(warm.tables) == {"customer", "orders", "lineitem"}
