"""Object-store faults, data changing underneath, and resource limits (issue 8, "Faults").

A real S3 server (SeaweedFS, or the one ``SHOAL_TEST_S3_ENDPOINT`` names: the faults come
from the proxy, so one server is enough) sits behind the benchmark proxy
(``benchmarks/s3proxy.py``), which injects 503 SlowDown, connection resets and
truncations mid-body, first-byte stalls and a slow tail.  Shoal reads through it
with :class:`ShoalFileSystem` and :meth:`Session.sql`; every answer is compared
with a direct read from the server, every failure must be one storage error of
:mod:`shoal.cache.errors` with a readable message, and nothing may hang: each
read runs under a deadline (:func:`within`) that fails the test instead of
blocking it.  Counts are asserted (requests, faults), never timings.

Covered elsewhere, not repeated here: an unreachable endpoint through
``ShoalFileSystem`` and the CLI (``test_cache_s3.py::test_unreachable_endpoint``,
``test_cli.py::test_s3_errors_are_one_line_without_secrets``), an overwrite
inside a filesystem snapshot on both SeaweedFS and moto
(``test_cache_s3.py::test_overwrite_during_snapshot_never_mixes_versions``),
``--max-rows`` on a small local result (``test_cli.py::test_max_rows_truncates_and_says_so``)
and the proxy's own fault mechanics (``test_s3proxy.py``).
"""

from __future__ import annotations

import dataclasses
import io
import os
import random
import resource
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3servers
from faultkit import put as put_bytes
from faultkit import within
from s3servers import S3Endpoint, free_port

from shoal.cache import (
    CacheConfig,
    EndpointUnreachableError,
    ObjectChangedError,
    ShoalFileSystem,
    StorageError,
    StoreConfig,
    StoreError,
)
from shoal.engine import Session

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))  # benchmarks/ is scripts, not a package
import s3proxy  # noqa: E402
from latency_profiles import FaultConfig, LatencyProfile  # noqa: E402

BS = 64 * 1024

#: Proxy-driven faults do not depend on the server: one server is enough.
pytestmark = pytest.mark.parametrize(
    "s3_endpoint", ["external" if s3servers.external_from_env() else "seaweedfs"], indirect=True)

_SCRIPT = Path(sys.executable).with_name("shoal")
SHOAL = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "shoal.cli.main"]


# -- helpers -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Burst(FaultConfig):
    """The first ``count`` GETs through the proxy get fault ``kind``, later ones none:
    a burst that ends after a known number of faults (counted, not timed)."""

    kind: str = "slowdown"
    count: int = 0
    seen: list[int] = dataclasses.field(default_factory=lambda: [0])

    def draw(self, rng: random.Random, method: bytes, profile: LatencyProfile) -> str | None:
        if method != b"GET" or self.seen[0] >= self.count:
            return None
        self.seen[0] += 1  # only the proxy's event-loop thread calls draw()
        return self.kind


@pytest.fixture
def proxy(s3_endpoint: S3Endpoint) -> Iterator[s3proxy.S3Proxy]:
    with s3proxy.S3Proxy(s3_endpoint.endpoint_url, profile="none", seed=8) as p:
        yield p


def store_config(endpoint: S3Endpoint, url: str, **overrides: Any) -> StoreConfig:
    values = {"endpoint_url": url, "access_key": endpoint.access_key, "secret_key": endpoint.secret_key,
              "region": endpoint.region, "connect_timeout": 2.0, "read_timeout": 5.0, "max_attempts": 6,
              **overrides}
    return StoreConfig(**values)


MakeFs = Callable[..., ShoalFileSystem]


@pytest.fixture
def make_fs(s3_endpoint: S3Endpoint, proxy: s3proxy.S3Proxy, tmp_path: Path) -> Iterator[MakeFs]:
    """Filesystems reading through the proxy (one GET per 64 KiB block), each with its own cache dir."""
    made: list[ShoalFileSystem] = []

    def make(name: str = "cache", **store: Any) -> ShoalFileSystem:
        cache = CacheConfig(directory=tmp_path / name, block_size=BS, readahead_blocks=0, max_request_size=BS)
        # No hedged GETs unless a test asks: the tests count the GETs the proxy saw.
        store.setdefault("hedge", False)
        fs = ShoalFileSystem(cache=cache, store=store_config(s3_endpoint, proxy.url, **store))
        made.append(fs)
        return fs

    yield make
    for fs in made:
        fs.close()


