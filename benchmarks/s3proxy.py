"""Latency / bandwidth / fault-injecting HTTP reverse proxy for S3 servers.

Put it in front of SeaweedFS or moto so that benchmarks and fault tests see an
object store that behaves like S3 (time to first byte, per-connection and
aggregate bandwidth, 503 SlowDown, resets) whatever the client is written in:
DuckDB httpfs is C++, so injecting inside a Python client would miss it.

Requests are forwarded byte-exactly, ``Host`` included: clients sign SigV4
for the proxy's ``host:port`` and SeaweedFS checks the signature against the
``Host`` it receives, so rewriting it would break authentication.  Responses
come back unchanged apart from the injected delays and faults.

Reserved path (S3 bucket names cannot contain ``_``, so it never collides;
its traffic is not counted):

* ``GET  /__shoal_proxy__/stats``   counters as JSON (same as ``S3Proxy.stats()``)
* ``POST /__shoal_proxy__/reset``   zero the counters
* ``POST /__shoal_proxy__/faults``  JSON object of ``FaultConfig`` fields to change
* ``POST /__shoal_proxy__/profile`` JSON ``{"name": ..., <LatencyProfile field>: ...}``

In-process: ``with S3Proxy(url, profile="s3-standard", seed=1) as p: ...p.url``.
As a process: ``python benchmarks/s3proxy.py --upstream http://127.0.0.1:8333
--listen 127.0.0.1:0 --profile s3-standard --seed 1`` prints ``LISTENING
<port>`` on stdout when ready.  Plain-HTTP upstreams only.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import email.utils
import json
import logging
import os
import random
import secrets
import signal
import socket
import statistics
import struct
import sys
import threading
import time
from typing import Any, Awaitable, Callable
from urllib.parse import urlsplit
from xml.sax.saxutils import escape

try:  # imported as benchmarks.s3proxy
    from .latency_profiles import FAULT_KINDS, PACE, PROFILES, FaultConfig, LatencyProfile, Pacer, get_profile
except ImportError:  # run as a script, or benchmarks/ is on sys.path
    from latency_profiles import FAULT_KINDS, PACE, PROFILES, FaultConfig, LatencyProfile, Pacer, get_profile

__all__ = ["S3Proxy", "FaultConfig", "LatencyProfile", "PROFILES", "measure_overhead", "main"]

log = logging.getLogger(__name__)

CONTROL_PREFIX = b"/__shoal_proxy__/"
CHUNK = 256 * 1024  # relay read size: big enough to keep per-chunk Python cost low
HEAD_LIMIT = 1 << 20  # max header block; also sizes the StreamReader buffers

Upstream = tuple[asyncio.StreamReader, asyncio.StreamWriter]
Emit = Callable[[bytes], Awaitable[None]]


class _Cut(Exception):
    """Raised by the body sender when an injected reset/truncation point is hit."""


def _parse_head(raw: bytes) -> tuple[list[bytes], dict[bytes, bytes]]:
    """Split a header block into its start line's words and lower-cased headers."""
    lines = raw[:-4].split(b"\r\n")
    first = lines[0].split(b" ", 2)
    if len(first) < 3:
        raise ValueError(f"bad start line {lines[0][:80]!r}")
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            raise ValueError(f"bad header line {line[:80]!r}")
        key, value = name.strip().lower(), value.strip()
        headers[key] = headers[key] + b", " + value if key in headers else value
    return first, headers


def _framing(headers: dict[bytes, bytes]) -> tuple[str, int]:
    """Body framing per RFC 9112 section 6.3: ("chunked"|"length"|"close", length)."""
    te = headers.get(b"transfer-encoding")
    if te is not None and te.lower().rsplit(b",", 1)[-1].strip() == b"chunked":
        return "chunked", -1
    cl = headers.get(b"content-length")
    if cl is not None:
        return "length", int(cl.split(b",")[0])
    return "close", -1


