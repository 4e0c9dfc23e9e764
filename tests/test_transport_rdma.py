"""RDMA: the fake verbs backend's semantics, the RDMA transport's handshake,
fallback and demotion (on the fake), and the real pyverbs path (marked ``rdma``)."""

from __future__ import annotations

import os
import threading
import time
from typing import Iterator

import pytest
from test_transport_helpers import MAX, SECRET, Harness

from shoal.transport import (
    BlockRequest, BlockServer, ClientConfig, MemoryProvider, Outcome, RdmaUnavailable, ServerConfig,
)
from shoal.transport.errors import RdmaError
from shoal.transport.rdma import Access, FakeFabric, FakeVerbs, QPState, RdmaServer, RdmaTransport, WCStatus
from shoal.transport.rdma import detect_backend
from shoal.transport.rdma.verbs import QPCaps


# -- the fake verbs backend ------------------------------------------------------------


class Pair:
    """Two fake devices with a connected RC QP pair and a registered region each."""

    def __init__(self, *, a_access: Access = Access.LOCAL_WRITE, b_access: Access = Access.LOCAL_WRITE | Access.REMOTE_WRITE,
                 qp_b_access: Access = Access.REMOTE_WRITE, caps: QPCaps = QPCaps(), size: int = 8192) -> None:
        self.fabric = FakeFabric(seed=1)
        verbs = FakeVerbs(self.fabric)
        self.a, self.b = verbs.open(), verbs.open()
        self.cq_a, self.cq_b = self.a.create_cq(64), self.b.create_cq(64)
        self.qp_a, self.qp_b = self.a.create_qp(self.cq_a, caps), self.b.create_qp(self.cq_b, caps)
        self.mr_a = self.a.reg_mr(bytearray(os.urandom(size)), a_access)
        self.mr_b = self.b.reg_mr(bytearray(size), b_access)
        self.qp_a.to_init(Access(0) | Access.REMOTE_READ)
        self.qp_b.to_init(qp_b_access)
        end_a, end_b = self.qp_a.local_endpoint(), self.qp_b.local_endpoint()
        self.qp_a.to_rtr(end_b)
        self.qp_b.to_rtr(end_a)
        self.qp_a.to_rts()
        self.qp_b.to_rts()

    def write(self, length: int = 4096, offset: int = 0, remote: int = 0, rkey: int | None = None,
              signaled: bool = True) -> list:
        self.qp_a.post_write(1, self.mr_a, offset, length, self.mr_b.addr + remote,
                             self.mr_b.rkey if rkey is None else rkey, signaled=signaled)
        return self.cq_a.poll(16)


def test_fake_write_moves_bytes_and_completes() -> None:
    p = Pair()
    [completion] = p.write(4096)
    assert completion.status is WCStatus.SUCCESS and completion.byte_len == 4096
    assert bytes(p.mr_b.view[:4096]) == bytes(p.mr_a.view[:4096])
    assert p.write(10, signaled=False) == []  # unsignaled success: no completion


def test_fake_qp_state_machine() -> None:
    fabric = FakeFabric()
    ctx = FakeVerbs(fabric).open()
    cq = ctx.create_cq(8)
    qp = ctx.create_qp(cq)
    mr = ctx.reg_mr(bytearray(64), Access.LOCAL_WRITE)
    assert qp.state is QPState.RESET
    with pytest.raises(RdmaError, match="EINVAL"):
        qp.post_write(1, mr, 0, 8, mr.addr, mr.rkey)
    with pytest.raises(RdmaError, match="EINVAL"):
        qp.to_rtr(qp.local_endpoint())  # RESET -> RTR skips INIT
    qp.to_init(Access.REMOTE_WRITE)
    with pytest.raises(RdmaError):
        qp.to_rts()  # INIT -> RTS skips RTR
    with pytest.raises(RdmaError, match="GID"):
        qp.to_rtr(qp.local_endpoint().__class__(1, 1, 1, bytes(16), 5))  # RoCE without a GID
    qp.to_rtr(qp.local_endpoint())
    with pytest.raises(RdmaError):
        qp.post_write(1, mr, 0, 8, mr.addr, mr.rkey)  # RTR cannot send
    qp.to_rts()
    assert qp.state is QPState.RTS
    with pytest.raises(RdmaError, match="read-only"):
        ctx.reg_mr(b"immutable", Access.LOCAL_WRITE)


