"""The storage layer against real S3 servers (SeaweedFS and moto, see conftest.py)."""

from __future__ import annotations

import random
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from s3servers import S3Endpoint, free_port

from shoal.cache import (
    AccessDeniedError,
    BucketNotFoundError,
    CacheConfig,
    EndpointUnreachableError,
    ObjectChangedError,
    ObjectNotFoundError,
    ShoalFileSystem,
    StorageError,
    StoreConfig,
)

BS = 64 * 1024

MakeFs = Callable[..., ShoalFileSystem]


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.fixture
def make_fs(s3_endpoint: S3Endpoint, tmp_path: Path) -> Iterator[MakeFs]:
    """ShoalFileSystems on one cache dir (each with a cold memory tier); closed at the end."""
    made: list[ShoalFileSystem] = []

    def make(store: dict[str, Any] | None = None, **cache: Any) -> ShoalFileSystem:
        store = {"endpoint_url": s3_endpoint.endpoint_url, "access_key": s3_endpoint.access_key,
                 "secret_key": s3_endpoint.secret_key, "region": s3_endpoint.region, **(store or {})}
        cache = {"directory": tmp_path / "cache", "block_size": BS, "readahead_blocks": 0, **cache}
        fs = ShoalFileSystem(cache=CacheConfig(**cache), store=StoreConfig(**store))
        made.append(fs)
        return fs

    yield make
    for fs in made:
        fs.close()


def gets(fs: ShoalFileSystem) -> int:
    """GET requests the S3 source sent (counted by the client, per filesystem)."""
    return fs.source("s3").requests  # type: ignore[attr-defined]


def assert_clean_error(exc: BaseException, secret: str) -> None:
    """The error, and everything chained to it, never shows the secret key."""
    assert isinstance(exc, StorageError)
    assert secret not in str(exc) and secret not in repr(exc)
    assert secret not in "".join(traceback.format_exception(exc))


@pytest.mark.parametrize(("max_request_blocks", "expected_gets"), [(256, 1), (4, 3)])
def test_cold_read_fills_cache_then_warm_read_sends_no_gets(
    s3_client: Any, s3_bucket: str, make_fs: MakeFs, max_request_blocks: int, expected_gets: int
) -> None:
    data = payload(10 * BS + 100, seed=1)
    s3_client.put_object(Bucket=s3_bucket, Key="dir/obj.bin", Body=data)
    url = f"s3://{s3_bucket}/dir/obj.bin"

    cold = make_fs(max_request_size=max_request_blocks * BS)
    assert cold.cat_file(url) == data
    assert gets(cold) == expected_gets == cold.stats()["store_requests"]
    assert cold.stats()["misses"] == 11 and cold.stats()["bytes_from_store"] == len(data)
    cold.close()

    warm = make_fs(max_request_size=max_request_blocks * BS)
    assert warm.cat_file(url) == data
    assert warm.cat_file(url, BS - 7, 3 * BS + 7) == data[BS - 7 : 3 * BS + 7]
    with warm.open(f"s3a://{s3_bucket}/dir/obj.bin") as f:
        f.seek(5 * BS + 3)
        assert f.read(BS) == data[5 * BS + 3 : 6 * BS + 3]
    assert gets(warm) == 0
    # A hit is one block read served by the SSD cache: 11 blocks, then 4, then 2.
    assert warm.stats()["hits"] == 11 + 4 + 2 and warm.stats()["misses"] == 0


def test_overwrite_in_bucket_gives_new_bytes(s3_client: Any, s3_bucket: str, make_fs: MakeFs) -> None:
    old, new = payload(3 * BS, seed=2), payload(3 * BS, seed=3)
    s3_client.put_object(Bucket=s3_bucket, Key="obj", Body=old)
    url = f"s3://{s3_bucket}/obj"
    fs = make_fs()
    assert fs.cat_file(url) == old
    s3_client.put_object(Bucket=s3_bucket, Key="obj", Body=new)
    assert fs.cat_file(url) == new
    assert fs.cat_file(url, 10, BS + 10) == new[10 : BS + 10]
    fs.reader.flush()
    again = make_fs()
    assert again.cat_file(url) == new and gets(again) == 0


def test_overwrite_during_snapshot_never_mixes_versions(
    s3_client: Any, s3_bucket: str, make_fs: MakeFs
) -> None:
    old, new = payload(4 * BS, seed=4), payload(4 * BS, seed=5)
    s3_client.put_object(Bucket=s3_bucket, Key="obj", Body=old)
    url = f"s3://{s3_bucket}/obj"
    fs = make_fs()
    with fs.snapshot():
        assert fs.size(url) == len(old)
        assert fs.cat_file(url, 0, BS) == old[:BS]
        s3_client.put_object(Bucket=s3_bucket, Key="obj", Body=new)
        # If-Match makes the store refuse; a store ignoring it is caught by the ETag check.
        with pytest.raises(ObjectChangedError):
            fs.cat_file(url)
        assert fs.cat_file(url, 0, BS) == old[:BS]
    assert fs.cat_file(url) == new