def _keep_alive(version: bytes, headers: dict[bytes, bytes]) -> bool:
    conn = headers.get(b"connection", b"").lower()
    if version.upper() == b"HTTP/1.0":
        return b"keep-alive" in conn
    return b"close" not in conn


async def _copy_body(reader: asyncio.StreamReader, framing: str, length: int, emit: Emit) -> None:
    """Read one message body from ``reader`` and pass its raw bytes to ``emit``.

    Chunked bodies are parsed only to find their end; chunk-size lines and
    trailers are passed through as they are, so the peer sees exactly what
    was sent.
    """
    if framing == "length":
        remaining = length
        while remaining > 0:
            data = await reader.read(min(remaining, CHUNK))
            if not data:
                raise asyncio.IncompleteReadError(b"", remaining)
            remaining -= len(data)
            await emit(data)
    elif framing == "chunked":
        while True:
            line = await reader.readuntil(b"\r\n")
            size = int(line.split(b";", 1)[0].strip(), 16)
            if size == 0:  # last chunk, then optional trailers up to an empty line
                while (trailer := await reader.readuntil(b"\r\n")) != b"\r\n":
                    line += trailer
                await emit(line + trailer)
                return
            await emit(line)
            await _copy_body(reader, "length", size + 2, emit)  # data plus its CRLF
    elif framing == "close":
        while data := await reader.read(CHUNK):
            await emit(data)


def _new_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (the ``bench`` extra): its C transports relay
    bytes for a fraction of the CPU, which matters when the proxy shares a
    small machine with the client and the server it measures."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class _Request:
    """One parsed client request (the raw head is kept for byte-exact forwarding)."""

    def __init__(self, head: bytes) -> None:
        first, self.headers = _parse_head(head)
        self.head = head
        self.method, self.target, self.version = first
        self.framing, self.length = _framing(self.headers)
        if self.framing == "close":  # a request without CL/TE has no body
            self.framing, self.length = "length", 0
        self.has_body = self.framing == "chunked" or self.length > 0
        self.expect = b"100-continue" in self.headers.get(b"expect", b"").lower()
        self.keep = _keep_alive(self.version, self.headers)


