"""Faults of the peer cache tier, end to end: the reads still return the object's bytes (issue 8).

A client :class:`ShoalFileSystem` with a :class:`PeerTier` reads objects from a
real S3 server while its peers misbehave: ``shoal worker`` processes SIGKILLed
while they serve the client's requests or frozen (SIGSTOP) so that they hang,
and hand-written peers (:class:`FakePeer`) that pass the handshake and then
answer garbage, corrupt bytes, another version, another length, or die in the
middle of a block.  Every read must equal the uploaded bytes (a peer problem is
a miss: the store answers), finish under a deadline, and be counted.

Covered elsewhere, not repeated here: the transport's own outcomes for the same
faults, without the reader (``test_transport_conformance.py``:
``test_peer_killed_mid_request``, ``test_peer_dies_mid_body``,
``test_body_that_stalls_costs_the_timeout_then_never_lands``,
``test_oversized_answer_from_a_peer_is_refused``, ``test_not_found_stale_and_corrupt``);
a worker killed *before* a read and an old version held by real workers
(``test_peer_cache.py``: ``test_dead_peer_costs_one_short_timeout_then_the_store``,
``test_new_version_is_never_served_from_an_old_block``); corruption of an
owner's cache file (``test_peer_cache.py::test_owner_serves_its_cache_files_zero_copy_and_corruption_is_caught``).

Not testable, by design: an authenticated peer that sends other bytes with the
right version token *and* checksums it computed over those bytes is trusted
(the cluster secret is the trust boundary; the requester has no digest of the
object to compare against).
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest
import s3servers
import xxhash
from faultkit import put, within
from s3servers import S3Endpoint, free_port
from test_transport_helpers import SECRET, FakePeer

from shoal.cache import BlockReader, CacheConfig, ShoalFileSystem, StoreConfig
from shoal.transport import PeerConfig, PeerTier
from shoal.transport.messages import BlockReply, decode_get
from shoal.transport.protocol import MsgType, Status, encode_frame

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))  # benchmarks/ is scripts, not a package
import s3proxy  # noqa: E402
from latency_profiles import LatencyProfile  # noqa: E402

BS = 64 * 1024
CHUNK = 64 * 1024
ONE_SERVER = pytest.mark.parametrize(
    "s3_endpoint", ["external" if s3servers.external_from_env() else "seaweedfs"], indirect=True)
pytestmark = ONE_SERVER

_SCRIPT = Path(sys.executable).with_name("shoal")
SHOAL = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "shoal.cli.main"]


def store_config(endpoint: S3Endpoint, url: str | None = None) -> StoreConfig:
    return StoreConfig(endpoint_url=url or endpoint.endpoint_url, access_key=endpoint.access_key,
                       secret_key=endpoint.secret_key, region=endpoint.region, max_attempts=3)


MakeFs = Callable[..., ShoalFileSystem]


@pytest.fixture
def make_fs(s3_endpoint: S3Endpoint, tmp_path: Path) -> Iterator[MakeFs]:
    """A client filesystem whose peer tier asks ``peers``; ``store_url`` defaults to the server."""
    made: list[tuple[ShoalFileSystem, PeerTier]] = []

    def make(peers: list[str], *, store_url: str | None = None, **tier: Any) -> ShoalFileSystem:
        cache = CacheConfig(directory=tmp_path / f"client{len(made)}", block_size=BS, readahead_blocks=0,
                            max_request_size=BS)
        settings = {"timeout": 2.0, "connect_timeout": 0.5, "down_for": 60.0, **tier}
        peer_tier = PeerTier(PeerConfig(peers=tuple(peers), mode="tcp", **settings), SECRET)
        fs = ShoalFileSystem(cache=cache, store=store_config(endpoint=s3_endpoint, url=store_url),
                             reader=BlockReader(cache, peers=peer_tier))
        made.append((fs, peer_tier))
        return fs

    yield make
    for fs, peer_tier in made:
        fs.close()
        peer_tier.close()


def client_gets(fs: ShoalFileSystem) -> int:
    return fs.source("s3").requests  # type: ignore[attr-defined]


class ShoalWorker:
    """``shoal worker`` in a subprocess, reading the store at ``store_url``."""

    def __init__(self, endpoint: S3Endpoint, root: Path, store_url: str) -> None:
        secret = root / "secret"
        secret.write_bytes(SECRET)
        secret.chmod(0o600)
        self.address = f"127.0.0.1:{free_port()}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SHOAL_"))}
        env.update(AWS_ENDPOINT_URL_S3=store_url, AWS_ACCESS_KEY_ID=endpoint.access_key,
                   AWS_SECRET_ACCESS_KEY=endpoint.secret_key, AWS_REGION=endpoint.region,
                   AWS_CONFIG_FILE=str(root / "none"), AWS_SHARED_CREDENTIALS_FILE=str(root / "none"),
                   AWS_EC2_METADATA_DISABLED="true", SHOAL_CACHE_BLOCK_SIZE=str(BS))
        self.log = open(root / "worker.log", "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [*SHOAL, "worker", "--listen", self.address, "--cache-dir", str(root / "worker-cache"),
             "--secret-file", str(secret), "--peers", self.address, "--transport", "tcp", "--log-level", "WARNING"],
            stdout=subprocess.PIPE, stderr=self.log, text=True, env=env, stdin=subprocess.DEVNULL)
        line = within(60, self.proc.stdout.readline)  # type: ignore[union-attr]
        if "listening on" not in line:
            self.close()
            raise RuntimeError(f"shoal worker did not start: {line!r}; see {root / 'worker.log'}")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a stopped worker cannot take SIGTERM
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        self.log.close()


@pytest.fixture
def start_worker(s3_endpoint: S3Endpoint, tmp_path: Path) -> Iterator[Callable[[str], ShoalWorker]]:
    workers: list[ShoalWorker] = []

    def start(store_url: str) -> ShoalWorker:
        root = tmp_path / f"worker{len(workers)}"
        root.mkdir()
        workers.append(ShoalWorker(s3_endpoint, root, store_url))
        return workers[-1]

    yield start
    for worker in workers:
        worker.close()


# -- real workers that die or hang ------------------------------------------------------------


def test_worker_killed_while_serving_the_read(start_worker: Callable[[str], ShoalWorker], make_fs: MakeFs,
                                              s3_endpoint: S3Endpoint, s3_client: Any, s3_bucket: str) -> None:
    """The owner of every block is SIGKILLed while it fills the client's requests from a slow
    store (it has started its GETs): the client gets UNAVAILABLE, reads the store itself, and
    skips the dead peer afterwards."""
    url, data = put(s3_client, s3_bucket, "obj.bin", 12 * BS + 77, seed=1)
    url2, data2 = put(s3_client, s3_bucket, "obj2.bin", 4 * BS, seed=2)
    with s3proxy.S3Proxy(s3_endpoint.endpoint_url, seed=3,
                         profile=LatencyProfile(name="slow", ttfb_median_s=0.4)) as proxy:
        worker = start_worker(proxy.url)  # the client reads the same store (same store_id), also slowly
        fs = make_fs([worker.address], store_url=proxy.url, timeout=30.0)
        fs.version(url)  # the HEAD, before the store is watched
        proxy.reset_stats()
        result: dict[str, Any] = {}

        def read() -> None:
            try:
                result["data"] = fs.cat_file(url)
            except BaseException as exc:  # noqa: BLE001 - reported below
                result["error"] = exc

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        deadline = time.monotonic() + 30
        while proxy.stats()["gets"] == 0 and time.monotonic() < deadline:  # the worker is filling
            time.sleep(0.005)
        assert proxy.stats()["gets"] > 0 and client_gets(fs) == 0
        worker.signal(signal.SIGKILL)
        reader.join(60)
        assert not reader.is_alive(), "the read hung on a dead peer"
        assert "error" not in result, repr(result.get("error"))
        assert result["data"] == data
        tier = fs.reader.peers
        assert tier.metrics.unavailable >= 1 and worker.address in tier.membership.snapshot()["down"]
        assert client_gets(fs) >= 1
        unavailable = tier.metrics.unavailable
        assert within(60, fs.cat_file, url2) == data2
        assert tier.metrics.unavailable == unavailable and tier.metrics.no_live_peer == 4  # skipped, not asked


def test_hanging_worker_costs_one_timeout_then_the_store(start_worker: Callable[[str], ShoalWorker],
                                                         make_fs: MakeFs, s3_endpoint: S3Endpoint,
                                                         s3_client: Any, s3_bucket: str) -> None:
    """A worker frozen with SIGSTOP keeps its sockets open and answers nothing: the requests on
    the client's open connection time out once, then the store answers and the peer is skipped."""
    objects = [put(s3_client, s3_bucket, f"o{n}.bin", 6 * BS + n, seed=10 + n) for n in range(3)]
    worker = start_worker(s3_endpoint.endpoint_url)
    (url0, data0), (url1, data1), (url2, data2) = objects
    assert within(60, make_fs([worker.address], timeout=30.0).cat_file, url0) == data0  # the worker fills o0
    fs = make_fs([worker.address], timeout=2.0)
    tier = fs.reader.peers
    assert within(60, fs.cat_file, url0) == data0  # from the worker's cache, over connections that stay open
    assert tier.metrics.peer_hits == 6 and client_gets(fs) == 0  # the healthy worker served everything
    worker.signal(signal.SIGSTOP)
    assert within(60, fs.cat_file, url1) == data1
    assert tier.metrics.timeouts + tier.metrics.unavailable >= 1
    assert worker.address in tier.membership.snapshot()["down"]
    asked = tier.metrics.timeouts + tier.metrics.unavailable
    assert within(60, fs.cat_file, url2) == data2
    assert tier.metrics.timeouts + tier.metrics.unavailable == asked  # a hanging peer is not waited on twice
    assert tier.metrics.peer_hits == 6 and client_gets(fs) == 14


