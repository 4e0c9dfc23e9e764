"""DuckDB reading prefetched bytes natively through Shoal's extension.

The unit tests load the real extension into a real DuckDB and hand it byte
ranges of a real Parquet file through futures, as the prefetch does; the
fallback read path is an in-process stand-in for the cached filesystem that
counts what it is asked.  The engine test runs sessions against a real S3
server.  All skip when the extension is not built (``python -m
shoal.cache.nativebuild``, run by ``scripts/install.sh``; it needs g++).
"""

from __future__ import annotations

import hashlib
import io
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import NamedTuple

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shoal.cache import CacheConfig, StoreConfig
from shoal.cache.nativereads import NativeReads
from shoal.engine import Session

NATIVE = NativeReads.get()
pytestmark = pytest.mark.skipif(NATIVE is None, reason="Shoal's DuckDB extension is not built "
                                "(python -m shoal.cache.nativebuild needs g++)")


class Version(NamedTuple):
    url: str
    size: int


class Store:
    """The cached filesystem's ``cat_file`` over one object, counting calls."""

    def __init__(self, url: str, data: bytes) -> None:
        self.url, self.data = url, data
        self.calls: list[tuple[int, int]] = []

    def cat_file(self, url: str, start: int, end: int) -> bytes:
        assert url == self.url
        self.calls.append((start, end))
        return self.data[start:end]


def _parquet(rows: int = 50_000) -> tuple[bytes, int]:
    table = pa.table({"a": pa.array(range(rows), pa.int64()), "b": [f"v{i % 97}" for i in range(rows)]})
    sink = io.BytesIO()
    pq.write_table(table, sink, row_group_size=10_000)
    return sink.getvalue(), sum(range(rows))


def _connection() -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(config={"allow_unsigned_extensions": "true"})
    assert NATIVE is not None and NATIVE.attach(con)
    return con


def _done(data: bytes | memoryview) -> Future:
    future: Future = Future()
    future.set_result(memoryview(data))
    return future


def _delta(before: dict[str, int]) -> dict[str, int]:
    assert NATIVE is not None
    return {k: v - before[k] for k, v in NATIVE.stats().items()}


def test_duckdb_reads_registered_ranges_natively_and_waits_for_those_in_flight() -> None:
    data, total = _parquet()
    url = "s3://bucket/t/part-0.parquet"
    store = Store(url, data)
    con = _connection()
    before = NATIVE.stats()
    third = len(data) // 3
    late: Future = Future()
    with NATIVE.query(store) as pieces:  # type: ignore[arg-type]
        path = pieces.add(Version(url, len(data)), [(0, third, _done(data[:third])),
                                                    (third, 2 * third, late),
                                                    (2 * third, len(data), _done(data[2 * third:])),
                                                    # overlapping ones, as a footer's tail and its chunks are
                                                    (third - 500, third + 500, _done(data[third - 500:third + 500])),
                                                    (len(data) - 300, len(data), _done(data[-300:]))])
        # The middle third arrives while DuckDB runs.
        threading.Timer(0.3, lambda: late.set_result(memoryview(data)[third:2 * third])).start()
        result = con.execute(f"SELECT sum(a), count(DISTINCT b) FROM read_parquet('{path}')").fetchall()
    assert result == [(total, 97)]
    stats = _delta(before)
    assert stats["native_reads"] > 0 and stats["native_bytes"] > 0
    assert stats["fallback_reads"] == 0 and store.calls == []
    assert stats["reads_that_waited"] >= 1


def test_bytes_not_registered_or_whose_fetch_failed_are_read_through_the_cache() -> None:
    data, total = _parquet()
    url = "s3://bucket/t/part-1.parquet"
    store = Store(url, data)
    con = _connection()
    before = NATIVE.stats()
    half = len(data) // 2
    failed: Future = Future()
    failed.set_exception(ConnectionResetError("peer went away"))
    with NATIVE.query(store) as pieces:  # type: ignore[arg-type]
        # The first half's fetch failed; the last 100 bytes (the footer's end) are not registered.
        path = pieces.add(Version(url, len(data)), [(0, half, failed),
                                                    (half, len(data) - 100, _done(data[half:-100]))])
        result = con.execute(f"SELECT sum(a) FROM read_parquet('{path}')").fetchall()
    assert result == [(total,)]
    stats = _delta(before)
    assert stats["fallback_reads"] >= 2 and stats["fallback_reads_unregistered"] >= 1
    assert store.calls and all(0 <= start < end <= len(data) for start, end in store.calls)
    assert any(start < half for start, _ in store.calls)  # the failed range came from the cache
    assert any(end > len(data) - 100 for _, end in store.calls)  # and the footer's end


