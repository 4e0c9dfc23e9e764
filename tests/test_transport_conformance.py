"""One conformance suite, run against every transport: TCP, RDMA on the fake
verbs backend, and RDMA on real pyverbs (marked ``rdma``; skipped without a device)."""

from __future__ import annotations

import os
import random
import socket
import struct
import threading
import time
from typing import Iterator

import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_transport_helpers import MAX, FakePeer, Harness, raw_connect, raw_handshake, read_until_closed

from shoal.transport import BlockRequest, MemoryProvider, Outcome
from shoal.transport.messages import BlockReply, encode_get
from shoal.transport.protocol import HEADER, MAGIC, VERSION, MsgType, Status, encode_frame
from shoal.transport.rdma import detect_backend


def _rdma_real_available() -> bool:
    return detect_backend() is not None


@pytest.fixture(params=[
    "tcp",
    "rdma-fake",
    pytest.param("rdma-real", marks=[
        pytest.mark.rdma,
        pytest.mark.skipif(not _rdma_real_available(),
                           reason="no RDMA device: pyverbs not importable or ibv_devices lists none"),
    ]),
])
def harness(request: pytest.FixtureRequest) -> Iterator[Harness]:
    h = Harness(request.param)
    yield h
    h.close()


def blocks(n: int, size: int = 1000, seed: int = 0) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {f"key-{i}": rng.randbytes(size + i) for i in range(n)}


def provider_with(data: dict[str, bytes], **kwargs: object) -> MemoryProvider:
    provider = MemoryProvider(**kwargs)  # type: ignore[arg-type]
    for key, value in data.items():
        provider.put(key, value, token="v1")
    return provider


def fetch(client, address, data: dict[str, bytes], *, token: str = "v1", timeout: float = 10.0):
    requests = [BlockRequest(key, token, len(value)) for key, value in data.items()]
    buffers = [memoryview(bytearray(r.length)) for r in requests]
    return client.fetch(address, requests, buffers, timeout=timeout), buffers


# -- sizes ------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 4095, 65537, 333_333, MAX])
def test_sizes_round_trip(harness: Harness, size: int) -> None:
    data = {"block": random.Random(size).randbytes(size)}
    server = harness.server(provider_with(data))
    client = harness.client()
    outcomes, buffers = fetch(client, server.address, data)
    assert outcomes == [Outcome.FILLED]
    assert bytes(buffers[0]) == data["block"]
    if size:
        assert client.metrics.by_transport == {harness.via: 1}


def test_max_plus_one_is_rejected_by_client_and_by_server(harness: Harness) -> None:
    data = {"big": os.urandom(MAX + 1)}
    server = harness.server(provider_with(data))
    strict = harness.client()  # refuses to even ask
    outcomes, _ = fetch(strict, server.address, data)
    assert outcomes == [Outcome.REJECTED]
    assert server.metrics.requests == 0
    lenient = harness.client(max_block=2 * MAX)  # asks; the server refuses
    outcomes, _ = fetch(lenient, server.address, data)
    assert outcomes == [Outcome.REJECTED]
    assert server.metrics.statuses.get("rejected") == 1
    outcomes, buffers = fetch(lenient, server.address, {"big": data["big"][:MAX]} | {})  # wrong length: stale
    assert outcomes == [Outcome.STALE]


def test_buffer_too_small_is_a_caller_error(harness: Harness) -> None:
    server = harness.server(provider_with({"k": b"abc"}))
    with pytest.raises(ValueError):
        harness.client().fetch(server.address, [BlockRequest("k", "v1", 3)], [memoryview(bytearray(2))], timeout=1)


# -- concurrency and ordering ---------------------------------------------------------


def test_thousand_concurrent_requests_answered_out_of_order(harness: Harness) -> None:
    data = blocks(1000, size=2000)
    order: list[str] = []
    lock = threading.Lock()
    rng = random.Random(7)
    delays = {key: rng.choice([0.0, 0.0, 0.001, 0.003]) for key in data}

    def delay(key: str) -> float:
        return delays[key]

    provider = provider_with(data, delay=delay)
    original = provider.lookup

    def recording_lookup(request: BlockRequest):  # type: ignore[no-untyped-def]
        served = original(request)
        with lock:
            order.append(request.key)
        return served

    provider.lookup = recording_lookup  # type: ignore[method-assign]
    server = harness.server(provider, handler_threads=16)
    client = harness.client(connections_per_peer=3)
    outcomes, buffers = fetch(client, server.address, data, timeout=60)
    assert outcomes == [Outcome.FILLED] * 1000
    assert all(bytes(b) == v for b, v in zip(buffers, data.values()))
    assert len(order) == 1000 and order != list(data)  # served (and answered) out of request order
    assert server.metrics.served == 1000


