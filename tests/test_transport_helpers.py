"""Helpers shared by the transport tests (no tests here): harnesses that start a
server and a client of one transport kind, and raw-socket peers that speak the
protocol by hand (to misbehave on purpose)."""

from __future__ import annotations

import secrets
import socket
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from shoal.transport import BlockServer, ClientConfig, ServerConfig, TcpTransport
from shoal.transport import _io
from shoal.transport.messages import Hello
from shoal.transport.protocol import NONCE_BYTES, Limits, MsgType, auth_mac, encode_frame
from shoal.transport.rdma import FakeFabric, FakeVerbs, RdmaServer, RdmaTransport, detect_backend
from shoal.transport.server import CLIENT_LABEL, SERVER_LABEL

SECRET = b"test-cluster-secret-0123456789abcdef"
MAX = 1 << 20  # max block in these tests


@dataclass
class Harness:
    """Starts servers and clients of one transport kind; closes them all at the end."""

    kind: str  # "tcp" | "rdma-fake" | "rdma-real"
    fabric: FakeFabric = field(default_factory=FakeFabric)
    made: list[Any] = field(default_factory=list)

    @property
    def via(self) -> str:
        return "tcp" if self.kind == "tcp" else "rdma"

    def backend(self) -> Any:
        if self.kind == "rdma-fake":
            return FakeVerbs(self.fabric)
        if self.kind == "rdma-real":
            return detect_backend()
        return None

    def server(self, provider: Any, *, max_block: int = MAX, **config: Any) -> BlockServer:
        rdma = RdmaServer(self.backend(), max_block=max_block) if self.kind != "tcp" else None
        server = BlockServer(provider, SECRET, config=ServerConfig(max_block=max_block, **config), rdma=rdma)
        server.start()
        self.made.append(server)
        return server

    def client(self, *, secret: bytes = SECRET, max_block: int = MAX, slots: int = 8, **config: Any) -> TcpTransport:
        cfg = ClientConfig(max_block=max_block, **config)
        if self.kind == "tcp":
            client: TcpTransport = TcpTransport(secret, config=cfg)
        else:
            client = RdmaTransport(secret, backend=self.backend(), config=cfg, mode="auto", slots=slots)
        self.made.append(client)
        return client

    def close(self) -> None:
        for obj in reversed(self.made):
            obj.close()


def raw_connect(address: Any, timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection(tuple(address), timeout=timeout)
    return sock


def raw_handshake(address: Any, secret: bytes = SECRET) -> socket.socket:
    """An authenticated raw connection (what a well-behaved client does first)."""
    sock = raw_connect(address)
    hello = Hello(secrets.token_bytes(NONCE_BYTES), 0, MAX, 0, "raw").encode()
    sock.sendall(encode_frame(MsgType.HELLO, 0, hello))
    header, challenge = _io.read_frame(sock, Limits(max_payload=0))
    assert header.type is MsgType.CHALLENGE
    sock.sendall(encode_frame(MsgType.AUTH, 0, auth_mac(secret, CLIENT_LABEL, (hello, challenge))))
    header, _ = _io.read_frame(sock, Limits(max_payload=0))
    assert header.type is MsgType.AUTH_OK
    return sock


def read_until_closed(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Everything the peer sends until it closes (the test fails on a hang via timeout)."""
    sock.settimeout(timeout)
    out = bytearray()
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            out += chunk
    except (ConnectionResetError, BrokenPipeError):
        pass
    return bytes(out)


class FakePeer:
    """A hand-written server: answers the handshake (optionally with a wrong proof),
    then runs ``behave(sock, header, meta)`` for each client frame."""

    def __init__(self, behave: Callable[[socket.socket, Any, bytes], None], *, secret: bytes = SECRET,
                 bad_proof: bool = False) -> None:
        self.behave = behave
        self.secret = secret
        self.bad_proof = bad_proof
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.address = self.listener.getsockname()
        self.errors: list[BaseException] = []
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            self.conns.append(sock)
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        try:
            limits = Limits(max_payload=0)
            _, hello = _io.read_frame(sock, limits)
            challenge = Hello(secrets.token_bytes(NONCE_BYTES), 0, MAX, 64, "fake").encode()
            sock.sendall(encode_frame(MsgType.CHALLENGE, 0, challenge))
            _io.read_frame(sock, limits)
            proof = auth_mac(self.secret, SERVER_LABEL, (hello, challenge))
            if self.bad_proof:
                proof = bytes(32)
            sock.sendall(encode_frame(MsgType.AUTH_OK, 0, proof))
            while True:
                header, meta = _io.read_frame(sock, limits)
                self.behave(sock, header, meta)
        except (OSError, ValueError) as exc:
            self.errors.append(exc)
        finally:
            sock.close()

    def close(self) -> None:
        self.listener.close()
        for sock in self.conns:
            try:
                sock.close()
            except OSError:
                pass