@pytest.mark.parametrize(("case", "expected"), [
    ("bad_rkey", WCStatus.REM_ACCESS_ERR),
    ("out_of_bounds", WCStatus.REM_ACCESS_ERR),
    ("before_region", WCStatus.REM_ACCESS_ERR),
    ("local_bounds", WCStatus.LOC_PROT_ERR),
])
def test_fake_access_checks(case: str, expected: WCStatus) -> None:
    p = Pair()
    if case == "bad_rkey":
        got = p.write(rkey=p.mr_b.rkey ^ 1)
    elif case == "out_of_bounds":
        got = p.write(4096, remote=8192 - 100)
    elif case == "before_region":
        p.qp_a.post_write(1, p.mr_a, 0, 16, p.mr_b.addr - 8, p.mr_b.rkey)
        got = p.cq_a.poll()
    else:
        got = p.write(4096, offset=8192 - 10)
    assert [c.status for c in got] == [expected]
    assert p.qp_a.state is QPState.ERR
    assert [c.status for c in p.write(8)] == [WCStatus.WR_FLUSH_ERR]  # everything after flushes
    assert bytes(p.mr_b.view) == bytes(8192)  # nothing landed


def test_fake_access_flags_of_region_and_responder_qp() -> None:
    assert [c.status for c in Pair(b_access=Access.LOCAL_WRITE).write()] == [WCStatus.REM_ACCESS_ERR]
    assert [c.status for c in Pair(qp_b_access=Access(0)).write()] == [WCStatus.REM_ACCESS_ERR]
    p = Pair()
    p.qp_a.post_read(2, p.mr_a, 0, 16, p.mr_b.addr, p.mr_b.rkey)  # region not REMOTE_READ
    assert [c.status for c in p.cq_a.poll()] == [WCStatus.REM_ACCESS_ERR]


def test_fake_remote_gone_dead_or_miswired_is_retry_exceeded() -> None:
    p = Pair()
    p.qp_b.close()
    assert [c.status for c in p.write()] == [WCStatus.RETRY_EXC_ERR]
    p = Pair()
    p.b.kill()
    assert [c.status for c in p.write()] == [WCStatus.RETRY_EXC_ERR]
    assert p.qp_b.state is QPState.ERR
    p = Pair()
    p.qp_b.remote = p.qp_b.remote.__class__(p.qp_a.qpn, (p.qp_a.psn + 1) % (1 << 24), 1, p.a.gid, 5)
    assert [c.status for c in p.write()] == [WCStatus.RETRY_EXC_ERR]  # PSN mismatch


def test_fake_queue_depths_and_injected_faults() -> None:
    p = Pair(caps=QPCaps(max_send_wr=4, max_rd_atomic=2), a_access=Access.LOCAL_WRITE | Access.REMOTE_READ)
    for _ in range(4):
        p.qp_a.post_write(1, p.mr_a, 0, 8, p.mr_b.addr, p.mr_b.rkey, signaled=False)
    with pytest.raises(RdmaError, match="ENOMEM"):
        p.qp_a.post_write(1, p.mr_a, 0, 8, p.mr_b.addr, p.mr_b.rkey, signaled=False)
    q = Pair(caps=QPCaps(max_rd_atomic=1), b_access=Access.LOCAL_WRITE | Access.REMOTE_READ,
             qp_b_access=Access.REMOTE_READ)
    q.qp_a.post_read(1, q.mr_a, 0, 8, q.mr_b.addr, q.mr_b.rkey, signaled=False)
    with pytest.raises(RdmaError, match="max_rd_atomic"):
        q.qp_a.post_read(2, q.mr_a, 0, 8, q.mr_b.addr, q.mr_b.rkey)
    r = Pair()
    r.fabric.inject(WCStatus.RETRY_EXC_ERR, qpn=r.qp_a.qpn)
    assert [c.status for c in r.write()] == [WCStatus.RETRY_EXC_ERR]


