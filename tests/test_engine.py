"""Engine behaviour: registration, pushdown, partition pruning, EXPLAIN, COPY, errors."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shoal.cache import BucketNotFoundError, CacheConfig, ObjectNotFoundError, StoreConfig
from shoal.engine import (
    BindError,
    CatalogError,
    NotParquetError,
    Session,
    SqlSyntaxError,
    UnknownTableError,
)


def _write(path: Path, table: pa.Table, **kwargs: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, **kwargs)


@pytest.fixture
def events(tmp_path: Path) -> Path:
    root = tmp_path / "events"
    for year in (2023, 2024):
        for month in (1, 2, 3):
            rows = pa.table({"v": list(range(100)), "tag": [f"{year}-{month}"] * 100})
            _write(root / f"year={year}" / f"month={month}" / "part-0.parquet", rows)
    return root


@pytest.fixture
def session(tmp_path: Path):
    with Session(workers=2, executor="threads", cache=CacheConfig(directory=tmp_path / "cache")) as s:
        yield s


def _s3_session(endpoint, tmp_path: Path, workers: int = 2, executor: str = "threads") -> Session:
    store = StoreConfig(endpoint_url=endpoint.endpoint_url, access_key=endpoint.access_key,
                        secret_key=endpoint.secret_key, region=endpoint.region, max_attempts=2)
    return Session(workers=workers, executor=executor, store=store,
                   cache=CacheConfig(directory=tmp_path / "cache", block_size=64 * 1024))


def _put_parquet(client, bucket: str, key: str, table: pa.Table, **kwargs: object) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, **kwargs)
    client.put_object(Bucket=bucket, Key=key, Body=buffer.getvalue())


def test_hive_partitions_are_pruned(session: Session, events: Path) -> None:
    session.sql(f"CREATE VIEW ev AS SELECT * FROM read_parquet('{events}/**/*.parquet', hive_partitioning=true)")
    query = "SELECT year, month, sum(v) AS s FROM ev WHERE year = 2024 AND month >= 2 AND v > 50 GROUP BY ALL ORDER BY ALL"
    result = session.sql(query)
    assert result.table.to_pylist() == [
        {"year": 2024, "month": 2, "s": sum(range(51, 100))},
        {"year": 2024, "month": 3, "s": sum(range(51, 100))},
    ]
    scan = result.profile.plan.scans["ev"]
    assert scan.files_listed == 6 and len(scan.files) == 2
    assert all("year=2024" in f.url for f in scan.files)
    text = session.explain(query)
    assert "2 of 6 listed" in text and "pruned by partition filter" in text
    assert "(v > 50)" in text


def test_projection_and_filter_are_pushed_down(session: Session, tmp_path: Path) -> None:
    table = pa.table({"a": list(range(1000)), "b": [i * 2 for i in range(1000)], "c": ["x"] * 1000})
    _write(tmp_path / "t" / "part-0.parquet", table, row_group_size=100)
    session.register("t", str(tmp_path / "t" / "*.parquet"))
    result = session.sql("SELECT b FROM t WHERE a < 10 ORDER BY b")
    assert result.table.column("b").to_pylist() == [i * 2 for i in range(10)]
    scan = result.profile.plan.scans["t"]
    assert scan.columns == ["a", "b"]
    assert scan.filter is not None and "a < 10" in scan.filter
    # Only the rows passing the filter travel to the coordinator.
    assert result.profile.tables["t"].rows_out == 10
    # One file, two workers: split by row groups.
    assert len(scan.fragments) >= 2 and all(f.row_groups for f in scan.fragments)


def test_user_views_and_tableless_queries(session: Session, tmp_path: Path) -> None:
    _write(tmp_path / "n.parquet", pa.table({"x": [1, 2, 3, 4]}))
    session.sql(f"CREATE VIEW n AS FROM '{tmp_path}/n.parquet'")
    session.sql("CREATE VIEW evens AS SELECT x FROM n WHERE x % 2 = 0")
    assert session.sql("SELECT sum(x) AS s FROM evens").table.to_pylist() == [{"s": 6}]
    assert session.sql("SELECT 42 AS answer").table.to_pylist() == [{"answer": 42}]
    names = session.sql("SHOW TABLES").table.column("name").to_pylist()
    assert names == ["n", "evens"]


def test_catalog_file(tmp_path: Path) -> None:
    _write(tmp_path / "d" / "a.parquet", pa.table({"x": [1, 2]}))
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(f'[tables.things]\nurl = "{tmp_path}/d/*.parquet"\n')
    with Session(workers=1, catalog=catalog, cache=CacheConfig(directory=tmp_path / "c")) as s:
        assert s.sql("SELECT count(*) AS n FROM things").table.to_pylist() == [{"n": 2}]
    catalog.write_text('[tables.bad]\nurl = 3\n')
    with pytest.raises(CatalogError, match="needs url"):
        Session(catalog=catalog)
    catalog.write_text('[tables.x\n')
    with pytest.raises(CatalogError, match="invalid catalog"):
        Session(catalog=catalog)


def test_query_errors_are_engine_errors(session: Session, tmp_path: Path) -> None:
    _write(tmp_path / "t.parquet", pa.table({"x": [1]}))
    session.register("t", str(tmp_path / "t.parquet"))
    (tmp_path / "notes.parquet").write_text("this is not parquet")
    with pytest.raises(SqlSyntaxError, match="syntax"):
        session.sql("SELEC x FROM t")
    with pytest.raises(UnknownTableError):
        session.sql("SELECT * FROM nowhere")
    with pytest.raises(BindError):
        session.sql("SELECT missing_column FROM t")
    with pytest.raises(NotParquetError):
        session.sql(f"SELECT * FROM '{tmp_path}/notes.parquet'")
    with pytest.raises(ObjectNotFoundError):
        session.sql(f"SELECT * FROM '{tmp_path}/absent/*.parquet'")


@pytest.mark.parametrize("executor", ["threads", "local"])
def test_explain_analyze_reports_store_and_cache_bytes(s3_endpoint, s3_bucket, s3_client, tmp_path: Path,
                                                       executor: str) -> None:
    table = pa.table({"k": list(range(20000)), "v": [float(i) for i in range(20000)]})
    _put_parquet(s3_client, s3_bucket, "t/part-0.parquet", table, row_group_size=2000)
    query = f"SELECT sum(v) AS s FROM 's3://{s3_bucket}/t/*.parquet' WHERE k >= 10000"
    for run, expect_store in ((0, True), (1, False)):
        with _s3_session(s3_endpoint, tmp_path, executor=executor) as s:
            result = s.sql(query)
            assert result.table.to_pylist() == [{"s": float(sum(range(10000, 20000)))}]
            text = s.explain(query, analyze=True)
            profile = result.profile
        if expect_store:
            assert profile.store_requests > 0 and profile.bytes_from_store > 0
        else:
            assert profile.store_requests == 0 and profile.bytes_from_store == 0
            if executor == "local":  # one DuckDB: it reads the file natively, from a local copy
                assert profile.local_copies == 1 and "read natively from local copies" in text
            else:
                assert profile.bytes_from_cache > 0
        assert "from store" in text and "GET" in text and "stages:" in text
        assert s3_endpoint.secret_key not in text


def test_embedded_plan_leaves_pushdown_to_duckdb_and_prefetches_named_columns(
        s3_endpoint, s3_bucket, s3_client, tmp_path: Path) -> None:
    """The fused (embedded) executor plans without views or EXPLAIN: it pins the files and
    prefetches the chunks of the columns the query names; DuckDB pushes down itself."""
    n = 20000
    wide = pa.table({"k": list(range(n)), "v": [float(i) for i in range(n)],
                     "pad": [f"{i:08d}" * 16 for i in range(n)]})
    _put_parquet(s3_client, s3_bucket, "w/part-0.parquet", wide, row_group_size=2000, compression="none")
    size = s3_client.head_object(Bucket=s3_bucket, Key="w/part-0.parquet")["ContentLength"]
    url = f"s3://{s3_bucket}/w/*.parquet"

    def cold(query: str) -> tuple[list[dict], object]:
        shutil.rmtree(tmp_path / "cache", ignore_errors=True)
        with _s3_session(s3_endpoint, tmp_path, executor="local") as s:
            s.register("w", url)
            result = s.sql(query)
            return result.table.to_pylist(), result.profile

    rows, profile = cold("SELECT sum(v) AS s FROM w WHERE k >= 10000")
    assert rows == [{"s": float(sum(range(10000, n)))}]
    scan = profile.plan.scans["w"]
    assert profile.plan.fused and scan.columns == ["k", "v"] and not scan.all_named
    assert profile.bytes_from_store < size / 3  # the wide "pad" column was never fetched
    rows, profile = cold("SELECT * FROM w WHERE k = 7")
    assert rows == [{"k": 7, "v": 7.0, "pad": "00000007" * 16}]
    assert profile.plan.scans["w"].all_named and profile.bytes_from_store >= size * 0.9
    with _s3_session(s3_endpoint, tmp_path, executor="local") as s:
        s.register("w", url)
        text = s.explain("SELECT sum(v) FROM w WHERE k >= 10000")  # EXPLAIN still shows the pushdown
        assert "columns (2 of 3): k, v" in text and "k >= 10000" in text


def test_copy_to_s3_and_read_back(s3_endpoint, s3_bucket, s3_client, tmp_path: Path) -> None:
    _put_parquet(s3_client, s3_bucket, "in/a.parquet", pa.table({"x": list(range(10))}))
    with _s3_session(s3_endpoint, tmp_path) as s:
        result = s.sql(f"COPY (SELECT x * 10 AS y FROM 's3://{s3_bucket}/in/*.parquet' WHERE x < 5) "
                       f"TO 's3://{s3_bucket}/out/y.parquet' (FORMAT parquet)")
        assert result.message and "5 rows" in result.message
        back = s.sql(f"SELECT y FROM 's3://{s3_bucket}/out/y.parquet' ORDER BY y").table
    assert back.column("y").to_pylist() == [0, 10, 20, 30, 40]


def test_overwritten_object_is_read_at_its_new_version(s3_endpoint, s3_bucket, s3_client, tmp_path: Path) -> None:
    key = "v/data.parquet"
    _put_parquet(s3_client, s3_bucket, key, pa.table({"x": [1, 2, 3]}))
    with _s3_session(s3_endpoint, tmp_path) as s:
        query = f"SELECT sum(x) AS s FROM 's3://{s3_bucket}/{key}'"
        assert s.sql(query).table.to_pylist() == [{"s": 6}]
        _put_parquet(s3_client, s3_bucket, key, pa.table({"x": [10, 20, 30, 40]}))
        assert s.sql(query).table.to_pylist() == [{"s": 100}]


def test_missing_bucket_is_a_storage_error(s3_endpoint, tmp_path: Path) -> None:
    with _s3_session(s3_endpoint, tmp_path) as s:
        with pytest.raises((BucketNotFoundError, ObjectNotFoundError)) as info:
            s.sql("SELECT * FROM 's3://shoal-no-such-bucket-x1/t/*.parquet'")
    assert s3_endpoint.secret_key not in str(info.value)


def test_single_table_aggregates_are_partially_aggregated_on_workers(session: Session, tmp_path: Path) -> None:
    import duckdb

    rows = pa.table({"k": [i % 7 for i in range(5000)], "v": [float(i) for i in range(5000)],
                     "n": [None if i % 11 == 0 else i for i in range(5000)]})
    for part in range(3):
        _write(tmp_path / "agg" / f"part-{part}.parquet", rows.slice(part * 1500, 2000), row_group_size=500)
    session.register("agg", str(tmp_path / "agg" / "*.parquet"))
    query = ("SELECT k, count(*) AS c, count(n) AS cn, sum(v) AS s, avg(v) AS a, min(n), max(v) FROM agg "
             "WHERE v > 100 GROUP BY k HAVING count(*) > 10 ORDER BY s DESC LIMIT 5")
    result = session.sql(query)
    reference = duckdb.sql(query.replace("FROM agg", f"FROM '{tmp_path}/agg/*.parquet'"))
    assert result.table.column_names == reference.columns
    expected = reference.fetchall()
    got = [tuple(r.values()) for r in result.table.to_pylist()]
    assert [(r[0], r[1], r[2], r[5]) for r in got] == [(r[0], r[1], r[2], r[5]) for r in expected]
    for mine, theirs in zip(got, expected):
        assert mine[3] == pytest.approx(theirs[3]) and mine[4] == pytest.approx(theirs[4])
    plan = result.profile.plan
    assert plan.partial is not None
    # Only partial groups travel: at most 7 groups per fragment.
    assert result.profile.tables["agg"].rows_out <= 7 * len(plan.scans["agg"].fragments)
    assert "partial aggregation on workers" in session.explain(query)
    # A join is not partially aggregated (the scan itself travels).
    join = "SELECT count(*) AS c FROM agg a JOIN agg b ON a.k = b.k AND a.v = b.v"
    joined = session.sql(join)
    glob = f"'{tmp_path}/agg/*.parquet'"
    assert joined.profile.plan.partial is None
    assert joined.table.to_pylist() == [{"c": duckdb.sql(join.replace("agg a", f"{glob} a").replace("agg b", f"{glob} b")).fetchall()[0][0]}]


@pytest.mark.parametrize("executor", ["local", "threads"])
def test_allowed_paths_lock_sql_to_shoal_and_those_directories(tmp_path: Path, executor: str) -> None:
    from shoal.engine import AccessNotAllowedError

    _write(tmp_path / "ok" / "a.parquet", pa.table({"x": [1]}))
    _write(tmp_path / "secret.parquet", pa.table({"x": [2]}))
    with Session(executor=executor, allowed_paths=[str(tmp_path / "ok")],
                 cache=CacheConfig(directory=tmp_path / "c")) as s:
        assert s.sql(f"SELECT * FROM '{tmp_path}/ok/a.parquet'").table.to_pylist() == [{"x": 1}]
        for query in (f"SELECT * FROM '{tmp_path}/secret.parquet'",
                      f"SELECT * FROM '{tmp_path}/ok/../secret.parquet'",
                      "SELECT * FROM read_csv('/etc/passwd')",
                      f"COPY (SELECT 1) TO '{tmp_path}/out.parquet' (FORMAT parquet)"):
            with pytest.raises(AccessNotAllowedError, match="not allowed"):
                s.sql(query)
    assert not (tmp_path / "out.parquet").exists()


def test_statements_other_than_queries_are_refused(session: Session) -> None:
    from shoal.engine import QueryError

    for statement in ("ATTACH '/tmp/shoal-attack.db'", "INSTALL httpfs", "SET threads=1",
                      "CREATE TABLE t AS SELECT 1", "INSERT INTO x VALUES (1)", "PRAGMA version"):
        with pytest.raises(QueryError, match="supported"):
            session.sql(statement)


def test_remembered_listings_never_hide_new_or_changed_files(s3_endpoint, s3_bucket, s3_client, tmp_path: Path) -> None:
    """Warm queries plan on the listing remembered on the SSD while the store is listed
    in the background; when the store changed, the query runs again on the fresh listing."""
    _put_parquet(s3_client, s3_bucket, "t/a.parquet", pa.table({"x": [1, 2]}))
    query = f"SELECT count(*) AS n, sum(x) AS s FROM 's3://{s3_bucket}/t/*.parquet'"
    with _s3_session(s3_endpoint, tmp_path, executor="local") as s:
        assert s.sql(query).table.to_pylist() == [{"n": 2, "s": 3}]
    _put_parquet(s3_client, s3_bucket, "t/b.parquet", pa.table({"x": [10]}))
    with _s3_session(s3_endpoint, tmp_path, executor="local") as s:  # a new process, same SSD cache
        assert s.sql(query).table.to_pylist() == [{"n": 3, "s": 13}]
        s3_client.delete_object(Bucket=s3_bucket, Key="t/a.parquet")
        assert s.sql(query).table.to_pylist() == [{"n": 1, "s": 10}]
        unchanged = s.sql(query)
        assert unchanged.table.to_pylist() == [{"n": 1, "s": 10}]
        # Nothing changed: one plan, and the only request is the background LIST.
        assert unchanged.profile.store_requests == 0


def _lists(session: Session) -> int:
    return session.fs.source("s3").list_hedger.requests


def test_tables_in_one_folder_are_checked_with_one_listing(s3_endpoint, s3_bucket, s3_client, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A warm query checks the remembered listings of its tables with one LIST of the
    folder they share (it waits for the slowest of its LISTs otherwise), still sees a
    file added since, and lists each table when that folder holds more than a page."""
    import shoal.cache.filesystem as filesystem_module

    _put_parquet(s3_client, s3_bucket, "wh/t/a.parquet", pa.table({"k": [1, 2], "x": [10, 20]}))
    _put_parquet(s3_client, s3_bucket, "wh/u/a.parquet", pa.table({"k": [1], "y": [5]}))
    _put_parquet(s3_client, s3_bucket, "wh/other/big.parquet", pa.table({"z": [0]}))  # listed, not read
    query = (f"SELECT sum(x) AS x, count(y) AS y FROM 's3://{s3_bucket}/wh/t/*.parquet' t "
             f"LEFT JOIN 's3://{s3_bucket}/wh/u/*.parquet' u USING (k)")
    with _s3_session(s3_endpoint, tmp_path, executor="local") as s:
        assert s.sql(query).table.to_pylist() == [{"x": 30, "y": 1}]
    _put_parquet(s3_client, s3_bucket, "wh/u/b.parquet", pa.table({"k": [2], "y": [7]}))
    with _s3_session(s3_endpoint, tmp_path, executor="local") as s:
        assert s.sql(query).table.to_pylist() == [{"x": 30, "y": 2}]  # the new file is seen
        before = _lists(s)
        assert s.sql(query).table.to_pylist() == [{"x": 30, "y": 2}]
        assert _lists(s) - before == 1  # both tables checked by one request
    monkeypatch.setattr(filesystem_module, "_JOINT_LISTING_KEYS", 2)  # the folder now holds more than a page
    s3_client.delete_object(Bucket=s3_bucket, Key="wh/u/b.parquet")
    with _s3_session(s3_endpoint, tmp_path, executor="local") as s:
        before = _lists(s)
        assert s.sql(query).table.to_pylist() == [{"x": 30, "y": 1}]
        assert _lists(s) - before >= 3  # the page that did not fit, then a LIST per table
    with _s3_session(s3_endpoint, tmp_path, executor="local") as s:  # remembered: no more attempts
        before = _lists(s)
        assert s.sql(query).table.to_pylist() == [{"x": 30, "y": 1}]
        assert _lists(s) - before == 2
    # An hour later the folder is tried again; it fits in a page now (files were removed).
    monkeypatch.setattr(filesystem_module, "_TOO_WIDE_RECHECK_S", 0.0)
    monkeypatch.setattr(filesystem_module, "_JOINT_LISTING_KEYS", 1000)
    with _s3_session(s3_endpoint, tmp_path, executor="local") as s:
        assert s.sql(query).table.to_pylist() == [{"x": 30, "y": 1}]
        before = _lists(s)
        assert s.sql(query).table.to_pylist() == [{"x": 30, "y": 1}]
        assert _lists(s) - before == 1  # one request again


