"""The Ray cluster's shared caches and spilling, on a local Ray cluster against a real S3 server.

* Worker actors serve their SSD caches to each other over the transport: with
  random placement (every object read by several actors) the store, counted
  by a proxy in front of it, sees each block fetched once for the whole
  cluster; a replaced actor keeps its address.
* The driver reads through the actors' caches: a ``ShoalDataset`` with an empty
  cache of its own, in this process and in DataLoader worker processes, reads a
  table the actors have cached without a single GET to the store.
* Large scan results spill to the object store as Parquet: all 22 TPC-H queries
  with every result spilled equal DuckDB's answers; the spill objects exist
  while the coordinator finishes the query and are gone afterwards, also after
  a cancellation or a failed task.
"""

from __future__ import annotations

import functools
import stat
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

ray = pytest.importorskip("ray", reason="the ray executor needs Ray: pip install 'shoal[ray]'")

from shoal.cache import CacheConfig, ObjectChangedError, ObjectNotFoundError, ObjectVersion, StoreConfig  # noqa: E402
from shoal.engine import EXECUTORS, EngineError, QueryCancelled, Session, WorkerError  # noqa: E402
from shoal.engine.ray_executor import RayExecutor  # noqa: E402
from shoal.engine.ray_peers import write_secret_file  # noqa: E402
from shoal.engine.ray_spill import SPILL_DIR, check_spill_url, spill_base, spill_object  # noqa: E402
from shoal.engine.worker import ScanTask  # noqa: E402
from shoal.transport import load_secret  # noqa: E402

from tpch_fixtures import TPCH_TABLES, answers, queries, upload  # type: ignore[import-not-found]  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # benchmarks/ is scripts
import s3proxy  # noqa: E402

SLOW = [pytest.mark.ray, pytest.mark.slow]
#: Small blocks: every table file spans several blocks, owned by different actors.
BS = 64 * 1024
LINEITEM_ROWS = 60175
INT_COLUMNS = ["l_orderkey", "l_partkey", "l_suppkey", "l_linenumber"]


# -- units (no cluster) ---------------------------------------------------------------


def _task(url: str, table: str = "lineitem", fragment: int = 3) -> ScanTask:
    return ScanTask(table=table, fragment=fragment, files=(ObjectVersion(url=url, size=1, etag="e"),),
                    row_groups=None, columns=("a",), filter=None, hive=False)


