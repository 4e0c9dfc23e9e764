"""The ``ray`` executor: scan fragments on Shoal worker actors of a Ray cluster.

Membership
    One :class:`~shoal.engine.ray_worker.ShoalWorker` actor per node of the
    cluster, pinned to its node, owning that node's SSD cache.  On a
    single-node cluster (a laptop, CI) there are ``workers`` actors instead,
    each with its own cache directory ``<cache dir>/ray-worker-<n>`` and an
    equal share of the cache size.  Members are named (``node:<id>`` or
    ``local:<n>``) so that a replacement takes over its predecessor's share.
    The live actors are the membership; it is refreshed before every query
    (dead actors replaced, nodes that joined get an actor, nodes that left
    are dropped).

Scheduling
    Each fragment goes to the member that owns its blocks: rendezvous hashing
    of the fragment's objects at their versions over the live members (see
    :mod:`shoal.engine.ray_affinity`).  A member gets one task per actor
    thread (``max_concurrency``) at a time; the rest wait in its queue on the
    coordinator, so a cancellation stops quickly.  Under skew, once a query
    has run for ``locality_wait_s`` (delay scheduling, as Spark's
    ``spark.locality.wait``), a member with an idle thread and an empty queue
    takes a queued fragment of a busy member: one of an object it ran before
    (so likely cached), else the smallest of the most backlogged.  Soft
    affinity that leaves short queries, and so the caches, alone.

Faults
    A member that dies mid-query (``RayActorError``, a crashed worker, a lost
    node) is dropped for the rest of the query and its queued and running
    fragments re-run on their next-ranked live member, up to
    ``max_attempts`` runs per fragment; then :class:`WorkerError`.  The next
    query replaces the dead actor.  Nothing is lost: fragments are pure
    functions of pinned object versions, which the store keeps.  An error
    *inside* a task (bad SQL, a missing object) is not retried: it is the
    query's answer, raised as the original exception.

Results
    Arrow tables through Ray's object store.  The coordinator caps their
    total at ``memory_budget`` bytes: a query whose scan results would exceed
    it fails with a :class:`WorkerError` that says so, before the coordinator
    runs out of memory.  Spilling such results to the object store as Parquet
    is not implemented: it needs the coordinator to read a table's results
    from Parquet URLs as well as from Arrow tables.

I/O accounting
    Each result carries the worker's per-object I/O since its last report;
    the executor adds it to the coordinator's :class:`~shoal.cache.IOLedger`,
    so ``QueryProfile`` and progress count the cluster's bytes by tier.
"""

from __future__ import annotations

import logging
import os
import random
import threading
from collections import OrderedDict
from dataclasses import asdict
from typing import Any, Iterable

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from shoal.cache import ShoalFileSystem

from .errors import EngineError
from .ray_affinity import assign
from .ray_dispatch import LOST_WORKER_ERRORS, actor_class, control, Member, QueryDispatch, task_key, task_size
from .ray_worker import member_cache_dir
from .worker import ScanResult, ScanTask

__all__ = ["RayExecutor"]

logger = logging.getLogger(__name__)

#: Objects remembered for cache-aware work stealing.
_RAN_KEYS = 100_000


