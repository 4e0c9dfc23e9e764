#!/usr/bin/env python
"""The floor of a peer read on one machine: DuckDB reading bytes that arrive over
loopback TCP into a fresh process, through a minimal Python filesystem, against
DuckDB's native reads of the same local files.

Issue 5 asks a client with an empty cache, reading from a warm peer, to run
TPC-H within 1.3x of a local-warm client.  This measures what *any* design
pays on this machine before it adds a protocol, checksums, lookups or
bookkeeping of its own, so that Shoal's peer ratio can be read against it:

* ``native``: DuckDB over the local Parquet files (what a local-warm client
  approaches: it reads sparse local copies natively);
* ``fsspec``: the same files through a minimal ``pread`` fsspec filesystem
  registered with DuckDB (the cost of reading through Python at all);
* ``loopback``: every byte DuckDB reads (recorded in an untimed run of the
  same query in another process) is sent by a separate *sender* process
  (``sendfile`` from the page cache, in the order DuckDB read it) over one
  loopback TCP connection in the timed region; the client receives it on one
  thread into fresh private memory (8 MiB mappings populated in one call:
  the cheapest fresh memory measured on this VM), while DuckDB reads through a
  minimal fsspec filesystem that waits for a range to arrive and returns it.  No framing, no
  checksums, no lookups: a lower bound for a peer read of these bytes;
* ``loopback_hot``: the same with the receive memory touched before the timed
  region (a receive pool recycled forever: no first-touch page faults);
* ``loopback_file``: the native alternative: every byte is received first
  into a sparse copy of its file (page cache), then DuckDB reads the copies
  natively (safe only once all of them are there, hence no overlap).

Each run is a fresh process, timed like ``bench_tpch.py`` (view creation plus
the query to an Arrow table); modes are interleaved run by run::

    .venv/bin/python benchmarks/tpch_peer_floor.py --queries q03,q06,q12 --runs 3

Writes ``benchmarks/results/peer-floor.json`` and ``.md`` (``--out`` to change).
Needs the SF 1 data in ``benchmarks/data/tpch-sf1`` (``bench_tpch.py`` makes it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MODES = ("native", "fsspec", "loopback", "loopback_hot", "loopback_file")

# The sender: serves byte ranges of local files with sendfile, in the order asked.
# Request: 4-byte big-endian length, then a JSON list of [path, offset, length].
_SENDER = r'''
import json, os, socket, struct, sys, threading

def serve(conn):
    fds = {}
    try:
        while True:
            head = conn.recv(4, socket.MSG_WAITALL)
            if len(head) < 4:
                return
            (size,) = struct.unpack(">I", head)
            body = b""
            while len(body) < size:
                body += conn.recv(size - len(body))
            for path, offset, length in json.loads(body):
                fd = fds.get(path)
                if fd is None:
                    fd = fds[path] = os.open(path, os.O_RDONLY)
                while length:
                    sent = os.sendfile(conn.fileno(), fd, offset, length)
                    offset += sent
                    length -= sent
    finally:
        conn.close()
        for fd in fds.values():
            os.close(fd)

srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(16)
print(srv.getsockname()[1], flush=True)
while True:
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
'''

_CHILD = r'''
import bisect, io, json, mmap, os, resource, socket, struct, sys, threading, time
sys.path.insert(0, sys.argv[3])
import duckdb, pyarrow  # noqa: F401 - pyarrow before the timed region, as bench_tpch's runner does
from fsspec.implementations.local import LocalFileSystem
import tpch_answers

mode, query, data, extra = sys.argv[1], sys.argv[2], sys.argv[4], json.loads(sys.argv[5])
recorded = []          # record mode: (path, offset, length) of every read, in order
record_lock = threading.Lock()
received = {}          # loopback: path -> sorted [(offset, length, index)]
buffers, ready = [], []
stats = {"uncovered_reads": 0, "reads": 0}


class Arena:
    """Receive memory cut from 8 MiB private anonymous mappings, each populated in
    one call when made (MAP_POPULATE: the cheapest way to fresh memory measured
    here, ~0.4 ms per MiB against ~0.55 for page faults and 0.1-2.4 for huge
    pages, depending on whether the VM's host still backs them).  ``prepare``
    makes them before the timed region (loopback_hot: a pool used forever)."""
    SIZE = 8 << 20
    def __init__(self):
        self.ready, self.used, self.view = [], self.SIZE, None
    def _new(self, size):
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE
        return memoryview(mmap.mmap(-1, size, flags=flags))
    def prepare(self, lengths):
        for length in lengths:
            self.ready.append(self.take(length))
        self.ready.reverse()
    def take(self, size):
        if self.ready:
            return self.ready.pop()
        if size > self.SIZE // 4:
            return self._new(size)
        if self.used + size > self.SIZE:
            self.view, self.used = self._new(self.SIZE), 0
        out = self.view[self.used : self.used + size]
        self.used += (size + 4095) & ~4095
        return out


class RangeFile(io.RawIOBase):
    def __init__(self, path):
        self.path, self.pos = path, 0
        self.size = os.stat(path).st_size
        self.fd = None
    def readable(self): return True
    def seekable(self): return True
    def seek(self, offset, whence=0):
        self.pos = offset if whence == 0 else (self.pos + offset if whence == 1 else self.size + offset)
        return self.pos
    def tell(self): return self.pos
    def read(self, n=-1):
        n = self.size - self.pos if n is None or n < 0 else min(n, self.size - self.pos)
        data = self._read(self.pos, n)
        self.pos += len(data)
        return data
    def _pread(self, offset, n):
        if self.fd is None:
            self.fd = os.open(self.path, os.O_RDONLY)
        return os.pread(self.fd, n, offset)
    def _read(self, offset, n):
        if mode == "record":
            with record_lock:
                recorded.append((self.path, offset, n))
            return self._pread(offset, n)
        if mode == "fsspec":
            return self._pread(offset, n)
        stats["reads"] += 1
        entries = received.get(self.path, ())
        at = bisect.bisect_right(entries, (offset, float("inf"), 0)) - 1
        if at >= 0:
            start, length, index = entries[at]
            if start + length >= offset + n:
                ready[index].wait()
                return bytes(buffers[index][offset - start : offset - start + n])
        stats["uncovered_reads"] += 1
        return self._pread(offset, n)
    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        super().close()


class RangeFileSystem(LocalFileSystem):
    protocol = ("pyfile",)
    root_marker = "/"
    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        return path[len("pyfile://"):] if path.startswith("pyfile://") else path
    def _open(self, path, mode="rb", **kwargs):
        return RangeFile(self._strip_protocol(path))


def receive_to_files(sock, ranges, directory):
    """loopback_file: each range written into a sparse copy of its file at its own offset."""
    buffer = memoryview(bytearray(4 << 20))
    fds = {}
    for path, offset, length in ranges:
        fd = fds.get(path)
        if fd is None:
            target = os.path.join(directory, os.path.basename(os.path.dirname(path)), os.path.basename(path))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            fd = fds[path] = os.open(target, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            os.ftruncate(fd, os.stat(path).st_size)
        while length:
            got = sock.recv_into(buffer, min(length, len(buffer)), socket.MSG_WAITALL)
            os.pwrite(fd, buffer[:got], offset)
            offset += got
            length -= got
    for fd in fds.values():
        os.close(fd)


def receive(sock, ranges, arena):
    for index, (path, offset, length) in enumerate(ranges):
        view = buffers[index] = arena.take(length) if length else memoryview(b"")
        got = 0
        while got < length:
            got += sock.recv_into(view[got:], length - got, socket.MSG_WAITALL)
        ready[index].set()


con = duckdb.connect()
con.execute(f"SET threads={int(extra.get('threads', 2))}")
con.execute("SET enable_external_file_cache=false")
prefix = ""
ranges, sock, arena = [], None, None
if mode not in ("native", "loopback_file"):
    con.register_filesystem(RangeFileSystem())
    prefix = "pyfile://"
if mode.startswith("loopback"):
    ranges = json.loads(open(extra["ranges"]).read())
    for index, (path, offset, length) in enumerate(ranges):
        received.setdefault(path, []).append((offset, length, index))
        ready.append(threading.Event())
    for entries in received.values():
        entries.sort()
    arena = Arena()
    if mode == "loopback_hot":
        arena.prepare(length for _, _, length in ranges if length)
    if mode == "loopback_file":
        ranges_needed = ranges
        ranges = []
    buffers.extend(None for _ in ranges)
    sock = socket.create_connection(("127.0.0.1", extra["port"]))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    request = json.dumps(ranges_needed if mode == "loopback_file" else ranges).encode()
con.execute("SELECT 1").fetchall()
sql = tpch_answers.load_queries()[query]

def cpu():
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime

cpu0 = cpu()
start = time.perf_counter()
if mode == "loopback_file":
    # The native path: every byte first lands in a sparse local copy (page cache),
    # then DuckDB reads the copies itself (only safe once all of them are there).
    sock.sendall(struct.pack(">I", len(request)) + request)
    receive_to_files(sock, ranges_needed, extra["copies"])
elif sock is not None:
    sock.sendall(struct.pack(">I", len(request)) + request)
    receiver = threading.Thread(target=receive, args=(sock, ranges, arena), daemon=True)
    receiver.start()
for table in ("lineitem", "orders", "partsupp", "part", "customer", "supplier", "nation", "region"):
    base = data
    if mode == "loopback_file" and os.path.isdir(os.path.join(extra["copies"], table)):
        base = extra["copies"]  # tables the query reads; the others are never scanned
    glob = f"{base}/{table}/*.parquet"
    con.execute(f"CREATE VIEW {table} AS FROM read_parquet('{prefix}{glob}')")
rows = con.sql(sql).to_arrow_table().num_rows
elapsed = time.perf_counter() - start
used_cpu = cpu() - cpu0
if mode == "record":
    # The union of the reads of each file (DuckDB reads some bytes twice), each
    # merged range ordered by its first read: what a peer sends once, in need order.
    first_read, spans = {}, {}
    for order, (path, offset, length) in enumerate(recorded):
        if length > 0:
            spans.setdefault(path, []).append((offset, offset + length, order))
    merged = []
    for path, items in spans.items():
        items.sort()
        current = None
        for lo, hi, order in items:
            if current is not None and lo <= current[2]:
                current[2] = max(current[2], hi)
                current[3] = min(current[3], order)
            else:
                current = [path, lo, hi, order]
                merged.append(current)
    merged.sort(key=lambda item: item[3])
    with open(extra["ranges"], "w") as f:
        json.dump([[path, lo, hi - lo] for path, lo, hi, _ in merged], f)
if mode == "loopback_file":
    ranges = ranges_needed
    import shutil
    for name in os.listdir(extra["copies"]):
        shutil.rmtree(os.path.join(extra["copies"], name))
print(json.dumps({"s": elapsed, "cpu_s": used_cpu, "rows": rows,
                  "bytes": sum(r[2] for r in ranges), **stats}))
'''


def _run(mode: str, query: str, data: Path, extra: dict[str, Any], pin: list[str]) -> dict[str, Any]:
    out = subprocess.run([*pin, sys.executable, "-c", _CHILD, mode, query, str(HERE), str(data), json.dumps(extra)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _markdown(result: dict[str, Any]) -> str:
    lines = [
        "# The floor of a peer read on one machine (issue 5)",
        "",
        f"Command: `{result['command']}` — SF {result['sf']}, {result['runs']} fresh-process runs per mode, "
        f"interleaved; DuckDB {result['duckdb']} with {result.get('threads', 2)} thread(s); {result['machine']}; started {result['started']}, "
        f"{result['runtime_s']:.0f} s.",
        "",
        *(["Pinned (`--pin`): two machines in one: every client process on CPU 0 with one DuckDB thread, the "
           "sender on CPU 1, so that sending costs the client nothing, as on separate machines.", ""]
          if result.get("pinned") else []),
        "Modes (see the script's docstring): `native` DuckDB over local files; `fsspec` the same through a "
        "minimal `pread` fsspec filesystem; `loopback` every byte DuckDB reads sent by another process "
        "(`sendfile`, in DuckDB's read order) over one loopback TCP connection during the query and read "
        "through a minimal fsspec filesystem as it arrives, into fresh memory; `loopback_hot` the "
        "same into memory touched before the timed region; `loopback_file` every byte received first into a "
        "sparse copy of its file (page cache), then DuckDB reads the copies natively. Medians; ratios to `native`.",
        "",
        "| Query | MiB read | native s | fsspec × | loopback × | loopback_hot × | loopback_file × "
        "| CPU s native / loopback |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for query, row in result["per_query"].items():
        lines.append(
            f"| {query} | {row['mib']:.1f} | {row['native_s']:.3f} | {row['fsspec']:.2f} | {row['loopback']:.2f} | "
            f"{row['loopback_hot']:.2f} | {row['loopback_file']:.2f} | {row['cpu_native_s']:.2f} / {row['cpu_loopback_s']:.2f} |")
    summary = result["summary"]
    lines += [
        f"| geometric mean | | | {summary['fsspec']:.2f} | {summary['loopback']:.2f} | "
        f"{summary['loopback_hot']:.2f} | {summary['loopback_file']:.2f} | |",
        "",
        "Every run's row count matched the native run's; reads outside the recorded ranges (served from the "
        f"local file, not counted as transferred): {result['uncovered_reads']}.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--queries", default="q03,q06,q12")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--data", type=Path, default=HERE / "data" / "tpch-sf1")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default benchmarks/results/peer-floor.json; -pinned with --pin)")
    parser.add_argument("--pin", action="store_true",
                        help="two machines in one: every client on CPU 0 with 1 DuckDB thread, the sender on CPU 1")
    parser.add_argument("--from-json", type=Path, help="only re-render the Markdown of this JSON")
    args = parser.parse_args()
    if args.from_json:
        args.from_json.with_suffix(".md").write_text(_markdown(json.loads(args.from_json.read_text())))
        return 0
    if args.out is None:
        args.out = HERE / "results" / ("peer-floor-pinned.json" if args.pin else "peer-floor.json")
    threads = 1 if args.pin else 2
    client_pin = ["taskset", "-c", "0"] if args.pin else []
    if not (args.data / "lineitem").is_dir():
        print(f"no TPC-H data in {args.data}: run benchmarks/bench_tpch.py first", file=sys.stderr)
        return 2
    import duckdb

    started = time.time()
    sender = subprocess.Popen([*(["taskset", "-c", "1"] if args.pin else []), sys.executable, "-c", _SENDER], stdout=subprocess.PIPE, text=True)
    per_query: dict[str, dict[str, Any]] = {}
    uncovered = 0
    try:
        port = int(sender.stdout.readline())  # type: ignore[union-attr]
        with tempfile.TemporaryDirectory() as tmp:
            for query in args.queries.split(","):
                ranges = str(Path(tmp) / f"{query}.json")
                copies = str(Path(tmp) / "copies")
                os.makedirs(copies, exist_ok=True)
                expected = _run("record", query, args.data, {"ranges": ranges}, [])["rows"]
                runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
                for _ in range(args.runs):
                    for mode in MODES:
                        run = _run(mode, query, args.data, {"ranges": ranges, "port": port, "copies": copies,
                                                            "threads": threads}, client_pin)
                        if run["rows"] != expected:
                            raise SystemExit(f"{query} {mode}: {run['rows']} rows, expected {expected}")
                        uncovered += run.get("uncovered_reads", 0)
                        runs[mode].append(run)
                native = statistics.median(r["s"] for r in runs["native"])
                row: dict[str, Any] = {"native_s": native, "mib": runs["loopback"][0]["bytes"] / 2**20,
                                       "cpu_native_s": statistics.median(r["cpu_s"] for r in runs["native"]),
                                       "cpu_loopback_s": statistics.median(r["cpu_s"] for r in runs["loopback"]),
                                       "runs": runs}
                for mode in MODES[1:]:
                    row[mode] = statistics.median(r["s"] for r in runs[mode]) / native
                per_query[query] = row
                print(f"{query}: native {native:.3f} s, " + ", ".join(f"{m} {row[m]:.2f}x" for m in MODES[1:])
                      + f" ({row['mib']:.1f} MiB)", flush=True)
    finally:
        sender.kill()
    summary = {mode: statistics.geometric_mean(r[mode] for r in per_query.values()) for mode in MODES[1:]}
    print("geometric mean: " + ", ".join(f"{m} {summary[m]:.2f}x" for m in MODES[1:]))
    result = {
        "command": "python benchmarks/tpch_peer_floor.py " + " ".join(sys.argv[1:]),
        "sf": json.loads((args.data / "_manifest.json").read_text()).get("sf", "?")
        if (args.data / "_manifest.json").exists() else "?",
        "runs": args.runs, "duckdb": duckdb.__version__, "threads": threads, "pinned": args.pin,
        "machine": f"{os.cpu_count()} vCPU {platform.machine()}, Python {platform.python_version()}",
        "started": dt.datetime.fromtimestamp(started, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "runtime_s": time.time() - started, "per_query": per_query, "summary": summary,
        "uncovered_reads": uncovered,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    args.out.with_suffix(".md").write_text(_markdown(result))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
