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

Peer cache
    With ``peers`` (the default) every actor serves its cache over the
    transport (TCP, HMAC-authenticated with the cluster secret) on its node's
    IP, and reads its own misses through the other actors: local cache ->
    the block's owner actor (rendezvous hashing over the live actors'
    addresses) -> the store, the owner filling its cache on a miss, so the
    store is read once per block for the whole cluster, whoever runs the
    fragment (a stolen fragment, a re-run, a joined worker, the driver).  The
    peer list is the live actors, pushed to them whenever it changes; a
    replaced actor serves on its predecessor's port when free, so its blocks
    keep their owner.  The secret is ``SHOAL_CLUSTER_SECRET_FILE`` when set,
    else generated per executor (``secrets``); it reaches the actors as a
    constructor argument over Ray's channel and is never logged.  See
    :mod:`shoal.engine.ray_peers`.

Reading through the cluster (the loader)
    :meth:`RayExecutor.cluster_filesystem` is a :class:`ShoalFileSystem` for
    this process whose misses go to the actors' caches (hand it to a
    ``Session(fs=...)`` and that to ``ShoalDataset(session=...)``);
    :meth:`RayExecutor.cluster_environment` is the same as environment
    variables (``SHOAL_PEERS``, ``SHOAL_CLUSTER_SECRET_FILE``, ...) for
    processes that build their own filesystem, e.g. DataLoader workers:
    ``os.environ.update(executor.cluster_environment())``.

