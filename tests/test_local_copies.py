"""Local copies: warm Parquet handed to DuckDB as sparse, verified local files.

Unit tests drive :class:`LocalCopies` with an in-process ``read_cached``; the
engine tests run real sessions against a real S3 server and check contents,
counters and what DuckDB was given.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shoal.cache import CacheConfig, CacheMetrics, StoreConfig
from shoal.cache.localcopy import LocalCopies, merge_ranges
from shoal.engine import Session
from shoal.engine import prefetch as prefetch_module

DATA = bytes(range(256)) * 64  # 16 KiB "object"


class Cached:
    """``read_cached`` over DATA, counting calls; ``missing`` ranges are not cached."""

    def __init__(self, missing: tuple[tuple[int, int], ...] = ()) -> None:
        self.calls: list[tuple[int, int]] = []
        self.missing = missing

    def __call__(self, lo: int, hi: int) -> bytes | None:
        self.calls.append((lo, hi))
        if any(m_lo < hi and lo < m_hi for m_lo, m_hi in self.missing):
            return None
        return DATA[lo:hi]


def _copies(tmp_path: Path, size_limit: int = 1 << 30) -> LocalCopies:
    return LocalCopies(tmp_path / "copies", size_limit=size_limit, metrics=CacheMetrics())


def _part(lo: int, hi: int) -> str:
    return f"{lo}-{hi}"


# The object's layout: every range a test names is a part of its own.
LAYOUT = {_part(lo, hi): [(lo, hi)] for lo, hi in (
    (0, 100), (8000, 9000), (16000, 16384), (100, 300), (4096, 6000), (0, 1000), (500, 1500), (3000, 3100),
    (0, 4096), (10000, 12000), (0, 8192), *((s, s + 256) for s in range(0, len(DATA), 512)))}


def _path(copies: LocalCopies, key: str, ranges: list[tuple[int, int]], cached: Cached) -> str | None:
    return copies.path(key, len(DATA), [_part(lo, hi) for lo, hi in ranges], lambda: LAYOUT, cached)


def _holds(path: str, ranges: list[tuple[int, int]]) -> bool:
    data = Path(path).read_bytes()
    return len(data) == len(DATA) and all(data[lo:hi] == DATA[lo:hi] for lo, hi in ranges)


def test_merge_ranges_sorts_joins_and_drops_empty() -> None:
    assert merge_ranges([(10, 20), (0, 5), (5, 7), (15, 30), (40, 40)]) == [(0, 7), (10, 30)]


def test_copy_is_made_only_when_every_range_is_cached(tmp_path: Path) -> None:
    copies = _copies(tmp_path)
    assert _path(copies, "k", [(0, 100), (8000, 9000)], Cached(missing=((8500, 8600),))) is None
    assert not (tmp_path / "copies").exists() or not any((tmp_path / "copies").iterdir())
    assert copies.metrics.local_copy_uses == 0


def test_copy_holds_the_ranges_at_their_offsets_and_is_reused_without_reading(tmp_path: Path) -> None:
    copies = _copies(tmp_path)
    ranges = [(16000, 16384), (100, 300), (4096, 6000)]
    cached = Cached()
    path = _path(copies, "k", ranges, cached)
    assert path is not None and _holds(path, ranges)
    assert sorted(cached.calls) == [(100, 300), (4096, 6000), (16000, 16384)]
    data = Path(path).read_bytes()
    assert data[300:4096] == bytes(4096 - 300)  # a hole reads as zeros
    assert os.stat(path).st_blocks * 512 < len(DATA)  # sparse
    # A later query that needs a subset: verified, nothing read from the cache.
    again = Cached()
    assert _path(copies, "k", [(100, 300), (16000, 16384)], again) == path
    assert again.calls == []
    assert copies.metrics.local_copy_uses == 2
    assert copies.metrics.local_copy_bytes == 200 + 1904 + 384


def test_a_settled_copy_is_hashed_once_then_trusted_until_it_changes(tmp_path: Path, monkeypatch) -> None:
    from shoal.cache import localcopy

    copies = _copies(tmp_path)
    path = _path(copies, "k", [(0, 4096)], Cached())
    os.utime(path, ns=(10**18, 10**18))  # long settled (any write would set it to now)
    hashed = []
    real = localcopy._digest
    monkeypatch.setattr(localcopy, "_digest", lambda view: hashed.append(len(view)) or real(view))
    assert _path(copies, "k", [(0, 4096)], Cached()) == path
    assert hashed == [4096]  # verified once, and remembered
    assert _path(copies, "k", [(0, 4096)], Cached()) == path
    assert hashed == [4096]
    with open(path, "r+b") as f:  # a change (it sets the mtime)
        f.write(b"\xff")
    assert _path(copies, "k", [(0, 4096)], Cached()) == path  # rebuilt
    assert copies.metrics.local_copy_corrupt == 1 and _holds(path, [(0, 4096)])


def test_copy_is_extended_with_only_the_missing_ranges(tmp_path: Path) -> None:
    copies = _copies(tmp_path)
    path = _path(copies, "k", [(0, 1000)], Cached())
    more = Cached()
    assert _path(copies, "k", [(500, 1500), (3000, 3100)], more) == path
    assert more.calls == [(1000, 1500), (3000, 3100)]
    assert _holds(path, [(0, 1500), (3000, 3100)])
    sidecar = json.loads(Path(path).with_suffix(".json").read_text())
    assert [r[:2] for r in sidecar["ranges"]] == [[0, 1000], [1000, 1500], [3000, 3100]]


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_damaged_copy_is_detected_and_rebuilt(tmp_path: Path, damage: str) -> None:
    copies = _copies(tmp_path)
    path = _path(copies, "k", [(0, 4096), (10000, 12000)], Cached())
    if damage == "flip":
        with open(path, "r+b") as f:
            f.seek(11000)
            byte = f.read(1)
            f.seek(11000)
            f.write(bytes([byte[0] ^ 0xFF]))
    elif damage == "truncate":
        os.truncate(path, 11000)
    else:
        os.unlink(path)
    rebuilt = Cached()
    assert _path(copies, "k", [(10000, 12000)], rebuilt) == path
    assert rebuilt.calls == [(10000, 12000)]  # the damaged copy was dropped, not trusted
    assert _holds(path, [(10000, 12000)])
    assert copies.metrics.local_copy_corrupt == (0 if damage == "delete" else 1)


def test_least_recently_used_copies_are_evicted_over_the_limit(tmp_path: Path) -> None:
    copies = _copies(tmp_path, size_limit=3 * 4096)
    for key in ("a", "b", "c", "d"):
        assert _path(copies, key, [(0, 8192)], Cached()) is not None
        os.utime(tmp_path / "copies" / f"{key}.json", (1000 + ord(key), 1000 + ord(key)))
    names = sorted(p.stem for p in (tmp_path / "copies").glob("*.parquet"))
    assert "d" in names and len(names) < 4
    assert copies.metrics.local_copy_evictions == 4 - len(names)
    assert copies.volume() <= 3 * 4096 or names == ["d"]
    assert copies.clear() == len(names) and not list((tmp_path / "copies").iterdir())


def _extend_in_child(directory: str, lo: int, hi: int) -> None:
    copies = LocalCopies(Path(directory), size_limit=1 << 30, metrics=CacheMetrics())
    for start in range(lo, hi, 512):
        assert _path(copies, "k", [(start, start + 256)], Cached()) is not None


def test_two_processes_extend_one_copy_without_losing_ranges(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    children = [ctx.Process(target=_extend_in_child, args=(str(tmp_path / "copies"), lo, lo + 8192))
                for lo in (0, 8192)]
    for child in children:
        child.start()
    for child in children:
        child.join(60)
        assert child.exitcode == 0
    wanted = [(s, s + 256) for s in range(0, len(DATA), 512)]
    again = Cached()
    path = _path(_copies(tmp_path), "k", wanted, again)
    assert again.calls == [] and _holds(path, wanted)


# -- the engine ----------------------------------------------------------------------------


def _session(endpoint, cache_dir: Path, **cache: object) -> Session:
    store = StoreConfig(endpoint_url=endpoint.endpoint_url, access_key=endpoint.access_key,
                        secret_key=endpoint.secret_key, region=endpoint.region, max_attempts=2)
    return Session(workers=2, store=store, cache=CacheConfig(directory=cache_dir, block_size=64 * 1024, **cache))


def _put(client, bucket: str, key: str, table: pa.Table) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=2000, compression="none")  # chunks as large as their data
    client.put_object(Bucket=bucket, Key=key, Body=buffer.getvalue())


def _table(n: int = 6000, offset: int = 0) -> pa.Table:
    # ``s`` is wide and unique, so its chunks lie in cache blocks of their own.
    return pa.table({"a": [i + offset for i in range(n)], "b": [i % 7 for i in range(n)],
                     "s": [f"row-{i:08d}-{'x' * 40}" for i in range(n)]})


def _fresh_query(endpoint, cache_dir: Path, bucket: str, query: str):
    """``query`` over table ``t`` in a new session (a new process would do the same)."""
    with _session(endpoint, cache_dir) as session:
        session.register("t", f"s3://{bucket}/t/*.parquet")
        return session.sql(query)


def _copies_used(result) -> int:
    return sum(io.local_copies for io in result.profile.tables.values())


def test_warm_query_reads_local_copies_natively(s3_endpoint, s3_client, s3_bucket, tmp_path: Path) -> None:
    for part in range(2):
        _put(s3_client, s3_bucket, f"t/part-{part}.parquet", _table(offset=part * 6000))
    query = "SELECT b, count(*) AS n, sum(a) AS total FROM t GROUP BY b ORDER BY b"
    with _session(s3_endpoint, tmp_path / "cache") as cold:
        cold.register("t", f"s3://{s3_bucket}/t/*.parquet")
        first = cold.sql(query)
        expected = first.table
        assert _copies_used(first) == 0 and first.profile.tables["t"].bytes_from_store > 0
        cold.fs.reader.flush()  # the writer stores the chunks, then makes the copies the next run reads
        assert cold.cache_stats()["local_copy_bytes"] > 0 and cold.cache_stats()["local_copy_uses"] == 0
    with _session(s3_endpoint, tmp_path / "cache") as warm:
        warm.register("t", f"s3://{s3_bucket}/t/*.parquet")
        result = warm.sql(query)
        assert result.table.equals(expected)
        assert _copies_used(result) == 2
        assert result.profile.tables["t"].bytes_from_store == 0
        stats = warm.cache_stats()
        assert stats["local_copy_uses"] == 2 and stats["bytes_from_store"] == 0
        assert stats["local_copy_bytes"] == 0  # ready since the cold query
        # A query naming a column not cached yet reads through the cache; once the
        # cache writer has stored its chunks, it extends the copies with them (no
        # GET), so the next run reads natively without writing anything.
        before = warm.cache_stats()["local_copy_bytes"]
        other_query = "SELECT count(DISTINCT s) AS n FROM t WHERE b = 3"
        other = warm.sql(other_query)
        assert other.table.to_pylist() == [{"n": 857}]
        assert _copies_used(other) == 0 and other.profile.tables["t"].bytes_from_store > 0
        warm.fs.reader.flush()
        extended = warm.cache_stats()["local_copy_bytes"]
        assert extended > before
        again = warm.sql(other_query)
        assert again.table.to_pylist() == [{"n": 857}]
        assert _copies_used(again) == 2 and again.profile.tables["t"].bytes_from_store == 0
        assert warm.cache_stats()["local_copy_bytes"] == extended
        assert warm.cache_stats()["local_copy_uses"] == 4  # the background job's copies are not uses
    copies = sorted((tmp_path / "cache" / "local-copies").glob("*.parquet"))
    assert len(copies) == 2


def test_an_overwritten_object_is_never_read_from_an_old_copy(s3_endpoint, s3_client, s3_bucket,
                                                              tmp_path: Path) -> None:
    _put(s3_client, s3_bucket, "t/part-0.parquet", _table())
    query = "SELECT sum(a) AS total FROM t"
    for _ in range(2):  # fill the cache, then make a copy
        result = _fresh_query(s3_endpoint, tmp_path / "cache", s3_bucket, query)
        assert result.table.to_pylist() == [{"total": sum(range(6000))}]
    _put(s3_client, s3_bucket, "t/part-0.parquet", _table(offset=1000))
    with _session(s3_endpoint, tmp_path / "cache") as session:
        session.register("t", f"s3://{s3_bucket}/t/*.parquet")
        result = session.sql(query)
        assert result.table.to_pylist() == [{"total": sum(range(1000, 7000))}]
        assert _copies_used(result) == 0  # the new version is not cached yet


def test_a_corrupted_copy_is_not_used(s3_endpoint, s3_client, s3_bucket, tmp_path: Path) -> None:
    _put(s3_client, s3_bucket, "t/part-0.parquet", _table())
    query = "SELECT b, sum(a) AS total FROM t GROUP BY b ORDER BY b"
    for _ in range(2):  # fill the cache, then make a copy
        expected = _fresh_query(s3_endpoint, tmp_path / "cache", s3_bucket, query).table
    (copy,) = (tmp_path / "cache" / "local-copies").glob("*.parquet")
    sidecar = json.loads(copy.with_suffix(".json").read_text())
    lo, hi, _ = sidecar["ranges"][1]
    with open(copy, "r+b") as f:  # scramble a column chunk in place
        f.seek(lo)
        scrambled = bytes(b ^ 0x5A for b in f.read(hi - lo))
        f.seek(lo)
        f.write(scrambled)
    with _session(s3_endpoint, tmp_path / "cache") as session:
        session.register("t", f"s3://{s3_bucket}/t/*.parquet")
        result = session.sql(query)
        assert result.table.equals(expected)
        stats = session.cache_stats()
        assert stats["local_copy_corrupt"] == 1 and stats["bytes_from_store"] == 0


def test_a_copy_missing_a_range_duckdb_reads_falls_back_to_the_cache(s3_endpoint, s3_client, s3_bucket,
                                                                     tmp_path: Path, monkeypatch) -> None:
    """If the ranges given for a copy ever missed one DuckDB reads, the hole is zeros,
    DuckDB cannot parse them as a page header, and the query runs through the cache."""
    _put(s3_client, s3_bucket, "t/part-0.parquet", _table())
    query = "SELECT sum(a) AS total, sum(b) AS bs FROM t"
    for _ in range(2):  # fill the cache, then make a copy
        expected = _fresh_query(s3_endpoint, tmp_path / "cache", s3_bucket, query).table
    shutil.rmtree(tmp_path / "cache" / "local-copies")  # made again below, with the faulty ranges
    real = prefetch_module.native_layout
    monkeypatch.setattr(prefetch_module, "native_layout",
                        lambda metadata, size: {**real(metadata, size), "b": []})  # forgets column b
    with _session(s3_endpoint, tmp_path / "cache") as session:
        session.register("t", f"s3://{s3_bucket}/t/*.parquet")
        result = session.sql(query)
        assert result.table.equals(expected)
        assert session.cache_stats()["local_copy_fallbacks"] == 1


def test_queries_that_read_unnamed_columns_are_not_given_copies(s3_endpoint, s3_client, s3_bucket,
                                                                tmp_path: Path) -> None:
    _put(s3_client, s3_bucket, "t/part-0.parquet", _table(n=100))
    _put(s3_client, s3_bucket, "u/part-0.parquet", pa.table({"b": [1, 2], "label": ["one", "two"]}))
    for _ in range(2):
        with _session(s3_endpoint, tmp_path / "cache") as session:
            session.register("t", f"s3://{s3_bucket}/t/*.parquet")
            session.register("u", f"s3://{s3_bucket}/u/*.parquet")
            whole_rows = session.sql("SELECT t FROM t ORDER BY a LIMIT 1")
            assert whole_rows.table.column(0).to_pylist() == [{"a": 0, "b": 0, "s": f"row-00000000-{'x' * 40}"}]
            assert not whole_rows.profile.plan.native
            natural = session.sql("SELECT count(*) AS n, min(label) AS l FROM t NATURAL JOIN u")
            assert natural.table.to_pylist() == [{"n": 29, "l": "one"}]
            assert not natural.profile.plan.native


@pytest.mark.parametrize(("sql", "native"), [
    ("SELECT a, sum(b) FROM t JOIN u USING (k) GROUP BY a", True),
    ("SELECT * FROM t", True),  # every column is named
    ("SELECT count(*) FROM t", True),
    ("SELECT t FROM t", False),  # a table as a value: whole rows
    ("SELECT x FROM t AS x", False),
    ("WITH c AS (SELECT a FROM t) SELECT c FROM c", False),
    ("SELECT a FROM t NATURAL JOIN u", False),
    ("SELECT * FROM (UNPIVOT t ON a, b INTO NAME n VALUE v)", False),
    ("SELECT filename FROM t", False),
    ("SELECT nation, sum(v) AS value FROM (SELECT n_name AS nation, x AS v FROM nation) GROUP BY nation "
     "ORDER BY value", True),  # TPC-H Q9: an alias named like a table
])
def test_which_statements_may_read_local_copies(sql: str, native: bool) -> None:
    import duckdb

    from shoal.engine.sqlinfo import parse_tree, reads_only_named_columns

    assert reads_only_named_columns(parse_tree(duckdb.connect(), sql)) is native


def test_local_copies_can_be_turned_off(s3_endpoint, s3_client, s3_bucket, tmp_path: Path) -> None:
    _put(s3_client, s3_bucket, "t/part-0.parquet", _table())
    for _ in range(2):
        with _session(s3_endpoint, tmp_path / "cache", local_copies=False) as session:
            session.register("t", f"s3://{s3_bucket}/t/*.parquet")
            result = session.sql("SELECT sum(a) AS total FROM t")
            assert result.table.to_pylist() == [{"total": sum(range(6000))}] and _copies_used(result) == 0
    assert not (tmp_path / "cache" / "local-copies").exists()
    assert CacheConfig.from_env({"SHOAL_LOCAL_COPIES": "off"}).local_copies is False


def test_copies_are_readable_when_sql_is_limited_to_allowed_paths(s3_endpoint, s3_client, s3_bucket,
                                                                  tmp_path: Path) -> None:
    _put(s3_client, s3_bucket, "t/part-0.parquet", _table())
    store = StoreConfig(endpoint_url=s3_endpoint.endpoint_url, access_key=s3_endpoint.access_key,
                        secret_key=s3_endpoint.secret_key, region=s3_endpoint.region, max_attempts=2)
    (tmp_path / "allowed").mkdir()
    for _ in range(2):
        with Session(workers=2, store=store, allowed_paths=[str(tmp_path / "allowed")],
                     cache=CacheConfig(directory=tmp_path / "cache", block_size=64 * 1024)) as session:
            session.register("t", f"s3://{s3_bucket}/t/*.parquet")
            result = session.sql("SELECT sum(a) AS total FROM t")
            assert result.table.to_pylist() == [{"total": sum(range(6000))}]
    assert _copies_used(result) == 1