# -- peers that answer wrongly ---------------------------------------------------------------------


def _reply(sock: socket.socket, header: Any, status: Status, token: str, payload: bytes,
           sums_of: bytes | None = None) -> None:
    """One BLOCK answer: ``payload`` with checksums of ``sums_of`` (default: of the payload)."""
    source = payload if sums_of is None else sums_of
    sums = [xxhash.xxh3_64_intdigest(source[i : i + CHUNK]) for i in range(0, len(source), CHUNK)]
    reply = BlockReply(status, len(payload), CHUNK, token, sums).encode()
    sock.sendall(encode_frame(MsgType.BLOCK, header.req_id, reply, payload_len=len(payload)))
    sock.sendall(payload)


def _garbage(sock: socket.socket, header: Any, meta: bytes) -> None:
    sock.sendall(random.Random(header.req_id).randbytes(3000))


def _corrupt(sock: socket.socket, header: Any, meta: bytes) -> None:
    request, _ = decode_get(meta, header.flags)
    payload = os.urandom(request.length)
    _reply(sock, header, Status.FILLED, request.token, payload, sums_of=os.urandom(request.length))


def _other_version(sock: socket.socket, header: Any, meta: bytes) -> None:
    request, _ = decode_get(meta, header.flags)
    _reply(sock, header, Status.FILLED, "e:0123456789abcdef0123456789abcdef", os.urandom(request.length))