def test_common_glob_prefix() -> None:
    from shoal.cache.source import common_glob_prefix

    assert common_glob_prefix(["s3://b/wh/t/*.parquet", "s3://b/wh/u/*.parquet"]) == "s3://b/wh/"
    assert common_glob_prefix(["s3://b/wh/t/*.parquet", "s3://b/wh/t/x=*/*.parquet"]) == "s3://b/wh/t/"
    assert common_glob_prefix(["s3://b/t/*.parquet", "s3://b/u/*.parquet"]) == "s3://b/"
    assert common_glob_prefix(["s3://b/t/*.parquet", "s3://c/u/*.parquet"]) is None  # two buckets
    assert common_glob_prefix(["s3://b/t/a.parquet", "s3://b/u/*.parquet"]) is None  # not a glob


@pytest.mark.parametrize(("sql", "names", "whole_rows"), [
    ("SELECT b FROM t WHERE a < 10", {"a", "b"}, False),
    ("SELECT * FROM t", set(), True),
    ("SELECT t.* EXCLUDE (a) FROM t", set(), True),
    ("SELECT x FROM t JOIN u USING (k)", {"x", "k"}, False),
    # EXISTS (SELECT * ...) reads no columns: TPC-H Q4, Q21 and Q22 prefetched whole tables
    ("SELECT a FROM t WHERE NOT EXISTS (SELECT * FROM u WHERE u.k = t.k)", {"a", "k"}, False),
    ("SELECT count(*) FROM t", set(), False),
])
def test_columns_a_query_names(sql: str, names: set[str], whole_rows: bool) -> None:
    from shoal.engine.sqlinfo import named_columns, parse_tree

    assert named_columns(parse_tree(duckdb.connect(), sql)) == (names, whole_rows)
