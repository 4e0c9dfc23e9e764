"""Socket helpers shared by the TCP server and client (blocking sockets, threads)."""

from __future__ import annotations

import os
import socket
import struct

from .errors import PeerUnavailable, ProtocolError, TransportTimeout
from .protocol import HEADER, Header, Limits, check_meta, decode_header

__all__ = ["configure", "recv_into_exact", "read_frame", "drain", "Idle", "set_blocking_timeouts"]

WAITALL = getattr(socket, "MSG_WAITALL", 0)
#: SO_SNDBUF/SO_RCVBUF for peer connections (0: the kernel's autotuning);
#: ``SHOAL_TCP_BUFFER`` overrides.  See benchmarks/RESULTS.md, "Transport".
_SOCKET_BUFFER = int(os.environ.get("SHOAL_TCP_BUFFER", str(4 << 20)))


class Idle(Exception):
    """No byte of a new frame arrived before the socket timeout (not an error)."""


def configure(sock: socket.socket) -> None:
    """TCP_NODELAY (requests are small and latency-bound) and large buffers."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF) if _SOCKET_BUFFER else ():
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, _SOCKET_BUFFER)
        except OSError:
            pass


def recv_into_exact(sock: socket.socket, view: memoryview, *, idle_ok: bool = False) -> None:
    """Fill ``view`` completely from ``sock``.

    Raises :class:`Idle` when ``idle_ok`` and the timeout hit before the first
    byte, :class:`TransportTimeout` when it hit mid-way, and
    :class:`PeerUnavailable` on EOF or a socket error.
    """
    got = 0
    total = len(view)
    # A blocking socket (timeouts by SO_RCVTIMEO, see set_blocking_timeouts) can wait
    # for the whole body in one call: one wakeup into Python per body, not per segment.
    flags = WAITALL if sock.gettimeout() is None else 0
    while got < total:
        try:
            n = sock.recv_into(view[got:], total - got, flags)
        except (socket.timeout, BlockingIOError) as exc:
            if idle_ok and got == 0:
                raise Idle() from exc
            raise TransportTimeout("peer stalled in the middle of a frame") from exc
        except OSError as exc:
            raise PeerUnavailable(f"connection lost: {exc}") from exc
        if n == 0:
            raise PeerUnavailable("connection closed by peer")
        got += n


def set_blocking_timeouts(sock: socket.socket, seconds: float) -> None:
    """Blocking mode with kernel-side send/receive timeouts (SO_SNDTIMEO/SO_RCVTIMEO):
    no poll() before every call, and MSG_WAITALL receives work."""
    sock.settimeout(None)
    seconds = max(seconds, 0.001)
    timeval = struct.pack("ll", int(seconds), int((seconds % 1) * 1e6))
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    except OSError:  # pragma: no cover - platforms without them: Python-level timeouts
        sock.settimeout(seconds)


def read_frame(sock: socket.socket, limits: Limits, *, idle_ok: bool = False) -> tuple[Header, bytes]:
    """Read one header and its metadata (not the payload), both validated."""
    head = bytearray(HEADER.size)
    recv_into_exact(sock, memoryview(head), idle_ok=idle_ok)
    header = decode_header(head, limits)
    meta = bytearray(header.meta_len)
    if header.meta_len:
        recv_into_exact(sock, memoryview(meta))
    check_meta(header, meta)
    return header, bytes(meta)


def drain(sock: socket.socket, nbytes: int, scratch: memoryview) -> None:
    """Read and discard ``nbytes`` (a payload nobody waits for any more)."""
    while nbytes > 0:
        chunk = min(nbytes, len(scratch))
        recv_into_exact(sock, scratch[:chunk])
        nbytes -= chunk


def expect_no_payload(header: Header) -> None:
    if header.payload_len:
        raise ProtocolError(f"{header.type.name} frames carry no payload")
