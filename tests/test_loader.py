"""The PyTorch loader against a real S3 server: sharding, shuffling, resuming, sources, cache.

Real ``torch.utils.data.DataLoader`` runs with 0, 2 and 4 worker processes;
ranks are simulated with explicit ``rank``/``world_size``.  Most tests run on
the first S3 server kind only (the loader's logic does not depend on the
server; the storage layer has its own suite on both); the smoke test runs on all.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3servers
import torch
from torch.utils.data import DataLoader

from shoal.cache import CacheConfig, ObjectNotFoundError, ShoalFileSystem, StoreConfig
from shoal.engine import BatchLoader, NotParquetError, Session
from shoal.engine.loader_stream import item_units
from shoal.engine.torch import (
    LoaderError,
    LoaderSchemaError,
    LoaderStateError,
    ShoalDataLoader,
    ShoalDataset,
    ShoalMapDataset,
    collate,
)

# 4 workers on a 2-core machine: DataLoader warns, and the tests mean it.
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")

FIRST = ["external"] if s3servers.external_from_env() is not None else ["seaweedfs"]
first_server = pytest.mark.parametrize("s3_endpoint", FIRST, indirect=True)

ROWS = (1000, 700, 333)  # uneven files, row groups of 128 rows (the last of each file shorter)
TOTAL = sum(ROWS)


def _table(start: int, n: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    ids = np.arange(start, start + n, dtype=np.int64)
    lengths = (ids % 7 + 1).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    tokens = pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.repeat(ids, lengths).astype(np.int32)))
    emb = pa.FixedSizeListArray.from_arrays(pa.array(np.repeat(ids, 4).astype(np.float32)), 4)
    return pa.table({
        "id": ids,
        "tokens": tokens,
        "emb": emb,
        "blob": pa.array([b"b%d" % i for i in ids], pa.binary()),
        "label": (ids % 5).astype(np.int8),
        "score": rng.random(n),
    })


def _put(client: Any, bucket: str, key: str, table: pa.Table, **kw: Any) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, **kw)
    client.put_object(Bucket=bucket, Key=key, Body=buf.getvalue())


@pytest.fixture(scope="module")
def data(s3_endpoint: s3servers.S3Endpoint) -> Iterator[dict[str, Any]]:
    """A bucket with three uneven Parquet files (ids 0..TOTAL-1), a bad file and a type-mismatched file."""
    client = s3_endpoint.boto3_client()
    bucket = f"shoal-loader-{secrets.token_hex(6)}"
    s3servers.create_bucket(client, bucket, s3_endpoint.region)
    start = 0
    for n, rows in enumerate(ROWS):
        _put(client, bucket, f"train/part-{n}.parquet", _table(start, rows, n), row_group_size=128)
        start += rows
    client.put_object(Bucket=bucket, Key="bad/notes.parquet", Body=b"not parquet at all")
    _put(client, bucket, "mixed/a.parquet", pa.table({"x": pa.array([1, 2], pa.int64())}))
    _put(client, bucket, "mixed/b.parquet", pa.table({"x": pa.array(["1", "2"])}))
    _put(client, bucket, "nulls/a.parquet", pa.table({"i": pa.array([1, None], pa.int64()),
                                                      "f": pa.array([1.5, None])}))
    _put(client, bucket, "tiny/a.parquet", _table(0, 5, 9))
    try:
        yield {"bucket": bucket, "url": f"s3://{bucket}/train/*.parquet", "endpoint": s3_endpoint, "client": client}
    finally:
        s3servers.empty_and_delete_bucket(client, bucket)


def _store(endpoint: s3servers.S3Endpoint) -> StoreConfig:
    return StoreConfig(endpoint_url=endpoint.endpoint_url, access_key=endpoint.access_key,
                       secret_key=endpoint.secret_key, region=endpoint.region, max_attempts=2)


@pytest.fixture
def make(data: dict[str, Any], tmp_path: Path) -> Iterator[Any]:
    """ShoalDataset factory: the test bucket's store, a cache directory of this test's own."""
    made: list[Any] = []

    def factory(source: str | None = None, cls: Any = ShoalDataset, **kw: Any) -> Any:
        kw.setdefault("cache", CacheConfig(directory=tmp_path / "cache", block_size=64 * 1024))
        if "session" not in kw:
            kw.setdefault("store", _store(data["endpoint"]))
        if cls is ShoalDataset:
            kw.setdefault("batch_size", 64)
        ds = cls(source or data["url"], **kw)
        made.append(ds)
        return ds

    yield factory
    for ds in made:
        ds.close()


def ids(batches: list[dict[str, Any]]) -> list[int]:
    return [int(i) for b in batches for i in b["id"]]


def run(ds: ShoalDataset, workers: int, **kw: Any) -> list[dict[str, Any]]:
    return list(ShoalDataLoader(ds, num_workers=workers, **kw))


# -- coverage, balance, order ------------------------------------------------------------


def test_smoke_every_server(make: Any) -> None:
    batches = list(make(batch_size=100))
    assert sorted(ids(batches)) == list(range(TOTAL))
    first = batches[0]
    assert first["tokens"].shape[0] == 100 and first["tokens_lengths"].dtype == torch.int64
    assert first["emb"].shape == (100, 4) and first["emb"].dtype == torch.float32


@first_server
@pytest.mark.parametrize("workers", [0, 2, 4])
def test_every_row_exactly_once_over_ranks_and_workers(make: Any, workers: int) -> None:
    world = 3
    per_rank = []
    for rank in range(world):
        ds = make(shuffle=True, seed=11, rank=rank, world_size=world, shuffle_buffer=256)
        batches = run(ds, workers)
        assert len(batches) == len(ds)
        per_rank.append(batches)
    assert len({len(b) for b in per_rank}) == 1  # no rank waits for another at the end
    everything = [i for batches in per_rank for i in ids(batches)]
    assert sorted(everything) == list(range(TOTAL))
    sizes = [len(b["id"]) for batches in per_rank for b in batches[:-1]]
    assert set(sizes) == {64}  # only each rank's last batch may be short


@first_server
@pytest.mark.parametrize("remainder", ["drop", "pad"])
def test_drop_and_pad_give_full_equal_batches(make: Any, remainder: str) -> None:
    world, batch = 3, 64
    per_rank = [run(make(shuffle=True, seed=2, rank=r, world_size=world, remainder=remainder), 2)
                for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1
    assert all(len(b["id"]) == batch for batches in per_rank for b in batches)
    seen = [i for batches in per_rank for i in ids(batches)]
    if remainder == "drop":
        assert len(seen) == len(set(seen)) and TOTAL - len(seen) < world * batch
    else:
        assert set(seen) == set(range(TOTAL)) and len(seen) - TOTAL < world * batch
    assert make(drop_last=True).loader.remainder == "drop"
    with pytest.raises(LoaderError, match="contradicts"):
        make(drop_last=True, remainder="pad")


@first_server
def test_order_is_deterministic_per_seed_and_changes_with_epoch(make: Any) -> None:
    a, b = make(shuffle=True, seed=7), make(shuffle=True, seed=7)
    first = ids(run(a, 2))
    assert first == ids(run(b, 2))
    assert first != list(range(TOTAL)) and sorted(first) == list(range(TOTAL))
    a.set_epoch(1)
    second = ids(run(a, 2))
    assert second != first and sorted(second) == list(range(TOTAL))
    assert ids(run(make(shuffle=True, seed=8), 2)) != first
    assert ids(run(make(shuffle=False), 0)) == list(range(TOTAL))
    # Quality: rows travel far from their file position (row groups shuffled globally).
    displacement = np.abs(np.array(first) - np.arange(TOTAL)).mean()
    assert displacement > TOTAL / 6


@first_server
def test_set_epoch_reaches_persistent_workers(make: Any) -> None:
    ds = make(shuffle=True, seed=3)
    loader = ShoalDataLoader(ds, num_workers=2, persistent_workers=True)
    orders = []
    for epoch in range(3):
        ds.set_epoch(epoch)
        orders.append(ids(list(loader)))
    assert all(sorted(o) == list(range(TOTAL)) for o in orders)
    assert len({tuple(o) for o in orders}) == 3
    ds.set_epoch(1)
    assert ids(list(loader)) == orders[1]


# -- resuming ------------------------------------------------------------------------------


def _interrupted(ds: ShoalDataset, workers: int, stop: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    loader = ShoalDataLoader(ds, num_workers=workers)
    taken = []
    for batch in loader:
        taken.append(batch)
        if len(taken) == stop:
            break
    return taken, json.loads(json.dumps(loader.state_dict()))  # a state is plain data


@first_server
@pytest.mark.parametrize("workers", [0, 2, 4])
def test_resume_continues_exactly(make: Any, workers: int) -> None:
    options = dict(shuffle=True, seed=5, shuffle_buffer=192, rank=1, world_size=2)
    full = ids(run(make(**options), workers))
    stops = (1, 7, len(full) // 64 - 1) if workers == 2 else (7,)
    for stop in stops:
        ds = make(**options)
        ds.set_epoch(0)
        taken, state = _interrupted(ds, workers, stop)
        assert state["batches_done"] == stop
        resumed = make(**options)
        resumed.load_state_dict(state)
        rest = run(resumed, workers)
        assert ids(taken) + ids(rest) == full  # same batches, same order
        # The next epoch after a resumed one is a whole, fresh epoch.
        resumed.set_epoch(1)
        following = ids(run(resumed, workers))
        assert len(following) == len(set(following)) == len(full) and following != full


@first_server
def test_resume_with_another_number_of_workers(make: Any) -> None:
    options = dict(shuffle=True, seed=9, shuffle_buffer=128)
    for before, after in ((2, 4), (4, 0), (0, 2)):
        taken, state = _interrupted(make(**options), before, 5)
        resumed = make(**options)
        resumed.load_state_dict(state)
        rest = run(resumed, after)
        assert sorted(ids(taken) + ids(rest)) == list(range(TOTAL))


@first_server
def test_resume_after_the_world_size_changes(make: Any) -> None:
    options = dict(shuffle=True, seed=4, shuffle_buffer=128)
    states, seen = [], []
    for rank in range(2):  # two ranks stop after different numbers of batches
        taken, state = _interrupted(make(rank=rank, world_size=2, **options), 2, 3 + rank)
        states.append(state)
        seen += ids(taken)
    single = make(rank=0, world_size=3, **options)
    with pytest.raises(LoaderStateError, match="every rank"):
        single.load_state_dict(states[0])
    rest = []
    for rank in range(3):
        ds = make(rank=rank, world_size=3, **options)
        ds.load_state_dict(states)
        rest.append(run(ds, 2))
    assert len({len(r) for r in rest}) == 1
    assert sorted(seen + [i for r in rest for i in ids(r)]) == list(range(TOTAL))


@first_server
def test_state_errors_are_clear(make: Any, data: dict[str, Any]) -> None:
    ds = make(shuffle=True, seed=1)
    state = ds.state_dict()
    assert state["lanes"] is None and state["batches_done"] == 0
    with pytest.raises(LoaderStateError, match="seed"):
        make(shuffle=True, seed=2).load_state_dict(state)
    with pytest.raises(LoaderStateError, match="other data"):
        make(f"s3://{data['bucket']}/train/part-0.parquet", shuffle=True, seed=1).load_state_dict(state)
    with pytest.raises(LoaderStateError, match="rank 0 loaded on rank 1"):
        make(shuffle=True, seed=1, rank=1, world_size=1 + 1).load_state_dict({**state, "world_size": 2})
    with pytest.raises(LoaderStateError, match="not a Shoal loader state"):
        ds.load_state_dict({"epoch": 1})
    # Counting batches needs ShoalDataLoader when workers do the iterating.
    plain = make()
    list(DataLoader(plain, batch_size=None, num_workers=2))
    with pytest.raises(LoaderStateError, match="ShoalDataLoader"):
        plain.state_dict()


@first_server
def test_load_state_restarts_persistent_workers(make: Any) -> None:
    options = dict(shuffle=True, seed=6)
    full = ids(run(make(**options), 2))
    taken, state = _interrupted(make(**options), 2, 4)
    ds = make(**options)
    loader = ShoalDataLoader(ds, num_workers=2, persistent_workers=True)
    assert ids(list(loader)) == full
    loader.load_state_dict(state)
    assert ids(taken) + ids(list(loader)) == full


# -- uneven data, empty shards ---------------------------------------------------------------


@first_server
@pytest.mark.parametrize("workers", [0, 4])
def test_tiny_data_more_ranks_and_workers_than_rows(make: Any, data: dict[str, Any], workers: int) -> None:
    url = f"s3://{data['bucket']}/tiny/*.parquet"  # 5 rows
    per_rank = [run(make(url, batch_size=4, rank=r, world_size=4, shuffle=True), workers) for r in range(4)]
    assert [len(b) for b in per_rank] == [1, 1, 1, 1]
    assert sorted(i for b in per_rank for i in ids(b)) == list(range(5))
    assert sorted(len(b[0]["id"]) for b in per_rank) == [1, 1, 1, 2]
    if workers == 0:
        dropped = [run(make(url, batch_size=4, rank=r, world_size=4, remainder="drop"), 0) for r in range(4)]
        assert all(b == [] for b in dropped)


@first_server
def test_a_filter_that_keeps_nothing_gives_no_batches(make: Any, data: dict[str, Any]) -> None:
    ds = make(f"SELECT id FROM '{data['url']}' WHERE id < 0")
    assert ds.num_rows == 0 and len(ds) == 0
    assert run(ds, 2) == []


# -- schema and source errors ------------------------------------------------------------------


@first_server
def test_schema_and_source_errors_are_clear(make: Any, data: dict[str, Any]) -> None:
    bucket = data["bucket"]
    with pytest.raises(LoaderSchemaError, match=r"column 'nope' not found in s3://.*part-0.parquet; available: id"):
        make(columns=["id", "nope"])
    with pytest.raises(LoaderSchemaError, match=r"column 'x' is int64 in s3://.*a.parquet but string in s3://.*b"):
        make(f"s3://{bucket}/mixed/*.parquet")
    with pytest.raises(NotParquetError, match="notes.parquet"):
        make(f"s3://{bucket}/bad/*.parquet")
    with pytest.raises(ObjectNotFoundError, match="no Parquet files"):
        make(f"s3://{bucket}/missing/*.parquet")
    with pytest.raises(LoaderSchemaError, match="not in the result"):
        make(f"SELECT id FROM '{data['url']}'", columns=["label"])
    with pytest.raises(LoaderError, match="unknown table"):
        make("no_such_table")
    with pytest.raises(LoaderError, match="batch_size"):
        make(batch_size=0)
    with pytest.raises(LoaderError, match="both rank and world_size"):
        make(rank=1)
    with pytest.raises(LoaderError, match="exactly one SELECT"):
        make(f"SELECT id FROM '{data['url']}'; SELECT 1")
    nulls = make(f"s3://{bucket}/nulls/*.parquet", columns=["f"])
    assert torch.isnan(next(iter(nulls))["f"][1])
    with pytest.raises(LoaderSchemaError, match="'i' has null values"):
        list(make(f"s3://{bucket}/nulls/*.parquet"))


# -- SQL sources -------------------------------------------------------------------------------------


@first_server
def test_sql_projection_and_filter_stream_only_what_is_needed(make: Any, data: dict[str, Any]) -> None:
    query = f"SELECT id, tokens AS toks FROM '{data['url']}' WHERE id < 300 AND label = 2"
    ds = make(query, batch_size=16, shuffle=True, seed=1)
    source = ds.loader.source
    assert source.kind == "sql-stream" and source.columns == ["id", "tokens"]
    assert len(source.units) == 3  # row groups 0-2 of part-0: the others are skipped by their statistics
    batches = run(ds, 2)
    assert sorted(ids(batches)) == [i for i in range(300) if i % 5 == 2]
    first = batches[0]
    assert set(first) == {"id", "toks", "toks_lengths"}
    row = int(first["id"][0])
    assert first["toks"][0, : row % 7 + 1].tolist() == [row] * (row % 7 + 1)


@first_server
def test_sql_with_catalog_table_and_general_query(make: Any, data: dict[str, Any], tmp_path: Path) -> None:
    store = _store(data["endpoint"])
    with Session(store=store, cache=CacheConfig(directory=tmp_path / "session-cache")) as session:
        session.register("train", data["url"])
        table = make("train", session=session, batch_size=500)
        assert table.loader.source.kind == "files" and sorted(ids(run(table, 0))) == list(range(TOTAL))
        query = "SELECT label, count(*) AS n, min(id) AS id FROM train GROUP BY label ORDER BY label"
        grouped = make(query, session=session, batch_size=10)
        assert grouped.loader.source.kind == "sql-materialized"
        (batch,) = list(grouped)
        assert batch["label"].tolist() == [0, 1, 2, 3, 4] and batch["id"].tolist() == [0, 1, 2, 3, 4]
        assert batch["n"].sum().item() == TOTAL
        again = make(query, session=session, batch_size=10)  # the materialized result is reused
        assert again.loader.source.files[0].version.url == grouped.loader.source.files[0].version.url
        computed = make(f"SELECT id, id * 2 AS twice FROM train WHERE id % 100 = 0", session=session)
        assert computed.loader.source.kind == "sql-materialized"
        (batch,) = list(computed)
        assert sorted(batch["twice"].tolist()) == [2 * i for i in range(0, TOTAL, 100)]


# -- cache -------------------------------------------------------------------------------------------


@first_server
@pytest.mark.parametrize("workers", [0, 2])
def test_epoch_two_reads_nothing_from_the_store(make: Any, tmp_path: Path, workers: int) -> None:
    cache = CacheConfig(directory=tmp_path / "epochs", block_size=64 * 1024)
    # Several windows: the first is decoded in this process (ShoalDataLoader), the others by the workers.
    ds = make(shuffle=True, seed=1, cache=cache, shuffle_buffer=256)
    observer = ShoalFileSystem(cache=cache)
    try:
        def from_store() -> int:
            ds.loader._fs.flush()
            return observer.reader.cache.persisted_stats()["bytes_from_store"]

        assert sorted(ids(run(ds, workers))) == list(range(TOTAL))
        after_first = from_store()
        assert after_first > 0
        ds.set_epoch(1)
        assert sorted(ids(run(ds, workers))) == list(range(TOTAL))
        assert from_store() == after_first
        if workers:  # new worker processes: their memory tier is empty, the SSD serves them
            assert observer.reader.cache.persisted_stats()["hits"] > 0
    finally:
        observer.close()


@first_server
def test_a_loader_on_a_warm_cache_sees_files_changed_since_the_last_listing(make: Any, data: dict[str, Any]) -> None:
    """A remembered listing lets a loader start reading before the store answers; the store's
    listing decides, and nothing read from a stale listing is used."""
    client, bucket = data["client"], data["bucket"]
    prefix = f"evolving-{secrets.token_hex(4)}"
    url = f"s3://{bucket}/{prefix}/*.parquet"
    _put(client, bucket, f"{prefix}/a.parquet", _table(0, 300, 1), row_group_size=128)
    _put(client, bucket, f"{prefix}/b.parquet", _table(300, 200, 2), row_group_size=128)
    assert sorted(ids(run(make(url, shuffle=True, seed=4), 2))) == list(range(500))
    again = make(url, shuffle=True, seed=4)  # listing unchanged: resolved from the remembered one
    plan = again.loader.plan()
    first_window = item_units(plan, plan.windows()[0])
    assert len(first_window) == 5  # a 4096-row window: every row group
    assert sorted(again.loader.reader._preloaded) == sorted(first_window)  # read while the store was listed
    assert sorted(ids(run(again, 2))) == list(range(500))
    assert again.loader.reader._preloaded == {}  # handed to worker 0, freed in this process
    _put(client, bucket, f"{prefix}/b.parquet", _table(1000, 150, 3), row_group_size=128)  # new version
    _put(client, bucket, f"{prefix}/c.parquet", _table(2000, 10, 4))  # a new file
    changed = make(url, shuffle=True, seed=4)
    assert changed.loader.reader._preloaded == {}  # what was read from the stale listing is dropped
    expected = [*range(300), *range(1000, 1150), *range(2000, 2010)]
    assert sorted(ids(run(changed, 2))) == expected
    assert sorted(ids(run(make(url), 0))) == expected


@pytest.mark.parametrize("cached", [False, True])
def test_a_file_overwritten_during_an_epoch_is_never_mixed(make: Any, data: dict[str, Any], tmp_path: Path,
                                                           cached: bool) -> None:
    """An epoch reads each file at the version it listed: a file overwritten after the
    first batch gives the old rows throughout, or one clear error; never a row of the new
    version next to rows of the old one."""
    client, bucket = data["client"], data["bucket"]
    prefix = f"overwritten-{secrets.token_hex(4)}"
    _put(client, bucket, f"{prefix}/a.parquet", _table(0, 20_000, 1), row_group_size=512)
    cache = CacheConfig(directory=tmp_path / "ow-cache", block_size=64 * 1024, enabled=cached)
    ds = make(f"s3://{bucket}/{prefix}/*.parquet", batch_size=256, cache=cache)
    seen: list[int] = []
    error: Exception | None = None
    batches = iter(ShoalDataLoader(ds, num_workers=0))
    try:
        seen += ids([next(batches)])
        _put(client, bucket, f"{prefix}/a.parquet", _table(50_000, 20_000, 2), row_group_size=512)
        for batch in batches:
            seen += ids([batch])
    except Exception as exc:  # noqa: BLE001 - which error it is is checked below
        error = exc
    assert seen and all(i < 20_000 for i in seen)  # not one row of the new version
    if error is None:
        assert sorted(seen) == list(range(20_000))
    else:
        assert "changed" in str(error).lower(), repr(error)
        assert "Traceback" not in str(error)


def test_deferred_s3_source_has_the_cache_identity_of_the_real_one(tmp_path: Path) -> None:
    from shoal.engine.loader_source import _DeferredS3Source

    store = StoreConfig(endpoint_url="http://127.0.0.1:9", access_key="k", secret_key="s", region="us-east-1")
    fs = ShoalFileSystem(cache=CacheConfig(directory=tmp_path / "cache"), store=store)
    try:
        deferred = _DeferredS3Source(fs, "s3")
        assert deferred.store_id == fs.source("s3").store_id
        assert deferred.pins_versions is fs.source("s3").pins_versions
    finally:
        fs.close()


def _tag_process(batch: dict[str, Any]) -> dict[str, Any]:
    return {**batch, "pid": os.getpid()}


@first_server
@pytest.mark.filterwarnings("ignore:.*pin_memory.*:UserWarning")
def test_the_first_batch_is_made_while_the_workers_start(make: Any) -> None:
    options = dict(shuffle=True, seed=3, shuffle_buffer=256, transform=_tag_process)
    batches = run(make(**options), 2)
    pids = [b["pid"] for b in batches]
    assert pids[0] == os.getpid() and os.getpid() not in pids[1:]  # then the workers, round robin
    assert sorted(ids(batches)) == list(range(TOTAL))
    # The same batches in the same order as when the workers make all of them (pin_memory).
    in_workers = run(make(**options), 2, pin_memory=True)
    assert os.getpid() not in [b["pid"] for b in in_workers]
    assert ids(in_workers) == ids(batches)


# -- conversion and random access -------------------------------------------------------------------


@first_server
def test_batch_values_transform_and_collate_hooks(make: Any) -> None:
    batch = next(iter(make(batch_size=32, pad_value=-1)))
    assert batch["id"].dtype == torch.int64 and batch["label"].dtype == torch.int8
    assert batch["score"].dtype == torch.float64
    assert batch["emb"].shape == (32, 4) and batch["emb"][3].tolist() == [3.0] * 4
    assert batch["tokens"].shape == (32, 7) and batch["tokens_lengths"][:3].tolist() == [1, 2, 3]
    assert batch["tokens"][0].tolist() == [0, -1, -1, -1, -1, -1, -1]
    assert batch["blob"][:2] == [b"b0", b"b1"]
    seen: list[Any] = []
    transformed = next(iter(make(batch_size=8, columns=["blob", "label"],
                                 transform=lambda b: seen.append(type(b["blob"][0])) or len(b["blob"]))))
    assert transformed == 8 and set(seen) == {bytes}  # (the background thread converts ahead)
    hooked = next(iter(make(batch_size=8, collate=lambda rb: rb.num_rows * 10, transform=lambda n: n + 1)))
    assert hooked == 81


@first_server
def test_map_style_random_access(make: Any, data: dict[str, Any]) -> None:
    ds = make(cls=ShoalMapDataset)
    assert len(ds) == TOTAL
    sample = ds[1234]
    assert int(sample["id"]) == 1234 and sample["tokens"].tolist() == [1234] * (1234 % 7 + 1)
    assert sample["blob"] == b"b1234" and int(ds[-1]["id"]) == TOTAL - 1
    batch = ds.get_batch([5, 1999, 0])
    assert batch["id"].tolist() == [5, 1999, 0]
    with pytest.raises(IndexError):
        ds[TOTAL]
    loader = DataLoader(ds, batch_size=50, shuffle=True, collate_fn=collate, num_workers=2,
                        generator=torch.Generator().manual_seed(0))
    seen = [int(i) for b in loader for i in b["id"]]
    assert sorted(seen) == list(range(TOTAL))
    filtered = make(f"SELECT id FROM '{data['url']}' WHERE label = 4", cls=ShoalMapDataset)
    assert len(filtered) == TOTAL // 5 and int(filtered[2]["id"]) == 14


@first_server
def test_ranks_come_from_torch_distributed(make: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 2)
    monkeypatch.setattr(dist, "get_world_size", lambda: 3)
    ds = make()
    assert (ds.loader.rank, ds.loader.world_size) == (2, 3)
    explicit = make(rank=0, world_size=2)
    assert (explicit.loader.rank, explicit.loader.world_size) == (0, 2)


@first_server
def test_allowed_paths_keep_local_sources_out(make: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inside, outside = tmp_path / "inside", tmp_path / "outside"
    for directory in (inside, outside):
        directory.mkdir()
        pq.write_table(_table(0, 10, 0), directory / "a.parquet")
    monkeypatch.setenv("SHOAL_ALLOWED_PATHS", str(inside))
    assert sorted(ids(list(make(str(inside / "*.parquet"))))) == list(range(10))
    with pytest.raises(LoaderError, match="outside the allowed paths"):
        make(str(outside / "*.parquet"))
    with pytest.raises(Exception, match="(?i)permission|not allowed|disabled"):
        make(f"SELECT id FROM read_parquet('{outside}/a.parquet') ORDER BY id")


def _documented_parameters(doc: str) -> set[str]:
    """Names in the "Parameters" entries of a numpy-style docstring (``name:`` or ``a, b:`` lines)."""
    import re

    names: set[str] = set()
    for line in doc.splitlines():
        match = re.fullmatch(r" {4}(\w+(?:, \w+)*):", line)
        if match:
            names.update(n.strip() for n in match.group(1).split(","))
    return names


@pytest.mark.parametrize("cls", [ShoalDataset, BatchLoader])
def test_every_constructor_argument_is_documented(cls: Any) -> None:
    import inspect

    arguments = set(inspect.signature(cls.__init__).parameters) - {"self"}
    assert arguments - _documented_parameters(cls.__doc__ or "") == set()
    map_arguments = set(inspect.signature(ShoalMapDataset.__init__).parameters) - {"self"}
    assert [a for a in map_arguments if f"``{a}``" not in (ShoalMapDataset.__doc__ or "")] == []


def test_the_batch_loader_and_its_errors_are_exported() -> None:
    import shoal.engine as engine
    import shoal.engine.errors as errors
    import shoal.engine.loader as loader_module

    assert {"BatchLoader", "LoaderError", "LoaderSchemaError", "LoaderStateError"} <= set(engine.__all__)
    assert engine.BatchLoader is loader_module.BatchLoader
    # One class each, wherever it is imported from (the adapter's names stay valid).
    assert LoaderError is engine.LoaderError is errors.LoaderError is loader_module.LoaderError
    assert LoaderSchemaError is errors.LoaderSchemaError and LoaderStateError is errors.LoaderStateError
    assert issubclass(LoaderError, engine.EngineError) and issubclass(LoaderStateError, ValueError)


def test_importing_the_engine_does_not_import_torch() -> None:
    code = ("import sys, shoal.engine, shoal.engine.loader; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