class _Conn:
    """A client connection and the upstream connection paired with it."""

    def __init__(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        self.cr, self.cw = cr, cw
        self.up: Upstream | None = None
        self.pacer = Pacer()  # per-connection bandwidth bucket

    def drop_upstream(self) -> None:
        if self.up is not None:
            self.up[1].close()
            self.up = None


class S3Proxy:
    """S3 reverse proxy with injected latency, bandwidth caps and faults.

    ``start()`` runs the proxy on its own event loop in a daemon thread and
    returns the bound port.  Profile and faults can be changed while it runs;
    changes apply to requests that start afterwards.
    """

    def __init__(self, upstream: str, *, host: str = "127.0.0.1", port: int = 0,
                 profile: str | LatencyProfile = "none", seed: int | None = None,
                 faults: FaultConfig | None = None) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream must be an http:// URL, got {upstream!r}")
        self.upstream = upstream.rstrip("/")
        self._up_addr = (parts.hostname, parts.port or 80)
        self._host, self._port = host, port
        # A random seed is still a seed: it is reported so a run can be replayed.
        self.seed = seed if seed is not None else secrets.randbits(32)
        self._rng = random.Random(self.seed)  # only used on the proxy's loop thread
        self._profile = get_profile(profile)
        self._faults = faults or FaultConfig()
        self._agg_pacer = Pacer()
        self._lock = threading.Lock()  # counters are read and reset from other threads
        self._counts: collections.Counter[str] = collections.Counter()
        self._active = 0
        self._seq = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------------ API
    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self._host in ("", "0.0.0.0") else self._host
        return f"http://{host}:{self._port}"

    @property
    def profile(self) -> LatencyProfile:
        return self._profile

    @property
    def faults(self) -> FaultConfig:
        return self._faults

    def set_profile(self, profile: str | LatencyProfile | None = None, **overrides: Any) -> LatencyProfile:
        """Switch profile (name or object) and/or override some of its fields."""
        base = get_profile(profile) if profile is not None else self._profile
        for key in ("tail", "bandwidth_range", "error_kinds"):  # JSON gives lists
            if isinstance(overrides.get(key), list):
                overrides[key] = tuple(tuple(v) if isinstance(v, list) else v for v in overrides[key])
        self._profile = base.replace(**overrides) if overrides else base
        log.info("profile %s", self._profile)
        return self._profile

    def set_faults(self, faults: FaultConfig | None = None, **changes: Any) -> FaultConfig:
        """Replace the fault config and/or change some of its fields."""
        self._faults = dataclasses.replace(faults or self._faults, **changes)
        log.info("faults %s", self._faults)
        return self._faults

    def stats(self) -> dict[str, Any]:
        """Snapshot of the counters (JSON-ready).

        Keys: requests, requests_by_method, gets, responses_by_status (what
        clients got, injected 503s included), bytes_sent (to clients, heads
        included), bytes_received (from clients), bytes_from_upstream,
        bytes_to_upstream, faults (injected, by kind), connections_opened,
        upstream_connections_opened, connections_active, profile, seed.
        """
        with self._lock:
            c, active = dict(self._counts), self._active

        def group(prefix: str) -> dict[str, int]:
            return {k[len(prefix) :]: v for k, v in c.items() if k.startswith(prefix)}

        keys = ("requests", "bytes_sent", "bytes_received", "bytes_from_upstream", "bytes_to_upstream",
                "connections_opened", "upstream_connections_opened")
        return {
            **{k: c.get(k, 0) for k in keys},
            "requests_by_method": group("method:"),
            "gets": c.get("method:GET", 0),
            "responses_by_status": group("status:"),
            "faults": {k: c.get(f"fault:{k}", 0) for k in FAULT_KINDS},
            "connections_active": active,
            "profile": self._profile.name,
            "seed": self.seed,
        }

    def reset_stats(self) -> None:
        """Zero all counters (the active-connection gauge is kept)."""
        with self._lock:
            self._counts.clear()

    def start(self) -> int:
        """Run the proxy on a daemon thread; return the bound port."""
        if self._thread is not None:
            raise RuntimeError("proxy already started")
        loop = self._loop = _new_loop()
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._listen())
            except BaseException as exc:  # e.g. port in use: report to the caller
                failure.append(exc)
                loop.close()
                return
            finally:
                ready.set()
            loop.run_forever()

        self._thread = threading.Thread(target=run, name=f"s3proxy-{self._up_addr[1]}", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            self._loop = self._thread = None
            raise failure[0]
        log.info("s3proxy %s -> %s profile=%s seed=%d", self.url, self.upstream, self._profile.name, self.seed)
        return self._port

    def stop(self) -> None:
        """Close the listener and all connections, then end the thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=10)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            if not thread.is_alive():
                loop.close()
            self._loop = self._thread = None

    def __enter__(self) -> "S3Proxy":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------ internals
    def _add(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._handle_client, self._host, self._port, limit=HEAD_LIMIT, backlog=1024)  # many GETs in flight
        self._port = self._server.sockets[0].getsockname()[1]

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        await self._server.wait_closed()

    async def _handle_client(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        """Serve one client connection: a keep-alive loop of request/response."""
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._add("connections_opened")
        with self._lock:
            self._active += 1
        conn = _Conn(cr, cw)
        try:
            if self._profile.connect_delay_s > 0:  # models TCP (+TLS) setup
                await asyncio.sleep(self._profile.connect_delay_s)
            keep = True
            while keep:
                try:
                    head = await cr.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    break  # client closed between requests
                except asyncio.LimitOverrunError:
                    await self._send_local(cw, 431, "Request Header Fields Too Large", b"", False)
                    break
                try:
                    req = _Request(head)
                except ValueError as exc:
                    log.warning("bad request from client: %s", exc)
                    await self._send_local(cw, 400, "Bad Request", b"", False)
                    break
                if req.target.startswith(CONTROL_PREFIX):
                    keep = await self._control(req, conn)
                else:
                    keep = await self._exchange(req, conn)
        except (ConnectionError, EOFError, OSError) as exc:
            log.debug("connection ended: %r", exc)
        except asyncio.CancelledError:
            # Only stop() cancels these tasks.  Ending normally matters: Python
            # 3.11 logs a spurious error for a cancelled client_connected_cb task.
            log.debug("connection cancelled by stop()")
        except Exception:
            log.exception("s3proxy connection failed")
        finally:
            conn.drop_upstream()
            if not cw.transport.is_closing():
                cw.close()
            with self._lock:
                self._active -= 1
            self._tasks.discard(task)

    async def _exchange(self, req: _Request, conn: _Conn) -> bool:
        """Forward one request and relay its response; return whether to keep the connection."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        profile, faults = self._profile, self._faults  # one consistent view per request
        with self._lock:
            self._counts["requests"] += 1
            self._counts["bytes_received"] += len(req.head)
            self._counts["method:" + req.method.decode("latin-1")] += 1
            self._seq += 1
            request_id = f"{self._seq:016X}"
        fault = faults.draw(self._rng, req.method, profile)
        ttfb = profile.sample_ttfb(self._rng) + (faults.stall_s if fault == "stall" else 0.0)
        bandwidth = profile.sample_bandwidth(self._rng)
        if fault is not None:
            self._add("fault:" + fault)
        log.debug("%s %s ttfb=%.4f bw=%s fault=%s", req.method.decode("latin-1"),
                  req.target[:120].decode("latin-1"), ttfb, bandwidth, fault)
        if fault == "slowdown":
            return await self._slowdown(req, conn, t0 + ttfb, request_id)

        pump: asyncio.Task[float] | None = None
        try:
            forwarded = await self._forward(req, conn, t0)
            if forwarded is None:
                return False
            rhead, sent_continue, pump, t_ref = forwarded
            rfirst, rheaders = _parse_head(rhead)
            status = int(rfirst[1])
            self._add("bytes_from_upstream", len(rhead))
            no_body = req.method == b"HEAD" or status in (204, 304)
            rframing, rlength = ("length", 0) if no_body else _framing(rheaders)
            up_keep = _keep_alive(rfirst[0], rheaders) and rframing != "close"
            cut_at: int | None = None
            if fault in ("reset", "truncate"):
                # Cut strictly inside the body so that the client must notice;
                # no body: cut before the head; unknown length: right after it.
                cut_at = min(int(rlength * faults.body_fraction), rlength - 1) if rframing == "length" else 0
            # TTFB counts from when the request was complete: upstream's own
            # latency is part of it, not added to it.
            await asyncio.sleep(max(0.0, t_ref + ttfb - loop.time()))
            if cut_at is not None and cut_at < 0:
                await self._cut(conn.cw, fault)  # type: ignore[arg-type]
                return False
            with self._lock:  # count before writing: the client may read the stats next
                self._counts["bytes_sent"] += len(rhead)
                self._counts[f"status:{status}"] += 1
            conn.cw.write(rhead)
            sent = 0

            async def send(data: bytes) -> None:
                nonlocal sent
                self._add("bytes_from_upstream", len(data))
                if cut_at is not None and sent + len(data) >= cut_at:
                    await self._paced_write(conn, data[: cut_at - sent], bandwidth)
                    raise _Cut
                await self._paced_write(conn, data, bandwidth)
                sent += len(data)

            try:
                assert conn.up is not None
                await _copy_body(conn.up[0], rframing, rlength, send)
            except _Cut:
                await self._cut(conn.cw, fault)  # type: ignore[arg-type]
                return False
            await conn.cw.drain()
            if pump is not None and not pump.done():
                # Upstream answered before reading the whole body (an error, or
                # no 100 Continue), so the connection state is unknown: close.
                await asyncio.wait({pump}, timeout=0 if req.expect and not sent_continue else 1.0)
                if not pump.done():
                    return False
            if not up_keep:
                conn.drop_upstream()
                return False
            return req.keep
        finally:
            if pump is not None and not pump.done():
                pump.cancel()

    async def _forward(
        self, req: _Request, conn: _Conn, t0: float
    ) -> tuple[bytes, bool, asyncio.Task[float] | None, float] | None:
        """Send the request upstream and wait for the final response head.

        Returns (head, sent 100 Continue, body pump task, time the request was
        complete), or None after answering 502 when upstream is unreachable.
        A bodiless request is retried once on a fresh connection when a kept-
        alive upstream connection turns out to have been closed.
        """
        for attempt in (0, 1):
            if conn.up is None or conn.up[0].at_eof() or conn.up[1].is_closing():
                conn.drop_upstream()
                try:
                    conn.up = await asyncio.open_connection(*self._up_addr, limit=HEAD_LIMIT)
                except OSError as exc:
                    log.warning("upstream %s unreachable: %s", self.upstream, exc)
                    await self._send_local(conn.cw, 502, "Bad Gateway", str(exc).encode(), False)
                    return None
                self._add("upstream_connections_opened")
            up_r, up_w = conn.up
            up_w.write(req.head)  # byte-exact, Host unchanged (SigV4)
            self._add("bytes_to_upstream", len(req.head))
            try:
                if not req.has_body:
                    await up_w.drain()
                    return (*await self._final_head(up_r, conn.cw), None, t0)
                pump = asyncio.create_task(self._pump(req, conn.cr, up_w))
                head = asyncio.create_task(self._final_head(up_r, conn.cw))
                await asyncio.wait({pump, head}, return_when=asyncio.FIRST_COMPLETED)
                if pump.done() and pump.exception() is not None:
                    head.cancel()  # the client went away mid-body
                    raise pump.exception()  # type: ignore[misc]
                try:
                    rhead, sent_continue = await head
                except BaseException:
                    pump.cancel()
                    raise
                done_at = pump.result() if pump.done() else asyncio.get_running_loop().time()
                return rhead, sent_continue, pump, done_at
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                conn.drop_upstream()
                stale = not isinstance(exc, asyncio.IncompleteReadError) or not exc.partial
                if attempt or req.has_body or not stale:
                    raise
                log.debug("kept-alive upstream connection was closed; retrying once")
        raise AssertionError("unreachable")

    async def _pump(self, req: _Request, cr: asyncio.StreamReader, up_w: asyncio.StreamWriter) -> float:
        """Copy the request body to upstream; return the loop time when done."""
        async def emit(data: bytes) -> None:
            with self._lock:
                self._counts["bytes_received"] += len(data)
                self._counts["bytes_to_upstream"] += len(data)
            up_w.write(data)
            await up_w.drain()

        await _copy_body(cr, req.framing, req.length, emit)
        return asyncio.get_running_loop().time()

    async def _final_head(self, up_r: asyncio.StreamReader, cw: asyncio.StreamWriter) -> tuple[bytes, bool]:
        """Read response heads until a final one; pass 1xx on at once (not delayed)."""
        sent_continue = False
        while True:
            rhead = await up_r.readuntil(b"\r\n\r\n")
            status = int(rhead.split(b" ", 2)[1])
            if not 100 <= status < 200 or status == 101:
                return rhead, sent_continue
            cw.write(rhead)
            await cw.drain()
            sent_continue = True

    async def _slowdown(self, req: _Request, conn: _Conn, deadline: float, request_id: str) -> bool:
        """Answer 503 SlowDown like S3 does, without contacting upstream."""
        keep = req.keep
        if req.has_body and req.expect:
            keep = False  # the client waits for 100 Continue; its body will not come
        elif req.has_body:
            async def discard(data: bytes) -> None:
                self._add("bytes_received", len(data))

            await _copy_body(conn.cr, req.framing, req.length, discard)
        await asyncio.sleep(max(0.0, deadline - asyncio.get_running_loop().time()))
        resource = escape(req.target.split(b"?", 1)[0].decode("latin-1"))
        body = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                "<Message>Please reduce your request rate.</Message>"
                f"<Resource>{resource}</Resource><RequestId>{request_id}</RequestId>"
                "<HostId>shoal-s3proxy</HostId></Error>").encode()
        extra = [f"x-amz-request-id: {request_id}", f"x-amz-id-2: {request_id}"]
        await self._send_local(conn.cw, 503, "Slow Down", body, keep, "application/xml", extra,
                               head_only=req.method == b"HEAD")
        return keep

    async def _paced_write(self, conn: _Conn, data: bytes, bandwidth: float | None) -> None:
        """Write to the client within the per-connection and aggregate caps."""
        cw, aggregate = conn.cw, self._profile.aggregate_bytes_per_s
        if bandwidth is None and aggregate is None:
            self._add("bytes_sent", len(data))
            cw.write(data)
            await cw.drain()
            return
        loop = asyncio.get_running_loop()
        view = memoryview(data)
        for i in range(0, len(view), PACE):
            piece = view[i : i + PACE]
            now = loop.time()
            wait = conn.pacer.delay(len(piece), bandwidth, now) if bandwidth else 0.0
            if aggregate:
                wait = max(wait, self._agg_pacer.delay(len(piece), aggregate, now))
            if wait > 0:
                await asyncio.sleep(wait)
            self._add("bytes_sent", len(piece))
            cw.write(piece)
            await cw.drain()

    async def _cut(self, cw: asyncio.StreamWriter, kind: str) -> None:
        """End the client connection abruptly: RST for "reset", FIN otherwise."""
        if kind != "reset":
            cw.close()  # close() flushes what was written, then sends FIN
            return
        # Let the prefix reach the client first: with SO_LINGER 0 the kernel
        # drops unsent data and sends RST instead of FIN.
        transport = cw.transport
        deadline = time.monotonic() + 2.0
        while transport.get_write_buffer_size() and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()

    async def _send_local(self, cw: asyncio.StreamWriter, status: int, reason: str, body: bytes, keep: bool,
                          content_type: str = "text/plain", extra: list[str] | None = None,
                          head_only: bool = False, counted: bool = True) -> None:
        """Answer from the proxy itself (injected 503, control path, 4xx, 502)."""
        lines = [f"HTTP/1.1 {status} {reason}", f"Date: {email.utils.formatdate(usegmt=True)}",
                 "Server: shoal-s3proxy", f"Content-Type: {content_type}", f"Content-Length: {len(body)}",
                 *(extra or []), "Connection: keep-alive" if keep else "Connection: close"]
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head_only else body)
        if counted:
            with self._lock:
                self._counts["bytes_sent"] += len(data)
                self._counts[f"status:{status}"] += 1
        cw.write(data)
        await cw.drain()

    async def _control(self, req: _Request, conn: _Conn) -> bool:
        """Serve the reserved ``/__shoal_proxy__/`` path; return keep-alive."""
        chunks: list[bytes] = []

        async def collect(data: bytes) -> None:
            chunks.append(data)

        await _copy_body(conn.cr, req.framing, req.length, collect)
        name = req.target.split(b"?", 1)[0][len(CONTROL_PREFIX) :].decode("latin-1").strip("/")
        status, reason, payload = 200, "OK", None
        try:
            if req.framing == "chunked":
                raise ValueError("send control bodies with Content-Length")
            body = json.loads(b"".join(chunks) or b"{}")
            if not isinstance(body, dict):
                raise TypeError("control body must be a JSON object")
            if req.method == b"GET" and name == "stats":
                payload = self.stats()
            elif req.method == b"POST" and name == "reset":
                self.reset_stats()
                payload = {"reset": True}
            elif req.method == b"POST" and name == "faults":
                payload = dataclasses.asdict(self.set_faults(**body))
            elif req.method == b"POST" and name == "profile":
                payload = self.set_profile(body.pop("name", None), **body).to_dict()
            else:
                status, reason, payload = 404, "Not Found", {"error": f"no control endpoint {name!r}"}
        except (ValueError, TypeError) as exc:
            status, reason, payload = 400, "Bad Request", {"error": str(exc)}
        await self._send_local(conn.cw, status, reason, json.dumps(payload).encode(), req.keep,
                               "application/json", counted=False)
        return req.keep