def test_concurrent_fetches_from_many_threads(harness: Harness) -> None:
    data = blocks(400, size=5000, seed=3)
    server = harness.server(provider_with(data))
    client = harness.client()
    keys = list(data)
    results: list[bool] = []

    def worker(part: list[str]) -> None:
        outcomes, buffers = fetch(client, server.address, {k: data[k] for k in part})
        results.append(outcomes == [Outcome.FILLED] * len(part)
                       and all(bytes(b) == data[k] for b, k in zip(buffers, part)))

    threads = [threading.Thread(target=worker, args=(keys[i::8],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [True] * 8


# -- per-request outcomes ---------------------------------------------------------------


def test_one_bad_chunk_deep_inside_a_large_block(harness: Harness) -> None:
    """A block larger than the client's receive piece, whose checksum of one chunk in
    the middle is wrong: CORRUPT, and the connection stays usable (the rest of the body
    is still read off the socket)."""
    import dataclasses

    size = MAX - 12_345  # several receive pieces, a short last chunk
    data = blocks(3, size=size, seed=11)

    class OneBadChunk(MemoryProvider):
        def lookup(self, request: BlockRequest):  # type: ignore[no-untyped-def]
            served = super().lookup(request)
            if request.key == "key-1" and served.sums:
                sums = list(served.sums)
                sums[len(sums) // 2 + 3] ^= 1
                served = dataclasses.replace(served, sums=sums)
            return served

    provider = OneBadChunk(chunk=16 << 10)
    for key, value in data.items():
        provider.put(key, value)
    server = harness.server(provider)
    client = harness.client()
    outcomes, got = fetch(client, server.address, data)
    assert outcomes == [Outcome.FILLED, Outcome.CORRUPT, Outcome.FILLED]
    assert bytes(got[0]) == data["key-0"] and bytes(got[2]) == data["key-2"]
    outcomes, got = fetch(client, server.address, {"key-2": data["key-2"]})
    assert outcomes == [Outcome.FILLED] and bytes(got[0]) == data["key-2"]


def test_not_found_stale_and_corrupt(harness: Harness) -> None:
    data = blocks(3, size=70_000)
    provider = provider_with(data)
    provider.corrupt.add("key-2")
    server = harness.server(provider)
    client = harness.client()
    requests = [BlockRequest("missing", "v1", 10), BlockRequest("key-0", "v2", len(data["key-0"])),
                BlockRequest("key-1", "v1", len(data["key-1"])), BlockRequest("key-2", "v1", len(data["key-2"]))]
    buffers = [memoryview(bytearray(r.length)) for r in requests]
    outcomes = client.fetch(server.address, requests, buffers, timeout=10)
    assert outcomes == [Outcome.NOT_FOUND, Outcome.STALE, Outcome.FILLED, Outcome.CORRUPT]
    assert bytes(buffers[2]) == data["key-1"]
    assert client.metrics.outcomes == {"not_found": 1, "stale": 1, "filled": 1, "corrupt": 1}
    outcomes, _ = fetch(client, server.address, {"key-1": data["key-1"]})  # the connection is still fine
    assert outcomes == [Outcome.FILLED]


def test_busy_when_too_many_in_flight(harness: Harness) -> None:
    data = blocks(40, size=100)
    server = harness.server(provider_with(data, delay=lambda key: 0.05), max_inflight=4, handler_threads=4)
    client = harness.client(connections_per_peer=1)
    outcomes, buffers = fetch(client, server.address, data)
    assert Outcome.BUSY in outcomes and Outcome.FILLED in outcomes
    assert set(outcomes) <= {Outcome.BUSY, Outcome.FILLED}
    for outcome, buffer, value in zip(outcomes, buffers, data.values()):
        if outcome is Outcome.FILLED:
            assert bytes(buffer) == value


# -- failures -------------------------------------------------------------------------------


def test_timeout_then_late_answer_is_drained(harness: Harness) -> None:
    data = {"slow": os.urandom(50_000), "fast": os.urandom(10)}
    server = harness.server(provider_with(data, delay=lambda key: 0.6 if key == "slow" else 0.0))
    client = harness.client(connections_per_peer=1)
    start = time.monotonic()
    outcomes, buffers = fetch(client, server.address, {"slow": data["slow"]}, timeout=0.15)
    assert outcomes == [Outcome.TIMEOUT]
    assert time.monotonic() - start < 0.5
    time.sleep(0.8)  # the late answer arrives and must not land in the caller's buffer
    assert bytes(buffers[0]) == bytes(50_000)
    outcomes, buffers = fetch(client, server.address, {"fast": data["fast"]})
    assert outcomes == [Outcome.FILLED] and bytes(buffers[0]) == data["fast"]
    assert client.metrics.connections == 1  # same connection, still in sync


def test_peer_killed_mid_request(harness: Harness) -> None:
    data = blocks(20, size=200_000)
    server = harness.server(provider_with(data, delay=lambda key: 0.3))
    client = harness.client()
    threading.Timer(0.1, server.close).start()
    start = time.monotonic()
    outcomes, _ = fetch(client, server.address, data, timeout=10)
    assert time.monotonic() - start < 5
    assert set(outcomes) <= {Outcome.UNAVAILABLE, Outcome.FILLED} and Outcome.UNAVAILABLE in outcomes
    outcomes, _ = fetch(client, server.address, {"key-0": data["key-0"]}, timeout=2)
    assert outcomes == [Outcome.UNAVAILABLE]  # and a dead peer is refused fast, not hung on


def test_peer_dies_mid_body(harness: Harness) -> None:
    payload = os.urandom(300_000)
    sums = [xxhash.xxh3_64_intdigest(payload[i : i + 65536]) for i in range(0, len(payload), 65536)]

    def half_then_close(sock: socket.socket, header, meta) -> None:  # type: ignore[no-untyped-def]
        reply = BlockReply(Status.FILLED, len(payload), 65536, "v1", sums).encode()
        sock.sendall(encode_frame(MsgType.BLOCK, header.req_id, reply, payload_len=len(payload)))
        sock.sendall(payload[: len(payload) // 2])
        sock.shutdown(socket.SHUT_RDWR)
        raise OSError("peer gone")

    peer = FakePeer(half_then_close)
    try:
        client = harness.client()
        buffer = memoryview(bytearray(len(payload)))
        outcomes = client.fetch(peer.address, [BlockRequest("k", "v1", len(payload))], [buffer], timeout=5)
        assert outcomes == [Outcome.UNAVAILABLE]
    finally:
        peer.close()


def test_body_that_stalls_costs_the_timeout_then_never_lands(harness: Harness) -> None:
    payload = os.urandom(300_000)
    sums = [xxhash.xxh3_64_intdigest(payload[i : i + 65536]) for i in range(0, len(payload), 65536)]
    release = threading.Event()

    def trickle(sock: socket.socket, header, meta) -> None:  # type: ignore[no-untyped-def]
        reply = BlockReply(Status.FILLED, len(payload), 65536, "v1", sums).encode()
        sock.sendall(encode_frame(MsgType.BLOCK, header.req_id, reply, payload_len=len(payload)))
        sock.sendall(payload[:1000])
        release.wait(10)
        sock.sendall(payload[1000:])  # far too late

    peer = FakePeer(trickle)
    try:
        client = harness.client()
        buffer = memoryview(bytearray(len(payload)))
        start = time.monotonic()
        outcomes = client.fetch(peer.address, [BlockRequest("k", "v1", len(payload))], [buffer], timeout=0.3)
        assert time.monotonic() - start < 3
        assert outcomes[0] in (Outcome.TIMEOUT, Outcome.UNAVAILABLE)
        snapshot = bytes(buffer)
        release.set()
        time.sleep(0.3)
        assert bytes(buffer) == snapshot  # nothing was written after fetch returned
    finally:
        release.set()
        peer.close()


def test_oversized_answer_from_a_peer_is_refused(harness: Harness) -> None:
    def lie(sock: socket.socket, header, meta) -> None:  # type: ignore[no-untyped-def]
        reply = BlockReply(Status.FILLED, 10, 65536, "v1", [0]).encode()
        sock.sendall(encode_frame(MsgType.BLOCK, header.req_id, reply, payload_len=MAX * 4))

    peer = FakePeer(lie)
    try:
        outcomes = harness.client().fetch(peer.address, [BlockRequest("k", "v1", 10)], [memoryview(bytearray(10))],
                                          timeout=5)
        assert outcomes == [Outcome.UNAVAILABLE]
    finally:
        peer.close()


# -- authentication and hostile input ------------------------------------------------------


def test_bad_secret_is_refused_and_server_keeps_serving(harness: Harness) -> None:
    data = {"k": b"secret bytes"}
    server = harness.server(provider_with(data))
    intruder = harness.client(secret=b"not-the-cluster-secret-at-all-000")
    outcomes, buffers = fetch(intruder, server.address, data)
    assert outcomes == [Outcome.UNAVAILABLE] and bytes(buffers[0]) == bytes(len(data["k"]))
    assert server.metrics.auth_failures >= 1 and server.metrics.requests == 0
    outcomes, buffers = fetch(harness.client(), server.address, data)
    assert outcomes == [Outcome.FILLED] and bytes(buffers[0]) == data["k"]


def test_server_that_cannot_prove_the_secret_is_not_trusted(harness: Harness) -> None:
    asked: list[int] = []
    peer = FakePeer(lambda sock, header, meta: asked.append(header.req_id), bad_proof=True)
    try:
        outcomes, _ = fetch(harness.client(), peer.address, {"k": b"x"})
        assert outcomes == [Outcome.UNAVAILABLE]
        assert asked == []  # no request was sent to an unauthenticated server
    finally:
        peer.close()


def _alive(harness: Harness, server) -> None:  # type: ignore[no-untyped-def]
    outcomes, buffers = fetch(harness.client(), server.address, {"k": b"still here"})
    assert outcomes == [Outcome.FILLED] and bytes(buffers[0]) == b"still here"


def test_bad_magic_bad_version_and_oversized_lengths(harness: Harness) -> None:
    server = harness.server(provider_with({"k": b"still here"}))
    good = encode_frame(MsgType.HELLO, 0, b"")
    bad_magic = b"HTTP" + good[4:]
    body = struct.pack("<4sBBHQIII", MAGIC, VERSION + 1, 1, 0, 0, 0, 0, xxhash.xxh32_intdigest(b""))
    bad_version = body + struct.pack("<I", xxhash.xxh32_intdigest(body))
    body = struct.pack("<4sBBHQIII", MAGIC, VERSION, 1, 0, 0, 1 << 30, 0, 0)
    huge_meta = body + struct.pack("<I", xxhash.xxh32_intdigest(body))
    for frame in (bad_magic, bad_version, huge_meta, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(8)):
        sock = raw_connect(server.address)
        sock.sendall(frame)
        answer = read_until_closed(sock)  # an ERROR frame, then the server closes
        assert answer[:4] == MAGIC and answer[5] == MsgType.ERROR
        sock.close()
    assert server.metrics.protocol_errors == 4
    sock = raw_handshake(server.address)  # after auth: a GET claiming a payload is refused
    meta, flags = encode_get(BlockRequest("k", "v1", 10))
    sock.sendall(encode_frame(MsgType.GET, 1, meta, payload_len=1 << 20, flags=flags))
    assert read_until_closed(sock)[5] == MsgType.ERROR
    sock = raw_handshake(server.address)  # a reply-type frame from a client is refused too
    sock.sendall(encode_frame(MsgType.BLOCK, 1, b""))
    assert read_until_closed(sock)[5] == MsgType.ERROR
    _alive(harness, server)


def test_requests_before_authentication_are_refused(harness: Harness) -> None:
    server = harness.server(provider_with({"k": b"still here"}))
    sock = raw_connect(server.address)
    meta, flags = encode_get(BlockRequest("k", "v1", 10))
    sock.sendall(encode_frame(MsgType.GET, 1, meta, flags=flags))
    answer = read_until_closed(sock)
    assert b"still here" not in answer and answer[5] == MsgType.ERROR
    _alive(harness, server)


def test_garbage_never_crashes_the_server(harness: Harness) -> None:
    server = harness.server(provider_with({"k": b"still here"}), handshake_timeout=0.5)

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(junk=st.binary(min_size=1, max_size=3000), after_auth=st.booleans(), valid_header=st.booleans())
    def hammer(junk: bytes, after_auth: bool, valid_header: bool) -> None:
        sock = raw_handshake(server.address) if after_auth else raw_connect(server.address)
        if valid_header:  # a well-formed header around random metadata reaches the message parsers
            kind = random.Random(junk).choice(list(MsgType))
            frame = encode_frame(kind, 1, junk[:2000], flags=junk[0] & 3)
        else:
            frame = junk
        try:
            sock.sendall(frame)
            sock.shutdown(socket.SHUT_WR)
            read_until_closed(sock, timeout=5)
        except OSError:
            pass
        finally:
            sock.close()

    hammer()
    _alive(harness, server)
    assert server.metrics.active_connections <= 2
    assert HEADER.size == 32


# -- ranged GETs (a slice of a block) ---------------------------------------------------------

RANGED_BLOCK = 300_000  # four whole 64 KiB checksum chunks and a short last one


def ranged(key: str, offset: int, length: int, block_length: int = RANGED_BLOCK, token: str = "v1") -> BlockRequest:
    return BlockRequest(key, token, length, offset=offset, block_length=block_length)


def cache_provider(tmp_path, data: bytes):  # type: ignore[no-untyped-def]
    """A CacheProvider over a real BlockCache holding ``data`` as block ``whole:0``
    and as two pieces of block ``parts:0`` (bytes [0, 131072) and [131072, end))."""
    from shoal.cache import BlockCache, CacheConfig
    from shoal.transport import CacheProvider

    cache = BlockCache(CacheConfig(directory=tmp_path / "cache", block_size=1 << 19))  # a short last block
    assert cache.put("whole:0", data)
    assert cache.put_piece("parts:0", 0, data[:131072]) and cache.put_piece("parts:0", 131072, data[131072:])
    return CacheProvider(cache), cache


@pytest.mark.parametrize("offset,size", [
    (0, 0), (65536, 0), (65536, 1), (131072, 4095), (65536, 70_001), (0, 65536),
    (262144, RANGED_BLOCK - 262144),  # the short last chunk
    (196608, RANGED_BLOCK - 196608),  # a whole chunk and the short last one
    (0, RANGED_BLOCK),  # the whole block, as a range
    (1, 1), (65535, 2), (100, 70_001), (262145, RANGED_BLOCK - 262145),  # off the 64 KiB chunk grid
])
@pytest.mark.parametrize("served_from", ["memory", "cache"])
def test_ranged_get_sizes(harness: Harness, tmp_path, offset: int, size: int, served_from: str) -> None:
    data = random.Random(offset + size).randbytes(RANGED_BLOCK)
    cache = None
    if served_from == "memory":
        provider = provider_with({"whole:0": data, "parts:0": data})
    else:
        provider, cache = cache_provider(tmp_path, data)
    try:
        server = harness.server(provider)
        client = harness.client()
        requests = [ranged("whole:0", offset, size), ranged("parts:0", offset, size)]
        buffers = [memoryview(bytearray(size)) for _ in requests]
        assert client.fetch(server.address, requests, buffers, timeout=10) == [Outcome.FILLED] * 2
        assert [bytes(b) for b in buffers] == [data[offset : offset + size]] * 2
        if size:
            assert client.metrics.by_transport == {harness.via: 2}
        if served_from == "cache" and size:
            counters = provider.counters.snapshot()
            assert counters["range_hits"] == 2
            # Zero-copy when the slice starts on a chunk boundary of the file it comes from
            # (the block's, or the one piece covering it; both start on a boundary here).
            one_piece = offset + size <= 131072 or offset >= 131072
            on_grid = offset % 65536 == 0
            assert counters.get("sendfile_hits", 0) == (on_grid + (on_grid and one_piece))
    finally:
        if cache is not None:
            cache.close()


def test_ranged_get_outside_the_block_is_rejected(harness: Harness) -> None:
    data = random.Random(1).randbytes(RANGED_BLOCK)
    server = harness.server(provider_with({"k": data}))
    client = harness.client()
    bad = [
        ranged("k", 393216, 1),                          # offset past the block's end
        ranged("k", RANGED_BLOCK + 1, 0),                # an empty range past the end
        ranged("k", 262144, RANGED_BLOCK - 262144 + 1),  # one byte past the end
        ranged("k", 65536, 10, block_length=2 * MAX),    # a block larger than the server serves
    ]
    buffers = [memoryview(bytearray(r.length)) for r in bad]
    assert client.fetch(server.address, bad, buffers, timeout=10) == [Outcome.REJECTED] * 4
    assert server.metrics.statuses.get("rejected") == 4
    too_big = ranged("k", 0, MAX + 1, block_length=MAX + 1)  # the client does not even ask
    assert client.fetch(server.address, [too_big], [memoryview(bytearray(MAX + 1))], timeout=10) == [
        Outcome.REJECTED]
    assert server.metrics.statuses.get("rejected") == 4
    good = ranged("k", 131072, 5)  # the connection is still in sync
    buffer = memoryview(bytearray(5))
    assert client.fetch(server.address, [good], [buffer], timeout=10) == [Outcome.FILLED]
    assert bytes(buffer) == data[131072:131077]


def test_ranged_get_of_another_version_or_length_is_stale(harness: Harness) -> None:
    data = random.Random(2).randbytes(RANGED_BLOCK)
    server = harness.server(provider_with({"k": data}))
    client = harness.client()
    requests = [ranged("k", 0, 100, token="v2"), ranged("k", 0, 100, block_length=RANGED_BLOCK - 1),
                ranged("missing", 0, 100)]
    buffers = [memoryview(bytearray(100)) for _ in requests]
    assert client.fetch(server.address, requests, buffers, timeout=10) == [
        Outcome.STALE, Outcome.STALE, Outcome.NOT_FOUND]


def test_ranged_get_corrupt_slice_is_caught(harness: Harness, tmp_path) -> None:
    """A flipped byte inside the slice: the owner sends the file as is, the requester's
    check fails.  A flipped byte in the cut last chunk, outside the slice: the owner's
    check of that chunk fails, and it drops the block instead of serving it."""
    data = random.Random(3).randbytes(RANGED_BLOCK)
    provider, cache = cache_provider(tmp_path, data)
    try:
        server = harness.server(provider)
        client = harness.client()
        [path] = [p for p in (tmp_path / "cache").rglob("*.val") if p.stat().st_size > RANGED_BLOCK]
        raw = bytearray(path.read_bytes())
        raw[70_000] ^= 0xFF  # inside chunk 1
        path.write_bytes(bytes(raw))
        buffer = memoryview(bytearray(65536))
        assert client.fetch(server.address, [ranged("whole:0", 65536, 65536)], [buffer],
                            timeout=10) == [Outcome.CORRUPT]
        assert client.fetch(server.address, [ranged("whole:0", 0, 65536)], [memoryview(bytearray(65536))],
                            timeout=10) == [Outcome.FILLED]  # other chunks are fine
        assert client.fetch(server.address, [ranged("whole:0", 0, 65536 + 100)],
                            [memoryview(bytearray(65636))], timeout=10) == [Outcome.NOT_FOUND]
        assert cache.metrics.corrupt_blocks == 1 and not cache.contains("whole:0")
        # Off the chunk grid the owner reads and checks the chunks itself: a bad one is never sent.
        assert client.fetch(server.address, [ranged("parts:0", 10, 100)], [memoryview(bytearray(100))],
                            timeout=10) == [Outcome.FILLED]
        [piece] = [p for p in (tmp_path / "cache").rglob("*.val") if 131072 < p.stat().st_size < 131200]
        raw = bytearray(piece.read_bytes())  # the piece holding bytes [0, 131072)
        raw[20_000] ^= 0xFF
        piece.write_bytes(bytes(raw))
        assert client.fetch(server.address, [ranged("parts:0", 10, 100)], [memoryview(bytearray(100))],
                            timeout=10) == [Outcome.NOT_FOUND]
        assert cache.metrics.corrupt_blocks == 2
    finally:
        cache.close()


def test_ranged_get_to_a_server_without_ranges_is_unsupported(harness: Harness) -> None:
    asked: list[int] = []
    peer = FakePeer(lambda sock, header, meta: asked.append(header.req_id))  # offers no CAP_RANGE
    try:
        client = harness.client()
        outcomes = client.fetch(peer.address, [ranged("k", 0, 10)], [memoryview(bytearray(10))], timeout=5)
        assert outcomes == [Outcome.UNSUPPORTED]
        assert asked == []  # never sent: an older server would drop the connection on the flag
    finally:
        peer.close()
