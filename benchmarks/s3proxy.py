"""Latency / bandwidth / fault-injecting HTTP reverse proxy for S3 servers.

Put it in front of SeaweedFS or moto so that benchmarks and fault tests see an
object store that behaves like S3 (time to first byte, per-connection and
aggregate bandwidth, 503 SlowDown, resets), whatever the client is written in
(DuckDB httpfs is C++, so injecting inside a Python client would miss it).

Requests are forwarded byte-exactly, ``Host`` included: clients sign SigV4
for the proxy's ``host:port`` and SeaweedFS checks the signature against the
``Host`` it receives, so rewriting it would break authentication.  Responses
come back unchanged apart from the injected delays and faults.

Reserved path (S3 bucket names cannot contain ``_``, so it never collides):

* ``GET  /__shoal_proxy__/stats``   counters as JSON (same as ``S3Proxy.stats()``)
* ``POST /__shoal_proxy__/reset``   zero the counters
* ``POST /__shoal_proxy__/faults``  JSON body of ``FaultConfig`` fields to change
* ``POST /__shoal_proxy__/profile`` JSON ``{"name": ..., <field>: ...}``

Use in-process (``with S3Proxy(url, profile="s3-standard", seed=1) as p:``) or
as ``python benchmarks/s3proxy.py --upstream http://127.0.0.1:8333
--listen 127.0.0.1:0 --profile s3-standard --seed 1``, which prints
``LISTENING <port>`` on stdout when ready.  Only plain-HTTP upstreams.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
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
from dataclasses import dataclass
from typing import Any, Awaitable, Callable
from urllib.parse import urlsplit
from xml.sax.saxutils import escape

try:  # imported as benchmarks.s3proxy
    from .latency_profiles import FAULT_KINDS, PROFILES, LatencyProfile, get_profile
except ImportError:  # run as a script, or benchmarks/ is on sys.path
    from latency_profiles import FAULT_KINDS, PROFILES, LatencyProfile, get_profile

__all__ = ["S3Proxy", "FaultConfig", "LatencyProfile", "PROFILES", "measure_overhead", "main"]

log = logging.getLogger(__name__)

CONTROL_PREFIX = b"/__shoal_proxy__/"
CHUNK = 256 * 1024  # read size when relaying bodies: big enough to keep Python overhead low
PACE = 64 * 1024  # write size and burst when pacing: ~1 ms at 60 MiB/s
HEAD_LIMIT = 1 << 20  # max header block; also sizes the StreamReader buffers


@dataclass(frozen=True, kw_only=True)
class FaultConfig:
    """Injected fault rates (probabilities per request, disjoint, sum <= 1).

    Attributes:
        slowdown_rate: answer ``503 SlowDown`` without contacting upstream.
        reset_rate: send ``body_fraction`` of the body, then a TCP reset.
        truncate_rate: send ``body_fraction`` of the body, then a clean close.
        stall_rate: wait ``stall_s`` extra before the first response byte.
        stall_s: length of a stall in seconds.
        body_fraction: where resets and truncations cut the body.
        only_get: inject faults (including the profile's errors) on GETs only.
    """

    slowdown_rate: float = 0.0
    reset_rate: float = 0.0
    truncate_rate: float = 0.0
    stall_rate: float = 0.0
    stall_s: float = 10.0
    body_fraction: float = 0.5
    only_get: bool = False

    def __post_init__(self) -> None:
        rates = (self.slowdown_rate, self.reset_rate, self.truncate_rate, self.stall_rate)
        if any(r < 0 for r in rates) or sum(rates) > 1.0 + 1e-9:
            raise ValueError("fault rates must be >= 0 and sum to <= 1")
        if not 0.0 <= self.body_fraction <= 1.0 or self.stall_s < 0:
            raise ValueError("body_fraction must be in [0, 1] and stall_s >= 0")


class _Cut(Exception):
    """Raised by the body sender when an injected reset/truncation point is hit."""


class _Pacer:
    """Token bucket in GCRA form: ``tat`` is when the bucket would be full again.

    Keeping virtual time instead of sleeping per chunk makes the long-run rate
    exact even though asyncio sleeps are coarse (~1 ms).
    """

    __slots__ = ("tat",)

    def __init__(self) -> None:
        self.tat = 0.0

    def delay(self, n: int, rate: float, now: float) -> float:
        """Reserve ``n`` bytes at ``rate``; return how long to wait before sending."""
        self.tat = max(self.tat, now) + n / rate
        return self.tat - now - PACE / rate


def _parse_head(raw: bytes) -> tuple[list[bytes], dict[bytes, bytes]]:
    """Split a header block into its first line's words and lower-cased headers."""
    lines = raw[:-4].split(b"\r\n")
    first = lines[0].split(b" ", 2)
    if len(first) < 2:
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
    """Body framing per RFC 9112 6.3: ("chunked"|"length"|"close", length)."""
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


async def _copy_body(
    reader: asyncio.StreamReader, framing: str, length: int, emit: Callable[[bytes], Awaitable[None]]
) -> None:
    """Read one message body from ``reader`` and pass its raw bytes to ``emit``.

    Chunked bodies are parsed only to find their end; the framing bytes are
    passed through as they are, so the peer sees exactly what upstream sent.
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
                while True:
                    trailer = await reader.readuntil(b"\r\n")
                    line += trailer
                    if trailer == b"\r\n":
                        await emit(line)
                        return
            await emit(line)
            await _copy_body(reader, "length", size + 2, emit)  # data plus its CRLF
    elif framing == "close":
        while data := await reader.read(CHUNK):
            await emit(data)


def _slowdown_xml(target: bytes, request_id: str) -> bytes:
    resource = escape(target.split(b"?", 1)[0].decode("latin-1"))
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
        "<Message>Please reduce your request rate.</Message>"
        f"<Resource>{resource}</Resource><RequestId>{request_id}</RequestId>"
        "<HostId>shoal-s3proxy</HostId></Error>"
    ).encode()


Upstream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class S3Proxy:
    """S3 reverse proxy with injected latency, bandwidth caps and faults.

    ``start()`` runs the proxy on its own event loop in a daemon thread and
    returns the bound port; all settings can be changed while it runs and
    apply to requests that start afterwards.
    """

    def __init__(
        self,
        upstream: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        profile: str | LatencyProfile = "none",
        seed: int | None = None,
        faults: FaultConfig | None = None,
    ) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream must be an http:// URL, got {upstream!r}")
        self.upstream = upstream.rstrip("/")
        self._up_addr = (parts.hostname, parts.port or 80)
        self._host, self._port = host, port
        # A random seed is still a seed: it is reported so a run can be replayed.
        self.seed = seed if seed is not None else secrets.randbits(32)
        self._rng = random.Random(self.seed)
        self._profile = get_profile(profile)
        self._faults = faults or FaultConfig()
        self._agg_pacer = _Pacer()
        self._lock = threading.Lock()
        self._counts: collections.Counter[str] = collections.Counter()
        self._by_method: collections.Counter[str] = collections.Counter()
        self._by_status: collections.Counter[str] = collections.Counter()
        self._by_fault: collections.Counter[str] = collections.Counter()
        self._active = 0
        self._seq = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # ----------------------------------------------------------------- API
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
        """Switch profile (name or object), optionally overriding fields."""
        base = get_profile(profile) if profile is not None else self._profile
        for key in ("tail", "bandwidth_range", "error_kinds"):  # JSON gives lists
            if isinstance(overrides.get(key), list):
                value = overrides[key]
                overrides[key] = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        self._profile = base.replace(**overrides) if overrides else base
        log.info("profile %s", self._profile)
        return self._profile

    def set_faults(self, faults: FaultConfig | None = None, **changes: Any) -> FaultConfig:
        """Replace the fault config, or change some of its fields."""
        self._faults = dataclasses.replace(faults or self._faults, **changes)
        log.info("faults %s", self._faults)
        return self._faults

    def stats(self) -> dict[str, Any]:
        """Snapshot of the counters (control-path traffic is not counted)."""
        with self._lock:
            c = self._counts
            return {
                "requests": c["requests"],
                "requests_by_method": dict(self._by_method),
                "gets": self._by_method.get("GET", 0),
                "responses_by_status": dict(self._by_status),
                "bytes_sent": c["bytes_sent"],
                "bytes_received": c["bytes_received"],
                "bytes_from_upstream": c["bytes_from_upstream"],
                "bytes_to_upstream": c["bytes_to_upstream"],
                "faults": {k: self._by_fault.get(k, 0) for k in FAULT_KINDS},
                "connections_opened": c["connections_opened"],
                "connections_active": self._active,
                "upstream_connections_opened": c["upstream_connections_opened"],
                "profile": self._profile.name,
                "seed": self.seed,
            }

    def reset_stats(self) -> None:
        """Zero all counters (the active-connection gauge is kept)."""
        with self._lock:
            for counter in (self._counts, self._by_method, self._by_status, self._by_fault):
                counter.clear()

    def start(self) -> int:
        """Run the proxy on a daemon thread; return the bound port."""
        if self._thread is not None:
            raise RuntimeError("proxy already started")
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            try:
                self._loop.run_until_complete(self._listen())
            except BaseException as exc:  # report bind errors to the caller
                failure.append(exc)
                self._loop.close()
                ready.set()
                return
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name=f"s3proxy-{self.upstream}", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            self._thread = None
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
            self._handle_client, self._host, self._port, limit=HEAD_LIMIT, backlog=1024
        )
        self._port = self._server.sockets[0].getsockname()[1]

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        if self._server is not None:
            await self._server.wait_closed()

    async def _handle_client(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        """Serve one client connection: a keep-alive loop of request/response."""
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._add("connections_opened")
        with self._lock:
            self._active += 1
        up: Upstream | None = None
        pacer = _Pacer()
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
                    first, headers = _parse_head(head)
                    method, target, version = first[0], first[1], first[2] if len(first) > 2 else b""
                    _framing(headers)  # validates Content-Length before we forward anything
                except ValueError as exc:
                    log.warning("bad request from client: %s", exc)
                    await self._send_local(cw, 400, "Bad Request", b"", False)
                    break
                if target.startswith(CONTROL_PREFIX):
                    keep = await self._control(method, target, version, headers, cr, cw)
                else:
                    keep, up = await self._exchange(head, method, target, version, headers, cr, cw, up, pacer)
        except (ConnectionError, EOFError, OSError) as exc:
            log.debug("connection ended: %r", exc)
        except asyncio.CancelledError:
            # Only stop() cancels these tasks.  Ending normally matters: on
            # Python 3.11 asyncio logs a spurious error for a cancelled
            # client_connected_cb task.
            log.debug("connection cancelled by stop()")
        except Exception:
            log.exception("s3proxy connection failed")
        finally:
            if up is not None:
                up[1].close()
            if not cw.transport.is_closing():
                cw.close()
            with self._lock:
                self._active -= 1
            self._tasks.discard(task)

    def _draw_fault(self, method: bytes, profile: LatencyProfile, faults: FaultConfig) -> str | None:
        if faults.only_get and method != b"GET":
            return None
        u, acc = self._rng.random(), 0.0
        for kind in FAULT_KINDS:
            acc += getattr(faults, f"{kind}_rate")
            if u < acc:
                return kind
        if profile.error_rate and self._rng.random() < profile.error_rate:
            return self._rng.choice(profile.error_kinds)
        return None

    async def _open_upstream(self) -> Upstream:
        reader, writer = await asyncio.open_connection(*self._up_addr, limit=HEAD_LIMIT)
        self._add("upstream_connections_opened")
        return reader, writer

    async def _exchange(
        self,
        head: bytes,
        method: bytes,
        target: bytes,
        version: bytes,
        headers: dict[bytes, bytes],
        cr: asyncio.StreamReader,
        cw: asyncio.StreamWriter,
        up: Upstream | None,
        pacer: _Pacer,
    ) -> tuple[bool, Upstream | None]:
        """Forward one request and relay its response; return (keep-alive, upstream)."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        profile, faults = self._profile, self._faults  # one consistent view per request
        with self._lock:
            self._counts["requests"] += 1
            self._counts["bytes_received"] += len(head)
            self._by_method[method.decode("latin-1")] += 1
            self._seq += 1
            request_id = f"{self._seq:016X}"
        fault = self._draw_fault(method, profile, faults)
        ttfb = profile.sample_ttfb(self._rng)
        bandwidth = profile.sample_bandwidth(self._rng)
        framing, length = _framing(headers)
        has_body = framing == "chunked" or (framing == "length" and length > 0)
        expect = b"100-continue" in headers.get(b"expect", b"").lower()
        keep = _keep_alive(version, headers)

        async def count_in(data: bytes) -> None:
            self._add("bytes_received", len(data))

        if fault == "slowdown":
            with self._lock:
                self._by_fault[fault] += 1
            if has_body and expect:
                keep = False  # the client waits for 100 Continue; its body will not come
            elif has_body:
                await _copy_body(cr, framing, length, count_in)
            await asyncio.sleep(max(0.0, t0 + ttfb - loop.time()))
            extra = [f"x-amz-request-id: {request_id}", f"x-amz-id-2: {request_id}"]
            await self._send_local(cw, 503, "Slow Down", _slowdown_xml(target, request_id), keep,
                                   "application/xml", extra, head_only=method == b"HEAD")
            return keep, up

        done_at = [t0]  # when the request body was fully forwarded

        async def pump() -> None:
            async def emit(data: bytes) -> None:
                up_w.write(data)
                with self._lock:
                    self._counts["bytes_received"] += len(data)
                    self._counts["bytes_to_upstream"] += len(data)
                await up_w.drain()

            await _copy_body(cr, framing, length, emit)
            done_at[0] = loop.time()

        async def final_head() -> tuple[bytes, bool]:
            sent_continue = False
            while True:
                rhead = await up_r.readuntil(b"\r\n\r\n")
                status = int(rhead.split(b" ", 2)[1])
                if not (100 <= status < 200) or status == 101:
                    return rhead, sent_continue
                cw.write(rhead)  # 100 Continue: pass on at once, it is not the first byte
                await cw.drain()
                sent_continue = True

        pump_task: asyncio.Task[None] | None = None
        try:
            for attempt in (0, 1):
                if up is None or up[0].at_eof() or up[1].is_closing():
                    if up is not None:
                        up[1].close()
                    try:
                        up = await self._open_upstream()
                    except OSError as exc:
                        log.warning("upstream %s unreachable: %s", self.upstream, exc)
                        await self._send_local(cw, 502, "Bad Gateway", str(exc).encode(), False)
                        return False, None
                up_r, up_w = up
                up_w.write(head)  # byte-exact, Host unchanged (SigV4)
                self._add("bytes_to_upstream", len(head))
                try:
                    if not has_body:
                        await up_w.drain()
                        rhead, sent_continue = await final_head()
                        break
                    pump_task = asyncio.create_task(pump())
                    head_task = asyncio.create_task(final_head())
                    await asyncio.wait({pump_task, head_task}, return_when=asyncio.FIRST_COMPLETED)
                    if pump_task.done() and pump_task.exception() is not None:
                        head_task.cancel()
                        raise pump_task.exception()  # type: ignore[misc]
                    rhead, sent_continue = await head_task
                    break
                except (asyncio.IncompleteReadError, ConnectionError) as exc:
                    up[1].close()
                    up = None
                    stale = not isinstance(exc, asyncio.IncompleteReadError) or not exc.partial
                    if attempt == 0 and not has_body and stale:
                        log.debug("upstream connection went stale; retrying once")
                        continue  # an idle keep-alive connection was closed by upstream
                    raise

            rfirst, rheaders = _parse_head(rhead)
            status = int(rfirst[1])
            self._add("bytes_from_upstream", len(rhead))
            no_body = method == b"HEAD" or status in (204, 304)
            rframing, rlength = ("length", 0) if no_body else _framing(rheaders)
            up_keep = _keep_alive(rfirst[0], rheaders) and rframing != "close"

            # TTFB counts from the moment the request was complete; upstream's
            # own latency is part of it, not added to it.
            t_ref = t0 if pump_task is None else (done_at[0] if pump_task.done() else loop.time())
            if fault == "stall":
                ttfb += faults.stall_s
            cut_at: int | None = None
            if fault in ("reset", "truncate"):
                # Cut strictly inside the body so the client must notice; with
                # no body or an unknown length, cut before/after the header.
                if rframing == "length":
                    cut_at = min(int(rlength * faults.body_fraction), rlength - 1)
                else:
                    cut_at = 0
            if fault is not None:
                with self._lock:
                    self._by_fault[fault] += 1
            await asyncio.sleep(max(0.0, t_ref + ttfb - loop.time()))
            if cut_at is not None and cut_at < 0:
                await self._cut(cw, fault)  # type: ignore[arg-type]
                return False, up

            with self._lock:  # count before writing: the client may read stats next
                self._counts["bytes_sent"] += len(rhead)
                self._by_status[str(status)] += 1
            cw.write(rhead)
            sent = 0

            async def send(data: bytes) -> None:
                nonlocal sent
                self._add("bytes_from_upstream", len(data))
                if cut_at is not None and sent + len(data) >= cut_at:
                    if cut_at > sent:
                        await self._paced_write(cw, data[: cut_at - sent], bandwidth, pacer)
                    raise _Cut
                await self._paced_write(cw, data, bandwidth, pacer)
                sent += len(data)

            try:
                await _copy_body(up_r, rframing, rlength, send)
            except _Cut:
                await self._cut(cw, fault)  # type: ignore[arg-type]
                return False, up
            await cw.drain()

            if pump_task is not None and not pump_task.done():
                # Upstream answered before reading the whole body (an error, or
                # no 100 Continue): the connection state is unknown, so close.
                await asyncio.wait({pump_task}, timeout=0 if expect and not sent_continue else 1.0)
                if not pump_task.done():
                    return False, up
            if not up_keep:
                up[1].close()
                return False, None
            return keep, up
        except BaseException:
            if up is not None:  # may be a connection opened here, unknown to the caller
                up[1].close()
            raise
        finally:
            if pump_task is not None and not pump_task.done():
                pump_task.cancel()

    async def _paced_write(
        self, cw: asyncio.StreamWriter, data: bytes, bandwidth: float | None, pacer: _Pacer
    ) -> None:
        """Write to the client at no more than the per-connection and aggregate caps."""
        aggregate = self._profile.aggregate_bytes_per_s
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
            wait = pacer.delay(len(piece), bandwidth, now) if bandwidth else 0.0
            if aggregate:
                wait = max(wait, self._agg_pacer.delay(len(piece), aggregate, now))
            if wait > 0:
                await asyncio.sleep(wait)
            self._add("bytes_sent", len(piece))
            cw.write(piece)
            await cw.drain()

    async def _cut(self, cw: asyncio.StreamWriter, kind: str) -> None:
        """End the client connection abruptly: RST for "reset", FIN otherwise."""
        transport = cw.transport
        if kind != "reset":
            cw.close()  # close() flushes what was written, then sends FIN
            return
        # Let the prefix reach the client first: with SO_LINGER 0 the kernel
        # drops unsent data and sends RST instead of FIN.
        deadline = time.monotonic() + 2.0
        while transport.get_write_buffer_size() and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()

    async def _send_local(
        self,
        cw: asyncio.StreamWriter,
        status: int,
        reason: str,
        body: bytes,
        keep: bool,
        content_type: str = "text/plain",
        extra: list[str] | None = None,
        head_only: bool = False,
        counted: bool = True,
    ) -> None:
        """Answer from the proxy itself (injected 503, control path, 4xx/502)."""
        lines = [
            f"HTTP/1.1 {status} {reason}",
            f"Date: {email.utils.formatdate(usegmt=True)}",
            "Server: shoal-s3proxy",
            f"Content-Type: {content_type}",
            f"Content-Length: {len(body)}",
            *(extra or []),
            "Connection: keep-alive" if keep else "Connection: close",
        ]
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head_only else body)
        if counted:
            with self._lock:
                self._counts["bytes_sent"] += len(data)
                self._by_status[str(status)] += 1
        cw.write(data)
        await cw.drain()

    async def _control(
        self,
        method: bytes,
        target: bytes,
        version: bytes,
        headers: dict[bytes, bytes],
        cr: asyncio.StreamReader,
        cw: asyncio.StreamWriter,
    ) -> bool:
        """Serve the reserved ``/__shoal_proxy__/`` path; return keep-alive."""
        keep = _keep_alive(version, headers)
        framing, length = _framing(headers)
        chunks: list[bytes] = []

        async def collect(data: bytes) -> None:
            chunks.append(data)

        if framing == "chunked" or length > 0:
            await _copy_body(cr, framing, length, collect)
        name = target.split(b"?", 1)[0][len(CONTROL_PREFIX) :].decode("latin-1").strip("/")
        status, reason, payload = 200, "OK", None
        try:
            if framing == "chunked":
                raise ValueError("send control bodies with Content-Length")
            body = json.loads(b"".join(chunks) or b"{}")
            if not isinstance(body, dict):
                raise TypeError("control body must be a JSON object")
            if method == b"GET" and name == "stats":
                payload = self.stats()
            elif method == b"POST" and name == "reset":
                self.reset_stats()
                payload = {"reset": True}
            elif method == b"POST" and name == "faults":
                payload = dataclasses.asdict(self.set_faults(**body))
            elif method == b"POST" and name == "profile":
                payload = self.set_profile(body.pop("name", None), **body).to_dict()
            else:
                status, reason, payload = 404, "Not Found", {"error": f"no control endpoint {name!r}"}
        except (ValueError, TypeError) as exc:
            status, reason, payload = 400, "Bad Request", {"error": str(exc)}
        data = json.dumps(payload).encode()
        await self._send_local(cw, status, reason, data, keep, "application/json", counted=False)
        return keep


