"""Remembered listings over the peer protocol (``LISTING`` / ``LISTING_REPLY``):
a real server over a real block cache, a real TCP client, malformed frames, and
the checks a client applies to a listing it receives.  With worker processes
and sessions: ``test_peer_cache.py``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_transport_helpers import SECRET, raw_handshake

from shoal.cache import BlockReader, CacheConfig
from shoal.cache.source import ObjectVersion, versions_from_entries
from shoal.transport import BlockServer, CacheProvider, TcpTransport
from shoal.transport import _io
from shoal.transport.errors import PeerUnavailable
from shoal.transport.messages import LISTING_GET, MAX_LISTING, decode_listing, encode_listing
from shoal.transport.protocol import Limits, MsgType, encode_frame
from shoal.transport.providers import MemoryProvider

ENTRIES = [{"url": "s3://b/t/part-0.parquet", "size": 10, "etag": '"e0"', "version_id": None, "mtime": 1.5},
           {"url": "s3://b/t/part-1.parquet", "size": 20, "etag": '"e1"', "version_id": None, "mtime": None}]


@pytest.fixture
def listing_server(tmp_path: Path) -> Iterator[BlockServer]:
    reader = BlockReader(CacheConfig(directory=tmp_path / "cache", block_size=64 << 10))
    server = BlockServer(CacheProvider(reader.cache), SECRET)
    server.start()
    yield server
    server.close()
    reader.close()


@pytest.fixture
def client() -> Iterator[TcpTransport]:
    transport = TcpTransport(SECRET)
    yield transport
    transport.close()


def test_a_listing_given_to_a_server_is_answered_back(listing_server: BlockServer, client: TcpTransport) -> None:
    address = listing_server.address
    assert client.remote_listing(address, "k" * 32) is None  # nothing remembered yet
    assert client.share_listing(address, "k" * 32, json.dumps(ENTRIES).encode())
    assert json.loads(client.remote_listing(address, "k" * 32) or b"") == ENTRIES
    assert client.remote_listing(address, "other") is None
    stats = listing_server.metrics.snapshot()
    assert stats["listings_stored"] == 1 and stats["listings_served"] == 1
    # Too long for one frame: not shared (the client lists the store, as without peers).
    long = json.dumps(ENTRIES * (MAX_LISTING // 100)).encode()
    assert len(long) > MAX_LISTING and not client.share_listing(address, "k" * 32, long)
    assert json.loads(client.remote_listing(address, "k" * 32) or b"") == ENTRIES


def test_a_server_that_keeps_no_listings_is_never_asked() -> None:
    server = BlockServer(MemoryProvider(), SECRET)
    server.start()
    transport = TcpTransport(SECRET)
    try:
        assert transport.remote_listing(server.address, "k") is None
        assert not transport.share_listing(server.address, "k", b"[]")
        assert server.metrics.protocol_errors == 0  # no LISTING frame was sent
    finally:
        transport.close()
        server.close()


def _error_then_closed(server: BlockServer, meta: bytes) -> None:
    sock = raw_handshake(server.address)
    sock.settimeout(10)
    try:
        sock.sendall(encode_frame(MsgType.LISTING, 7, meta))
        header, _ = _io.read_frame(sock, Limits())
        assert header.type is MsgType.ERROR
        with pytest.raises(PeerUnavailable):
            _io.read_frame(sock, Limits())
    finally:
        sock.close()


@pytest.mark.parametrize("body", [b"{not json", b'{"url": "s3://b/x"}', b"[1, 2]", b'"text"'])
def test_a_listing_that_is_not_a_list_of_objects_is_refused(listing_server: BlockServer, client: TcpTransport,
                                                            body: bytes) -> None:
    _error_then_closed(listing_server, encode_listing(1, "k", body))
    assert client.remote_listing(listing_server.address, "k") is None  # nothing was kept; still serving


@settings(max_examples=60, deadline=None)
@given(meta=st.binary(max_size=200))
def test_random_listing_metadata_is_an_answer_or_a_clean_refusal(tmp_path_factory: pytest.TempPathFactory,
                                                                 meta: bytes) -> None:
    reader = BlockReader(CacheConfig(directory=tmp_path_factory.mktemp("fuzz") / "cache", block_size=64 << 10))
    server = BlockServer(CacheProvider(reader.cache), SECRET)
    server.start()
    try:
        try:
            op, key, body = decode_listing(meta)
            valid = op == LISTING_GET or (isinstance(_loads(body), list)
                                          and all(isinstance(e, dict) for e in _loads(body)))
        except Exception:  # noqa: BLE001 - malformed: the server must refuse it the same way
            valid = False
        if not valid:
            _error_then_closed(server, meta)
        else:
            sock = raw_handshake(server.address)
            sock.settimeout(10)
            try:
                sock.sendall(encode_frame(MsgType.LISTING, 9, meta))
                header, _ = _io.read_frame(sock, Limits())
                assert header.type is MsgType.LISTING_REPLY and header.req_id == 9
            finally:
                sock.close()
        transport = TcpTransport(SECRET)
        try:
            assert transport.share_listing(server.address, "alive", b"[]")  # the server still serves
        finally:
            transport.close()
    finally:
        server.close()
        reader.close()


def _loads(body: bytes) -> object:
    try:
        return json.loads(body)
    except ValueError:
        return None


# -- what a client accepts ------------------------------------------------------------------


def test_a_received_listing_is_used_only_if_every_entry_is_well_formed_and_matches() -> None:
    pattern = "s3://b/t/*.parquet"
    assert versions_from_entries(ENTRIES, pattern) == [ObjectVersion(**e) for e in ENTRIES]
    assert versions_from_entries([], pattern) == []
    bad = [
        [{**ENTRIES[0], "url": "s3://other/secret.parquet"}],  # not an object of this pattern
        [{**ENTRIES[0], "url": "s3://b/t/sub/part.parquet"}],  # * does not cross "/"
        [{**ENTRIES[0], "url": "file://b/t/part-0.parquet"}],  # another scheme
        [{**ENTRIES[0], "size": -1}], [{**ENTRIES[0], "size": "10"}], [{**ENTRIES[0], "size": True}],
        [{**ENTRIES[0], "etag": 5}], [{**ENTRIES[0], "mtime": "yesterday"}],
        [{**ENTRIES[0], "extra": 1}], [{"size": 1}], ["s3://b/t/part-0.parquet"], {"url": "x"}, None,
    ]
    for entries in bad:
        assert versions_from_entries(entries, pattern) is None, entries
    # A directory (a table's prefix) takes everything under it; ** crosses levels.
    deep = [{"url": "s3://b/t/year=2024/part.parquet", "size": 1}]
    assert versions_from_entries(deep, "s3://b/t/") is not None
    assert versions_from_entries(deep, "s3://b/t") is not None
    assert versions_from_entries(deep, "s3://b/t/**/*.parquet") is not None
    assert versions_from_entries(deep, "s3://b/tt/") is None
