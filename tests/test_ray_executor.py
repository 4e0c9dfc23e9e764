"""The ``ray`` executor on a local Ray cluster against a real S3 server.

One Ray runtime per module (``num_cpus=2``); every Session starts its own
2-3 worker actors, each with its own cache directory under the test's
``tmp_path``.  Covers: all 22 TPC-H queries equal DuckDB, cache affinity on a
second run, a worker killed mid-query, a worker added between runs,
cancellation, task errors and the memory budget without spilling.  The
actors' shared caches, the driver's reads through them and spilling are in
``test_ray_cluster.py``.
"""

from __future__ import annotations

import functools
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

ray = pytest.importorskip("ray", reason="the ray executor needs Ray: pip install 'shoal[ray]'")

from shoal.cache import CacheConfig, ObjectChangedError, ObjectNotFoundError, ObjectVersion, StoreConfig  # noqa: E402
from shoal.engine import EXECUTORS, QueryCancelled, Session, WorkerError  # noqa: E402
from shoal.engine.ray_executor import RayExecutor  # noqa: E402
from shoal.engine.worker import ScanTask  # noqa: E402

from tpch_fixtures import TPCH_TABLES, answers, queries, upload  # type: ignore[import-not-found]  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]

#: Touches six tables: eight fragments spread over the workers.
JOIN_QUERY = "q05"


@pytest.fixture(scope="module", autouse=True)
def ray_cluster() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def tpch_bucket(s3_endpoint, tpch_dir: Path) -> Iterator[str]:
    client = s3_endpoint.boto3_client()
    # A fixed name: blocks are placed by hashing their URLs, and the placement
    # asserts below want every worker to own some object (with random names,
    # about one bucket in fifty left a worker without any).
    bucket = "shoal-ray-tpch-placed"
    from s3servers import empty_and_delete_bucket  # type: ignore[import-not-found]

    empty_and_delete_bucket(client, bucket)  # left over from an interrupted run (gone is fine)
    client.create_bucket(Bucket=bucket)
    upload(client, bucket, tpch_dir)
    yield bucket
    empty_and_delete_bucket(client, bucket)


def _store(endpoint) -> StoreConfig:
    return StoreConfig(endpoint_url=endpoint.endpoint_url, access_key=endpoint.access_key,
                       secret_key=endpoint.secret_key, region=endpoint.region)


def _session(endpoint, bucket: str, tmp_path: Path, *, workers: int = 3) -> Session:
    session = Session(workers=workers, executor="ray", cache=CacheConfig(directory=tmp_path / "cache"),
                      store=_store(endpoint))
    for table in TPCH_TABLES:
        session.register(table, f"s3://{bucket}/tpch/{table}/*.parquet")
    return session


def _rows(result: Any) -> list[tuple]:
    return [tuple(row.values()) for row in result.table.to_pylist()]


@pytest.fixture
def ray_options(monkeypatch: pytest.MonkeyPatch):
    """Make ``Session(executor="ray")`` build its executor with these options."""
    def use(**options: Any) -> None:
        monkeypatch.setitem(EXECUTORS, "ray", functools.partial(RayExecutor, **options))
    return use


def _skip_moto(endpoint) -> None:
    # Behaviour below does not depend on the server: run it once.
    if endpoint.name == "moto":
        pytest.skip("server-independent; runs on seaweedfs")


# -- answers --------------------------------------------------------------------------


def test_tpch_equals_duckdb(s3_endpoint, tpch_bucket: str, reference, tmp_path: Path) -> None:
    failures = {}
    with _session(s3_endpoint, tpch_bucket, tmp_path) as session:
        executor = session.executor
        assert executor.name == "ray" and len(executor.members) == 3
        placed: set[str] = set()
        for name, sql in queries().items():
            result = session.sql(sql)
            placed |= set(executor.last_assignment.values())
            difference = answers.rows_difference(_rows(result), reference[name])
            if difference:
                failures[name] = difference
            # The workers' I/O reaches the coordinator's profile.
            assert result.profile.executor == "ray"
            profile = result.profile
            assert profile.bytes_from_store + profile.bytes_from_cache + profile.bytes_from_peers > 0
        stats = executor.worker_stats()
    assert failures == {}
    assert placed == {"local:0", "local:1", "local:2"}
    # Each worker read blocks from the store or from their owners among the other workers.
    assert all(s["tasks_run"] > 0 and s["bytes_from_store"] + s["bytes_from_peers"] > 0 for s in stats.values())
    assert sum(s["bytes_from_store"] + s["fill_bytes_from_store"] for s in stats.values()) > 0
    assert len({s["cache_dir"] for s in stats.values()}) == 3
    assert len({s["pid"] for s in stats.values()}) == 3


# -- affinity -------------------------------------------------------------------------