def measure_overhead(upstream_url: str, *, n: int = 30, size: int = 1 << 20, bucket: str = "shoal-proxy-overhead",
                     key: str = "overhead.bin", access_key: str | None = None, secret_key: str | None = None,
                     region: str = "us-east-1", seed: int = 0, proxy_url: str | None = None) -> dict[str, Any]:
    """Time ``n`` ranged GETs of ``size`` bytes directly vs through the proxy.

    The proxy runs in this process with profile "none" (or pass ``proxy_url``
    of one already running, e.g. as a subprocess, set to "none"), so the ratio
    is its own cost: CPU plus one more loopback hop.  Direct and proxied GETs
    alternate so that drift in the upstream affects both alike.  Credentials
    default to $AWS_ACCESS_KEY_ID / $AWS_SECRET_ACCESS_KEY, else "x"/"y".
    """
    import boto3  # local import: the proxy itself needs only the stdlib
    from botocore.config import Config

    config = Config(retries={"total_max_attempts": 1}, s3={"addressing_style": "path"})
    creds = {"aws_access_key_id": access_key or os.environ.get("AWS_ACCESS_KEY_ID", "x"),
             "aws_secret_access_key": secret_key or os.environ.get("AWS_SECRET_ACCESS_KEY", "y")}

    def client(url: str) -> Any:
        return boto3.client("s3", endpoint_url=url, region_name=region, config=config, **creds)

    rng = random.Random(seed)
    direct = client(upstream_url)
    try:
        direct.create_bucket(Bucket=bucket)
    except direct.exceptions.ClientError as exc:
        if exc.response["Error"]["Code"] not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise
    blob = rng.randbytes(4 * size)
    direct.put_object(Bucket=bucket, Key=key, Body=blob)
    times: dict[str, list[float]] = {"direct": [], "proxy": []}
    cpu = {"direct": 0.0, "proxy": 0.0}
    stack_owned = proxy_url is None
    with contextlib.ExitStack() as stack:
        if proxy_url is None:
            proxy_url = stack.enter_context(S3Proxy(upstream_url, profile="none", seed=seed)).url
        clients = {"direct": direct, "proxy": client(proxy_url)}
        for i in range(n + 3):  # the first 3 rounds only warm up
            offset = rng.randrange(0, 3 * size)
            for name in ("direct", "proxy") if i % 2 else ("proxy", "direct"):
                c0, t = time.process_time(), time.perf_counter()
                got = clients[name].get_object(Bucket=bucket, Key=key, Range=f"bytes={offset}-{offset + size - 1}")
                data = got["Body"].read()
                dt, dc = time.perf_counter() - t, time.process_time() - c0
                if data != blob[offset : offset + size]:
                    raise AssertionError(f"{name} GET returned wrong bytes")
                if i >= 3:
                    times[name].append(dt)
                    cpu[name] += dc
    direct.delete_object(Bucket=bucket, Key=key)
    med = {k: statistics.median(v) for k, v in times.items()}
    mean = {k: statistics.fmean(v) for k, v in times.items()}
    return {
        "n": n, "size": size, "upstream": upstream_url, "median_s": med, "mean_s": mean,
        "min_s": {k: min(v) for k, v in times.items()}, "max_s": {k: max(v) for k, v in times.items()},
        "ratio_median": med["proxy"] / med["direct"], "ratio_mean": mean["proxy"] / mean["direct"],
        # Process CPU per GET: client (+ proxy thread on the proxied side;
        # + the upstream too if it runs in this process, like ThreadedMotoServer).
        "process_cpu_s_per_get": {k: v / n for k, v in cpu.items()},
        "in_process_proxy": stack_owned,
    }


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--upstream", required=True, help="S3 server URL, e.g. http://127.0.0.1:8333")
    p.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0: any free port)")
    p.add_argument("--profile", default="none", choices=sorted(PROFILES))
    p.add_argument("--seed", type=int, default=None, help="RNG seed (random and printed if unset)")
    p.add_argument("--bandwidth-mib-s", type=float, help="override the per-connection cap (0: none)")
    p.add_argument("--aggregate-mib-s", type=float, help="override the aggregate cap (0: none)")
    p.add_argument("--error-rate", type=float, help="override the profile's error rate")
    for kind in FAULT_KINDS:
        p.add_argument(f"--{kind}-rate", type=float, default=0.0, help=f"probability of a {kind} fault")
    p.add_argument("--stall-s", type=float, default=10.0, help="length of a first-byte stall")
    p.add_argument("--body-fraction", type=float, default=0.5, help="where resets/truncations cut the body")
    p.add_argument("--only-get", action="store_true", help="inject faults on GETs only")
    p.add_argument("--measure-overhead", action="store_true",
                   help="time ranged GETs direct vs through the proxy, print JSON, exit")
    p.add_argument("--n", type=int, default=30, help="GETs per side for --measure-overhead")
    p.add_argument("--size", type=int, default=1 << 20, help="bytes per GET for --measure-overhead")
    p.add_argument("--proxy-url", help="for --measure-overhead: a running proxy to measure instead of one in-process")
    p.add_argument("--log-level", default="WARNING")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; see ``--help``."""
    args = _parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.measure_overhead:
        print(json.dumps(measure_overhead(args.upstream, n=args.n, size=args.size, seed=args.seed or 0,
                                          proxy_url=args.proxy_url), indent=2))
        return 0
    host, _, port = args.listen.rpartition(":")
    overrides: dict[str, Any] = {}
    if args.bandwidth_mib_s is not None:
        overrides.update(bandwidth_bytes_per_s=args.bandwidth_mib_s * 2**20 or None, bandwidth_range=None)
    if args.aggregate_mib_s is not None:
        overrides["aggregate_bytes_per_s"] = args.aggregate_mib_s * 2**20 or None
    if args.error_rate is not None:
        overrides["error_rate"] = args.error_rate
    faults = FaultConfig(**{f"{k}_rate": getattr(args, f"{k}_rate") for k in FAULT_KINDS},
                         stall_s=args.stall_s, body_fraction=args.body_fraction, only_get=args.only_get)
    proxy = S3Proxy(args.upstream, host=host or "127.0.0.1", port=int(port or 0),
                    profile=get_profile(args.profile).replace(**overrides), seed=args.seed, faults=faults)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    proxy.start()
    print(f"s3proxy: upstream={proxy.upstream} profile={args.profile} overrides={overrides} seed={proxy.seed} "
          f"stats={proxy.url}/__shoal_proxy__/stats", file=sys.stderr, flush=True)
    print(f"LISTENING {proxy.port}", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        print(json.dumps(proxy.stats()), file=sys.stderr, flush=True)
        proxy.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
