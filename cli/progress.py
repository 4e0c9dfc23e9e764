"""Running one statement: a worker thread, Ctrl-C as cancel, and a progress bar.

The statement runs on a worker thread so that the main thread can take
Ctrl-C (SIGINT) at any moment and turn it into :meth:`Session.interrupt`;
the engine then raises :class:`~shoal.engine.QueryCancelled`.  On a terminal,
a query that is still running after :data:`PROGRESS_DELAY` seconds gets a
progress bar of bytes scanned out of the bytes of the files it reads (both
from the engine's progress callback).
"""

from __future__ import annotations

import sys
import threading
import time
from typing import IO, Any

from shoal.engine import QueryCancelled, QueryResult, Session

from .output import human_size

__all__ = ["run_statement", "PROGRESS_DELAY"]

PROGRESS_DELAY = 1.0
_POLL = 0.1
_REINTERRUPT = 0.5


class _Tracker:
    """Bytes read so far and bytes expected, as the engine's progress callback reports them."""

    def __init__(self) -> None:
        self.done = 0
        self.total = 0

    def callback(self, done: int, total: int) -> None:
        self.done, self.total = done, total


class _Bar:
    def __init__(self, stream: IO[str], tracker: _Tracker) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, ProgressColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
        from rich.text import Text

        class Bytes(ProgressColumn):
            """``12.0/48.0 MiB`` once the expected total is known; nothing before."""

            def render(self, task: Any) -> Text:
                if not task.total:
                    return Text("")
                return Text(f"{human_size(task.completed)} / {human_size(task.total)}", style="progress.download")

        self.tracker = tracker
        console = Console(file=stream)
        self.progress = Progress(SpinnerColumn(), TextColumn("[progress.description]{task.description}"),
                                 BarColumn(), Bytes(), TimeElapsedColumn(), console=console, transient=True)
        self.task = self.progress.add_task("running", total=None)
        self.progress.start()

    def update(self) -> None:
        total = self.tracker.total or None
        done = self.tracker.done
        if total is not None:
            done = min(done, total)
        self.progress.update(self.task, completed=done, total=total,
                             description="scanning" if total else "running")

    def stop(self) -> None:
        self.progress.stop()


def run_statement(session: Session, statement: str, *, show_progress: bool | None = None,
                  stream: IO[str] | None = None) -> QueryResult:
    """Run one statement; Ctrl-C cancels it (raising QueryCancelled)."""
    stream = stream or sys.stderr
    if show_progress is None:
        show_progress = stream.isatty()
    tracker = _Tracker()
    outcome: dict[str, Any] = {}

    finished = threading.Event()

    def work() -> None:
        try:
            outcome["result"] = session.sql(statement, progress=tracker.callback)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            outcome["error"] = exc
        finally:
            finished.set()

    worker = threading.Thread(target=work, name="shoal-query", daemon=True)
    started = time.monotonic()
    worker.start()
    bar: _Bar | None = None
    cancelled_at: float | None = None
    try:
        # Wait on an Event, not Thread.join: a join interrupted by Ctrl-C can
        # mark a still-running thread as stopped (CPython gh-90882).
        while not finished.is_set():
            try:
                if finished.wait(_POLL):
                    break
                if cancelled_at is not None:
                    # The interrupt may have come before the engine started the
                    # query (and reset its cancel flag): repeat it until it ends.
                    if time.monotonic() - cancelled_at >= _REINTERRUPT:
                        session.interrupt()
                        cancelled_at = time.monotonic()
                elif show_progress and bar is None and time.monotonic() - started >= PROGRESS_DELAY:
                    bar = _Bar(stream, tracker)
                if bar is not None:
                    bar.update()
            except KeyboardInterrupt:
                if bar is not None:
                    bar.stop()
                    bar = None
                cancelled_at = time.monotonic()
                session.interrupt()
    finally:
        if bar is not None:
            bar.stop()
    worker.join()
    if cancelled_at is not None:
        raise QueryCancelled("query cancelled")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