# -- the RDMA transport on the fake ---------------------------------------------------------


@pytest.fixture
def fake() -> Iterator[Harness]:
    h = Harness("rdma-fake")
    yield h
    h.close()


def _provider(n: int = 6, size: int = 100_000) -> tuple[MemoryProvider, dict[str, bytes]]:
    data = {f"k{i}": os.urandom(size + i) for i in range(n)}
    provider = MemoryProvider()
    for key, value in data.items():
        provider.put(key, value)
    return provider, data


def _fetch(client, address, data):  # type: ignore[no-untyped-def]
    requests = [BlockRequest(k, "v1", len(v)) for k, v in data.items()]
    buffers = [memoryview(bytearray(len(v))) for v in data.values()]
    outcomes = client.fetch(address, requests, buffers, timeout=5)
    assert all(o is not Outcome.FILLED or bytes(b) == v for o, b, v in zip(outcomes, buffers, data.values()))
    return outcomes


def test_rdma_used_when_both_sides_have_it(fake: Harness) -> None:
    provider, data = _provider()
    server = fake.server(provider)
    client = fake.client()
    assert _fetch(client, server.address, data) == [Outcome.FILLED] * len(data)
    assert client.metrics.by_transport == {"rdma": len(data)}
    assert client.peer_transport(server.address) == "rdma"
    assert server.metrics.rdma_bytes == sum(map(len, data.values())) and server.metrics.bytes_sent == 0


def test_handshake_failure_falls_back_to_tcp(fake: Harness, caplog: pytest.LogCaptureFixture) -> None:
    provider, data = _provider()
    server = fake.server(provider)
    fake.fabric.fail_transitions.add("rtr")
    client = fake.client()
    with caplog.at_level("INFO", logger="shoal.transport.tcp"):
        assert _fetch(client, server.address, data) == [Outcome.FILLED] * len(data)
    assert client.metrics.by_transport == {"tcp": len(data)}
    assert client.metrics.rdma_fallbacks >= 1 and server.metrics.rdma_rejected >= 1
    assert client.peer_transport(server.address) == "tcp"
    assert caplog.text.count("block data over TCP") == 1  # the choice is logged once per peer


