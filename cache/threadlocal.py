"""Per-thread state that lasts as long as the OS thread, not its Python thread state.

``threading.local`` keeps its values in the calling thread's *Python thread
state*.  DuckDB calls a registered fsspec filesystem from its own native
threads, and each call enters Python with a thread state that is created for
the call and destroyed when it returns.  Every call therefore finds a fresh,
empty ``threading.local``: diskcache opened a new SQLite connection (and
re-applied its pragmas) for every block a DuckDB thread looked up, about 130
connections and ~80 ms of a fresh process's warm TPC-H Q6.

:class:`ThreadSlots` keys the values by ``threading.get_ident()`` instead,
which is the OS thread's id and stays the same across those calls.  An id can
be reused after its thread exits; the next thread with that id then inherits
the values, which is harmless for what is kept here (a SQLite connection is
only used by one thread at a time, and SQLite checks the thread by this id).
"""

from __future__ import annotations

from threading import get_ident as _get_ident
from typing import Any

__all__ = ["ThreadSlots"]


class ThreadSlots:
    """Attribute access like ``threading.local``, keyed by the OS thread id."""

    __slots__ = ("_values",)

    def __init__(self) -> None:
        object.__setattr__(self, "_values", {})

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
            mine = self._values.setdefault(_get_ident(), {})  # setdefault: atomic under the GIL
        mine[name] = value

    def __delattr__(self, name: str) -> None:
        try:
            del self._values[_get_ident()][name]
        except KeyError:
            raise AttributeError(name) from None
