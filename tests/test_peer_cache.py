"""The peer cache tier with real worker PROCESSES (``shoal.transport.worker``) on
loopback, each with its own cache directory, against real S3 servers."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from faultkit import put
from s3servers import S3Endpoint, free_port

from shoal.cache import BlockReader, CacheConfig, ObjectChangedError, ShoalFileSystem, StoreConfig
from shoal.transport import PeerConfig, PeerTier, TcpTransport
from shoal.transport.worker import main as worker_main

BS = 64 * 1024
SECRET = b"peer-cache-test-secret-0123456789"


class Cluster:
    """Worker processes serving their caches; ``stats()`` asks each over the protocol."""

    def __init__(self, endpoint: S3Endpoint, root: Path, count: int) -> None:
        self.root = root
        self.secret_file = root / "secret"
        self.secret_file.write_bytes(SECRET)
        self.secret_file.chmod(0o600)
        self.addresses = [f"127.0.0.1:{free_port()}" for _ in range(count)]
        env = {**os.environ, "AWS_ENDPOINT_URL_S3": endpoint.endpoint_url, "AWS_ACCESS_KEY_ID": endpoint.access_key,
               "AWS_SECRET_ACCESS_KEY": endpoint.secret_key, "AWS_REGION": endpoint.region,
               "SHOAL_LOG_LEVEL": "WARNING", "SHOAL_CACHE_BLOCK_SIZE": str(BS)}
        self.procs: list[subprocess.Popen[str]] = []
        for n, address in enumerate(self.addresses):
            log = open(root / f"worker{n}.log", "w")
            self.procs.append(subprocess.Popen(
                [sys.executable, "-c", "import sys; from shoal.transport.worker import main; sys.exit(main())",
                 "--listen", address, "--cache-dir", str(root / f"cache{n}"), "--secret-file", str(self.secret_file),
                 "--peers", ",".join(self.addresses), "--transport", "tcp"],
                stdout=subprocess.PIPE, stderr=log, text=True, env=env))
        for proc in self.procs:
            line = proc.stdout.readline() if proc.stdout else ""
            if "listening on" not in line:
                self.close()
                raise RuntimeError(f"worker did not start: {line!r}; see {root}/worker*.log")
        self.admin = TcpTransport(SECRET)

    def stats(self) -> list[dict[str, Any]]:
        return [self.admin.remote_stats(a) if proc.poll() is None else {}
                for a, proc in zip(self.addresses, self.procs)]

    def store_gets(self) -> int:
        total = 0
        for stat in self.stats():
            for source in stat.get("provider", {}).get("store", {}).values():
                total += source["requests"]
        return total

    def kill(self, n: int) -> None:
        self.procs[n].send_signal(signal.SIGKILL)
        self.procs[n].wait(10)

    def close(self) -> None:
        if hasattr(self, "admin"):
            self.admin.close()
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
            if proc.stdout:
                proc.stdout.close()


@pytest.fixture(scope="module")
def cluster(s3_endpoint: S3Endpoint, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(s3_endpoint, tmp_path_factory.mktemp("cluster"), 3)
    yield c
    c.close()


MakeFs = Callable[..., ShoalFileSystem]


@pytest.fixture
def make_fs(s3_endpoint: S3Endpoint, tmp_path: Path) -> Iterator[MakeFs]:
    """A client filesystem with its own cache dir and a peer tier over ``peers``."""
    made: list[tuple[ShoalFileSystem, PeerTier | None]] = []

    def make(peers: list[str], name: str = "client", *, cache_options: dict[str, Any] | None = None,
             **tier: Any) -> ShoalFileSystem:
        cache = CacheConfig(directory=tmp_path / name, block_size=BS, readahead_blocks=0, max_request_size=BS,
                            **(cache_options or {}))
        store = StoreConfig(endpoint_url=s3_endpoint.endpoint_url, access_key=s3_endpoint.access_key,
                            secret_key=s3_endpoint.secret_key, region=s3_endpoint.region)
        peer_tier = PeerTier(PeerConfig(peers=tuple(peers), mode="tcp", **tier), SECRET) if peers else None
        fs = ShoalFileSystem(cache=cache, store=store, reader=BlockReader(cache, peers=peer_tier))
        made.append((fs, peer_tier))
        return fs

    yield make
    for fs, peer_tier in made:
        fs.close()
        if peer_tier is not None:
            peer_tier.close()


def client_gets(fs: ShoalFileSystem) -> int:
    return fs.source("s3").requests  # type: ignore[attr-defined]


def test_store_is_read_once_per_block_for_the_cluster(cluster: Cluster, s3_client: Any, s3_bucket: str,
                                                      make_fs: MakeFs) -> None:
    url, data = put(s3_client, s3_bucket, "obj.bin", 10 * BS + 100, seed=1)
    before = cluster.store_gets()
    first = make_fs(cluster.addresses, "first")
    assert first.cat_file(url) == data
    assert client_gets(first) == 0  # every block came from its owner...
    assert cluster.store_gets() - before == 11  # ...which read it from the store exactly once
    tier = first.reader.peers
    assert tier.metrics.peer_hits == 11 and tier.metrics.peer_bytes == len(data)

    second = make_fs(cluster.addresses, "second")
    assert second.cat_file(url) == data
    assert client_gets(second) == 0 and cluster.store_gets() - before == 11  # no new store reads at all
    owners = {str(tier.membership.owner(f"{second.reader.object_key(second.source('s3'), second.version(url))}:{i}"))
              for i in range(11)}
    assert len(owners) >= 2  # the blocks really are spread over the workers
    stats = tier.stats(first.stats())
    assert stats["peer"]["peer_hits"] == 11 and stats["store"]["requests"] == 0
    assert stats["transport"]["by_transport"] == {"tcp": 11}


def test_partial_reads_and_prefetch_go_through_the_owners(cluster: Cluster, s3_client: Any, s3_bucket: str,
                                                          make_fs: MakeFs) -> None:
    url, data = put(s3_client, s3_bucket, "cols.bin", 6 * BS, seed=7)
    before = cluster.store_gets()
    fs = make_fs(cluster.addresses, "parts")
    assert fs.cat_file(url, start=100, end=200) == data[100:200]  # a piece of block 0
    assert fs.cat_file(url, start=BS - 10, end=BS + 10) == data[BS - 10 : BS + 10]  # across blocks 0 and 1
    assert fs.prefetch(url, [(2 * BS + 5, 2 * BS + 50), (4 * BS, 4 * BS + 1)]) > 0  # blocks 2 and 4
    tier = fs.reader.peers
    deadline = time.monotonic() + 10
    while tier.metrics.peer_hits < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    # Pieces, not blocks: [100, 200) of block 0, the read across blocks 0 and 1 (two), two prefetched.
    assert tier.metrics.peer_hits == tier.metrics.piece_hits == 5
    assert tier.metrics.peer_bytes == 100 + 20 + 45 + 1  # only the bytes asked for reach the reader
    assert client_gets(fs) == 0 and cluster.store_gets() - before == 5  # each filled by its owner, once
    fs.reader.flush()  # pieces from peers stay in memory (their owners keep them on SSD)
    assert fs.cat_file(url, start=2 * BS + 5, end=2 * BS + 50) == data[2 * BS + 5 : 2 * BS + 50]
    assert tier.metrics.peer_hits == 5
    other = make_fs(cluster.addresses, "parts2")
    assert other.cat_file(url, start=2 * BS + 5, end=2 * BS + 50) == data[2 * BS + 5 : 2 * BS + 50]
    third = make_fs(cluster.addresses, "parts3")  # a part of that piece
    assert third.cat_file(url, start=2 * BS + 20, end=2 * BS + 30) == data[2 * BS + 20 : 2 * BS + 30]
    assert other.reader.peers.metrics.piece_hits == third.reader.peers.metrics.piece_hits == 1
    assert cluster.store_gets() - before == 5  # the owner served both from the piece it kept


def test_what_peers_serve_stays_off_the_local_ssd_unless_asked(cluster: Cluster, s3_client: Any, s3_bucket: str,
                                                             make_fs: MakeFs) -> None:
    """By default the cluster keeps a block once, at its owner: a reader keeps what peers
    sent in memory (read again without a request), not on its own SSD; with
    ``keep_peer_copies`` it does, and a later process on that directory reads it locally."""
    url, data = put(s3_client, s3_bucket, "copies.bin", 10 * BS + 100, seed=11)
    pieces = [(n * BS + 7, n * BS + 900) for n in range(4)]
    for name, keep in (("nocopy", False), ("copy", True)):
        fs = make_fs(cluster.addresses, name, cache_options={"keep_peer_copies": keep})
        assert fs.cat_file(url) == data  # whole blocks
        assert [fs.cat_file(url, start=a, end=b) for a, b in pieces] == [data[a:b] for a, b in pieces]
        hits = fs.reader.peers.metrics.peer_hits
        assert hits == 11 and client_gets(fs) == 0
        assert fs.cat_file(url) == data and fs.reader.peers.metrics.peer_hits == hits  # memory, not the peers
        fs.reader.flush()
        alone = make_fs([], name)  # the same cache directory, no peer tier
        assert alone.cat_file(url) == data
        assert client_gets(alone) == (0 if keep else 11), name  # only the copies reached the SSD


def test_peer_pieces_beyond_the_memory_budget_go_to_the_ssd(cluster: Cluster, s3_client: Any, s3_bucket: str,
                                                           make_fs: MakeFs) -> None:
    """Pieces from peers are held in memory up to ``memory_size``; older ones then go to the
    SSD instead of being dropped, so a big prefetch still reaches its reader locally."""
    url, data = put(s3_client, s3_bucket, "spill.bin", 8 * BS, seed=12)
    fs = make_fs(cluster.addresses, "spill", cache_options={"memory_size": 2 * BS})
    ranges = [(n * BS + 1, (n + 1) * BS - 1) for n in range(8)]  # 8 pieces of almost a block each
    assert fs.prefetch(url, ranges) > 0
    tier = fs.reader.peers
    deadline = time.monotonic() + 10
    while tier.metrics.peer_hits < 8 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert tier.metrics.peer_hits == 8
    fs.reader.flush()
    assert [fs.cat_file(url, start=a, end=b) for a, b in ranges] == [data[a:b] for a, b in ranges]
    assert tier.metrics.peer_hits == 8 and client_gets(fs) == 0  # all of them still here
    assert fs.stats()["hits"] >= 6  # at least the 6 beyond the budget were read from the SSD


def test_concurrent_readers_share_one_store_read(cluster: Cluster, s3_client: Any, s3_bucket: str,
                                                 make_fs: MakeFs) -> None:
    url, data = put(s3_client, s3_bucket, "hot.bin", 12 * BS, seed=2)
    before = cluster.store_gets()
    clients = [make_fs(cluster.addresses, f"c{i}") for i in range(4)]
    results: list[bool] = []

    def read(fs: ShoalFileSystem, seed: int) -> None:
        order = list(range(12))
        random.Random(seed).shuffle(order)
        results.append(all(fs.cat_file(url, start=i * BS, end=(i + 1) * BS) == data[i * BS:(i + 1) * BS]
                           for i in order))

    threads = [threading.Thread(target=read, args=(fs, n)) for n, fs in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == [True] * 4
    assert sum(client_gets(fs) for fs in clients) == 0
    assert cluster.store_gets() - before == 12  # 4 readers, 12 blocks, one GET each for the cluster


def test_new_version_is_never_served_from_an_old_block(cluster: Cluster, s3_client: Any, s3_bucket: str,
                                                       make_fs: MakeFs) -> None:
    url, old = put(s3_client, s3_bucket, "v.bin", 3 * BS, seed=3)
    reader = make_fs(cluster.addresses, "old")
    with reader.snapshot():
        pinned = reader.version(url)
        assert reader.cat_file(url) == old
    _, new = put(s3_client, s3_bucket, "v.bin", 3 * BS, seed=4)
    assert make_fs(cluster.addresses, "new").cat_file(url) == new  # new ETag -> new keys -> owners refill
    # A reader still pinned to the old version gets the old bytes where owners have them cached...
    stale_reader = make_fs(cluster.addresses, "pinned")
    with stale_reader.snapshot():
        stale_reader.pin(pinned)
        assert stale_reader.cat_file(url) == old
    # ...and where nobody has them, the owner's pinned store read fails and so does the read: never wrong bytes.
    gone = make_fs(cluster.addresses, "gone")
    with gone.snapshot():
        gone.pin(type(pinned)(url=pinned.url, size=pinned.size, etag='"0123456789abcdef0123456789abcdef"'))
        with pytest.raises(ObjectChangedError):
            gone.cat_file(url)
    assert gone.reader.peers.metrics.stale == 3


def test_query_profile_shows_peer_bytes_apart_from_store_and_cache(cluster: Cluster, s3_client: Any,
                                                                   s3_bucket: str, make_fs: MakeFs) -> None:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from shoal.engine import Session
    from shoal.engine.profile import render_explain

    rows = 20_000
    sink = io.BytesIO()
    pq.write_table(pa.table({"k": list(range(rows)), "v": [3 * i for i in range(rows)]}), sink,
                   row_group_size=5_000)
    s3_client.put_object(Bucket=s3_bucket, Key="t/part-0.parquet", Body=sink.getvalue())

    def query(name: str) -> tuple[ShoalFileSystem, Any]:
        fs = make_fs(cluster.addresses, name)
        session = Session(fs=fs, workers=1)
        session.register("t", f"s3://{s3_bucket}/t/")
        result = session.sql("SELECT count(*) AS n, sum(v) AS s FROM t")
        assert result.table.to_pylist() == [{"n": rows, "s": 3 * sum(range(rows))}]
        session.close()
        return fs, result.profile

    query("profile-warms-the-owners")
    fs, profile = query("profile-empty-local-cache")
    tier = fs.reader.peers
    assert profile.peer_tier and tier.metrics.peer_hits > 0
    assert profile.bytes_from_peers == tier.metrics.peer_bytes > 0  # every peer byte is in the profile...
    assert profile.tables["t"].blocks_from_peers == tier.metrics.peer_hits
    assert profile.bytes_from_store == 0 and profile.store_requests == 0  # ...and none came from the store
    assert profile.to_dict()["bytes_from_peers"] == profile.bytes_from_peers
    text = render_explain(profile, analyze=True)
    assert f"from peers ({tier.metrics.peer_hits} blocks)" in text
    assert "from store (0 GETs), " in text and " from peers, " in text


def test_a_new_client_plans_on_the_listing_its_peers_remember(cluster: Cluster, s3_client: Any, s3_bucket: str,
                                                              make_fs: MakeFs) -> None:
    """A client that lists a table gives the listing to the peer that owns its key; a
    client with an empty cache plans on it (no LIST before planning) while it lists
    the store, and re-runs when the store's listing differs (a file added since)."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from shoal.engine import Session

    rows = 3_000

    def put_part(n: int) -> None:
        sink = io.BytesIO()
        pq.write_table(pa.table({"k": list(range(rows)), "v": [n] * rows}), sink)
        s3_client.put_object(Bucket=s3_bucket, Key=f"lt/part-{n}.parquet", Body=sink.getvalue())

    def query(name: str) -> tuple[ShoalFileSystem, list[dict[str, Any]]]:
        fs = make_fs(cluster.addresses, name)
        with Session(fs=fs, workers=1) as session:
            session.register("lt", f"s3://{s3_bucket}/lt/")
            return fs, session.sql("SELECT count(*) AS n, sum(v) AS s FROM lt").table.to_pylist()

    def shared(fs: ShoalFileSystem) -> None:
        deadline = time.monotonic() + 10
        while fs.reader.peers.metrics.listings_shared < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert fs.reader.peers.metrics.listings_shared == 1

    put_part(1)
    first, rows_first = query("listing-first")
    assert rows_first == [{"n": rows, "s": rows}] and first.reader.peers.metrics.listings_from_peers == 0
    shared(first)  # the owner of the listing's key keeps it
    second, rows_second = query("listing-second")
    assert rows_second == rows_first and second.reader.peers.metrics.listings_from_peers == 1
    put_part(2)  # the remembered listing is now one file short
    third, rows_third = query("listing-third")
    assert third.reader.peers.metrics.listings_from_peers == 1
    assert rows_third == [{"n": 2 * rows, "s": 3 * rows}]  # re-run on the store's listing
    shared(third)  # ...which the owner now keeps
    fourth, rows_fourth = query("listing-fourth")
    assert rows_fourth == rows_third and fourth.reader.peers.metrics.listings_from_peers == 1