def test_spill_location(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SHOAL_SPILL_URL", raising=False)
    tasks = [_task("/local/file.parquet"), _task("s3://data/tpch/lineitem/part-0.parquet")]
    assert spill_base(None, tasks) == f"s3://data/{SPILL_DIR}/"
    assert spill_base(None, [_task("/local/file.parquet")]) is None
    assert spill_base("s3://scratch/spill", tasks) == "s3://scratch/spill/"
    monkeypatch.setenv("SHOAL_SPILL_URL", "s3a://env-bucket/x/")
    assert spill_base(None, tasks) == "s3a://env-bucket/x/"
    for bad in ("/tmp/spill", "memory://x", "s3://", "http://host/bucket"):
        with pytest.raises(EngineError, match="spill URL"):
            check_spill_url(bad)
    # One new object per attempt; odd table names cannot leave the prefix.
    first, second = (spill_object("s3://b/p/q/", _task("s3://b/t", table='we"ird/../name')) for _ in range(2))
    assert first != second and first.startswith("s3://b/p/q/we_ird_.._name-00003-") and first.endswith(".parquet")
    assert "/" not in first[len("s3://b/p/q/"):]


def test_generated_secret_file_is_private(tmp_path: Path) -> None:
    from shoal.engine.ray_peers import cluster_secret

    secret, path = cluster_secret()
    assert path is None and len(secret) >= 32
    written = write_secret_file(secret, tmp_path)
    assert stat.S_IMODE(written.stat().st_mode) == 0o600
    assert stat.S_IMODE(written.parent.stat().st_mode) == 0o700
    assert load_secret(written) == secret


# -- cluster fixtures -----------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def tpch_bucket(s3_endpoint, tpch_dir: Path) -> Iterator[str]:
    client = s3_endpoint.boto3_client()
    bucket = f"shoal-raycl-{uuid.uuid4().hex[:10]}"
    client.create_bucket(Bucket=bucket)
    upload(client, bucket, tpch_dir)
    yield bucket
    from s3servers import empty_and_delete_bucket  # type: ignore[import-not-found]

    empty_and_delete_bucket(client, bucket)


@pytest.fixture
def ray_options(monkeypatch: pytest.MonkeyPatch):
    """Make ``Session(executor="ray")`` build its executor with these options."""
    def use(**options: Any) -> None:
        monkeypatch.setitem(EXECUTORS, "ray", functools.partial(RayExecutor, **options))
    return use


def _store(endpoint, url: str | None = None) -> StoreConfig:
    return StoreConfig(endpoint_url=url or endpoint.endpoint_url, access_key=endpoint.access_key,
                       secret_key=endpoint.secret_key, region=endpoint.region)


class ObjectGetCounter(s3proxy.S3Proxy):
    """The store's view: GETs of object bytes (not listings) that reach it, with their ranges."""

    object_gets = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ranges: list[tuple[str, int, int]] = []

    async def _exchange(self, req: Any, conn: Any) -> bool:
        path, _, query = req.target.partition(b"?")
        if req.method == b"GET" and b"list-type" not in query and path.strip(b"/").count(b"/") >= 1:
            # Only the proxy's event-loop thread counts.
            self.object_gets += 1
            first, _, last = req.headers.get(b"range", b"bytes=0-").decode().removeprefix("bytes=").partition("-")
            self.ranges.append((path.decode(), int(first), int(last) if last else -1))
        return await super()._exchange(req, conn)

    def bytes_fetched_and_distinct(self) -> tuple[int, int]:
        """Bytes the GETs moved, and how many distinct object bytes they covered."""
        fetched = distinct = 0
        by_path: dict[str, list[tuple[int, int]]] = {}
        for path, first, last in self.ranges:
            assert last >= first, "an object GET without a range"
            fetched += last + 1 - first
            by_path.setdefault(path, []).append((first, last + 1))
        for spans in by_path.values():
            end = -1
            for lo, hi in sorted(spans):
                if hi > end:
                    distinct += hi - max(lo, end)
                    end = hi
        return fetched, distinct


def _session(endpoint, bucket: str, tmp_path: Path, *, workers: int = 3, block_size: int = BS,
             store_url: str | None = None) -> Session:
    session = Session(workers=workers, executor="ray", store=_store(endpoint, store_url),
                      cache=CacheConfig(directory=tmp_path / "cache", block_size=block_size))
    for table in TPCH_TABLES:
        session.register(table, f"s3://{bucket}/tpch/{table}/*.parquet")
    return session


def _rows(result: Any) -> list[tuple]:
    return [tuple(row.values()) for row in result.table.to_pylist()]


def _skip_moto(endpoint) -> None:
    if endpoint.name == "moto":
        pytest.skip("server-independent; runs on seaweedfs")


def _spill_keys(endpoint, bucket: str) -> list[str]:
    listing = endpoint.boto3_client().list_objects_v2(Bucket=bucket, Prefix=f"{SPILL_DIR}/")
    return [o["Key"] for o in listing.get("Contents", [])]


def _total(stats: dict[str, dict[str, Any]], key: str) -> int:
    return sum(s.get(key, 0) for s in stats.values())


# -- actors serve their caches ----------------------------------------------------------


@pytest.mark.ray
@pytest.mark.slow
def test_actors_read_each_block_from_the_store_once(s3_endpoint, tpch_bucket: str, reference,
                                                     tmp_path: Path, ray_options, ray_cluster) -> None:
    _skip_moto(s3_endpoint)
    # Random placement: each object is read by several actors over the queries.
    ray_options(affinity=False)
    names = ["q03", "q05", "q09", "q10", "q18"]
    with ObjectGetCounter(s3_endpoint.endpoint_url) as proxy, \
            _session(s3_endpoint, tpch_bucket, tmp_path, store_url=proxy.url) as session:
        executor = session.executor
        # The coordinator plans first (its footer reads go to its own cache): the store sees the actors.
        for name in names:
            session.explain(queries()[name])
        proxy.ranges.clear()
        runners: list[dict[tuple[str, int], str]] = []
        for run in range(2):
            gets = proxy.object_gets
            runners.append({})
            for name in names:
                result = session.sql(queries()[name])
                assert not answers.rows_difference(_rows(result), reference[name]), name
                runners[-1].update(executor.last_assignment)
            if run == 1:
                # Fragments moved to other actors; these found every block in the cluster: no GET.
                assert sum(runners[0][k] != runners[1][k] for k in runners[1]) > 0
                assert proxy.object_gets == gets
        # At the store: owners fill the exact pieces asked for, so the cluster fetches each
        # byte it needs about once, not once per actor (without peers, random placement reads
        # each object up to once per actor).  Pieces of different shapes overlap at their
        # edges (footer probes, merged prefetch ranges): at SF 0.01, where footers are a large
        # share of the bytes, that came to ~1.35x the distinct bytes, and up to 1.5x on a
        # loaded machine (two actors asking one owner for overlapping pieces at once); one
        # copy per actor would be up to 3x.
        fetched, distinct = proxy.bytes_fetched_and_distinct()
        assert distinct > 0 and fetched <= 1.75 * distinct, (fetched, distinct)
        stats = executor.worker_stats()
        addresses = executor.peer_addresses()
        # The membership of the peer tier is the set of live actors, on every actor.
        assert len(addresses) == 3 and sorted(s["address"] for s in stats.values()) == addresses
        assert all(sorted(s["peers"]) == addresses for s in stats.values())
        # The secret is nowhere in what the actors report.
        assert executor._secret is not None and executor._secret.decode() not in repr(stats)
        # The actors' own counters agree: blocks came from the store (reads by their owner,
        # or fills for a peer that asked) and from each other.
        assert _total(stats, "bytes_from_store") + _total(stats, "fill_bytes_from_store") > 0
        assert _total(stats, "bytes_from_peers") > 0
        assert sum(s["served"].get("hits", 0) for s in stats.values()) > 0

        # A replaced actor serves on its predecessor's address: its blocks keep their owner.
        victim = executor.members[0]
        old = stats[victim]
        ray.kill(executor.handle(victim))
        time.sleep(0.5)
        result = session.sql(queries()["q05"])
        assert not answers.rows_difference(_rows(result), reference["q05"])
        new = executor.worker_stats()
        assert new[victim]["pid"] != old["pid"] and new[victim]["address"] == old["address"]
        assert executor.peer_addresses() == addresses


# -- the driver reads through the cluster -----------------------------------------------


def _loaded_rows(batches: Any) -> int:
    rows = 0
    for batch in batches:
        assert set(batch) == set(INT_COLUMNS)
        rows += len(batch["l_orderkey"])
    return rows


@pytest.mark.ray
@pytest.mark.slow
def test_driver_loader_reads_through_the_actors_caches(s3_endpoint, tpch_bucket: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch, ray_cluster) -> None:
    _skip_moto(s3_endpoint)
    torch_loader = pytest.importorskip("shoal.engine.torch")
    url = f"s3://{tpch_bucket}/tpch/lineitem/*.parquet"
    # Everyone (actors, coordinator, loader) reads the store through a proxy that counts GETs.
    with ObjectGetCounter(s3_endpoint.endpoint_url) as proxy, \
            _session(s3_endpoint, tpch_bucket, tmp_path, store_url=proxy.url) as session:
        executor = session.executor
        # Warm the actors' caches with every block of the table.
        assert session.sql("SELECT * FROM lineitem").num_rows == LINEITEM_ROWS
        assert proxy.object_gets > 0
        # The owners hold the pieces DuckDB read; a loader reads other shapes (pyarrow's
        # footer probe spans bytes DuckDB skipped), which owners fill on first contact.
        # One loader pass over an empty cache of its own brings those in too.
        warm_fs = executor.cluster_filesystem(CacheConfig(directory=tmp_path / "warm", block_size=BS))
        with Session(fs=warm_fs, workers=1) as warm:
            dataset = torch_loader.ShoalDataset(url, batch_size=4096, columns=INT_COLUMNS, session=warm)
            try:
                assert _loaded_rows(dataset) == LINEITEM_ROWS
            finally:
                dataset.close()
        served_before = sum(s["served"].get("hits", 0) for s in executor.worker_stats().values())
        proxy.object_gets = 0

        # In this process: a filesystem over an empty cache whose misses go to the actors.
        fs = executor.cluster_filesystem(CacheConfig(directory=tmp_path / "driver", block_size=BS))
        with Session(fs=fs, workers=1) as driver:
            dataset = torch_loader.ShoalDataset(url, batch_size=4096, columns=INT_COLUMNS, session=driver)
            try:
                assert _loaded_rows(dataset) == LINEITEM_ROWS
            finally:
                dataset.close()
            stats = fs.stats()
        assert stats["store_requests"] == 0 and stats["bytes_from_store"] == 0, stats
        assert stats["tiers"]["peer"]["peer_hits"] > 0
        assert proxy.object_gets == 0
        served_mid = sum(s["served"].get("hits", 0) for s in executor.worker_stats().values())

        # DataLoader worker processes build their own filesystem: from the environment.
        monkeypatch.setenv("SHOAL_CACHE_DIR", str(tmp_path / "unused"))
        for name, value in executor.cluster_environment().items():
            monkeypatch.setenv(name, value)
        cache = CacheConfig(directory=tmp_path / "loader", block_size=BS)
        dataset = torch_loader.ShoalDataset(url, batch_size=4096, columns=INT_COLUMNS, cache=cache,
                                            store=_store(s3_endpoint, proxy.url))
        try:
            assert _loaded_rows(torch_loader.ShoalDataLoader(dataset, num_workers=2)) == LINEITEM_ROWS
        finally:
            dataset.close()
        # Not one GET of the table's bytes reached the store: the actors served them all.
        assert proxy.object_gets == 0
        served_after = sum(s["served"].get("hits", 0) for s in executor.worker_stats().values())
        assert served_mid > served_before and served_after > served_mid


# -- spilling ---------------------------------------------------------------------------


def _watch_release(executor: RayExecutor, endpoint, bucket: str) -> list[list[str]]:
    """Record the spill objects that exist when the coordinator releases a query's results."""
    seen: list[list[str]] = []
    release = executor.release

    def watched(results: Any) -> None:
        seen.append(_spill_keys(endpoint, bucket))
        release(results)

    executor.release = watched  # type: ignore[method-assign]
    return seen


@pytest.mark.ray
@pytest.mark.slow
def test_tpch_with_every_result_spilled_equals_duckdb(s3_endpoint, tpch_bucket: str, reference, tmp_path: Path,
                                                      ray_options, ray_cluster) -> None:
    _skip_moto(s3_endpoint)
    ray_options(spill_threshold=0)  # every non-empty result goes to the object store
    failures = {}
    with _session(s3_endpoint, tpch_bucket, tmp_path, workers=2, block_size=8 << 20) as session:
        executor = session.executor
        seen = _watch_release(executor, s3_endpoint, tpch_bucket)
        for name, sql in queries().items():
            before = executor.spilled_results
            result = session.sql(sql)
            difference = answers.rows_difference(_rows(result), reference[name])
            if difference:
                failures[name] = difference
            spilled = executor.spilled_results - before
            assert spilled > 0, name
            # The objects existed while the coordinator finished the query, and are gone now.
            assert len(seen[-1]) == spilled, (name, seen[-1])
            assert _spill_keys(s3_endpoint, tpch_bucket) == [], name
            assert sum(t.rows_out for t in result.profile.tables.values()) > 0
        stats = executor.worker_stats()
    assert failures == {}
    assert _total(stats, "spilled_tasks") == executor.spilled_results
    assert executor.coordinator_spills == 0


@pytest.mark.ray
@pytest.mark.slow
def test_memory_budget_spills_instead_of_failing(s3_endpoint, tpch_bucket: str, reference, tmp_path: Path,
                                                 ray_options, ray_cluster) -> None:
    _skip_moto(s3_endpoint)
    budget = 64 << 10
    ray_options(memory_budget=budget, spill_threshold=None)
    sql = "SELECT l_orderkey, l_partkey, l_comment FROM lineitem ORDER BY l_orderkey, l_linenumber LIMIT 5"
    with _session(s3_endpoint, tpch_bucket, tmp_path, workers=2, block_size=8 << 20) as session:
        executor = session.executor
        seen = _watch_release(executor, s3_endpoint, tpch_bucket)
        result = session.sql(sql)
        assert result.num_rows == 5 and result.table.column("l_orderkey").to_pylist() == [1] * 5
        assert executor.spilled_results > 0 and len(seen[-1]) == executor.spilled_results
        assert executor.last_memory_bytes <= budget
        assert _spill_keys(s3_endpoint, tpch_bucket) == []
        # Small results stay in memory.
        assert _rows(session.sql(queries()["q06"])) and not answers.rows_difference(
            _rows(session.sql(queries()["q06"])), reference["q06"])


@pytest.mark.ray
@pytest.mark.slow
def test_spill_objects_are_deleted_on_cancel_and_on_error(s3_endpoint, tpch_bucket: str, tmp_path: Path,
                                                          ray_options, ray_cluster) -> None:
    _skip_moto(s3_endpoint)
    ray_options(spill_threshold=0, task_delay_s=1.0)
    with _session(s3_endpoint, tpch_bucket, tmp_path, workers=2, block_size=8 << 20) as session:
        executor = session.executor
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["result"] = session.sql(queries()["q05"])
            except BaseException as exc:  # noqa: BLE001 - handed to the test
                box["error"] = exc

        thread = threading.Thread(target=run)
        thread.start()
        deadline = time.monotonic() + 120
        while executor.spilled_results == 0 and time.monotonic() < deadline and thread.is_alive():
            time.sleep(0.02)
        assert executor.spilled_results > 0
        assert _spill_keys(s3_endpoint, tpch_bucket), "a spilled result is in the store mid-query"
        session.interrupt()
        thread.join(60)
        assert isinstance(box.get("error"), QueryCancelled), box
        assert _spill_keys(s3_endpoint, tpch_bucket) == []

        # A task that fails after another spilled: the query's error, and nothing left behind.
        region = session.fs.versions(f"s3://{tpch_bucket}/tpch/region/*.parquet")[0]
        good = ScanTask(table="region", fragment=0, files=(region,), row_groups=None, columns=("r_name",),
                        filter=None, hive=False)
        missing = ObjectVersion(url=f"s3://{tpch_bucket}/tpch/nope.parquet", size=100, etag="x")
        bad = ScanTask(table="t", fragment=1, files=(missing,), row_groups=None, columns=("a",), filter=None,
                       hive=False)
        with pytest.raises((ObjectNotFoundError, ObjectChangedError)):
            executor.run([good, bad], threading.Event())
        assert _spill_keys(s3_endpoint, tpch_bucket) == []


@pytest.mark.ray
@pytest.mark.slow
def test_without_spilling_the_budget_is_a_clear_error(s3_endpoint, tpch_bucket: str, tmp_path: Path,
                                                      ray_options, ray_cluster) -> None:
    _skip_moto(s3_endpoint)
    ray_options(memory_budget=64 << 10, spill=False, peers=False)
    with _session(s3_endpoint, tpch_bucket, tmp_path, workers=2, block_size=8 << 20) as session:
        with pytest.raises(WorkerError, match="memory budget"):
            session.sql("SELECT * FROM lineitem ORDER BY l_orderkey LIMIT 5")
        assert session.executor.peer_addresses() == []
        with pytest.raises(EngineError, match="peers=False"):
            session.executor.cluster_environment()
        assert session.sql("SELECT count(*) FROM nation").table.column(0)[0].as_py() == 25