def measure_overhead(
    upstream_url: str,
    *,
    n: int = 30,
    size: int = 1 << 20,
    bucket: str = "shoal-proxy-overhead",
    key: str = "overhead.bin",
    access_key: str | None = None,
    secret_key: str | None = None,
    region: str = "us-east-1",
    seed: int = 0,
) -> dict[str, Any]:
    """Time ``n`` ranged GETs of ``size`` bytes directly vs through the proxy.

    The proxy runs in this process with profile "none", so the ratio is its
    own cost (CPU and one extra loopback hop).  Direct and proxied GETs
    alternate so that drift in the upstream affects both equally.
    """
    import boto3  # local: the proxy itself needs nothing outside the stdlib
    from botocore.config import Config

    access_key = access_key or os.environ.get("AWS_ACCESS_KEY_ID", "x")
    secret_key = secret_key or os.environ.get("AWS_SECRET_ACCESS_KEY", "y")
    config = Config(retries={"total_max_attempts": 1}, s3={"addressing_style": "path"})

    def client(url: str) -> Any:
        return boto3.client("s3", endpoint_url=url, aws_access_key_id=access_key,
                            aws_secret_access_key=secret_key, region_name=region, config=config)

    rng = random.Random(seed)
    direct = client(upstream_url)
    try:
        direct.create_bucket(Bucket=bucket)
    except direct.exceptions.ClientError as exc:  # already there is fine
        if exc.response["Error"]["Code"] not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise
    blob = rng.randbytes(4 * size)
    direct.put_object(Bucket=bucket, Key=key, Body=blob)
    times: dict[str, list[float]] = {"direct": [], "proxy": []}
    cpu: dict[str, float] = {"direct": 0.0, "proxy": 0.0}
    with S3Proxy(upstream_url, profile="none", seed=seed) as proxy:
        clients = {"direct": direct, "proxy": client(proxy.url)}
        for i in range(n + 3):  # the first 3 rounds warm up connections
            offset = rng.randrange(0, 3 * size)
            order = ("direct", "proxy") if i % 2 else ("proxy", "direct")
            for name in order:
                c0, t = time.process_time(), time.perf_counter()
                got = clients[name].get_object(Bucket=bucket, Key=key, Range=f"bytes={offset}-{offset + size - 1}")
                data = got["Body"].read()
                dt, dc = time.perf_counter() - t, time.process_time() - c0
                if data != blob[offset : offset + size]:
                    raise AssertionError(f"{name} GET returned wrong bytes")
                if i >= 3:
                    times[name].append(dt)
                    cpu[name] += dc
        proxy_stats = proxy.stats()
    direct.delete_object(Bucket=bucket, Key=key)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "n": n,
        "size": size,
        "upstream": upstream_url,
        "median_s": med,
        "mean_s": {k: statistics.fmean(v) for k, v in times.items()},
        "min_s": {k: min(v) for k, v in times.items()},
        "max_s": {k: max(v) for k, v in times.items()},
        "ratio_median": med["proxy"] / med["direct"],
        "ratio_mean": statistics.fmean(times["proxy"]) / statistics.fmean(times["direct"]),
        "process_cpu_s_per_get": {k: v / n for k, v in cpu.items()},
        "proxy_gets": proxy_stats["gets"],
    }


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--upstream", required=True, help="S3 server URL, e.g. http://127.0.0.1:8333")
    p.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0 = any free port)")
    p.add_argument("--profile", default="none", choices=sorted(PROFILES))
    p.add_argument("--seed", type=int, default=None, help="RNG seed (random and printed if unset)")
    p.add_argument("--bandwidth-mib-s", type=float, help="override per-connection cap (0 = none)")
    p.add_argument("--aggregate-mib-s", type=float, help="override aggregate cap (0 = none)")
    p.add_argument("--error-rate", type=float, help="override the profile's error rate")
    for kind in FAULT_KINDS:
        p.add_argument(f"--{kind}-rate", type=float, default=0.0, help=f"probability of a {kind} fault")
    p.add_argument("--stall-s", type=float, default=10.0, help="length of a first-byte stall")
    p.add_argument("--body-fraction", type=float, default=0.5, help="where resets/truncations cut")
    p.add_argument("--only-get", action="store_true", help="inject faults on GETs only")
    p.add_argument("--measure-overhead", action="store_true",
                   help="time ranged GETs direct vs through the proxy, print JSON, exit")
    p.add_argument("--n", type=int, default=30, help="GETs per side for --measure-overhead")
    p.add_argument("--size", type=int, default=1 << 20, help="bytes per GET for --measure-overhead")
    p.add_argument("--log-level", default="WARNING")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; see ``--help``."""
    args = _parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.measure_overhead:
        result = measure_overhead(args.upstream, n=args.n, size=args.size, seed=args.seed or 0)
        print(json.dumps(result, indent=2))
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
    print(f"s3proxy: upstream={proxy.upstream} profile={args.profile} seed={proxy.seed} "
          f"control={proxy.url}/__shoal_proxy__/stats", file=sys.stderr, flush=True)
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
