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
    of the fragment's objects at their versions over the live members, with
    bounded loads (see :mod:`shoal.engine.ray_affinity`).  A member gets at
    most ``2 x max_concurrency`` tasks in flight; the rest wait in its queue
    on the coordinator, so a cancellation stops quickly.

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
    it fails with a :class:`WorkerError` that says so (spilling to the object
    store is not implemented yet; see the module's report in RESULTS.md).

I/O accounting
    Each result carries the worker's per-object I/O since its last report;
    the executor adds it to the coordinator's :class:`~shoal.cache.IOLedger`,
    so ``QueryProfile`` and progress count the cluster's bytes by tier.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import ray
import ray.exceptions
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from shoal.cache import ShoalFileSystem

from .errors import EngineError, QueryCancelled, WorkerError
from .ray_affinity import assign, fragment_key, ranking
from .ray_worker import ShoalWorker, member_cache_dir, task_to_data
from .worker import ScanResult, ScanTask

__all__ = ["RayExecutor", "task_key", "task_size"]

logger = logging.getLogger(__name__)

#: Errors that mean "the worker is gone", not "the task is wrong": re-run elsewhere.
_LOST = (
    ray.exceptions.RayActorError,
    ray.exceptions.WorkerCrashedError,
    ray.exceptions.NodeDiedError,
    ray.exceptions.ObjectLostError,
    ray.exceptions.OutOfMemoryError,
)


def task_key(task: ScanTask) -> str:
    """The affinity key of a task: its objects at their versions."""
    return fragment_key(task.files)


def task_size(task: ScanTask, tasks: list[ScanTask]) -> int:
    """Bytes a task reads: its files, or its share of a file split by row groups."""
    if task.row_groups is None:
        return sum(v.size for v in task.files)
    siblings = sum(1 for t in tasks if t.table == task.table and t.files == task.files) or 1
    return sum(v.size for v in task.files) // siblings


@dataclass
class _Member:
    name: str
    handle: Any
    cache_dir: str
    node_id: str | None = None
    alive: bool = True
    queue: deque[int] = field(default_factory=deque)
    running: int = 0


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
    steal:
        Soft affinity: a worker with an idle thread takes the last queued
        fragment of the most backlogged worker (``False``: owners only).
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
                 steal: bool = True, load_factor: float | None = None, init_options: dict[str, Any] | None = None,
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
        self.steal = steal
        self.task_delay_s = task_delay_s
        self._owns_runtime = _connect(address, init_options or {})
        self._per_node = per_node if per_node is not None else len(_alive_nodes()) > 1
        self._members: dict[str, _Member] = {}
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
        refs = {_control(m.handle.ping).remote(): m for m in live}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
        for ref in ready:
            try:
                ray.get(ref)
            except _LOST:
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

    def _spawn(self, name: str, cache_dir: str, node_id: str | None) -> _Member:
        config = self.fs.cache_config
        share = 1 if self._per_node else max(1, self.workers)
        cache = asdict(config)
        cache.update(directory=cache_dir, size_limit=max(config.block_size, config.size_limit // share))
        # Credentials travel as plain data inside Ray; never logged, never returned.
        store = asdict(self.fs.store_config)
        # Control calls (ping, cancel, stats) have their own thread: they answer while tasks run.
        options: dict[str, Any] = {"num_cpus": 0, "max_concurrency": self.max_concurrency, "max_restarts": 0}
        if node_id is not None:
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id, soft=False)
        actor = _actor_class().options(**options)
        handle = actor.remote(name, cache, store, tuple(self.fs.protocol), self.task_delay_s)
        return _Member(name=name, handle=handle, cache_dir=cache_dir, node_id=node_id)

    def _retire(self, *members: _Member) -> None:
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
        refs = [_control(m.handle.stats).remote() for m in live]
        out: dict[str, dict[str, Any]] = {}
        for member, ref in zip(live, refs):
            try:
                out[member.name] = ray.get(ref, timeout=60)
            except _LOST:
                member.alive = False
        return out

    def in_flight(self) -> dict[str, int]:
        """Tasks each member is running for the current query (read from any thread)."""
        return {m.name: m.running for m in list(self._members.values())}

    def drop_memory(self) -> None:
        """Make every worker forget its in-memory block tier (SSD caches stay)."""
        ray.get([_control(m.handle.drop_memory).remote() for m in self._members.values() if m.alive])

    # -- running ----------------------------------------------------------------------

    def run(self, tasks: Iterable[ScanTask], cancel: threading.Event) -> list[ScanResult]:
        tasks = list(tasks)
        if self._closed:
            raise EngineError("the ray executor is closed")
        with self._lock:
            self._refresh_members()
            self._queries += 1
            return _Query(self, tasks, cancel).run()

    def _place(self, tasks: list[ScanTask], names: list[str]) -> list[str]:
        keys = [task_key(t) for t in tasks]
        if not self.affinity:
            import random

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


class _Query:
    """One ``run``: dispatch with bounded in-flight work, collect, re-run lost fragments."""

    def __init__(self, executor: RayExecutor, tasks: list[ScanTask], cancel: threading.Event) -> None:
        self.ex = executor
        self.tasks = tasks
        self.cancel = cancel
        self.id = uuid.uuid4().hex
        self.data = [task_to_data(t) for t in tasks]
        self.results: list[ScanResult | None] = [None] * len(tasks)
        self.attempts = [0] * len(tasks)
        self.inflight: dict[Any, tuple[int, _Member]] = {}
        self.bytes_in = 0
        self.window = 2 * executor.max_concurrency

    def live(self) -> list[_Member]:
        return [m for m in self.ex._members.values() if m.alive]

    def run(self) -> list[ScanResult]:
        if not self.tasks:
            return []
        live = self.live()
        if not live:
            raise WorkerError("no live ray workers")
        placed = self.ex._place(self.tasks, [m.name for m in live])
        for index, name in enumerate(placed):
            self.ex._members[name].queue.append(index)
        try:
            self._loop()
        except BaseException:
            self._abandon()
            raise
        finally:
            for member in self.ex._members.values():
                member.queue.clear()
                member.running = 0
        self._collect_tail_io()
        return [r for r in self.results if r is not None]

    def _loop(self) -> None:
        remaining = len(self.tasks)
        while remaining:
            if self.cancel.is_set():
                raise QueryCancelled("query cancelled")
            self._submit()
            if not self.inflight:
                raise WorkerError("no live ray workers left to run the query's fragments")
            ready, _ = ray.wait(list(self.inflight), num_returns=1, timeout=0.1)
            for ref in ready:
                index, member = self.inflight.pop(ref)
                member.running -= 1
                try:
                    out = ray.get(ref)
                except _LOST as exc:
                    self._lost(index, member, exc)
                    continue
                except ray.exceptions.TaskCancelledError:
                    raise QueryCancelled("query cancelled") from None
                except ray.exceptions.RayTaskError as exc:
                    cause = getattr(exc, "cause", None)
                    if isinstance(cause, BaseException):
                        raise cause from None
                    raise WorkerError(f"fragment failed on ray worker {member.name}: {exc}") from None
                self._accept(index, out)
                task = self.tasks[index]
                self.ex.last_assignment[(task.table, task.fragment)] = member.name
                remaining -= 1

    def _submit(self) -> None:
        live = self.live()
        for member in live:
            while member.queue and member.running < self.window:
                self._send(member, member.queue.popleft())
        if not self.ex.steal:
            return
        # Soft affinity: a worker with an idle thread and nothing of its own
        # takes the smallest queued fragment of the most backlogged worker.
        for thief in live:
            while not thief.queue and thief.running < self.ex.max_concurrency:
                victim = max(live, key=lambda m: len(m.queue))
                if not victim.queue:
                    return
                self._send(thief, victim.queue.pop())
                self.ex.steals += 1

    def _send(self, member: _Member, index: int) -> None:
        self.attempts[index] += 1
        ref = member.handle.run.remote(self.id, self.data[index])
        self.inflight[ref] = (index, member)
        member.running += 1

    def _accept(self, index: int, out: dict[str, Any]) -> None:
        table = out["table"]
        self.bytes_in += table.nbytes
        ledger = self.ex.fs.reader.ledger
        for url, delta in out["io"].items():
            ledger.add(url, **delta)
        budget = self.ex.memory_budget
        if budget is not None and self.bytes_in > budget:
            raise WorkerError(
                f"the query's scan results exceed the coordinator's memory budget "
                f"({self.bytes_in} > {budget} bytes); raise memory_budget or make the query more "
                f"selective (spilling to the object store is not implemented)")
        self.results[index] = ScanResult(task=self.tasks[index], table=table, seconds=out["seconds"],
                                         worker=out["worker"])

    def _lost(self, index: int, member: _Member, exc: BaseException) -> None:
        if member.alive:
            member.alive = False
            logger.warning("ray worker %s lost mid-query (%s); re-running its fragments elsewhere",
                           member.name, type(exc).__name__)
        orphans = [index] + list(member.queue)
        member.queue.clear()
        # Others may be gone too (a node lost): find out before handing them work.
        self.ex._probe(timeout=1.0)
        for other in self.ex._members.values():
            if not other.alive and other.queue:
                orphans += list(other.queue)
                other.queue.clear()
        live = self.live()
        if not live:
            # Everyone is gone: replace them (same names, same caches) and go on.
            self.ex._refresh_members(probe=False)
            live = self.live()
        for orphan in orphans:
            task = self.tasks[orphan]
            if self.attempts[orphan] >= self.ex.max_attempts:
                raise WorkerError(
                    f"fragment {task.fragment} of {task.table} failed on {self.attempts[orphan]} "
                    f"ray workers (last: {member.name}, {type(exc).__name__}); giving up") from exc
            if not live:
                raise WorkerError(f"every ray worker was lost while running the query "
                                  f"(last: {member.name}, {type(exc).__name__})") from exc
            names = {m.name: m for m in live}
            target = names[ranking(task_key(task), names)[0]]
            target.queue.append(orphan)
            self.ex.retries += 1

    def _abandon(self) -> None:
        """Stop the query's work on the workers (cancellation or failure)."""
        members = {id(m): m for _, m in self.inflight.values() if m.alive}
        for member in members.values():
            try:
                _control(member.handle.cancel).remote(self.id)
            except Exception:  # noqa: BLE001
                pass
        for ref in list(self.inflight):
            try:
                ray.cancel(ref)
            except Exception:  # noqa: BLE001
                pass
        # Let the actors go idle before the next query; their answers no longer matter.
        if self.inflight:
            ray.wait(list(self.inflight), num_returns=len(self.inflight), timeout=10)
        self.inflight.clear()

    def _collect_tail_io(self) -> None:
        """I/O that finished after a worker's last result (read-ahead): into the ledger."""
        live = self.live()
        refs = [_control(m.handle.take_io).remote() for m in live]
        ledger = self.ex.fs.reader.ledger
        for member, ref in zip(live, refs):
            try:
                io = ray.get(ref, timeout=60)
            except _LOST:
                member.alive = False
                continue
            for url, delta in io.items():
                ledger.add(url, **delta)


_CONTROL = "control"


@functools.lru_cache(maxsize=None)
def _actor_class() -> Any:
    return ray.remote(concurrency_groups={_CONTROL: 1})(ShoalWorker)


def _control(method: Any) -> Any:
    return method.options(concurrency_group=_CONTROL)


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
