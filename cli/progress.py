"""Running one statement: a worker thread, Ctrl-C as cancel, and a progress bar.

The statement runs on a worker thread so that the main thread can take
Ctrl-C (SIGINT) at any moment and turn it into :meth:`Session.interrupt`;
the engine then raises :class:`~shoal.engine.QueryCancelled`.  On a terminal,
a query that is still running after :data:`PROGRESS_DELAY` seconds gets a
progress bar of bytes scanned out of the bytes its fragments span.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import IO, Any

from shoal.engine import QueryCancelled, QueryResult, Session

__all__ = ["run_statement", "PROGRESS_DELAY"]

PROGRESS_DELAY = 1.0
_POLL = 0.1
_REINTERRUPT = 0.5


class _Tracker:
    """Expected bytes (from the engine's callback) and bytes read so far (from the I/O ledger)."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.total = 0
        self._baseline = self._read()

    def callback(self, done: int, total: int) -> None:
        self.total = total

    def _read(self) -> int:
        try:
            ledger = self.session.fs.reader.ledger.snapshot()
        except AttributeError:
            return 0
        return sum(io.bytes_from_store + io.bytes_from_cache + io.bytes_from_memory for io in ledger.values())

    @property
    def done(self) -> int:
        return max(0, self._read() - self._baseline)


class _Bar:
    def __init__(self, stream: IO[str], tracker: _Tracker) -> None:
        from rich.console import Console
        from rich.progress import (BarColumn, DownloadColumn, Progress, SpinnerColumn, TextColumn,
                                   TimeElapsedColumn)

        self.tracker = tracker
        console = Console(file=stream, stderr=stream is sys.stderr)
        self.progress = Progress(SpinnerColumn(), TextColumn("[progress.description]{task.description}"),
                                 BarColumn(), DownloadColumn(), TimeElapsedColumn(),
                                 console=console, transient=True)
        self.task = self.progress.add_task("scanning", total=tracker.total or None)
        self.progress.start()

    def update(self) -> None:
        total = self.tracker.total or None
        done = self.tracker.done
        if total is not None:
            done = min(done, total)
        self.progress.update(self.task, completed=done, total=total)

    def stop(self) -> None:
        self.progress.stop()


def run_statement(session: Session, statement: str, *, show_progress: bool | None = None,
                  stream: IO[str] | None = None) -> QueryResult:
    """Run one statement; Ctrl-C cancels it (raising QueryCancelled)."""
    stream = stream or sys.stderr
    if show_progress is None:
        show_progress = stream.isatty()
    tracker = _Tracker(session)
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["result"] = session.sql(statement, progress=tracker.callback)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            outcome["error"] = exc

    worker = threading.Thread(target=work, name="shoal-query", daemon=True)
    started = time.monotonic()
    worker.start()
    bar: _Bar | None = None
    cancelled_at: float | None = None
    try:
        while worker.is_alive():
            try:
                worker.join(_POLL)
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
    if cancelled_at is not None:
        raise QueryCancelled("query cancelled")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