@pytest.fixture
def small_cluster(s3_endpoint: S3Endpoint, tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(s3_endpoint, tmp_path, 2)
    yield c
    c.close()


def test_dead_peer_costs_one_short_timeout_then_the_store(small_cluster: Cluster, s3_client: Any, s3_bucket: str,
                                                          make_fs: MakeFs) -> None:
    url, data = put(s3_client, s3_bucket, "obj.bin", 16 * BS, seed=5)
    fs = make_fs(small_cluster.addresses, timeout=2.0, down_for=60.0)
    tier = fs.reader.peers
    key = fs.reader.object_key(fs.source("s3"), fs.version(url))
    dead = small_cluster.addresses[1]
    dead_blocks = [i for i in range(16) if str(tier.membership.owner(f"{key}:{i}")) == dead]
    assert 0 < len(dead_blocks) < 16
    small_cluster.kill(1)
    start = time.monotonic()
    assert fs.cat_file(url) == data  # right bytes: the dead peer's blocks came from the store
    assert time.monotonic() - start < 10
    assert tier.metrics.unavailable >= 1 and dead in tier.membership.snapshot()["down"]
    assert client_gets(fs) >= 1
    assert tier.metrics.peer_hits == 16 - len(dead_blocks)
    # The dead peer is now skipped: the next object's blocks all go to the live worker.
    url2, data2 = put(s3_client, s3_bucket, "obj2.bin", 8 * BS, seed=6)
    unavailable = tier.metrics.unavailable
    assert fs.cat_file(url2) == data2
    assert tier.metrics.unavailable == unavailable and tier.metrics.peer_hits == 16 - len(dead_blocks) + 8


def test_worker_main_refuses_to_start_without_a_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("SHOAL_CLUSTER_SECRET_FILE", raising=False)
    assert worker_main(["--listen", "127.0.0.1:0", "--cache-dir", str(tmp_path)]) == 2
    assert "SHOAL_CLUSTER_SECRET_FILE" in capsys.readouterr().err
    assert worker_main(["--listen", "nonsense", "--secret-file", str(tmp_path / "none")]) == 2


def test_tier_from_env(tmp_path: Path) -> None:
    assert PeerTier.from_env({}) is None
    secret = tmp_path / "s"
    secret.write_bytes(SECRET)
    secret.chmod(0o600)
    tier = PeerTier.from_env({"SHOAL_PEERS": "127.0.0.1:1,127.0.0.1:2", "SHOAL_CLUSTER_SECRET_FILE": str(secret),
                              "SHOAL_TRANSPORT": "tcp", "SHOAL_PEER_TIMEOUT": "0.5"})
    assert tier is not None
    try:
        assert [str(p) for p in tier.membership.peers] == ["127.0.0.1:1", "127.0.0.1:2"]
        assert tier.config.timeout == 0.5 and tier.transport.name == "tcp"
    finally:
        tier.close()


def test_owner_serves_its_cache_files_zero_copy_and_corruption_is_caught(tmp_path: Path) -> None:
    from shoal.cache import BlockCache
    from shoal.transport import BlockRequest, BlockServer, CacheProvider, Outcome

    cache = BlockCache(CacheConfig(directory=tmp_path / "cache", block_size=BS))
    data = random.Random(9).randbytes(BS)
    cache.put("obj:0", data)
    provider = CacheProvider(cache)
    server = BlockServer(provider, SECRET)
    address = server.start()
    client = TcpTransport(SECRET)
    try:
        buffer = memoryview(bytearray(BS))
        assert client.fetch(address, [BlockRequest("obj:0", "t", BS)], [buffer], timeout=5) == [Outcome.FILLED]
        assert bytes(buffer) == data
        assert provider.counters.snapshot()["sendfile_hits"] == 1
        deadline = time.monotonic() + 5  # counted once sendfile returns, maybe after the client has it all
        while server.metrics.sendfile_bytes < BS and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.metrics.sendfile_bytes == BS
        # Flip one byte of the block in its cache file: the owner sends it as is (it does
        # not read the data), the requester's check against the stored checksums fails.
        [path] = [p for p in (tmp_path / "cache").rglob("*.val")]
        raw = bytearray(path.read_bytes())
        raw[12345] ^= 0xFF
        path.write_bytes(bytes(raw))
        buffer = memoryview(bytearray(BS))
        assert client.fetch(address, [BlockRequest("obj:0", "t", BS)], [buffer], timeout=5) == [Outcome.CORRUPT]
    finally:
        client.close()
        server.close()
        cache.close()


def test_owner_never_fills_from_local_files(tmp_path: Path) -> None:
    from shoal.cache import BlockCache
    from shoal.transport import BlockRequest, Origin
    from shoal.transport.protocol import Status
    from shoal.transport.worker import StoreFiller

    secret_file = tmp_path / "passwd"
    secret_file.write_bytes(b"root:x:0:0\n" * 1000)
    config = CacheConfig(directory=tmp_path / "cache", block_size=BS)
    cache = BlockCache(config)
    filler = StoreFiller(cache, config, StoreConfig(), max_block=16 << 20)
    try:
        origin = Origin(store_id="file", url=str(secret_file), size=11000, block_size=BS, index=0, mtime=1.0)
        served = filler(BlockRequest("whatever:0", "m:1.0", 11000, origin))
        assert served is not None and served.status is Status.NOT_FOUND and served.data is None
        origin = Origin(store_id="file", url=f"file://{secret_file}", size=11000, block_size=BS, index=0)
        assert filler(BlockRequest("whatever:0", "m:None", 11000, origin)).status is Status.NOT_FOUND
    finally:
        filler.close()
        cache.close()


def test_owner_without_ranges_is_asked_for_whole_blocks() -> None:
    """Unit test of the tier's fallback: a transport that answers ranged requests
    UNSUPPORTED (an older owner) gets asked for the whole blocks, and the reader
    still gets exactly the pieces it wanted."""
    from shoal.cache.source import ObjectVersion
    from shoal.transport import BlockTransport, Outcome

    blocks = {f"k:{i}": random.Random(i).randbytes(BS) for i in range(2)}

    class OldOwner(BlockTransport):
        name = "tcp"

        def __init__(self) -> None:
            self.asked: list[tuple[str, bool]] = []

        def fetch(self, peer, requests, buffers, *, timeout):  # type: ignore[no-untyped-def]
            outcomes = []
            for request, buffer in zip(requests, buffers):
                self.asked.append((request.key, request.ranged))
                if request.ranged:
                    outcomes.append(Outcome.UNSUPPORTED)
                else:
                    buffer[: request.length] = blocks[request.key][: request.length]
                    outcomes.append(Outcome.FILLED)
            return outcomes

        def close(self) -> None:
            pass

    transport = OldOwner()
    tier = PeerTier(PeerConfig(peers=("127.0.0.1:9",), mode="tcp"), SECRET, transport=transport)
    source = type("Source", (), {"store_id": "s3:test"})()
    version = ObjectVersion(url="s3://b/obj", size=2 * BS, etag="e1")
    try:
        got = tier.fetch_pieces(source, version, BS, [(0, "k:0", 70_000 - BS, BS - 5), (1, "k:1", 3, 10)])
        assert bytes(got[0]) == blocks["k:0"][70_000 - BS : BS - 5] and bytes(got[1]) == blocks["k:1"][3:10]
        assert sorted(transport.asked) == [("k:0", False), ("k:0", True), ("k:1", False), ("k:1", True)]
        assert tier.metrics.ranges_unsupported == 2
        assert tier.metrics.peer_hits == 2 and tier.metrics.peer_bytes == (BS - 5 - (70_000 - BS)) + 7
    finally:
        tier.close()


def test_receive_buffers_are_zeroed_disjoint_and_outlive_their_arena() -> None:
    """Batches are cut from shared huge-page arenas: each buffer starts zeroed,
    no two overlap (even when the arena rolls over), and a buffer stays valid
    after its arena has been replaced."""
    from shoal.transport import peercache

    arena = peercache._ReceiveArena.ARENA_BYTES
    first = peercache._receive_buffers([10, 0, 4096 + 1])
    assert [len(b) for b in first] == [10, 0, 4097]
    assert all(not any(b) for b in first)
    for i, b in enumerate(first):
        b[:] = bytes([i + 1]) * len(b)
    # Enough batches to roll over to new arenas several times.
    later = [peercache._receive_buffers([arena // 5]) for _ in range(12)]
    for n, (b,) in enumerate(later):
        assert not any(b[:4096])
        b[:] = bytes([n + 10]) * len(b)
    assert bytes(first[0]) == b"\x01" * 10 and bytes(first[2]) == b"\x03" * 4097
    for n, (b,) in enumerate(later):
        assert b[0] == b[-1] == n + 10
    # A batch larger than a quarter arena gets a mapping of its own.
    (big,) = peercache._receive_buffers([arena])
    big[-1] = 7
    assert len(big) == arena and big[0] == 0 and big[-1] == 7
    assert peercache._receive_buffers([]) == []


def test_a_child_forked_while_the_receive_arena_is_locked_still_receives() -> None:
    """DataLoader workers fork: a child must not inherit the arena's lock held."""
    from shoal.transport import peercache

    with peercache._ARENA._lock:
        pid = os.fork()
        if pid == 0:  # the child: a held lock would hang it until the alarm
            signal.alarm(10)
            try:
                (buffer,) = peercache._receive_buffers([4096])
                buffer[:] = b"x" * 4096
                os._exit(0 if bytes(buffer) == b"x" * 4096 else 1)
            except BaseException:
                os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