class RayExecutor:
    """Runs scan tasks on Shoal worker actors (see the module docstring).

    Parameters
    ----------
    fs:
        The coordinator's filesystem: its cache and store configuration are
        shipped to the workers, and its I/O ledger receives theirs.
    workers:
        Actors on a single-node cluster (ignored when there is one per node).
    address:
        ``None``: the Ray runtime already initialised in this process, else
        ``SHOAL_RAY_ADDRESS`` / ``RAY_ADDRESS``, else a new local cluster.
        ``"auto"``: a Ray cluster already running on this machine, else a new
        local one.  ``"ray://host:port"`` (Ray Client) or ``"host:port"``: that
        cluster.
    per_node:
        One actor per node (``True``), ``workers`` actors wherever Ray puts
        them (``False``), or ``None``: per node when the cluster has more than one.
    max_concurrency:
        Tasks an actor runs at once (threads).
    max_attempts:
        Runs of a fragment before the query fails (lost workers only).
    memory_budget:
        Most bytes of scan results the coordinator accepts for one query.
    affinity:
        ``False`` ignores cache ownership (a random member per fragment per
        query): the baseline of the affinity benchmark.
    locality_wait_s:
        Seconds into a query before an idle worker may take a busy worker's
        queued fragments (``None``: owners only; ``0``: at once).
    load_factor:
        Static bounded loads for the placement (``None``: pure hashing; see
        :func:`shoal.engine.ray_affinity.assign`).
    init_options:
        Extra ``ray.init`` arguments when this executor starts the runtime.
    task_delay_s:
        Sleep before every task (fault-injection tests and benchmarks).
    """

    name = "ray"
    fused = False

    def __init__(self, fs: ShoalFileSystem, *, workers: int, address: str | None = None,
                 per_node: bool | None = None, max_concurrency: int = 2, max_attempts: int = 3,
                 memory_budget: int | None = None, affinity: bool = True,
                 locality_wait_s: float | None = 0.5, load_factor: float | None = None, init_options: dict[str, Any] | None = None,
                 task_delay_s: float = 0.0) -> None:
        if workers < 1:
            raise EngineError("workers must be at least 1")
        if max_attempts < 1 or max_concurrency < 1:
            raise EngineError("max_attempts and max_concurrency must be at least 1")
        self.fs = fs
        self.workers = workers
        self.max_concurrency = max_concurrency
        self.max_attempts = max_attempts
        self.memory_budget = memory_budget
        self.affinity = affinity
        self.load_factor = load_factor
        self.locality_wait_s = locality_wait_s
        self.task_delay_s = task_delay_s
        self._owns_runtime = _connect(address, init_options or {})
        self._per_node = per_node if per_node is not None else len(_alive_nodes()) > 1
        self._members: dict[str, Member] = {}
        self._lock = threading.Lock()
        self._queries = 0
        #: Ownership key -> member it was placed on, for the last query.
        self.last_placement: dict[str, str] = {}
        #: (table, fragment) -> member that ran it, for the last query.
        self.last_assignment: dict[tuple[str, int], str] = {}
        #: Fragments re-run because their worker was lost, since this executor started.
        self.retries = 0
        #: Fragments run by another worker than their owner because it was idle.
        self.steals = 0
        # Ownership key -> members that ran it (their caches likely hold it), newest keys last.
        self._ran: OrderedDict[str, set[str]] = OrderedDict()
        #: Actors created to replace dead ones.
        self.replacements = 0
        self._closed = False
        self._refresh_members()

    # -- membership -------------------------------------------------------------------

    @property
    def members(self) -> list[str]:
        """Names of the live members."""
        return sorted(m.name for m in self._members.values() if m.alive)

    def resize(self, workers: int) -> None:
        """Change the number of actors of a single-node cluster (takes effect now)."""
        if workers < 1:
            raise EngineError("workers must be at least 1")
        with self._lock:
            self.workers = workers
            if not self._per_node:
                self._retire(*[self._members.pop(n) for n in list(self._members) if _local_index(n) >= workers])
            self._refresh_members()

    def _probe(self, timeout: float = 2.0) -> None:
        """Mark members whose actor is gone as dead (one parallel ping; busy ones count as alive)."""
        live = [m for m in self._members.values() if m.alive]
        refs = {control(m.handle.ping).remote(): m for m in live}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
        for ref in ready:
            try:
                ray.get(ref)
            except LOST_WORKER_ERRORS:
                refs[ref].alive = False

    def _refresh_members(self, *, probe: bool = True) -> None:
        if probe and self._members:
            self._probe()
        wanted: dict[str, tuple[str, str | None]] = {}
        if self._per_node:
            for node in _alive_nodes():
                wanted[f"node:{node['NodeID'][:16]}"] = (str(self.fs.cache_config.directory), node["NodeID"])
        else:
            base = self.fs.cache_config.directory
            for i in range(self.workers):
                wanted[f"local:{i}"] = (str(member_cache_dir(base, i)), None)
        leaving = []
        for name in list(self._members):
            member = self._members[name]
            if name not in wanted or not member.alive:
                if name not in wanted:
                    logger.info("ray worker %s left the cluster", name)
                else:
                    self.replacements += 1
                    logger.warning("replacing lost ray worker %s", name)
                leaving.append(self._members.pop(name))
        self._retire(*leaving)
        for name, (cache_dir, node_id) in wanted.items():
            if name not in self._members:
                self._members[name] = self._spawn(name, cache_dir, node_id)

    def _spawn(self, name: str, cache_dir: str, node_id: str | None) -> Member:
        config = self.fs.cache_config
        share = 1 if self._per_node else max(1, self.workers)
        cache = asdict(config)
        cache.update(directory=cache_dir, size_limit=max(config.block_size, config.size_limit // share))
        # Credentials travel as plain data inside Ray; never logged, never returned.
        store = asdict(self.fs.store_config)
        options: dict[str, Any] = {"num_cpus": 0, "max_concurrency": self.max_concurrency, "max_restarts": 0}
        if node_id is not None:
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id, soft=False)
        actor = actor_class().options(**options)
        handle = actor.remote(name, cache, store, tuple(self.fs.protocol), self.task_delay_s)
        return Member(name=name, handle=handle, cache_dir=cache_dir, node_id=node_id)

    def _retire(self, *members: Member) -> None:
        """Stop actors: live ones flush their cache writes first, then all are killed."""
        closing = []
        for member in members:
            if member.alive:
                try:
                    closing.append(member.handle.close.remote())
                except Exception:  # noqa: BLE001 - the actor may be gone already
                    pass
        if closing:
            ray.wait(closing, num_returns=len(closing), timeout=30)
        for member in members:
            try:
                ray.kill(member.handle, no_restart=True)
            except Exception:  # noqa: BLE001
                pass

    def handle(self, name: str) -> Any:
        """The actor handle of a member (tests kill it with ``ray.kill``)."""
        return self._members[name].handle

    def worker_stats(self) -> dict[str, dict[str, Any]]:
        """Per live member: tasks run, cache hits, bytes by tier (see ``ShoalWorker.stats``)."""
        live = [m for m in self._members.values() if m.alive]
        refs = [control(m.handle.stats).remote() for m in live]
        out: dict[str, dict[str, Any]] = {}
        for member, ref in zip(live, refs):
            try:
                out[member.name] = ray.get(ref, timeout=60)
            except LOST_WORKER_ERRORS:
                member.alive = False
        return out

    def in_flight(self) -> dict[str, int]:
        """Tasks each member is running for the current query (read from any thread)."""
        return {m.name: m.running for m in list(self._members.values())}

    def drop_memory(self) -> None:
        """Make every worker forget its in-memory block tier (SSD caches stay)."""
        ray.get([control(m.handle.drop_memory).remote() for m in self._members.values() if m.alive])

    # -- running ----------------------------------------------------------------------

    def run(self, tasks: Iterable[ScanTask], cancel: threading.Event) -> list[ScanResult]:
        tasks = list(tasks)
        if self._closed:
            raise EngineError("the ray executor is closed")
        with self._lock:
            self._refresh_members()
            self._queries += 1
            return QueryDispatch(self, tasks, cancel).run()

    def _note_ran(self, key: str, member: str) -> None:
        self._ran.setdefault(key, set()).add(member)
        self._ran.move_to_end(key)
        if len(self._ran) > _RAN_KEYS:
            self._ran.popitem(last=False)

    def _place(self, tasks: list[ScanTask], names: list[str]) -> list[str]:
        keys = [task_key(t) for t in tasks]
        if not self.affinity:
            rng = random.Random(self._queries)
            chosen = [rng.choice(names) for _ in tasks]
        else:
            sizes = [task_size(t, tasks) for t in tasks]
            chosen = assign(keys, sizes, names, load_factor=self.load_factor).members
        self.last_placement = dict(zip(keys, chosen))
        self.last_assignment = {}
        return chosen

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._retire(*self._members.values())
        self._members.clear()
        if self._owns_runtime and ray.is_initialized():
            ray.shutdown()


def _local_index(name: str) -> int:
    return int(name.split(":", 1)[1]) if name.startswith("local:") else -1


def _alive_nodes() -> list[dict[str, Any]]:
    return [n for n in ray.nodes() if n.get("Alive")]


def _connect(address: str | None, init_options: dict[str, Any]) -> bool:
    """Join or start a Ray runtime; True when this call started it."""
    if ray.is_initialized():
        return False
    if address is None:
        address = os.environ.get("SHOAL_RAY_ADDRESS") or os.environ.get("RAY_ADDRESS") or None
    local = {"num_cpus": min(2, os.cpu_count() or 1), "include_dashboard": False,
             "log_to_driver": False, "configure_logging": False}
    try:
        if address is None:
            ray.init(**{**local, **init_options})
        elif address == "auto":
            try:
                ray.init(address="auto", **init_options)
            except ConnectionError:
                ray.init(**{**local, **init_options})
        else:
            ray.init(address=address, **init_options)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise EngineError(f"cannot reach the Ray cluster at {address}: {exc}") from exc
    return True
