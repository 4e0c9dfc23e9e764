"""Executors run scan tasks on workers; the planner never knows which kind.

``local`` (the embedded default) fuses the scan fragments into the
coordinator's DuckDB pipeline: each table becomes a view with exactly the
workers' projection and filter, run by DuckDB's own threads with no
materialization in between (the fastest plan on one machine).  ``threads``
runs the fragments as tasks on a pool of stateless worker threads and ships
Arrow back, the same protocol a remote executor (Ray) uses.  Other executors
register under a name in :data:`EXECUTORS`.
"""

from __future__ import annotations

import threading
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import Callable, Iterable, Protocol

from shoal.cache import ShoalFileSystem

from .errors import EngineError, QueryCancelled
from .worker import ScanResult, ScanTask, run_scan_task

__all__ = ["Executor", "LocalExecutor", "ThreadExecutor", "create_executor", "EXECUTORS"]


class Executor(Protocol):
    """Runs scan tasks; results arrive in any order."""

    workers: int
    name: str
    #: True: the coordinator runs the scans itself, in its own pipeline.
    fused: bool

    def run(self, tasks: Iterable[ScanTask], cancel: threading.Event) -> list[ScanResult]:
        """Run every task; raise the first failure (other tasks are cancelled)."""
        ...

    def close(self) -> None:
        ...


class LocalExecutor:
    """Scans fused into the coordinator's DuckDB (``workers`` = DuckDB threads)."""

    name = "local"
    fused = True

    def __init__(self, fs: ShoalFileSystem, *, workers: int) -> None:
        self.fs = fs
        self.workers = workers

    def run(self, tasks: Iterable[ScanTask], cancel: threading.Event) -> list[ScanResult]:
        raise EngineError("the local executor runs scans inside the coordinator")

    def close(self) -> None:
        pass


class ThreadExecutor:
    """Workers as threads of this process, sharing one cached filesystem."""

    name = "threads"
    fused = False

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


def _ray_executor(fs: ShoalFileSystem, *, workers: int, **options: object) -> Executor:
    # Imported on first use: Ray is an optional extra and slow to import.
    try:
        import ray  # noqa: F401
    except ImportError as exc:
        raise EngineError("the ray executor needs Ray: pip install 'shoal[ray]'") from exc
    from .ray_executor import RayExecutor

    return RayExecutor(fs, workers=workers, **options)  # type: ignore[arg-type]


EXECUTORS: dict[str, Callable[..., Executor]] = {"local": LocalExecutor, "threads": ThreadExecutor,
                                                 "ray": _ray_executor}


def create_executor(name: str, fs: ShoalFileSystem, *, workers: int, **options: object) -> Executor:
    """An executor by name (``local``, ``threads``, ``ray`` with its extra installed).

    ``options`` go to the executor (e.g. ``address`` for ``ray``)."""
    factory = EXECUTORS.get(name)
    if factory is None:
        raise EngineError(f"unknown executor {name!r}; available: {', '.join(sorted(EXECUTORS))}")
    return factory(fs, workers=workers, **options)
