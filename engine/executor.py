"""Executors run scan tasks on workers; the planner never knows which kind.

``threads`` (the embedded default) runs workers on a thread pool in this
process.  Other executors (Ray) register under a name in
:data:`EXECUTORS`; they are imported lazily.
"""

from __future__ import annotations

import threading
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import Callable, Iterable, Protocol

from shoal.cache import ShoalFileSystem

from .errors import EngineError, QueryCancelled
from .worker import ScanResult, ScanTask, run_scan_task

__all__ = ["Executor", "ThreadExecutor", "create_executor", "EXECUTORS"]


class Executor(Protocol):
    """Runs scan tasks; results arrive in any order."""

    workers: int
    name: str

    def run(self, tasks: Iterable[ScanTask], cancel: threading.Event) -> list[ScanResult]:
        """Run every task; raise the first failure (other tasks are cancelled)."""
        ...

    def close(self) -> None:
        ...


class ThreadExecutor:
    """Workers as threads of this process, sharing one cached filesystem."""

    name = "threads"

    def __init__(self, fs: ShoalFileSystem, *, workers: int) -> None:
        self.fs = fs
        self.workers = workers
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="shoal-worker")

    def run(self, tasks: Iterable[ScanTask], cancel: threading.Event) -> list[ScanResult]:
        def guarded(task: ScanTask) -> ScanResult:
            if cancel.is_set():
                raise QueryCancelled("query cancelled")
            return run_scan_task(task, self.fs)

        futures: list[Future[ScanResult]] = [self._pool.submit(guarded, t) for t in tasks]
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        for future in done:
            if future.exception() is not None:
                cancel.set()
                for other in pending:
                    other.cancel()
                wait(pending)
                raise future.exception()  # type: ignore[misc]
        return [f.result() for f in futures]

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


EXECUTORS: dict[str, Callable[..., Executor]] = {"threads": ThreadExecutor}


def create_executor(name: str, fs: ShoalFileSystem, *, workers: int) -> Executor:
    """An executor by name (``threads``; ``ray`` once its extra is installed)."""
    factory = EXECUTORS.get(name)
    if factory is None:
        raise EngineError(f"unknown executor {name!r}; available: {', '.join(sorted(EXECUTORS))}")
    return factory(fs, workers=workers)
