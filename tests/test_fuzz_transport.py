"""Fuzzing the peer protocol, the parser that reads bytes from other machines.

Headers with valid checksums and any lengths, length fields that claim
gigabytes, frames cut at any byte, structured GET / BLOCK / origin metadata,
and a real :class:`BlockServer` on loopback fed fuzzed frame sequences before
and after authentication.  Every parser may only succeed (with a value that
respects its limits) or raise :class:`ProtocolError`; nothing allocates what
a length field claims before checking it.  (Configuration, catalog and SQL
parsers: ``test_fuzz_parsers.py``.)
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import socket
import struct
import time
import tracemalloc
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterator

import duckdb
import pytest
import xxhash
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from test_transport_helpers import SECRET, raw_connect, raw_handshake

from shoal.cache import CacheConfig, StorageConfigError, StorageError, StoreConfig, parse_size
from shoal.cache.config import MAX_SIZE
from shoal.cache.source import split_url
from shoal.cli.config import FORMATS, SETTINGS, Config
from shoal.cli.errors import ConfigError
from shoal.engine import Catalog, CatalogError, EngineError, QueryError, Session, SqlSyntaxError
from shoal.engine.sqlinfo import column_references, parse_tree, table_references, top_level_conjuncts
from shoal.transport import (
    BlockRequest, BlockServer, FrameTooLarge, MemoryProvider, Origin, Outcome, PeerUnavailable, ProtocolError,
    ServerConfig, TcpTransport,
)
from shoal.transport import _io
from shoal.transport.messages import MAX_SUMS, MIN_CHUNK, BlockReply, RdmaSlot, decode_get, encode_get
from shoal.transport.protocol import (
    CHUNK, FLAG_FILL, FLAG_RDMA, HARD_MAX_META, HARD_MAX_PAYLOAD, MAGIC, MAX_KEY, MAX_TEXT, MAX_TOKEN, VERSION,
    Limits, MsgType, Reader, Status, Writer, decode_header, encode_frame,
)


def fuzz(examples: int) -> Any:
    """Hypothesis settings of this file: no deadline (two shared CPUs), no health checks."""
    return settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck))


U16, U32, U64 = st.integers(0, 0xFFFF), st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1)
KNOWN_TYPES = frozenset(int(t) for t in MsgType)


def _header(msg_type: int, flags: int, req_id: int, meta_len: int, payload_len: int, meta_sum: int = 0,
            magic: bytes = MAGIC, version: int = VERSION) -> bytes:
    """A 32-byte header with a correct header checksum (whatever the other fields say)."""
    body = struct.pack("<4sBBHQIII", magic, version, msg_type, flags, req_id, meta_len, payload_len, meta_sum)
    return body + struct.pack("<I", xxhash.xxh32_intdigest(body))


def _frame(msg_type: int, req_id: int, meta: bytes, *, flags: int = 0, payload_len: int = 0) -> bytes:
    return _header(msg_type, flags, req_id, len(meta), payload_len, xxhash.xxh32_intdigest(meta)) + meta


# == the frame parser ====================================================================


@fuzz(400)
@given(msg_type=st.integers(0, 255), flags=U16, req_id=U64,
       meta_len=st.one_of(U32, st.sampled_from([0, HARD_MAX_META, HARD_MAX_META + 1, 2**32 - 1])),
       payload_len=st.one_of(U32, st.sampled_from([0, HARD_MAX_PAYLOAD, HARD_MAX_PAYLOAD + 1, 2**32 - 1])),
       max_meta=st.integers(1, HARD_MAX_META), max_payload=st.integers(0, HARD_MAX_PAYLOAD))
def test_checksummed_headers_are_accepted_exactly_within_the_limits(
        msg_type: int, flags: int, req_id: int, meta_len: int, payload_len: int, max_meta: int,
        max_payload: int) -> None:
    """A header that passes its checksum reaches the type and length checks: known
    types within both limits decode to exactly their fields, everything else is refused."""
    data = _header(msg_type, flags, req_id, meta_len, payload_len)
    limits = Limits(max_meta=max_meta, max_payload=max_payload)
    if msg_type not in KNOWN_TYPES:
        with pytest.raises(ProtocolError, match="unknown message type"):
            decode_header(data, limits)
    elif meta_len > max_meta or payload_len > max_payload:
        with pytest.raises(FrameTooLarge):
            decode_header(data, limits)
    else:
        header = decode_header(data, limits)
        assert (int(header.type), header.flags, header.req_id, header.meta_len, header.payload_len) == (
            msg_type, flags, req_id, meta_len, payload_len)


@fuzz(300)
@given(data=st.binary(min_size=32, max_size=32), position=st.integers(0, 27), value=st.integers(0, 255))
def test_any_change_under_the_header_checksum_is_refused(data: bytes, position: int, value: int) -> None:
    frame = bytearray(_header(MsgType.PING, 0, 1, 0, 0))
    assume(frame[position] != value)
    frame[position] = value
    with pytest.raises(ProtocolError):
        decode_header(bytes(frame))
    try:  # and arbitrary bytes: a ProtocolError or, very rarely, a header within the limits
        header = decode_header(data)
    except ProtocolError:
        return
    assert header.meta_len <= HARD_MAX_META and header.payload_len <= Limits().max_payload


@fuzz(60)
@given(meta_len=st.one_of(st.integers(HARD_MAX_META + 1, 2**32 - 1), st.just(2**32 - 1)),
       payload_len=U32, msg_type=st.sampled_from(sorted(MsgType)), after=st.binary(max_size=64))
def test_a_huge_length_field_is_refused_before_anything_is_allocated(
        meta_len: int, payload_len: int, msg_type: MsgType, after: bytes) -> None:
    """``read_frame`` (both the server's and the client's) allocates the metadata
    buffer only after the length passed its limit: a header claiming 4 GiB of
    metadata costs a few hundred bytes, over a real socket."""
    a, b = socket.socketpair()
    try:
        a.sendall(_header(msg_type, 0, 7, meta_len, payload_len) + after)
        b.settimeout(5)
        tracemalloc.start()
        try:
            with pytest.raises(FrameTooLarge):
                _io.read_frame(b, Limits(max_payload=1 << 20))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 64 << 10, f"read_frame allocated {peak} bytes for a refused header"
    finally:
        a.close()
        b.close()


def test_lengths_beyond_the_wire_format_cannot_be_sent_or_read() -> None:
    """The wire carries 32-bit lengths: 2**32, 2**63 or 2**64 - 1 cannot even be
    encoded, and a counted array claiming 2**32 - 1 entries (32 GiB) is refused
    from its count alone."""
    for n in (HARD_MAX_PAYLOAD + 1, 2**32, 2**63, 2**64 - 1):
        with pytest.raises(FrameTooLarge):
            encode_frame(MsgType.BLOCK, 1, payload_len=n)
    with pytest.raises(FrameTooLarge):
        encode_frame(MsgType.GET, 1, b"x" * (HARD_MAX_META + 1))
    huge_count = Writer().u32(2**32 - 1).getvalue()
    tracemalloc.start()
    try:
        with pytest.raises(FrameTooLarge):
            Reader(huge_count).u64s(MAX_SUMS)
        with pytest.raises(FrameTooLarge):  # a BLOCK reply claiming 4 G checksums
            BlockReply.decode(Writer().u8(0).u32(1 << 20).u32(CHUNK).text("t").raw(huge_count).getvalue())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 10
    with pytest.raises(ProtocolError):  # a count within the limit, but without the bytes behind it
        Reader(Writer().u32(MAX_SUMS).getvalue()).u64s(MAX_SUMS)


class _Trickle:
    """A socket stand-in (unit test of the reassembly logic) that hands out the
    stream in the planned piece sizes, then reports EOF."""

    def __init__(self, data: bytes, pieces: list[int]) -> None:
        self.data, self.pos, self.pieces = data, 0, list(pieces)

    def gettimeout(self) -> float:
        return 1.0

    def recv_into(self, view: memoryview, nbytes: int = 0, flags: int = 0) -> int:
        want = min(len(view), nbytes or len(view), self.pieces.pop(0) if self.pieces else len(self.data))
        chunk = self.data[self.pos : self.pos + want]
        view[: len(chunk)] = chunk
        self.pos += len(chunk)
        return len(chunk)


frames_strategy = st.lists(
    st.tuples(st.sampled_from(sorted(MsgType)), st.integers(0, 2**64 - 1), st.binary(max_size=300), U16),
    min_size=1, max_size=8)


@fuzz(200)
@given(frames=frames_strategy, pieces=st.lists(st.integers(1, 97), max_size=60))
def test_frames_cut_at_any_byte_reassemble_exactly(frames: list[tuple[MsgType, int, bytes, int]],
                                                    pieces: list[int]) -> None:
    stream = b"".join(encode_frame(t, r, m, flags=f) for t, r, m, f in frames)
    sock = _Trickle(stream, pieces)
    for msg_type, req_id, meta, flags in frames:
        header, got = _io.read_frame(sock, Limits(max_payload=0))  # type: ignore[arg-type]
        assert (header.type, header.req_id, header.flags, got) == (msg_type, req_id, flags, meta)
    with pytest.raises(PeerUnavailable):
        _io.read_frame(sock, Limits(max_payload=0))  # type: ignore[arg-type]


# == metadata codecs =====================================================================

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
              st.text(max_size=20)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=8)
origin_fields = {"store_id": st.one_of(st.text(max_size=20), json_values),
                 "url": st.one_of(st.text(max_size=40), json_values),
                 "size": st.one_of(st.integers(-5, 2**64), json_values),
                 "block_size": st.one_of(st.integers(-5, 2**40), json_values),
                 "index": st.one_of(st.integers(-5, 2**63), json_values)}
origin_json = st.one_of(
    st.fixed_dictionaries(origin_fields, optional={
        "etag": st.one_of(st.none(), st.text(max_size=10), json_values),
        "version_id": st.one_of(st.none(), st.text(max_size=10)),
        "mtime": st.one_of(st.none(), st.floats(allow_nan=True), st.integers(), st.text(max_size=3)),
        "evil": json_values}),
    json_values)


@fuzz(300)
@given(raw=origin_json)
def test_origin_json_decodes_to_typed_in_range_fields_or_a_protocol_error(raw: Any) -> None:
    data = json.dumps(raw).encode()
    try:
        origin = Origin.decode(data)
    except ProtocolError:
        return
    assert isinstance(raw, dict) and set(raw) <= set(Origin.__dataclass_fields__)
    assert isinstance(origin.store_id, str) and isinstance(origin.url, str)
    for name in ("size", "block_size", "index"):
        value = getattr(origin, name)
        assert type(value) is int and value == raw[name]
    assert origin.size >= 0 and origin.block_size > 0 and origin.index >= 0
    assert origin.etag is None or isinstance(origin.etag, str)


def test_deeply_nested_origin_json_is_a_protocol_error() -> None:
    for data in (b"[" * 8000, b'{"a":' * 1500 + b"1" + b"}" * 1500):
        with pytest.raises(ProtocolError):
            Origin.decode(data)


texts = st.one_of(st.text(max_size=40), st.text(min_size=MAX_KEY - 2, max_size=MAX_KEY + 40, alphabet="ké/."))


@fuzz(300)
@given(length=U32, key=texts, token=texts, origin=st.one_of(st.none(), origin_json),
       slot=st.one_of(st.none(), st.tuples(U64, U32, U32)), flags=U16, tail=st.binary(max_size=3))
def test_get_metadata_decodes_within_its_limits_or_raises_protocol_error(
        length: int, key: str, token: str, origin: Any, slot: Any, flags: int, tail: bytes) -> None:
    """GET metadata built field by field (valid framing, any contents, any flags):
    the decoder yields a request within every limit, or a ProtocolError."""
    w = Writer().u32(length)
    w.raw(struct.pack("<H", len(key.encode())) + key.encode()[:0xFFFF])
    w.raw(struct.pack("<H", len(token.encode())) + token.encode())
    if origin is not None:
        body = json.dumps(origin).encode()[:0xFFFF]
        w.raw(struct.pack("<H", len(body)) + body)
    if slot is not None:
        w.u64(slot[0]).u32(slot[1]).u32(slot[2])
    meta = w.getvalue() + tail
    try:
        request, got_slot = decode_get(meta, flags)
    except ProtocolError:
        return
    assert not flags & ~(FLAG_FILL | FLAG_RDMA)
    assert request.key and len(request.key.encode()) <= MAX_KEY and len(request.token.encode()) <= MAX_TOKEN
    assert 0 <= request.length < 2**32
    assert (request.origin is not None) == bool(flags & FLAG_FILL)
    assert (got_slot is not None) == bool(flags & FLAG_RDMA)
    # What decodes re-encodes to itself, and (origin JSON aside, whose spacing is free)
    # to the very same bytes: nothing was guessed or dropped.
    assert decode_get(*encode_get(request, got_slot)) == (request, got_slot)
    if not flags & FLAG_FILL:
        assert encode_get(request, got_slot) == (meta, flags)


@fuzz(300)
@given(status=st.integers(0, 255), length=U32, chunk=U32, token=texts,
       sums=st.lists(U64, max_size=40), detail=st.text(max_size=50))
def test_block_replies_decode_consistently_or_raise_protocol_error(
        status: int, length: int, chunk: int, token: str, sums: list[int], detail: str) -> None:
    meta = (Writer().u8(status).u32(length).u32(chunk).raw(struct.pack("<H", len(token.encode())) + token.encode())
            .u64s(sums).text(detail).getvalue())
    try:
        reply = BlockReply.decode(meta)
    except ProtocolError:
        return
    assert reply.length <= HARD_MAX_PAYLOAD and len(reply.token.encode()) <= MAX_TOKEN
    if reply.status is Status.FILLED and reply.length:
        assert reply.chunk >= MIN_CHUNK and len(reply.sums) == -(-reply.length // reply.chunk)
    assert BlockReply.decode(reply.encode()) == reply


# == a real server fed fuzzed byte streams ================================================

BLOCKS = {"k0": b"zero " * 600, "k1": bytes(range(256)) * 274}  # 3000 and 70144 bytes
MAX_BLOCK = 1 << 20


@pytest.fixture(scope="module")
def server() -> Iterator[BlockServer]:
    provider = MemoryProvider()
    for key, data in BLOCKS.items():
        provider.put(key, data, token="v1")
    srv = BlockServer(provider, SECRET, config=ServerConfig(max_block=MAX_BLOCK, handshake_timeout=2.0))
    srv.start()
    yield srv
    srv.close()


def _expected_block(key: str, token: str, length: int, rdma: bool) -> tuple[Status, bytes]:
    if length > MAX_BLOCK or rdma:  # the server offers no RDMA: a slot is a bad request
        return Status.REJECTED, b""
    data = BLOCKS.get(key)
    if data is None:
        return Status.NOT_FOUND, b""
    if token != "v1" or length != len(data):
        return Status.STALE, b""
    return Status.FILLED, data


good_actions = st.one_of(
    st.tuples(st.just("ping"), st.binary(max_size=2 * MAX_TEXT)),
    st.tuples(st.just("stats")),
    st.tuples(st.just("rdma"), st.binary(max_size=64)),
    # a block that exists, asked for exactly (FILLED), with or without a fill origin
    st.sampled_from(sorted(BLOCKS)).flatmap(
        lambda k: st.tuples(st.just("get"), st.just(k), st.just("v1"), st.just(len(BLOCKS[k])), st.just(False),
                            st.booleans())),
    st.tuples(st.just("get"), st.sampled_from(["k0", "k1", "missing", "../../etc/passwd", "/etc/passwd", "é\u2028"]),
              st.sampled_from(["v1", "v2", ""]),
              st.one_of(st.sampled_from([len(v) for v in BLOCKS.values()] + [0, MAX_BLOCK + 1]), U32),
              st.booleans(), st.booleans()),
)
bad_actions = st.one_of(  # each makes the server send ERROR and close; all its bytes are read first
    st.tuples(st.just("junk"), st.binary(min_size=32, max_size=32)),
    st.tuples(st.just("magic"), st.binary(min_size=4, max_size=4).filter(lambda m: m != MAGIC)),
    st.tuples(st.just("version"), st.integers(0, 255).filter(lambda v: v != VERSION)),
    st.tuples(st.just("type"), st.integers(0, 255).filter(lambda t: t not in KNOWN_TYPES)),
    st.tuples(st.just("meta_len"), st.integers(HARD_MAX_META + 1, 2**32 - 1)),
    st.tuples(st.just("payload"), st.integers(1, 2**32 - 1)),
    st.tuples(st.just("meta_sum"), st.binary(min_size=1, max_size=100)),
    st.tuples(st.just("server_frame"), st.sampled_from(sorted(set(MsgType) - {MsgType.GET, MsgType.PING, MsgType.STATS,
                                                                             MsgType.RDMA_CONNECT}))),
    st.tuples(st.just("get_meta"), st.binary(max_size=120), st.integers(0, 7)),
)


def _bad_bytes(action: tuple[Any, ...], req_id: int) -> bytes:
    kind = action[0]
    if kind == "junk":
        return action[1] if action[1][:4] != MAGIC else b"JUNK" + action[1][4:]
    if kind == "magic":
        return _header(MsgType.PING, 0, req_id, 0, 0, magic=action[1])
    if kind == "version":
        return _header(MsgType.PING, 0, req_id, 0, 0, version=action[1])
    if kind == "type":
        return _header(action[1], 0, req_id, 0, 0)
    if kind == "meta_len":
        return _header(MsgType.GET, 0, req_id, action[1], 0)
    if kind == "payload":  # clients never send payloads
        return _header(MsgType.GET, 0, req_id, 0, action[1])
    if kind == "meta_sum":
        meta = action[1]
        return _header(MsgType.PING, 0, req_id, len(meta), 0, xxhash.xxh32_intdigest(meta) ^ 1) + meta
    if kind == "server_frame":
        return _frame(action[1], req_id, b"")
    raise AssertionError(kind)


def _read_replies(sock: socket.socket, until: set[int] | None) -> list[tuple[Any, bytes, bytes]]:
    """Frames (header, metadata, payload) until every id in ``until`` has an answer,
    or (``until`` None) until the server closes the connection."""
    got: list[tuple[Any, bytes, bytes]] = []
    seen: set[int] = set()
    while until is None or not until <= seen:
        try:
            header, meta = _io.read_frame(sock, Limits(max_payload=MAX_BLOCK))
            payload = bytearray(header.payload_len)
            if header.payload_len:
                _io.recv_into_exact(sock, memoryview(payload))
        except PeerUnavailable:  # closed (a block being sent when it hung up is cut short: dropped)
            assert until is None, f"server closed with answers missing for {sorted(until - seen)}"
            return got
        got.append((header, meta, bytes(payload)))
        seen.add(header.req_id)
    return got


def _check_answer(expect: dict[int, tuple[Any, ...]], header: Any, meta: bytes, payload: bytes) -> None:
    assert header.req_id in expect, f"answer {header.type.name} to a request never sent ({header.req_id})"
    action = expect.pop(header.req_id)
    if action[0] == "ping":
        assert header.type is MsgType.PONG and meta == action[1][:MAX_TEXT] and not payload
    elif action[0] == "stats":
        assert header.type is MsgType.STATS_REPLY
        stats = json.loads(meta)
        assert set(stats) == {"server", "provider", "node"}
        assert SECRET.decode() not in meta.decode()
    elif action[0] == "rdma":
        assert header.type is MsgType.RDMA_REJECT
    else:
        _, key, token, length, rdma, _fill = action
        assert header.type is MsgType.BLOCK
        reply = BlockReply.decode(meta)
        status, data = _expected_block(key, token, length, rdma)
        assert reply.status is status, (action, reply)
        assert payload == data and reply.length == len(data)


def _get_frame(req_id: int, action: tuple[Any, ...]) -> bytes:
    _, key, token, length, rdma, fill = action
    origin = Origin(store_id="s", url="s3://b/k", size=length, block_size=4096, index=0) if fill else None
    meta, flags = encode_get(BlockRequest(key, token, length, origin), RdmaSlot(4096, 1, length) if rdma else None)
    return encode_frame(MsgType.GET, req_id, meta, flags=flags)


def _server_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name.startswith("shoal.transport") and r.levelno >= logging.ERROR]


def _wait_for_idle(server: BlockServer) -> None:
    deadline = time.monotonic() + 10
    while server.metrics.active_connections and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.metrics.active_connections == 0


def test_server_answers_fuzzed_frame_sequences_exactly_then_refuses_the_first_bad_frame(
        server: BlockServer, caplog: pytest.LogCaptureFixture) -> None:
    """After authentication: a fuzzed sequence of well-formed requests, sent cut
    into random pieces, gets exactly one correct answer per request (content
    checked against the provider); a sequence that ends in a malformed frame
    gets an ERROR frame and the connection closed, and the server stays healthy."""
    counts = {"bad": 0}
    caplog.set_level(logging.WARNING, logger="shoal.transport")

    @fuzz(70)
    @given(actions=st.lists(good_actions, max_size=10), bad=st.one_of(st.none(), st.none(), bad_actions),
           cuts=st.lists(st.integers(1, 400), max_size=10))
    def run(actions: list[tuple[Any, ...]], bad: tuple[Any, ...] | None, cuts: list[int]) -> None:
        expect: dict[int, tuple[Any, ...]] = {}
        stream = bytearray()
        for req_id, action in enumerate(actions, start=1):
            expect[req_id] = action
            if action[0] == "ping":
                stream += encode_frame(MsgType.PING, req_id, action[1])
            elif action[0] == "stats":
                stream += encode_frame(MsgType.STATS, req_id)
            elif action[0] == "rdma":
                stream += encode_frame(MsgType.RDMA_CONNECT, req_id, action[1])
            else:
                stream += _get_frame(req_id, action)
        if bad is not None and bad[0] == "get_meta":
            stream += encode_frame(MsgType.GET, 99, bad[1], flags=bad[2])
            try:  # random bytes that happen to be a valid GET are a request, not an error
                request, slot = decode_get(bad[1], bad[2])
            except ProtocolError:
                pass
            else:
                expect[99] = ("get", request.key, request.token, request.length, slot is not None, False)
                bad = None
        elif bad is not None:
            stream += _bad_bytes(bad, 99)
        sock = raw_handshake(server.address)
        sock.settimeout(10)
        try:
            view, pos = bytes(stream), 0
            for cut in cuts + [len(view)]:
                sock.sendall(view[pos : pos + cut])
                pos += cut
                if pos >= len(view):
                    break
            if bad is None:
                for header, meta, payload in _read_replies(sock, set(expect)):
                    _check_answer(expect, header, meta, payload)
                assert not expect
            else:
                counts["bad"] += 1
                replies = _read_replies(sock, None)
                errors = [h for h, _, _ in replies if h.type is MsgType.ERROR]
                assert len(errors) == 1
                for header, meta, payload in replies:
                    if header.type is not MsgType.ERROR:
                        _check_answer(expect, header, meta, payload)
        finally:
            sock.close()

    before = server.metrics.protocol_errors
    run()
    _wait_for_idle(server)
    assert server.metrics.protocol_errors - before == counts["bad"]
    assert _server_errors(caplog) == []  # no "unexpected error" anywhere: every failure was anticipated
    _still_serving(server)


def _get_frame_meta(action: tuple[Any, ...]) -> bytes:
    _, key, token, length, rdma, _ = action
    return encode_get(BlockRequest(key, token, length), RdmaSlot(4096, 1, length) if rdma else None)[0]


def _still_serving(server: BlockServer) -> None:
    client = TcpTransport(SECRET)
    try:
        buffer = memoryview(bytearray(len(BLOCKS["k1"])))
        assert client.fetch(server.address, [BlockRequest("k1", "v1", len(BLOCKS["k1"]))], [buffer],
                            timeout=10) == [Outcome.FILLED]
        assert bytes(buffer) == BLOCKS["k1"]
    finally:
        client.close()


hello_metas = st.one_of(
    st.binary(max_size=120),
    st.builds(lambda nonce, caps, node: Writer().raw(nonce).u32(caps).u32(MAX_BLOCK).u32(0).text(node, 256).getvalue(),
              st.binary(min_size=32, max_size=32), U32, st.text(max_size=30)))


def test_before_authentication_the_server_sends_only_challenge_or_error(
        server: BlockServer, caplog: pytest.LogCaptureFixture) -> None:
    """Fuzzed handshakes (any HELLO, any AUTH proof, requests in its place):
    nothing but CHALLENGE and ERROR frames ever comes back, never a block, a
    PONG or the server's stats, and the connection is closed."""
    caplog.set_level(logging.WARNING, logger="shoal.transport")

    @fuzz(50)
    @given(first=st.sampled_from([MsgType.HELLO, MsgType.HELLO, MsgType.GET, MsgType.PING, MsgType.STATS,
                                  MsgType.AUTH]),
           hello=hello_metas,
           second=st.sampled_from([MsgType.AUTH, MsgType.AUTH, MsgType.GET, MsgType.STATS, MsgType.HELLO]),
           proof=st.one_of(st.binary(max_size=64), st.binary(min_size=32, max_size=32)))
    def run(first: MsgType, hello: bytes, second: MsgType, proof: bytes) -> None:
        sock = raw_connect(server.address)
        sock.settimeout(10)
        try:
            get_k0 = _get_frame_meta(("get", "k0", "v1", len(BLOCKS["k0"]), False, False))
            meta = hello if first is MsgType.HELLO else get_k0
            try:
                sock.sendall(encode_frame(first, 1, meta))
                sock.sendall(encode_frame(second, 2, proof if second is MsgType.AUTH else _get_frame_meta(
                    ("get", "k0", "v1", len(BLOCKS["k0"]), False, False))))
            except OSError:
                pass  # the server may already have refused the first frame
            received = bytearray()
            try:
                while chunk := sock.recv(65536):
                    received += chunk
            except ConnectionResetError:
                pass
            assert BLOCKS["k0"][:64] not in received
            types = _frame_types(bytes(received))  # whatever arrived parses as frames of the two allowed types
            assert set(types) <= {MsgType.CHALLENGE, MsgType.ERROR}, types
        finally:
            sock.close()

    requests = server.metrics.requests
    run()
    _wait_for_idle(server)
    assert server.metrics.requests == requests
    assert _server_errors(caplog) == []
    _still_serving(server)