def _io(stats: dict[str, dict[str, Any]]) -> tuple[int, int]:
    store = sum(s["bytes_from_store"] for s in stats.values())
    cached = sum(s["bytes_from_cache"] + s["bytes_from_memory"] for s in stats.values())
    return store, cached


def test_second_run_reads_from_caches(s3_endpoint, tpch_bucket: str, tmp_path: Path) -> None:
    with _session(s3_endpoint, tpch_bucket, tmp_path) as session:
        executor = session.executor
        first: dict[str, str] = {}
        for sql in queries().values():
            session.sql(sql)
            first.update(executor.last_placement)
        # SSD only: the workers forget their in-memory blocks.
        executor.drop_memory()
        before = executor.worker_stats()
        store = cached = 0
        second: dict[str, str] = {}
        for sql in queries().values():
            profile = session.sql(sql).profile
            store += profile.bytes_from_store
            cached += profile.bytes_from_cache
            second.update(executor.last_placement)
        after = executor.worker_stats()
    # Every object was placed on the same worker both times.
    assert second == first and len(set(first.values())) == 3
    assert cached / (store + cached) >= 0.9, (store, cached)
    # The same from the workers' own counters.
    worker_store = _io(after)[0] - _io(before)[0]
    worker_cached = _io(after)[1] - _io(before)[1]
    assert worker_cached / (worker_store + worker_cached) >= 0.9, (worker_store, worker_cached)
    assert sum(a["hits"] - before[m]["hits"] for m, a in after.items()) > 0


def test_replaced_worker_finds_its_ssd_cache(s3_endpoint, tpch_bucket: str, tmp_path: Path,
                                             reference, ray_options) -> None:
    _skip_moto(s3_endpoint)
    ray_options(locality_wait_s=None)  # owners only, however slow the machine
    sql = queries()[JOIN_QUERY]
    with _session(s3_endpoint, tpch_bucket, tmp_path) as session:
        session.sql(sql)
        executor = session.executor
        executor.drop_memory()  # also waits for the cache's write-behind
        old = executor.worker_stats()
        for name in executor.members:
            ray.kill(executor.handle(name))
        time.sleep(0.5)
        # Between queries: the next query finds them dead, in-flight or not.
        result = session.sql(sql)
        assert not answers.rows_difference(_rows(result), reference[JOIN_QUERY])
        new = executor.worker_stats()
    assert {s["pid"] for s in new.values()}.isdisjoint({s["pid"] for s in old.values()})
    assert [s["cache_dir"] for _, s in sorted(new.items())] == [s["cache_dir"] for _, s in sorted(old.items())]
    store, cached = _io(new)
    assert cached > 0 and store <= 0.1 * (store + cached), (store, cached)


# -- faults ---------------------------------------------------------------------------