def people(rows: int, seed: int, first: int = 0) -> pa.Table:
    """``rows`` rows with ids ``first, first + 1, ...`` (unique across the files of a table)."""
    rng = random.Random(seed)
    return pa.table({"id": pa.array(range(first, first + rows), pa.int64()),
                     "name": pa.array([rng.randbytes(12).hex() for _ in range(rows)]),
                     "v": pa.array([rng.random() for _ in range(rows)], pa.float64())})


def put_parquet(client: Any, bucket: str, key: str, table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=2000)
    client.put_object(Bucket=bucket, Key=key, Body=buffer.getvalue())
    return buffer.getvalue()


def direct_answer(client: Any, bucket: str, keys: list[str], query: str, tmp_path: Path) -> list[dict[str, Any]]:
    """``query`` (over table ``t``) answered by plain DuckDB on the objects read straight from the server."""
    local = Path(tempfile.mkdtemp(prefix="direct-", dir=tmp_path))
    for n, key in enumerate(keys):
        (local / f"{n}.parquet").write_bytes(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    con = duckdb.connect()
    try:
        con.execute(f"CREATE VIEW t AS SELECT * FROM read_parquet('{local}/*.parquet')")
        return con.sql(query).to_arrow_table().to_pylist()
    finally:
        con.close()


QUERY = "SELECT count(*) AS n, sum(id) AS s, sum(length(name)) AS l, min(name) AS lo, max(v) AS hi FROM t"
ROWS_QUERY = "SELECT id, name, v FROM t WHERE id % 7 = 3 ORDER BY id"


def session_for(endpoint: S3Endpoint, url: str, cache_dir: Path, *, enabled: bool = True, readahead_blocks: int = 8,
                **store: Any) -> Session:
    cache = CacheConfig(directory=cache_dir, block_size=BS, max_request_size=BS, enabled=enabled,
                        readahead_blocks=readahead_blocks)
    return Session(workers=2, cache=cache, store=store_config(endpoint, url, **store))


def sql(session: Session, table_url: str, query: str, **kwargs: Any) -> list[dict[str, Any]]:
    """``query`` with ``t`` bound to ``table_url``, under a deadline."""
    text = query.replace("FROM t", f"FROM '{table_url}'")
    return within(90, session.sql, text, **kwargs).table.to_pylist()


# -- object store faults through ShoalFileSystem -------------------------------------------------------


@pytest.mark.parametrize("kind", ["slowdown", "reset", "truncate", "stall"])
def test_fault_burst_is_retried_and_bytes_are_right(kind: str, proxy: s3proxy.S3Proxy, make_fs: MakeFs,
                                                    s3_client: Any, s3_bucket: str) -> None:
    """A burst of 10 faulted GETs (503 SlowDown, reset or clean close mid-body, first-byte stall)
    among 16 concurrent block GETs: the faulted GETs are retried, the bytes are right."""
    url, data = put_bytes(s3_client, s3_bucket, "burst.bin", 16 * BS - 100, seed=1)
    fs = make_fs(read_timeout=0.5 if kind == "stall" else 5.0, max_attempts=8)  # a stall (30 s) times out
    proxy.set_faults(Burst(kind=kind, count=10, stall_s=30.0))
    assert within(60, fs.cat_file, url) == data
    assert proxy.stats()["faults"][kind] == 10
    if kind != "stall":  # (a 0.5 s timeout may also catch a slow answer on a busy machine)
        assert proxy.stats()["gets"] == 26  # each faulted GET cost exactly one more
    assert fs.stats()["store_requests"] == 16  # the retries happened inside the 16 reads
    # Nothing broken was cached: a new filesystem on the same cache reads it all from the SSD.
    fs.reader.flush()
    proxy.set_faults(FaultConfig(slowdown_rate=1.0, only_get=True))  # only the SSD cache can answer GETs
    warm = make_fs()
    assert within(30, warm.cat_file, url) == data
    assert warm.stats()["store_requests"] == 0


@pytest.mark.parametrize(("kind", "error", "words"), [
    ("slowdown", StoreError, "slowdown"),
    ("reset", StoreError, "connection"),
    ("truncate", StoreError, "connection"),
    ("stall", EndpointUnreachableError, "did not answer"),
])
def test_persistent_fault_is_one_clear_error_after_bounded_attempts(
        kind: str, error: type[StoreError], words: str, proxy: s3proxy.S3Proxy, make_fs: MakeFs,
        s3_endpoint: S3Endpoint, s3_client: Any, s3_bucket: str) -> None:
    url, data = put_bytes(s3_client, s3_bucket, "one-block.bin", BS, seed=2)
    fs = make_fs(read_timeout=0.3 if kind == "stall" else 5.0, max_attempts=3)
    fs.size(url)  # the HEAD goes through before the store turns bad
    proxy.reset_stats()
    proxy.set_faults(FaultConfig(**{f"{kind}_rate": 1.0}, stall_s=30.0, only_get=True))
    with pytest.raises(error) as info:
        within(60, fs.cat_file, url)
    message = str(info.value)
    assert isinstance(info.value, StorageError)
    assert url in message and words in message.lower(), message
    assert s3_endpoint.secret_key not in message and "\n" not in message
    # Bounded: max_attempts GETs for the one block, not retries multiplied by retries.
    assert proxy.stats()["gets"] == 3 == proxy.stats()["faults"][kind]
    assert fs.stats()["bytes_from_store"] == 0  # no partial bytes were kept
    proxy.set_faults(FaultConfig())
    assert within(30, fs.cat_file, url) == data  # the store is back: so is the object


def test_slow_tail_is_retried_past_the_read_timeout(proxy: s3proxy.S3Proxy, make_fs: MakeFs,
                                                    s3_client: Any, s3_bucket: str) -> None:
    """One GET in five takes 2-3 s to its first byte; with a 0.5 s read timeout those are
    retried (and most retries are fast), the rest answer normally."""
    url, data = put_bytes(s3_client, s3_bucket, "tail.bin", 12 * BS, seed=3)
    proxy.set_profile(LatencyProfile(name="slow-tail", ttfb_median_s=0.002, tail=((0.2, 2.0, 3.0),)))
    fs = make_fs(read_timeout=0.5, max_attempts=8)
    assert within(60, fs.cat_file, url) == data
    assert proxy.stats()["gets"] > 12  # some GETs ran into the tail and were sent again
    assert fs.stats()["store_requests"] == 12


def test_first_byte_stall_is_hedged(proxy: s3proxy.S3Proxy, make_fs: MakeFs, s3_client: Any,
                                    s3_bucket: str) -> None:
    """The first two GETs stall 30 s before their first byte (longer than the read timeout
    allows for): each gets a second copy after 0.2 s, which answers; the bytes are right,
    the store saw one GET more per stalled one, and the losers were not counted as reads."""
    url, data = put_bytes(s3_client, s3_bucket, "hedge.bin", 8 * BS - 7, seed=4)
    fs = make_fs(hedge=True, hedge_after=0.2, read_timeout=60.0, max_attempts=1)
    fs.size(url)  # the HEAD goes through before the stalls start (on a busy machine it may be hedged too)
    before = fs.stats()
    proxy.reset_stats()
    proxy.set_faults(Burst(kind="stall", count=2, stall_s=30.0))
    assert within(20, fs.cat_file, url) == data  # not 30 s: the second copies answered
    stats = fs.stats()
    hedged = stats["store_hedged"] - before["store_hedged"]
    assert proxy.stats()["faults"]["stall"] == 2
    assert hedged >= 2 and stats["store_hedge_wins"] - before["store_hedge_wins"] >= 2
    # Each stalled GET cost one more; a copy sent for a merely slow GET may be cancelled
    # before it leaves when the first answers meanwhile.
    assert 8 + 2 <= proxy.stats()["gets"] <= 8 + hedged
    assert stats["store_requests"] == 8 and stats["bytes_from_store"] == len(data)


def test_a_stalled_listing_is_hedged(proxy: s3proxy.S3Proxy, make_fs: MakeFs, s3_client: Any,
                                    s3_bucket: str) -> None:
    """The first LIST stalls 30 s: a second copy is sent after 0.2 s and its answer is
    the listing (a query planned on a remembered listing waits for this one)."""
    urls = sorted(put_bytes(s3_client, s3_bucket, f"listed/part-{n}.bin", 100 + n, seed=n)[0] for n in range(3))
    fs = make_fs(hedge=True, hedge_after=0.2, read_timeout=60.0, max_attempts=1)
    source = fs.source("s3")
    proxy.reset_stats()
    proxy.set_faults(Burst(kind="stall", count=1, stall_s=30.0))  # the LIST is the first GET
    versions = within(20, source.glob, f"s3://{s3_bucket}/listed/*.bin")
    assert [v.url for v in versions] == urls and [v.size for v in versions] == [100, 101, 102]
    assert proxy.stats()["faults"]["stall"] == 1
    assert fs.stats()["store_hedged"] >= 1 and fs.stats()["store_hedge_wins"] >= 1


# -- object store faults through Session.sql ------------------------------------------------------------


def test_query_under_mixed_faults_gives_the_direct_answer(proxy: s3proxy.S3Proxy, s3_endpoint: S3Endpoint,
                                                          s3_client: Any, s3_bucket: str, tmp_path: Path) -> None:
    """One request in five (LIST, HEAD and GET alike) gets a 503 SlowDown, a reset or a truncation
    mid-body, or a first-byte stall past the read timeout; the rows of two queries equal DuckDB's
    over the objects read directly, and so do those of a warm re-run served by the SSD cache."""
    keys = ["t/part-0.parquet", "t/part-1.parquet"]
    for n, key in enumerate(keys):
        put_parquet(s3_client, s3_bucket, key, people(12000, seed=10 + n, first=12000 * n))
    table_url = f"s3://{s3_bucket}/t/*.parquet"
    expected = [direct_answer(s3_client, s3_bucket, keys, q, tmp_path) for q in (QUERY, ROWS_QUERY)]
    proxy.set_faults(FaultConfig(slowdown_rate=0.05, reset_rate=0.05, truncate_rate=0.05, stall_rate=0.05,
                                 stall_s=30.0))
    with session_for(s3_endpoint, proxy.url, tmp_path / "cache", read_timeout=0.5, max_attempts=8) as s:
        assert [sql(s, table_url, q) for q in (QUERY, ROWS_QUERY)] == expected
    assert all(count > 0 for count in proxy.stats()["faults"].values()), proxy.stats()["faults"]
    proxy.set_faults(FaultConfig())
    # Without read-ahead, which may fetch whole blocks that are cached only as pieces.
    with session_for(s3_endpoint, proxy.url, tmp_path / "cache", readahead_blocks=0) as s:
        result = within(60, s.sql, ROWS_QUERY.replace("FROM t", f"FROM '{table_url}'"))
    assert result.table.to_pylist() == expected[1]
    assert result.profile.store_requests == 0  # all from the SSD cache: nothing broken was kept


def test_unreachable_endpoint_is_one_clear_error_from_sql(s3_endpoint: S3Endpoint, tmp_path: Path) -> None:
    with session_for(s3_endpoint, f"http://127.0.0.1:{free_port()}", tmp_path / "cache", max_attempts=2) as s:
        with pytest.raises(EndpointUnreachableError) as info:
            within(60, s.sql, "SELECT count(*) FROM 's3://some-bucket/t/*.parquet'")
    assert "cannot reach the object store" in str(info.value)
    assert s3_endpoint.secret_key not in str(info.value)


def test_endpoint_going_down_mid_query_is_one_clear_error(proxy: s3proxy.S3Proxy, s3_endpoint: S3Endpoint,
                                                          s3_client: Any, s3_bucket: str, tmp_path: Path) -> None:
    """The store disappears after the query is planned (its files listed, footers read)."""
    put_parquet(s3_client, s3_bucket, "t/part-0.parquet", people(20000, seed=20))
    table_url = f"s3://{s3_bucket}/t/*.parquet"
    stopped: list[bool] = []

    def stop_store(done: int, total: int) -> None:
        if not stopped:
            stopped.append(True)
            proxy.stop()

    with session_for(s3_endpoint, proxy.url, tmp_path / "cache", max_attempts=2, connect_timeout=1.0) as s:
        with pytest.raises(EndpointUnreachableError) as info:
            sql(s, table_url, ROWS_QUERY, progress=stop_store)
        assert stopped and "cannot reach the object store" in str(info.value)
        assert s3_endpoint.secret_key not in str(info.value)


# -- data changing underneath a query ---------------------------------------------------------------------


@pytest.mark.parametrize("cached", [True, False], ids=["cache", "no-cache"])
def test_object_overwritten_during_a_query(cached: bool, s3_endpoint: S3Endpoint, s3_client: Any, s3_bucket: str,
                                           tmp_path: Path) -> None:
    """The object is overwritten after the query pinned its version (planned, footer read) and
    before its data is read: the answer is all old or all new (the query re-ran), or, without a
    cache to re-plan from, ObjectChangedError; never rows of both."""
    key = "t/part-0.parquet"
    put_parquet(s3_client, s3_bucket, key, people(20000, seed=30))
    old = direct_answer(s3_client, s3_bucket, [key], ROWS_QUERY, tmp_path)
    table_url = f"s3://{s3_bucket}/t/*.parquet"
    new_table = people(20000, seed=31)
    overwritten: list[bool] = []

    def overwrite(done: int, total: int) -> None:
        if not overwritten:
            overwritten.append(True)
            put_parquet(s3_client, s3_bucket, key, new_table)

    with session_for(s3_endpoint, s3_endpoint.endpoint_url, tmp_path / "cache", enabled=cached) as s:
        try:
            rows = sql(s, table_url, ROWS_QUERY, progress=overwrite)
        except ObjectChangedError as exc:
            assert not cached, "with a cache the query re-runs on the new version"
            assert key in str(exc) and "changed" in str(exc)
            rows = None
        assert overwritten
        new = direct_answer(s3_client, s3_bucket, [key], ROWS_QUERY, tmp_path)
        assert rows is None or rows in (old, new)
        if cached:
            assert rows == new
        assert sql(s, table_url, ROWS_QUERY) == new  # and the next query sees the new version


@pytest.mark.parametrize("cached", [True, False], ids=["cache", "no-cache"])
def test_object_deleted_during_a_query(cached: bool, s3_endpoint: S3Endpoint, s3_client: Any, s3_bucket: str,
                                       tmp_path: Path) -> None:
    """One of two files is deleted after the query listed and pinned them: the answer is that of
    the remaining file (the query re-ran on a fresh listing) or one clear error; never a mix."""
    keys = ["t/part-0.parquet", "t/part-1.parquet"]
    for n, key in enumerate(keys):
        put_parquet(s3_client, s3_bucket, key, people(15000, seed=40 + n, first=15000 * n))
    table_url = f"s3://{s3_bucket}/t/*.parquet"
    deleted: list[bool] = []

    def delete(done: int, total: int) -> None:
        if not deleted:
            deleted.append(True)
            s3_client.delete_object(Bucket=s3_bucket, Key=keys[0])

    with session_for(s3_endpoint, s3_endpoint.endpoint_url, tmp_path / "cache", enabled=cached) as s:
        remaining = direct_answer(s3_client, s3_bucket, keys[1:], QUERY, tmp_path)
        try:
            rows = sql(s, table_url, QUERY, progress=delete)
        except StorageError as exc:
            assert not cached, "with a cache the query re-runs on the new listing"
            assert isinstance(exc, ObjectChangedError), repr(exc)
            assert keys[0] in str(exc)
            rows = None
        assert deleted
        if cached:
            assert rows == remaining
        assert sql(s, table_url, QUERY) == remaining


def test_file_deleted_since_the_remembered_listing_is_not_an_error(s3_endpoint: S3Endpoint, s3_client: Any,
                                                                    s3_bucket: str, tmp_path: Path) -> None:
    """A later process plans on the listing an earlier one remembered (speculative listing); a file
    deleted in between whose data was never cached must make the query re-run, not fail."""
    keys = ["t/part-0.parquet", "t/part-1.parquet"]
    for n, key in enumerate(keys):
        put_parquet(s3_client, s3_bucket, key, people(15000, seed=50 + n, first=15000 * n))
    table_url = f"s3://{s3_bucket}/t/*.parquet"
    with session_for(s3_endpoint, s3_endpoint.endpoint_url, tmp_path / "cache") as s:
        assert sql(s, table_url, "SELECT count(*) AS n FROM t") == [{"n": 30000}]  # footers only
    s3_client.delete_object(Bucket=s3_bucket, Key=keys[0])
    remaining = direct_answer(s3_client, s3_bucket, keys[1:], QUERY, tmp_path)
    with session_for(s3_endpoint, s3_endpoint.endpoint_url, tmp_path / "cache") as s:
        assert sql(s, table_url, QUERY) == remaining


# -- resource limits -----------------------------------------------------------------------------------


def _cli_env(endpoint: S3Endpoint, tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SHOAL_", "XDG_"))}
    env.update(HOME=str(home), SHOAL_CACHE_DIR=str(tmp_path / "cli-cache"), SHOAL_WORKERS="2",
               AWS_CONFIG_FILE=str(home / "none"), AWS_SHARED_CREDENTIALS_FILE=str(home / "none"),
               AWS_EC2_METADATA_DISABLED="true", AWS_ACCESS_KEY_ID=endpoint.access_key,
               AWS_SECRET_ACCESS_KEY=endpoint.secret_key, AWS_ENDPOINT_URL_S3=endpoint.endpoint_url,
               AWS_REGION=endpoint.region, MALLOC_ARENA_MAX="2")
    return env


def test_result_larger_than_max_rows_is_truncated_and_says_so(s3_endpoint: S3Endpoint, s3_client: Any,
                                                              s3_bucket: str, tmp_path: Path) -> None:
    """Documented behaviour of ``--max-rows``: print the first N rows, say so on stderr, exit 0.
    (The whole result is still computed and held in memory first: see the next test.)"""
    put_parquet(s3_client, s3_bucket, "t/part-0.parquet", people(50000, seed=60))
    env = _cli_env(s3_endpoint, tmp_path)
    query = f"SELECT id, name FROM 's3://{s3_bucket}/t/*.parquet' ORDER BY id"
    result = subprocess.run([*SHOAL, "sql", "--format", "csv", "--max-rows", "5", query], env=env,
                            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "id,name" and [int(line.split(",")[0]) for line in lines[1:]] == [0, 1, 2, 3, 4]
    assert "output truncated to 5 of 50000 rows (--max-rows)" in result.stderr


def test_result_that_does_not_fit_in_memory_is_one_clear_error(s3_endpoint: S3Endpoint, s3_client: Any,
                                                               s3_bucket: str, tmp_path: Path) -> None:
    """``shoal sql`` limited to 1.5 GiB of address space (RLIMIT_AS, which binds root too) asked
    for a ~2 GiB result: one ``shoal: error: out of memory ...`` line and exit status 1, no
    traceback, no killed process.  (Shoal sets no DuckDB ``memory_limit`` of its own: DuckDB's
    default is 80% of RAM and its operators spill to ``temp_directory``; the Arrow result the
    engine returns is outside that limit, so the process's own limit is what a result hits.)"""
    put_parquet(s3_client, s3_bucket, "t/part-0.parquet", people(4000, seed=70))
    env = _cli_env(s3_endpoint, tmp_path)
    query = (f"SELECT t.id, repeat(t.name, 20) AS wide, r.range AS k "
             f"FROM 's3://{s3_bucket}/t/*.parquet' t, range(1000) r")
    limit = 1536 << 20

    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    result = subprocess.run([*SHOAL, "sql", "--format", "csv", "--max-rows", "3", query], env=env,
                            capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL,
                            preexec_fn=limit_memory, cwd=tmp_path)
    lines = result.stderr.splitlines()
    assert result.returncode == 1, result.stderr
    assert len(lines) == 1 and lines[0].startswith("shoal: error: out of memory"), result.stderr
    assert "Traceback" not in result.stderr and "SET " not in lines[0]
    assert s3_endpoint.secret_key not in result.stderr
