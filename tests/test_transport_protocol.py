"""Frames, codecs, checksums, secrets, addresses, membership: the pieces under the transports."""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import shoal.transport as transport
from shoal.transport import (
    AuthenticationFailed, BlockRequest, FrameTooLarge, Membership, Origin, PeerAddress, PeerUnavailable,
    ProtocolError, TransportConfigError, TransportError, TransportTimeout, load_secret, make_transport,
    transport_mode,
)
from shoal.transport.base import LatencyHistogram
from shoal.transport.messages import BlockReply, Hello, RdmaSlot, decode_get, encode_get
from shoal.transport.protocol import (
    HEADER, Limits, MsgType, Reader, Status, Writer, auth_mac, check_meta, chunk_sums, decode_header,
    encode_frame, verify_chunks,
)
from shoal.transport.rdma.verbs import QPEndpoint


def test_public_surface_is_importable() -> None:
    for name in transport.__all__:
        assert getattr(transport, name) is not None
    assert sorted(transport.__all__) == transport.__all__


def test_errors_subclass_the_builtins() -> None:
    assert issubclass(TransportError, OSError)
    assert issubclass(PeerUnavailable, ConnectionError)
    assert issubclass(TransportTimeout, TimeoutError)
    assert issubclass(AuthenticationFailed, PermissionError)
    assert issubclass(ProtocolError, ValueError) and issubclass(FrameTooLarge, ProtocolError)
    assert issubclass(TransportConfigError, ValueError)


# -- frames -------------------------------------------------------------------------


def test_frame_round_trip() -> None:
    frame = encode_frame(MsgType.GET, 42, b"meta", payload_len=7, flags=3)
    header = decode_header(frame[:32], Limits(max_payload=7))
    assert (header.type, header.req_id, header.meta_len, header.payload_len, header.flags) == (
        MsgType.GET, 42, 4, 7, 3)
    check_meta(header, frame[32:])
    with pytest.raises(ProtocolError):
        check_meta(header, b"metA")


@pytest.mark.parametrize("position", range(32))
def test_any_header_byte_flip_is_detected(position: int) -> None:
    frame = bytearray(encode_frame(MsgType.PING, 1, b"x"))
    frame[position] ^= 0x40
    with pytest.raises(ProtocolError):
        decode_header(frame[:32])


def test_length_limits() -> None:
    with pytest.raises(FrameTooLarge):
        decode_header(encode_frame(MsgType.BLOCK, 1, payload_len=1 << 20)[:32], Limits(max_payload=1 << 20 - 1))
    with pytest.raises(FrameTooLarge):
        decode_header(encode_frame(MsgType.BLOCK, 1, b"x" * 100)[:32], Limits(max_meta=99))
    with pytest.raises(FrameTooLarge):
        encode_frame(MsgType.BLOCK, 1, payload_len=1 << 40)
    with pytest.raises(ValueError):
        Limits(max_payload=1 << 40)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=32, max_size=32))
def test_random_headers_only_raise_protocol_errors(data: bytes) -> None:
    try:
        decode_header(data)
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.integers(0, 7))
def test_random_metadata_only_raises_protocol_errors(data: bytes, flags: int) -> None:
    parsers = [BlockReply.decode, Hello.decode, QPEndpoint.decode, Origin.decode, lambda d: decode_get(d, flags)]
    for parse in parsers:
        try:
            parse(data)
        except ProtocolError:
            pass