def _wait_for_running(executor: RayExecutor, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = executor.in_flight()
        busy = [name for name, n in running.items() if n > 0]
        if busy:
            return max(busy, key=lambda n: running[n])
        time.sleep(0.01)
    raise AssertionError("no task started")


def _run_in_thread(session: Session, sql: str) -> tuple[threading.Thread, dict[str, Any]]:
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = session.sql(sql)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    return thread, box


def test_worker_killed_mid_query(s3_endpoint, tpch_bucket: str, tmp_path: Path, reference,
                                 ray_options) -> None:
    _skip_moto(s3_endpoint)
    ray_options(task_delay_s=0.5)
    with _session(s3_endpoint, tpch_bucket, tmp_path) as session:
        executor = session.executor
        thread, box = _run_in_thread(session, queries()[JOIN_QUERY])
        victim = _wait_for_running(executor)
        ray.kill(executor.handle(victim))
        thread.join(120)
        assert "error" not in box, box.get("error")
        assert not answers.rows_difference(_rows(box["result"]), reference[JOIN_QUERY])
        assert executor.retries >= 1
        assert victim not in executor.members
        # The next query replaces the dead actor under the same name.
        result = session.sql(queries()[JOIN_QUERY])
        assert not answers.rows_difference(_rows(result), reference[JOIN_QUERY])
        assert executor.replacements == 1
        assert executor.members == ["local:0", "local:1", "local:2"]


def test_bounded_retries_then_worker_error(s3_endpoint, tpch_bucket: str, tmp_path: Path,
                                           ray_options) -> None:
    _skip_moto(s3_endpoint)
    ray_options(task_delay_s=0.5, max_attempts=1)
    with _session(s3_endpoint, tpch_bucket, tmp_path) as session:
        thread, box = _run_in_thread(session, queries()[JOIN_QUERY])
        ray.kill(session.executor.handle(_wait_for_running(session.executor)))
        thread.join(120)
        error = box.get("error")
        assert isinstance(error, WorkerError), error
        assert "failed on 1 ray workers" in str(error)
        # Still usable: the dead worker is replaced.
        assert session.sql("SELECT count(*) FROM nation").table.column(0)[0].as_py() == 25


def test_task_errors_are_not_retried(s3_endpoint, tpch_bucket: str, tmp_path: Path) -> None:
    _skip_moto(s3_endpoint)
    with _session(s3_endpoint, tpch_bucket, tmp_path, workers=2) as session:
        missing = ObjectVersion(url=f"s3://{tpch_bucket}/tpch/nope.parquet", size=100, etag="x")
        task = ScanTask(table="t", fragment=0, files=(missing,), row_groups=None, columns=("a",),
                        filter=None, hive=False)
        with pytest.raises((ObjectNotFoundError, ObjectChangedError)):
            session.executor.run([task], threading.Event())
        assert session.executor.retries == 0
        assert session.sql("SELECT count(*) FROM region").table.column(0)[0].as_py() == 5


# -- membership -----------------------------------------------------------------------


def test_added_worker_takes_only_its_share(s3_endpoint, tpch_bucket: str, tmp_path: Path, reference,
                                           ray_options) -> None:
    _skip_moto(s3_endpoint)
    ray_options(locality_wait_s=None)  # owners only: exactly the hash's moves
    names = ["q03", "q05", "q09", "q10", "q18"]
    with _session(s3_endpoint, tpch_bucket, tmp_path, workers=2) as session:
        executor = session.executor
        before: dict[str, str] = {}
        for name in names:
            session.sql(queries()[name])
            before.update(executor.last_placement)
        stats_before = executor.worker_stats()
        executor.resize(3)
        assert executor.members == ["local:0", "local:1", "local:2"]
        after: dict[str, str] = {}
        for name in names:
            result = session.sql(queries()[name])
            after.update(executor.last_placement)
            assert not answers.rows_difference(_rows(result), reference[name])
        stats_after = executor.worker_stats()
    moved = {k for k in before if after[k] != before[k]}
    assert moved, "the new worker took no fragment"
    assert all(after[k] == "local:2" for k in moved)
    assert len(moved) < len(before)
    # The old workers kept their fragments, so they read nothing new from the store.
    for member in ("local:0", "local:1"):
        assert stats_after[member]["bytes_from_store"] == stats_before[member]["bytes_from_store"]
    assert stats_after["local:2"]["tasks_run"] > 0


# -- cancellation and limits ----------------------------------------------------------


def test_cancel_mid_query(s3_endpoint, tpch_bucket: str, tmp_path: Path, ray_options) -> None:
    _skip_moto(s3_endpoint)
    ray_options(task_delay_s=1.0)
    with _session(s3_endpoint, tpch_bucket, tmp_path) as session:
        thread, box = _run_in_thread(session, queries()[JOIN_QUERY])
        _wait_for_running(session.executor)
        started = time.monotonic()
        session.interrupt()
        thread.join(60)
        assert isinstance(box.get("error"), QueryCancelled), box
        assert time.monotonic() - started < 15
        # Started tasks see the cancellation when they next look (or Ray cancels
        # them first): none of the query's fragments runs to the end.
        time.sleep(2.5)
        stats = session.executor.worker_stats()
        assert sum(s["tasks_run"] for s in stats.values()) == 0, stats
        assert session.executor.retries == 0
        # Nothing died; the next query runs on the same workers.
        assert session.sql("SELECT count(*) FROM region").table.column(0)[0].as_py() == 5
        assert session.executor.replacements == 0


def test_cancelled_before_start(s3_endpoint, tpch_bucket: str, tmp_path: Path) -> None:
    _skip_moto(s3_endpoint)
    with _session(s3_endpoint, tpch_bucket, tmp_path, workers=2) as session:
        version = session.fs.versions(f"s3://{tpch_bucket}/tpch/region/*.parquet")[0]
        task = ScanTask(table="region", fragment=0, files=(version,), row_groups=None,
                        columns=("r_name",), filter=None, hive=False)
        cancel = threading.Event()
        cancel.set()
        with pytest.raises(QueryCancelled):
            session.executor.run([task], cancel)
        assert [r.table.num_rows for r in session.executor.run([task], threading.Event())] == [5]


def test_memory_budget_is_a_clear_error(s3_endpoint, tpch_bucket: str, tmp_path: Path,
                                        ray_options) -> None:
    _skip_moto(s3_endpoint)
    ray_options(memory_budget=64 << 10, spill=False)  # with spilling: tests/test_ray_cluster.py
    with _session(s3_endpoint, tpch_bucket, tmp_path, workers=2) as session:
        with pytest.raises(WorkerError, match="memory budget"):
            session.sql("SELECT * FROM lineitem ORDER BY l_orderkey LIMIT 5")
        assert session.sql("SELECT count(*) FROM nation").table.column(0)[0].as_py() == 25
