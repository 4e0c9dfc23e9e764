"""Per-thread state that lasts as long as the OS thread, not its Python thread state.

``threading.local`` keeps its values in the calling thread's *Python thread
state*.  DuckDB calls a registered fsspec filesystem from its own native
threads, and each call enters Python with a thread state that is created for
the call and destroyed when it returns.  Every call therefore finds a fresh,
empty ``threading.local``: diskcache opened a new SQLite connection (and
re-applied its pragmas) for every block a DuckDB thread looked up, about 130
connections and ~80 ms of a fresh process's warm TPC-H Q6.

:class:`ThreadSlots` keys the values by ``threading.get_ident()`` instead,
which is the OS thread's id and stays the same across those calls.  A thread
that Python started drops its values when it exits (as with
``threading.local``: a guard object in a real ``threading.local`` goes with the
thread); a native thread's values stay until :meth:`ThreadSlots.clear`, and an
id reused by a later thread inherits them, which is harmless for what is kept
here (a SQLite connection is used by one thread at a time, and SQLite checks
the thread by this id).
"""

from __future__ import annotations

import threading
from threading import get_ident as _get_ident
from typing import Any, Iterator

__all__ = ["ThreadSlots"]


class _Guard:
    """Lives in a Python thread's ``threading.local``; drops that thread's values when it exits."""

    __slots__ = ("values", "ident", "mine")

    def __init__(self, values: dict[int, dict[str, Any]], ident: int, mine: dict[str, Any]) -> None:
        self.values, self.ident, self.mine = values, ident, mine

    def __del__(self) -> None:
        # Only the values it was made for: after clear(), a new guard replaces
        # this one, and the thread's new values must stay.
        if self.values.get(self.ident) is self.mine:
            del self.values[self.ident]


class ThreadSlots:
    """Attribute access like ``threading.local``, keyed by the OS thread id."""

    __slots__ = ("_values", "_guards")

    def __init__(self) -> None:
        object.__setattr__(self, "_values", {})
        object.__setattr__(self, "_guards", threading.local())

    # ``_values`` is a slot, so these run only for other names (and on hot
    # paths: a file's position is read and set on every read).
    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[_get_ident()][name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        mine = self._values.get(_get_ident())
        if mine is None:
            mine = self._new_slot()
        mine[name] = value

    def __delattr__(self, name: str) -> None:
        try:
            del self._values[_get_ident()][name]
        except KeyError:
            raise AttributeError(name) from None

    def _new_slot(self) -> dict[str, Any]:
        ident = _get_ident()
        mine = self._values.setdefault(ident, {})  # setdefault: atomic under the GIL
        # A thread Python started (or the main thread) gets a guard: its thread
        # state lives as long as the thread.  Native threads entering Python per
        # call would lose the guard, and their values, after each call; they show
        # up here only as dummy threads (once something asked current_thread()).
        thread = threading._active.get(ident)  # noqa: SLF001 - no public "did Python start this thread" test
        if thread is not None and not isinstance(thread, threading._DummyThread):  # noqa: SLF001
            self._guards.guard = _Guard(self._values, ident, mine)
        return mine

    def clear(self) -> Iterator[dict[str, Any]]:
        """Forget every thread's values; yields each thread's (to close what they hold)."""
        while self._values:
            _, values = self._values.popitem()
            yield values