def test_missing_bucket(s3_endpoint: S3Endpoint, make_fs: MakeFs) -> None:
    with pytest.raises(BucketNotFoundError) as info:
        make_fs().cat_file("s3://shoal-no-such-bucket-4711/key")
    assert "shoal-no-such-bucket-4711" in str(info.value)
    assert_clean_error(info.value, s3_endpoint.secret_key)


def test_missing_key(s3_endpoint: S3Endpoint, s3_bucket: str, make_fs: MakeFs) -> None:
    with pytest.raises(ObjectNotFoundError) as info:
        make_fs().cat_file(f"s3://{s3_bucket}/no/such/key")
    assert not isinstance(info.value, BucketNotFoundError)
    assert isinstance(info.value, FileNotFoundError) and "no/such/key" in str(info.value)
    assert_clean_error(info.value, s3_endpoint.secret_key)


def test_wrong_secret(s3_endpoint: S3Endpoint, s3_client: Any, s3_bucket: str, make_fs: MakeFs) -> None:
    if s3_endpoint.name == "moto":
        pytest.skip("moto accepts any credentials (no authentication)")
    s3_client.put_object(Bucket=s3_bucket, Key="obj", Body=b"x" * 100)
    wrong = "wrong-secret-do-not-print-0123456789"
    fs = make_fs(store={"secret_key": wrong, "max_attempts": 1})
    with pytest.raises(AccessDeniedError) as info:
        fs.cat_file(f"s3://{s3_bucket}/obj")
    assert isinstance(info.value, PermissionError)
    assert_clean_error(info.value, wrong)


def test_unreachable_endpoint(tmp_path: Path) -> None:
    secret = "unreachable-secret-0123456789"
    store = StoreConfig(endpoint_url=f"http://127.0.0.1:{free_port()}", access_key="AKID", secret_key=secret,
                        region="us-east-1", max_attempts=1, connect_timeout=1, read_timeout=2)
    fs = ShoalFileSystem(cache=CacheConfig(directory=tmp_path / "cache", block_size=BS), store=store)
    try:
        with pytest.raises(EndpointUnreachableError) as info:
            fs.cat_file("s3://bucket/key")
    finally:
        fs.close()
    assert isinstance(info.value, ConnectionError)
    assert_clean_error(info.value, secret)


def _tables() -> list[pa.Table]:
    rng = random.Random(7)
    return [pa.table({"id": pa.array(range(n * 5000, (n + 1) * 5000), pa.int64()),
                      "name": pa.array([rng.randbytes(40).hex() for _ in range(5000)]),
                      "part": pa.array([n] * 5000, pa.int32())})
            for n in range(3)]


def test_duckdb_reads_parquet_glob(
    s3_client: Any, s3_bucket: str, make_fs: MakeFs, tmp_path: Path
) -> None:
    local = tmp_path / "local"
    local.mkdir()
    for n, table in enumerate(_tables()):
        path = local / f"part-{n}.parquet"
        pq.write_table(table, path, row_group_size=1000)
        s3_client.put_object(Bucket=s3_bucket, Key=f"data/part-{n}.parquet", Body=path.read_bytes())
    s3_client.put_object(Bucket=s3_bucket, Key="data/README.txt", Body=b"not parquet")
    query = "SELECT part, count(*), sum(id), min(name), max(name) FROM read_parquet('{}') GROUP BY part ORDER BY part"
    expected = duckdb.connect().sql(query.format(f"{local}/*.parquet")).fetchall()
    assert len(expected) == 3
    for warm in (False, True):
        fs = make_fs()
        con = duckdb.connect()
        con.register_filesystem(fs)
        assert con.sql(query.format(f"s3://{s3_bucket}/data/*.parquet")).fetchall() == expected
        con.close()
        fs.reader.flush()
        assert (gets(fs) == 0) == warm


def test_duckdb_copy_to_s3_and_read_back(s3_client: Any, s3_bucket: str, make_fs: MakeFs) -> None:
    fs = make_fs()
    con = duckdb.connect()
    con.register_filesystem(fs)
    url = f"s3://{s3_bucket}/out/result.parquet"
    con.execute(f"COPY (SELECT range AS id, range % 10 AS bucket FROM range(20000)) TO '{url}' (FORMAT parquet)")
    assert con.sql(f"SELECT count(*), sum(id), sum(bucket) FROM read_parquet('{url}')").fetchall() == [
        (20000, sum(range(20000)), sum(i % 10 for i in range(20000)))]
    con.close()
    body = s3_client.get_object(Bucket=s3_bucket, Key="out/result.parquet")["Body"].read()
    table = pq.read_table(pa.BufferReader(body))
    assert table.num_rows == 20000 and table.column("id").to_pylist() == list(range(20000))