def test_a_file_still_being_planned_makes_readers_wait_for_its_ranges() -> None:
    data, total = _parquet()
    url = "s3://bucket/t/part-2.parquet"
    store = Store(url, data)
    con = _connection()
    before = NATIVE.stats()
    version = Version(url, len(data))
    tail = len(data) - 64 * 1024
    with NATIVE.query(store) as pieces:  # type: ignore[arg-type]
        path = pieces.add(version, [(tail, len(data), _done(data[tail:]))], complete=False)

        def plan_the_rest() -> None:
            time.sleep(0.3)  # DuckDB has the footer and waits for the chunks
            pieces.extend(version, [(0, tail, _done(data[:tail]))])
            pieces.complete(version)

        pieces.in_background(plan_the_rest)
        result = con.execute(f"SELECT sum(a) FROM read_parquet('{path}')").fetchall()
    assert result == [(total,)]
    stats = _delta(before)
    assert stats["fallback_reads"] == 0 and store.calls == []
    assert stats["reads_that_waited"] >= 1


def test_a_finished_query_s_files_are_gone_and_unsigned_extensions_stay_off() -> None:
    data, _ = _parquet(1000)
    url = "s3://bucket/t/part-3.parquet"
    con = _connection()
    pieces = NATIVE.query(Store(url, data))  # type: ignore[arg-type]
    path = pieces.add(Version(url, len(data)), [(0, len(data), _done(data))])
    assert con.execute(f"SELECT count(*) FROM read_parquet('{path}')").fetchall() == [(1000,)]
    pieces.close()
    with pytest.raises(duckdb.IOException, match="No files found"):
        con.execute(f"SELECT count(*) FROM read_parquet('{path}')").fetchall()
    assert con.execute("SELECT current_setting('allow_unsigned_extensions')").fetchall() == [(False,)]
    with pytest.raises(duckdb.Error, match="allow_unsigned_extensions"):
        con.execute("SET allow_unsigned_extensions=true")


def _put(s3_client, bucket: str, key: str, table: pa.Table) -> None:
    sink = io.BytesIO()
    pq.write_table(table, sink, row_group_size=2000)
    s3_client.put_object(Bucket=bucket, Key=key, Body=sink.getvalue())


def test_a_cold_query_reads_its_prefetched_chunks_natively(s3_endpoint, s3_client, s3_bucket, tmp_path: Path,
                                                          monkeypatch) -> None:
    for part in range(2):
        rows = range(part * 20_000, (part + 1) * 20_000)
        _put(s3_client, s3_bucket, f"t/part-{part}.parquet",
             pa.table({"a": list(rows), "b": [i % 7 for i in rows], "s": [f"s{i % 857}" for i in rows],
                       # a column the query never reads, too big to be fetched with its neighbours
                       "pad": [hashlib.sha512(str(i).encode()).hexdigest() for i in rows]}))
    query = "SELECT b, count(*) AS n, sum(a) AS total FROM t WHERE s <> 's1' GROUP BY b ORDER BY b"
    store = StoreConfig(endpoint_url=s3_endpoint.endpoint_url, access_key=s3_endpoint.access_key,
                        secret_key=s3_endpoint.secret_key, region=s3_endpoint.region)
    results = {}
    for native in ("1", "0"):
        monkeypatch.setenv("SHOAL_NATIVE_READS", native)
        with Session(cache=CacheConfig(directory=tmp_path / f"cache-{native}"), store=store) as session:
            assert (session.planner.native is not None) == (native == "1")
            before = NATIVE.stats()
            session.register("t", f"s3://{s3_bucket}/t/*.parquet")
            result = session.sql(query)
            results[native] = result.table
            stats = _delta(before)
            if native == "1":
                assert stats["native_reads"] > 0 and stats["fallback_reads"] == 0
                # only the named columns' chunks (and footers) came from the store
                assert 0 < result.profile.tables["t"].bytes_from_store < sum(
                    o["Size"] for o in s3_client.list_objects_v2(Bucket=s3_bucket, Prefix="t/")["Contents"]) / 2
            else:
                assert stats["native_reads"] == 0
    assert results["1"].equals(results["0"])
    assert results["1"].num_rows == 7
