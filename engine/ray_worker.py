"""The Shoal worker that runs inside a Ray actor (one per node).

It owns its node's SSD cache (one :class:`~shoal.cache.BlockReader`, shared by
the actor's threads) and runs :func:`~shoal.engine.worker.run_scan_task` on
tasks that arrive as plain data.  Each thread has its own
:class:`~shoal.cache.ShoalFileSystem` over the shared reader, so every task
runs inside its own version snapshot: the task's pinned versions are what
DuckDB reads, however many tasks of however many queries run at once.

Results leave as Arrow tables, which Ray's serializer puts in its object
store as buffers (pickle protocol 5, out of band), never row by row; a
result larger than the limit its task was sent with is written to the
object store as Parquet instead and only its URL and version leave
(:mod:`shoal.engine.ray_spill`).  Each result carries the I/O the actor did
since its previous report, so the coordinator can account a query's bytes
by tier.

With a cluster secret the actor also serves its cache to the other actors
and to the driver over the transport, and reads its own misses through
them (:class:`~shoal.engine.ray_peers.ActorPeers`).

This module does not import Ray (only :func:`~shoal.engine.ray_peers.node_ip`
asks it for the node's address): :mod:`shoal.engine.ray_executor` wraps
:class:`ShoalWorker` with ``ray.remote``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import duckdb

from shoal.cache import BlockReader, CacheConfig, ObjectVersion, ShoalFileSystem, StoreConfig

from .errors import QueryCancelled
from .ray_peers import ActorPeers
from .ray_spill import spill_object, write_spill
from .worker import ScanTask, _connection, run_scan_task

__all__ = ["ShoalWorker", "member_cache_dir", "task_to_data", "task_from_data", "IO_FIELDS"]

logger = logging.getLogger(__name__)

IO_FIELDS = ("bytes_from_memory", "bytes_from_cache", "bytes_from_store", "store_requests",
             "blocks_hit", "blocks_missed", "bytes_from_peers", "blocks_from_peers")


def task_to_data(task: ScanTask) -> dict[str, Any]:
    """A task as plain data (dicts, tuples, strings, numbers) for the wire."""
    data = {f.name: getattr(task, f.name) for f in dataclasses.fields(task)}
    data["files"] = tuple(dataclasses.asdict(v) for v in task.files)
    return data


def task_from_data(data: dict[str, Any]) -> ScanTask:
    fields = dict(data)
    fields["files"] = tuple(ObjectVersion(**v) for v in data["files"])
    return ScanTask(**fields)


class ShoalWorker:
    """One node's worker: a cache directory, a block reader, scan tasks.

    ``cache`` and ``store`` are the fields of :class:`CacheConfig` and
    :class:`StoreConfig` as plain dicts (credentials included: they travel in
    Ray's object store and are never logged or returned).  With ``secret``
    (the cluster secret, never logged or returned either) the actor serves
    its cache on its node's IP, on ``port`` when free (a replacement keeps
    its predecessor's address, so block ownership does not move), else on any.
    """

    def __init__(self, member: str, cache: dict[str, Any], store: dict[str, Any],
                 protocols: tuple[str, ...], task_delay_s: float = 0.0, secret: bytes | None = None,
                 port: int = 0, peer_timeout: float = 5.0) -> None:
        self.member = member
        # An actor keeps what it reads, also what its peers served: tasks are placed
        # on the actor that owns their files (ray_affinity.py), so this SSD is where
        # that data is read again, also by the actor that replaces this one.
        self._cache_config = CacheConfig(**{**cache, "keep_peer_copies": True})
        self._store_config = StoreConfig(**store)
        self._protocols = tuple(protocols)
        self._task_delay_s = task_delay_s
        self.reader = BlockReader(self._cache_config)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._reported: dict[str, dict[str, int]] = {}
        self._cancelled: set[str] = set()
        self._running: dict[int, tuple[str, duckdb.DuckDBPyConnection]] = {}
        self._tasks_run = 0
        self._tasks_failed = 0
        self._tasks_cancelled = 0
        self._bytes_out = 0
        self._spilled_tasks = 0
        self._spilled_bytes = 0
        self._spilled_arrow_bytes = 0
        self._started = time.time()
        self.peers: ActorPeers | None = None
        if secret is not None:
            self.peers = ActorPeers(self.reader, self._cache_config, self._store_config, secret, port=port,
                                    timeout=peer_timeout)
        logger.debug("shoal worker %s up (pid %d, cache %s)", member, os.getpid(), self._cache_config.directory)

    # -- per-thread filesystem ---------------------------------------------------------

    def _fs(self) -> ShoalFileSystem:
        fs = getattr(self._local, "fs", None)
        if fs is None:
            fs = ShoalFileSystem(cache=self._cache_config, store=self._store_config,
                                 protocols=self._protocols, reader=self.reader)
            self._local.fs = fs
        return fs

    # -- tasks --------------------------------------------------------------------------

    def run(self, query: str, data: dict[str, Any], spill: dict[str, Any] | None = None) -> dict[str, Any]:
        """Run one scan task of ``query``; returns ``{"table", "seconds", "worker", "io"}``.

        With ``spill`` (``{"prefix": url, "limit": bytes}``) a result of more than
        ``limit`` bytes is written as Parquet under ``prefix``: ``table`` is then
        empty (the schema) and ``spilled`` holds ``{"url", "version", "rows", "bytes"}``."""
        task = task_from_data(data)
        if self._task_delay_s:
            time.sleep(self._task_delay_s)
        fs = self._fs()
        ident = threading.get_ident()
        with self._lock:
            if query in self._cancelled:
                self._tasks_cancelled += 1
                raise QueryCancelled("query cancelled")
            self._running[ident] = (query, _connection(fs, task.threads))
        try:
            with fs.snapshot():
                fs.take_error()
                try:
                    result = run_scan_task(task, fs)
                except duckdb.Error as exc:
                    # DuckDB wraps what the filesystem raised: send the storage error itself.
                    storage = fs.take_error()
                    if storage is not None:
                        raise storage from None
                    if isinstance(exc, duckdb.InterruptException) and query in self._cancelled:
                        raise QueryCancelled("query cancelled") from None
                    raise
        except BaseException:
            with self._lock:
                self._tasks_failed += 1
            raise
        finally:
            with self._lock:
                self._running.pop(ident, None)
        table = result.table
        out: dict[str, Any] = {"seconds": result.seconds, "worker": f"{self.member}@{socket.gethostname()}/{os.getpid()}"}
        if spill is not None and table.nbytes > spill["limit"]:
            out["spilled"] = self._spill(query, task, fs, spill["prefix"], table)
            table = table.schema.empty_table()
        with self._lock:
            self._tasks_run += 1
            self._bytes_out += table.nbytes
        out.update(table=table, io=self.take_io())
        return out

    def _spill(self, query: str, task: ScanTask, fs: ShoalFileSystem, prefix: str, table: Any) -> dict[str, Any]:
        with self._lock:
            if query in self._cancelled:  # the coordinator may be deleting the prefix now
                self._tasks_cancelled += 1
                raise QueryCancelled("query cancelled")
        url = spill_object(prefix, task)
        version = write_spill(fs, url, table)
        with self._lock:
            self._spilled_tasks += 1
            self._spilled_bytes += version["size"]
            self._spilled_arrow_bytes += table.nbytes
        logger.debug("spilled %d rows (%d bytes in memory) of %s to %s", table.num_rows, table.nbytes, task.table, url)
        return {"url": url, "version": version, "rows": table.num_rows, "bytes": table.nbytes}

    def cancel(self, query: str) -> int:
        """Refuse the query's queued tasks and interrupt its running ones; returns how many ran."""
        with self._lock:
            self._cancelled.add(query)
            if len(self._cancelled) > 1024:
                self._cancelled = {query}
            running = [con for q, con in self._running.values() if q == query]
        for con in running:
            con.interrupt()
        return len(running)

    # -- accounting ---------------------------------------------------------------------

    def take_io(self) -> dict[str, dict[str, int]]:
        """Per-object I/O since the last call (what the coordinator adds to its ledger)."""
        snapshot = self.reader.ledger.snapshot()
        delta: dict[str, dict[str, int]] = {}
        with self._lock:
            for url, io in snapshot.items():
                now = {name: getattr(io, name) for name in IO_FIELDS}
                before = self._reported.get(url, {})
                change = {k: v - before.get(k, 0) for k, v in now.items() if v != before.get(k, 0)}
                if change:
                    delta[url] = change
                    self._reported[url] = now
        return delta

    def stats(self) -> dict[str, Any]:
        """Counters for tests and benchmarks: tasks, and cache tiers of this worker."""
        metrics = self.reader.metrics.snapshot()
        io = self.reader.ledger.snapshot()
        with self._lock:
            counts = {"tasks_run": self._tasks_run, "tasks_failed": self._tasks_failed,
                      "tasks_cancelled": self._tasks_cancelled, "bytes_out": self._bytes_out,
                      "spilled_tasks": self._spilled_tasks, "spilled_bytes": self._spilled_bytes,
                      "spilled_arrow_bytes": self._spilled_arrow_bytes}
        return {
            "member": self.member,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "cache_dir": str(self._cache_config.directory),
            "cache_volume": self.reader.cache.volume(),
            "uptime_s": time.time() - self._started,
            **counts,
            "hits": metrics["hits"],
            "misses": metrics["misses"],
            "store_requests": metrics["store_requests"],
            "bytes_from_store": sum(u.bytes_from_store for u in io.values()),
            "bytes_from_cache": sum(u.bytes_from_cache for u in io.values()),
            "bytes_from_memory": sum(u.bytes_from_memory for u in io.values()),
            "bytes_from_peers": sum(u.bytes_from_peers for u in io.values()),
            **(self.peers.stats() if self.peers is not None else {}),
        }

    # -- peers --------------------------------------------------------------------------

    def address(self) -> str | None:
        """``host:port`` where this actor serves its cache (None: not serving)."""
        return self.peers.address if self.peers is not None else None

    def set_peers(self, peers: list[str]) -> None:
        """The live actors' addresses: this actor's misses go to their owners among them."""
        if self.peers is not None:
            self.peers.set_peers(peers)

    def drop_memory(self) -> None:
        """Forget the in-memory block tier (the SSD tier stays): for warm-SSD measurements."""
        self.reader.flush()
        self.reader.drop_memory()

    def ping(self) -> str:
        return self.member

    def close(self) -> None:
        if self.peers is not None:
            self.peers.close()
        self.reader.flush()
        self.reader.close()


def member_cache_dir(base: Path, index: int) -> Path:
    """Where local worker ``index`` keeps its cache: ``<base>/ray-worker-<index>``."""
    return Path(base) / f"ray-worker-{index}"