def test_forced_rdma_does_not_fall_back(fake: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    provider, data = _provider(1)
    plain = BlockServer(provider, SECRET)  # no RDMA on this server
    fake.made.append(plain)
    server = plain.start()
    client = RdmaTransport(SECRET, backend=FakeVerbs(fake.fabric), mode="rdma", config=ClientConfig(max_block=MAX))
    try:
        assert _fetch(client, server, data) == [Outcome.UNAVAILABLE]
    finally:
        client.close()
    monkeypatch.setattr("shoal.transport.rdma.transport.detect_backend", lambda device=None: None)
    with pytest.raises(RdmaUnavailable, match="no RDMA device"):
        RdmaTransport(SECRET, mode="rdma")
    assert RdmaTransport(SECRET, mode="auto").mode == "tcp"  # auto without a device: plain TCP


def test_server_without_rdma_means_tcp(fake: Harness) -> None:
    provider, data = _provider()
    server = BlockServer(provider, SECRET, config=ServerConfig(max_block=MAX))
    address = server.start()
    try:
        client = fake.client()
        assert _fetch(client, address, data) == [Outcome.FILLED] * len(data)
        assert client.metrics.by_transport == {"tcp": len(data)} and client.metrics.rdma_fallbacks >= 1
    finally:
        server.close()


def test_failed_writes_retry_over_tcp_then_demote(fake: Harness) -> None:
    provider, data = _provider(1)
    server = fake.server(provider)
    client = fake.client(connections_per_peer=1, demote_after=3, demote_for=60)
    for attempt in range(3):
        fake.fabric.inject(WCStatus.REM_ACCESS_ERR)
        assert _fetch(client, server.address, data) == [Outcome.FILLED]  # the WRITE failed; TCP delivered
        client.drop_peer(server.address)  # the failed session is broken: reconnect for the next attempt
    assert client.metrics.rdma_demotions == 1
    assert client.metrics.by_transport == {"tcp": 3}
    assert _fetch(client, server.address, data) == [Outcome.FILLED]
    assert client.peer_transport(server.address) == "tcp"  # demoted: no RDMA handshake for a while
    assert client.metrics.by_transport == {"tcp": 4}


def test_owner_device_dies_mid_transfer(fake: Harness) -> None:
    provider, data = _provider(4)
    rdma = RdmaServer(FakeVerbs(fake.fabric), max_block=MAX)
    server = BlockServer(provider, SECRET, rdma=rdma, config=ServerConfig(max_block=MAX))
    address = server.start()
    try:
        client = fake.client()
        assert _fetch(client, address, data) == [Outcome.FILLED] * 4
        rdma.ctx.kill()
        assert _fetch(client, address, data) == [Outcome.FILLED] * 4  # retried over TCP, right bytes
        assert client.metrics.by_transport["tcp"] == 4
    finally:
        server.close()


def test_timed_out_rdma_request_keeps_its_slot_until_the_late_answer(fake: Harness) -> None:
    data = {"slow": os.urandom(50_000), "fast": os.urandom(60_000)}
    provider = MemoryProvider(delay=lambda key: 0.5 if key == "slow" else 0.0)
    for key, value in data.items():
        provider.put(key, value)
    server = fake.server(provider)
    client = fake.client(connections_per_peer=1, slots=1)
    assert _fetch(client, server.address, {"slow": data["slow"]}) == [Outcome.FILLED]  # warm up: connected
    requests = [BlockRequest("slow", "v1", 50_000)]
    late = [memoryview(bytearray(50_000))]
    assert client.fetch(server.address, requests, late, timeout=0.1) == [Outcome.TIMEOUT]
    assert _fetch(client, server.address, {"fast": data["fast"]}) == [Outcome.FILLED]
    assert client.metrics.by_transport == {"rdma": 1, "tcp": 1}  # the only slot was still reserved
    time.sleep(0.7)
    assert bytes(late[0]) == bytes(50_000)  # the late WRITE landed in the slot, never in the caller's buffer
    assert _fetch(client, server.address, {"fast": data["fast"]}) == [Outcome.FILLED]
    assert client.metrics.by_transport == {"rdma": 2, "tcp": 1}  # freed by the late answer


def test_many_concurrent_rdma_fetches(fake: Harness) -> None:
    provider, data = _provider(64, size=30_000)
    server = fake.server(provider)
    client = fake.client(slots=16)
    keys = list(data)
    results: list[list[Outcome]] = []
    threads = [threading.Thread(target=lambda part=keys[i::4]: results.append(
        _fetch(client, server.address, {k: data[k] for k in part}))) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert [o for r in results for o in r] == [Outcome.FILLED] * 64
    assert client.metrics.by_transport.get("rdma", 0) > 0


# -- real hardware ---------------------------------------------------------------------------


@pytest.mark.rdma
@pytest.mark.skipif(detect_backend() is None,
                    reason="no RDMA device: pyverbs not importable or ibv_devices lists none (see README)")
def test_real_pyverbs_loopback_fetch() -> None:
    provider, data = _provider(8)
    backend = detect_backend()
    server = BlockServer(provider, SECRET, rdma=RdmaServer(backend, max_block=MAX),
                         config=ServerConfig(max_block=MAX))
    address = server.start()
    client = RdmaTransport(SECRET, backend=backend, mode="rdma", config=ClientConfig(max_block=MAX))
    try:
        assert _fetch(client, address, data) == [Outcome.FILLED] * 8
        assert client.metrics.by_transport == {"rdma": 8}
    finally:
        client.close()
        server.close()