def test_hostile_lengths_cost_the_server_no_memory(server: BlockServer) -> None:
    """Headers claiming 4 GiB of metadata or payload, before and after
    authentication: each is refused unread; the server's Python allocations
    while handling forty of them stay under 2 MiB."""
    tracemalloc.start()
    try:
        for n in range(40):
            sock = raw_handshake(server.address) if n % 2 else raw_connect(server.address)
            sock.settimeout(10)
            huge = 2**32 - 1 - n
            sock.sendall(_header(MsgType.GET if n % 4 < 2 else MsgType.HELLO, 0, 1, huge if n % 3 else 0,
                                 0 if n % 3 else huge))
            answer = b""
            try:
                while chunk := sock.recv(65536):
                    answer += chunk
            except ConnectionResetError:
                pass
            sock.close()
            assert _frame_types(answer) == [MsgType.ERROR]
        _wait_for_idle(server)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 << 20, f"peak {peak} bytes"


def _frame_types(stream: bytes) -> list[MsgType]:
    """The types of the frames in ``stream`` (each must parse; a cut-off last one is ignored)."""
    types = []
    while len(stream) >= 32:
        header = decode_header(stream[:32])
        types.append(header.type)
        stream = stream[32 + header.meta_len + header.payload_len:]
    return types


def test_a_deeply_nested_origin_is_a_protocol_error_on_the_server(server: BlockServer,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="shoal.transport")
    before = server.metrics.protocol_errors
    sock = raw_handshake(server.address)
    sock.settimeout(10)
    try:
        meta = Writer().u32(10).text("k0").text("v1").blob(b"[" * 8000, 8 << 10).getvalue()
        sock.sendall(encode_frame(MsgType.GET, 5, meta, flags=FLAG_FILL))
        replies = _read_replies(sock, None)
    finally:
        sock.close()
    _wait_for_idle(server)
    assert [h.type for h, _, _ in replies] == [MsgType.ERROR]
    assert server.metrics.protocol_errors == before + 1 and _server_errors(caplog) == []