def _other_length(sock: socket.socket, header: Any, meta: bytes) -> None:
    request, _ = decode_get(meta, header.flags)
    _reply(sock, header, Status.FILLED, request.token, os.urandom(request.length - 1))


def _dies_mid_body(sock: socket.socket, header: Any, meta: bytes) -> None:
    request, _ = decode_get(meta, header.flags)
    payload = os.urandom(request.length)
    sums = [xxhash.xxh3_64_intdigest(payload[i : i + CHUNK]) for i in range(0, len(payload), CHUNK)]
    reply = BlockReply(Status.FILLED, len(payload), CHUNK, request.token, sums).encode()
    sock.sendall(encode_frame(MsgType.BLOCK, header.req_id, reply, payload_len=len(payload)))
    sock.sendall(payload[: len(payload) // 2])
    sock.shutdown(socket.SHUT_RDWR)
    raise OSError("peer died")


def _hangs(sock: socket.socket, header: Any, meta: bytes) -> None:
    threading.Event().wait(30)  # never answers (the fake's thread is a daemon)


@pytest.mark.parametrize(("behave", "counter"), [
    (_garbage, "unavailable"),
    (_corrupt, "corrupt"),
    (_other_version, "stale"),
    (_other_length, "stale"),
    (_dies_mid_body, "unavailable"),
    (_hangs, "timeouts"),
], ids=["garbage", "corrupt", "other-version", "other-length", "dies-mid-body", "hangs"])
def test_misbehaving_peer_never_changes_the_bytes(behave: Callable[..., None], counter: str, make_fs: MakeFs,
                                                  s3_client: Any, s3_bucket: str) -> None:
    url, data = put(s3_client, s3_bucket, "obj.bin", 5 * BS + 999, seed=20)
    peer = FakePeer(behave)
    try:
        fs = make_fs([f"127.0.0.1:{peer.address[1]}"], timeout=1.0 if behave is _hangs else 10.0)
        assert within(60, fs.cat_file, url) == data
        metrics = fs.reader.peers.metrics
        assert metrics.peer_hits == 0 and getattr(metrics, counter) >= 1, metrics.snapshot()
        assert client_gets(fs) == 6  # every block from the store, once
        fs.reader.flush()
        fs.reader.drop_memory()
        assert fs.cat_file(url) == data and client_gets(fs) == 6  # and what was cached is right
    finally:
        peer.close()


def test_peer_that_is_not_a_shoal_worker(make_fs: MakeFs, s3_endpoint: S3Endpoint, s3_client: Any,
                                         s3_bucket: str) -> None:
    """SHOAL_PEERS pointing at some other service (here: the S3 server's HTTP port)."""
    url, data = put(s3_client, s3_bucket, "obj.bin", 3 * BS, seed=21)
    http_port = s3_endpoint.endpoint_url.rsplit(":", 1)[1].strip("/")
    fs = make_fs([f"127.0.0.1:{http_port}"])
    assert within(60, fs.cat_file, url) == data
    assert fs.reader.peers.metrics.unavailable >= 1 and fs.reader.peers.metrics.peer_hits == 0