def test_codecs_round_trip() -> None:
    origin = Origin(store_id="http://s3:9000", url="s3://b/k", size=10, block_size=4096, index=0, etag='"e"',
                    version_id=None, mtime=1.5)
    request = BlockRequest("key:0", "e:e", 10, origin)
    meta, flags = encode_get(request, RdmaSlot(0x1000, 77, 4096))
    assert decode_get(meta, flags) == (request, RdmaSlot(0x1000, 77, 4096))
    reply = BlockReply(Status.FILLED, 70000, 65536, "tok", [1, 2], "")
    assert BlockReply.decode(reply.encode()) == reply
    with pytest.raises(ProtocolError):  # checksum table does not cover the length
        BlockReply.decode(BlockReply(Status.FILLED, 70000, 65536, "tok", [1]).encode())
    hello = Hello(b"n" * 32, 1, 2, 3, "node")
    assert Hello.decode(hello.encode()) == hello
    endpoint = QPEndpoint(5, 7, 1, bytes(range(16)), 5)
    assert QPEndpoint.decode(endpoint.encode()) == endpoint
    with pytest.raises(ProtocolError):
        decode_get(encode_get(BlockRequest("", "t", 1))[0], 0)


@pytest.mark.parametrize("raw", [b"[]", b'{"store_id": 1}', b"\xff", b'{"store_id":"s","url":"u","size":true,'
                                 b'"block_size":4096,"index":0}', b'{"store_id":"s","url":"u","size":1,'
                                 b'"block_size":4096,"index":0,"evil":1}'])
