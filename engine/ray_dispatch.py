"""Dispatch of one query's fragments to the Ray worker actors (see ray_executor).

A :class:`QueryDispatch` queues each fragment on the member that owns it, keeps at
most ``max_concurrency`` tasks in flight per member (one per thread), lets idle members
take queued fragments of backlogged ones, re-runs the fragments of a lost
member on their next-ranked live member, feeds the workers' I/O into the
coordinator's ledger, and keeps the results held in memory within the
coordinator's budget by spilling the rest to the object store
(:mod:`shoal.engine.ray_spill`).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import ray
import ray.exceptions

from .errors import QueryCancelled, WorkerError
from .ray_affinity import fragment_key, ranking
from .ray_spill import SpilledResult, pin_spilled, spill_object, write_spill
from .ray_worker import ShoalWorker, task_to_data
from .worker import ScanResult, ScanTask

if TYPE_CHECKING:
    from .ray_executor import RayExecutor

__all__ = ["LOST_WORKER_ERRORS", "Member", "QueryDispatch", "actor_class", "control", "task_key", "task_size"]

logger = logging.getLogger(__name__)

#: Errors that mean "the worker is gone", not "the task is wrong": re-run elsewhere.
LOST_WORKER_ERRORS = (
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
class Member:
    name: str
    handle: Any
    cache_dir: str
    node_id: str | None = None
    #: ``host:port`` of the actor's block server (None: not serving peers).
    address: str | None = None
    alive: bool = True
    queue: deque[int] = field(default_factory=deque)
    running: int = 0


_CONTROL = "control"


@functools.lru_cache(maxsize=None)
def actor_class() -> Any:
    # Control calls (ping, cancel, stats) have their own thread: they answer while tasks run.
    return ray.remote(concurrency_groups={_CONTROL: 1})(ShoalWorker)


def control(method: Any) -> Any:
    return method.options(concurrency_group=_CONTROL)


class QueryDispatch:
    """One ``run``: dispatch with bounded in-flight work, collect, re-run lost fragments."""

    def __init__(self, executor: RayExecutor, tasks: list[ScanTask], cancel: threading.Event) -> None:
        self.ex = executor
        self.tasks = tasks
        self.cancel = cancel
        self.id = uuid.uuid4().hex
        self.data = [task_to_data(t) for t in tasks]
        self.keys = [task_key(t) for t in tasks]
        self.results: list[ScanResult | None] = [None] * len(tasks)
        self.attempts = [0] * len(tasks)
        self.inflight: dict[Any, tuple[int, Member]] = {}
        self.bytes_in = 0
        #: ``<spill url>/<query id>/`` (None: results cannot spill).
        self.spill_prefix = executor._spill_prefix(tasks, self.id)
        self.spilled = 0
        self.lost = 0
        # One task per actor thread: the rest wait here, where an idle worker can take them.
        self.window = executor.max_concurrency
        self.started = time.monotonic()

    def live(self) -> list[Member]:
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
            if self.spill_prefix is not None:  # any task may have written before the failure
                self.ex._delete_spill(self.spill_prefix)
            raise
        finally:
            for member in self.ex._members.values():
                member.queue.clear()
                member.running = 0
        self.ex.last_memory_bytes = self.bytes_in
        if self.spilled:
            self.ex._hold_spill(self.spill_prefix)  # deleted by release(), once the coordinator read it
        elif self.lost and self.spill_prefix is not None:
            self.ex._delete_spill(self.spill_prefix)  # a lost worker may have spilled before it died
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
                except LOST_WORKER_ERRORS as exc:
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
                self.ex._note_ran(self.keys[index], member.name)
                remaining -= 1

    def _submit(self) -> None:
        live = self.live()
        for member in live:
            while member.queue and member.running < self.window:
                self._send(member, member.queue.popleft())
        wait = self.ex.locality_wait_s
        if wait is None or time.monotonic() - self.started < wait:
            return
        # Soft affinity: a worker with an idle thread and nothing of its own
        # takes a queued fragment of a busy worker: one whose object it ran
        # before (likely in its cache), else the smallest of the most backlogged.
        for thief in live:
            while not thief.queue and thief.running < self.ex.max_concurrency:
                victim, position = self._pick(thief, live)
                if victim is None:
                    return
                index = victim.queue[position]
                del victim.queue[position]
                self._send(thief, index)
                self.ex.steals += 1

    def _pick(self, thief: Member, live: list[Member]) -> tuple[Member | None, int]:
        for member in live:
            for position in range(len(member.queue) - 1, -1, -1):
                if thief.name in self.ex._ran.get(self.keys[member.queue[position]], ()):
                    return member, position
        victim = max(live, key=lambda m: len(m.queue))
        return (victim, len(victim.queue) - 1) if victim.queue else (None, -1)

    def _spill_limit(self) -> dict[str, Any] | None:
        """What a task sent now may return in memory; beyond it, the worker spills."""
        if self.spill_prefix is None:
            return None
        limit = self.ex.spill_threshold
        budget = self.ex.memory_budget
        if budget is not None:
            room = max(0, budget - self.bytes_in)
            limit = room if limit is None else min(limit, room)
        return None if limit is None else {"prefix": self.spill_prefix, "limit": limit}

    def _send(self, member: Member, index: int) -> None:
        self.attempts[index] += 1
        ref = member.handle.run.remote(self.id, self.data[index], self._spill_limit())
        self.inflight[ref] = (index, member)
        member.running += 1

    def _accept(self, index: int, out: dict[str, Any]) -> None:
        table = out["table"]
        task = self.tasks[index]
        ledger = self.ex.fs.reader.ledger
        for url, delta in out["io"].items():
            ledger.add(url, **delta)
        spilled = out.get("spilled")
        budget = self.ex.memory_budget
        if spilled is None and budget is not None and self.bytes_in + table.nbytes > budget:
            if self.spill_prefix is None:
                raise WorkerError(
                    f"the query's scan results exceed the coordinator's memory budget "
                    f"({self.bytes_in + table.nbytes} > {budget} bytes) and cannot spill (spilling is off, "
                    f"or no s3:// location: set SHOAL_SPILL_URL); raise memory_budget or make the query "
                    f"more selective")
            # Sent while there was room, but others arrived first: spill it from here.
            url = spill_object(self.spill_prefix, task)
            spilled = {"url": url, "version": write_spill(self.ex.fs, url, table), "rows": table.num_rows,
                       "bytes": table.nbytes}
            table = table.schema.empty_table()
            self.ex.coordinator_spills += 1
        if spilled is not None:
            pin_spilled(self.ex.fs, spilled["version"])
            self.spilled += 1
            self.ex.spilled_results += 1
            self.results[index] = SpilledResult(
                task=task, table=table, seconds=out["seconds"], worker=out["worker"], spilled=(spilled["url"],),
                spilled_rows=spilled["rows"], spilled_bytes=spilled["bytes"], spill_prefix=self.spill_prefix or "")
            return
        self.bytes_in += table.nbytes
        self.results[index] = ScanResult(task=task, table=table, seconds=out["seconds"], worker=out["worker"])

    def _lost(self, index: int, member: Member, exc: BaseException) -> None:
        self.lost += 1
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
                control(member.handle.cancel).remote(self.id)
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
        refs = [control(m.handle.take_io).remote() for m in live]
        ledger = self.ex.fs.reader.ledger
        for member, ref in zip(live, refs):
            try:
                io = ray.get(ref, timeout=60)
            except LOST_WORKER_ERRORS:
                member.alive = False
                continue
            for url, delta in io.items():
                ledger.add(url, **delta)