Results
    Arrow tables through Ray's object store, at most ``spill_threshold``
    bytes per task and ``memory_budget`` bytes per query held by the
    coordinator; larger results spill to the object store as Parquet (under
    ``spill_url`` / ``SHOAL_SPILL_URL`` / ``s3://<bucket>/.shoal-spill/``,
    one prefix per query, deleted when the coordinator has read them, on
    error or cancellation, and at close) and the coordinator's DuckDB reads
    them through Shoal's filesystem (:mod:`shoal.engine.ray_spill`).  With
    ``spill=False`` (or no s3:// location) a query whose results exceed the
    budget fails with a :class:`WorkerError` that says so.

I/O accounting
    Each result carries the worker's per-object I/O since its last report;
    the executor adds it to the coordinator's :class:`~shoal.cache.IOLedger`,
    so ``QueryProfile`` and progress count the cluster's bytes by tier.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import threading
import weakref
from collections import OrderedDict
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from shoal.cache import CacheConfig, ShoalFileSystem
from shoal.transport import PeerTier

from .errors import EngineError
from .ray_affinity import assign
from .ray_dispatch import LOST_WORKER_ERRORS, actor_class, control, Member, QueryDispatch, task_key, task_size
from .ray_peers import cluster_secret, driver_filesystem, peer_environment, retarget, write_secret_file
from .ray_spill import SpilledResult, check_spill_url, delete_prefix, spill_base
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
    peers:
        Actors serve their caches to each other and to the driver (see the module docstring).
    peer_timeout:
        Longest wait for an owner actor's answer before reading the store instead.
    spill:
        Large results go to the object store as Parquet (``False``: the budget is a hard error).
    spill_url:
        ``s3://bucket/prefix/`` for spilled results (default ``SHOAL_SPILL_URL``, else
        ``.shoal-spill/`` in the bucket of the query's first object).
    spill_threshold:
        Largest result of one task kept in memory (``None``: only ``memory_budget`` limits).
    """

    name = "ray"
    fused = False

    def __init__(self, fs: ShoalFileSystem, *, workers: int, address: str | None = None,
                 per_node: bool | None = None, max_concurrency: int = 2, max_attempts: int = 3,
                 memory_budget: int | None = None, affinity: bool = True,
                 locality_wait_s: float | None = 0.5, load_factor: float | None = None, init_options: dict[str, Any] | None = None,
                 task_delay_s: float = 0.0, peers: bool = True, peer_timeout: float = 5.0, spill: bool = True,
                 spill_url: str | None = None, spill_threshold: int | None = 256 << 20) -> None:
        if workers < 1:
            raise EngineError("workers must be at least 1")
        if max_attempts < 1 or max_concurrency < 1:
            raise EngineError("max_attempts and max_concurrency must be at least 1")
        if spill_threshold is not None and spill_threshold < 0:
            raise EngineError("spill_threshold must be at least 0 bytes")
        self.fs = fs
        self.workers = workers
        self.max_concurrency = max_concurrency
        self.max_attempts = max_attempts
        self.memory_budget = memory_budget
        self.affinity = affinity
        self.load_factor = load_factor
        self.locality_wait_s = locality_wait_s
        self.task_delay_s = task_delay_s
        self.peer_timeout = peer_timeout
        self.spill = spill
        self.spill_url = check_spill_url(spill_url) if spill_url else None
        self.spill_threshold = spill_threshold
        # The cluster secret: never logged, never returned (see cluster_environment for its file).
        self._secret, self._secret_file = cluster_secret() if peers else (None, None)
        self._own_secret_dir: Path | None = None
        self._pushed_peers: tuple[str, ...] = ()
        self._ports: dict[str, int] = {}
        self._tiers: weakref.WeakSet[PeerTier] = weakref.WeakSet()
        self._spills_lock = threading.Lock()
        self._open_spills: set[str] = set()
        #: Results spilled to the object store (by workers or the coordinator), since start.
        self.spilled_results = 0
        #: Of those, results the coordinator spilled because they arrived past its budget.
        self.coordinator_spills = 0
        #: Bytes of scan results the coordinator held in memory for the last query.
        self.last_memory_bytes = 0
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
        self._sync_peers()

    def _sync_peers(self) -> None:
        """Learn new actors' addresses; give every actor (and handed-out tiers) the live list."""
        if self._secret is None:
            return
        new = [m for m in self._members.values() if m.alive and m.address is None]
        refs = [control(m.handle.address).remote() for m in new]
        for member, ref in zip(new, refs):
            try:
                member.address = ray.get(ref, timeout=300)
            except (*LOST_WORKER_ERRORS, ray.exceptions.GetTimeoutError) as exc:
                logger.warning("ray worker %s did not start (%s)", member.name, type(exc).__name__)
                member.alive = False
                continue
            self._ports[member.name] = int(str(member.address).rsplit(":", 1)[1])
        live = [m for m in self._members.values() if m.alive and m.address]
        peers = tuple(sorted(str(m.address) for m in live))
        if peers == self._pushed_peers:
            return
        refs = [control(m.handle.set_peers).remote(list(peers)) for m in live]
        for member, ref in zip(live, refs):
            try:
                ray.get(ref, timeout=60)
            except LOST_WORKER_ERRORS:
                member.alive = False  # replaced before the next query
        self._pushed_peers = peers
        for tier in list(self._tiers):
            retarget(tier, peers)
        logger.info("ray workers serve their caches at %s", ", ".join(peers))

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
        handle = actor.remote(name, cache, store, tuple(self.fs.protocol), self.task_delay_s, self._secret,
                              self._ports.get(name, 0), self.peer_timeout)
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

    # -- reading through the cluster ----------------------------------------------------

    def peer_addresses(self) -> list[str]:
        """``host:port`` of every live actor's block server (empty with ``peers=False``)."""
        return list(self._pushed_peers)

    def cluster_filesystem(self, cache: CacheConfig | None = None) -> ShoalFileSystem:
        """A filesystem for this process that reads through the actors' caches: a local
        miss goes to the block's owner actor (which fills it from the store), then the store.

        ``cache``: this process's own cache (default: the coordinator's); its block size
        must be the workers', since blocks are keyed by it.  The filesystem follows later
        membership changes; close it when done."""
        if self._secret is None:
            raise EngineError("this ray executor does not serve its workers' caches (peers=False)")
        config = cache or self.fs.cache_config
        if config.block_size != self.fs.cache_config.block_size:
            raise EngineError(f"the cache's block size ({config.block_size}) must be the workers' "
                              f"({self.fs.cache_config.block_size}) to read their blocks")
        fs, tier = driver_filesystem(self.peer_addresses(), self._secret, config, self.fs.store_config,
                                     tuple(self.fs.protocol), timeout=self.peer_timeout)
        self._tiers.add(tier)
        return fs

    def cluster_environment(self) -> dict[str, str]:
        """Environment variables that make a new :class:`ShoalFileSystem` (in this process or a
        process started later, e.g. a DataLoader worker) read through the actors' caches:
        ``SHOAL_PEERS``, ``SHOAL_CLUSTER_SECRET_FILE`` (a private file this executor writes
        when the secret was generated, deleted at close), ``SHOAL_TRANSPORT``,
        ``SHOAL_CACHE_BLOCK_SIZE``.  A snapshot of the membership: ask again after it changes."""
        if self._secret is None:
            raise EngineError("this ray executor does not serve its workers' caches (peers=False)")
        if self._secret_file is None:
            path = write_secret_file(self._secret)
            self._own_secret_dir, self._secret_file = path.parent, str(path)
        return peer_environment(self.peer_addresses(), self._secret_file, self.fs.cache_config.block_size)

    # -- spilled results ------------------------------------------------------------------

    def _spill_prefix(self, tasks: list[ScanTask], query: str) -> str | None:
        if not self.spill:
            return None
        base = spill_base(self.spill_url, tasks)
        return f"{base}{query}/" if base else None

    def _hold_spill(self, prefix: str | None) -> None:
        if prefix is not None:
            with self._spills_lock:
                self._open_spills.add(prefix)

    def _delete_spill(self, prefix: str) -> None:
        deleted = delete_prefix(self.fs, prefix)
        with self._spills_lock:
            if deleted is None:
                self._open_spills.add(prefix)  # try again at close
            else:
                self._open_spills.discard(prefix)
        if deleted:
            logger.debug("deleted %d spilled objects under %s", deleted, prefix)

    def release(self, results: Iterable[ScanResult]) -> None:
        """The coordinator is done with ``results``: delete the objects they spilled."""
        prefixes = {r.spill_prefix for r in results if isinstance(r, SpilledResult) and r.spill_prefix}
        for prefix in sorted(prefixes):
            self._delete_spill(prefix)

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
        with self._spills_lock:
            leftover = sorted(self._open_spills)
        for prefix in leftover:
            self._delete_spill(prefix)
        self._retire(*self._members.values())
        self._members.clear()
        if self._own_secret_dir is not None:
            shutil.rmtree(self._own_secret_dir, ignore_errors=True)
            self._own_secret_dir = self._secret_file = None
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