def test_origin_decoding_is_strict(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        Origin.decode(raw)


def test_reader_writer_bounds() -> None:
    data = Writer().u8(1).u16(2).u32(3).u64(4).text("hé").u64s([5, 6]).getvalue()
    r = Reader(data)
    assert (r.u8(), r.u16(), r.u32(), r.u64(), r.text(), r.u64s(10)) == (1, 2, 3, 4, "hé", [5, 6])
    r.done()
    with pytest.raises(ProtocolError):
        Reader(data).u64s(0)  # the count is checked before anything is read
    with pytest.raises(ProtocolError):
        Reader(b"\x05\x00ab").blob()
    with pytest.raises(ProtocolError):
        Reader(b"\x01").done()


# -- checksums and authentication -----------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(st.binary(min_size=1, max_size=200_000), st.data())
def test_checksums_catch_any_flip(data: bytes, draw: st.DataObject) -> None:
    sums = chunk_sums(data, 4096)
    assert verify_chunks(data, 4096, sums)
    position = draw.draw(st.integers(0, len(data) - 1))
    flipped = bytearray(data)
    flipped[position] ^= 1
    assert not verify_chunks(flipped, 4096, sums)
    assert not verify_chunks(data + b"x", 4096, sums)


def test_auth_macs_differ_by_label_and_transcript() -> None:
    a = auth_mac(b"s" * 16, b"client", [b"x", b"y"])
    assert a != auth_mac(b"s" * 16, b"server", [b"x", b"y"])
    assert a != auth_mac(b"s" * 16, b"client", [b"xy", b""])  # parts are length-prefixed
    assert a != auth_mac(b"t" * 16, b"client", [b"x", b"y"])


def test_load_secret(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(TransportConfigError, match="SHOAL_CLUSTER_SECRET_FILE"):
        load_secret(None, {})
    short = tmp_path / "short"
    short.write_bytes(b"tiny\n")
    with pytest.raises(TransportConfigError, match="shorter"):
        load_secret(short)
    good = tmp_path / "good"
    good.write_bytes(b"0123456789abcdef0123\n")
    good.chmod(0o600)
    assert load_secret(None, {"SHOAL_CLUSTER_SECRET_FILE": str(good)}) == b"0123456789abcdef0123"
    good.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="shoal.transport.base"):
        load_secret(good)
    assert "readable by others" in caplog.text
    with pytest.raises(TransportConfigError, match="cannot read"):
        load_secret(tmp_path / "missing")


def test_modes_and_registry() -> None:
    assert transport_mode(None, {}) == "auto"
    assert transport_mode(None, {"SHOAL_TRANSPORT": "TCP"}) == "tcp"
    assert transport_mode("rdma", {"SHOAL_TRANSPORT": "tcp"}) == "rdma"
    with pytest.raises(TransportConfigError):
        transport_mode("udp", {})
    with pytest.raises(TransportConfigError):
        make_transport("carrier-pigeon")
    client = make_transport("tcp", secret=b"s" * 16)
    assert client.name == "tcp"
    client.close()


# -- addresses and membership ----------------------------------------------------------


def test_peer_addresses() -> None:
    assert PeerAddress.parse("h:1") == PeerAddress("h", 1)
    assert str(PeerAddress.parse("[::1]:80")) == "[::1]:80"
    assert PeerAddress.parse(("10.0.0.1", 9)) == PeerAddress("10.0.0.1", 9)
    assert PeerAddress.parse_list("a:1, b:2,a:1") == [PeerAddress("a", 1), PeerAddress("b", 2)]
    for bad in ("nohost", "h:", ":1", "h:99999", "h:x"):
        with pytest.raises(TransportConfigError):
            PeerAddress.parse(bad)


def test_rendezvous_owner_is_stable_balanced_and_moves_minimally() -> None:
    peers = ["10.0.0.1:7000", "10.0.0.2:7000", "10.0.0.3:7000"]
    m = Membership(peers)
    keys = [f"object:{i}" for i in range(3000)]
    owners = {k: m.owner(k) for k in keys}
    assert Membership(list(reversed(peers))).owner(keys[0]) == owners[keys[0]]  # order does not matter
    counts = {p: sum(1 for o in owners.values() if str(o) == p) for p in peers}
    assert all(800 < c < 1200 for c in counts.values()), counts
    dead = PeerAddress.parse(peers[0])
    m.mark_down(dead)
    moved = [k for k in keys if m.owner(k) != owners[k]]
    assert moved and all(owners[k] == dead for k in moved)  # only the dead peer's keys move
    m.mark_up(dead)
    assert all(m.owner(k) == owners[k] for k in keys)
    m2 = Membership(peers, down_for=0.0)
    m2.mark_down(dead)
    assert dead in m2.live()  # expired immediately
    assert Membership([]).owner("k") is None
    assert Membership(peers, self_address=peers[1]).is_self(PeerAddress.parse(peers[1]))


def test_latency_histogram() -> None:
    h = LatencyHistogram()
    for _ in range(98):
        h.add(0.0001)
    h.add(0.5)
    h.add(0.5)
    assert h.quantile(0.5) <= 0.000128
    assert h.quantile(0.995) >= 0.5
    assert h.snapshot()["count"] == 100


def test_pyverbs_enum_shim_handles_old_and_new_module_names(monkeypatch: pytest.MonkeyPatch) -> None:
    import enum
    import sys
    import types

    from shoal.transport.rdma import pyverbs_backend

    old = types.ModuleType("pyverbs.enums")
    old.IBV_QPT_RC = 2  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pyverbs", types.ModuleType("pyverbs"))
    monkeypatch.setitem(sys.modules, "pyverbs.enums", old)
    pyverbs_backend.const.cache_clear()
    assert pyverbs_backend.const("IBV_QPT_RC") == 2

    new = types.ModuleType("pyverbs.libibverbs_enums")
    new.ibv_qp_type = enum.IntEnum("ibv_qp_type", {"IBV_QPT_RC": 2, "IBV_QPT_UD": 4})  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pyverbs.enums", None)  # gone in rdma-core v59+
    monkeypatch.setitem(sys.modules, "pyverbs.libibverbs_enums", new)
    pyverbs_backend.const.cache_clear()
    assert pyverbs_backend.const("IBV_QPT_UD") == 4
    with pytest.raises(transport.RdmaUnavailable):
        pyverbs_backend.const("IBV_NOT_A_THING")
    pyverbs_backend.const.cache_clear()


def test_rdma_detection_never_raises() -> None:
    from shoal.transport.rdma import detect_backend
    from shoal.transport.rdma.pyverbs_backend import PyverbsBackend

    backend = detect_backend()  # None here: no pyverbs in the venv, no RDMA kernel support
    assert backend is None or backend.devices()
    assert isinstance(PyverbsBackend().devices(), list)
    assert HEADER.size == struct.calcsize("<4sBBHQIIII")
