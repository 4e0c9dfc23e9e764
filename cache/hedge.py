"""Hedged requests: a second copy of a request whose first byte is late.

Object stores answer most GETs in tens of milliseconds and a few percent in
hundreds of milliseconds or seconds (S3 Standard: p50 ~27 ms, ~3% over
200 ms, a few per thousand over 2 s; AnyBlob measured the same shape and
hedges them).  A scan made of dozens of range GETs almost always contains one
of those, and it finishes when its slowest GET does.  Sending the same
request again once the first has waited several times the usual first-byte
time, and taking whichever answers first, cuts that tail at the price of a
few percent more requests (and almost no extra bytes: the loser is cancelled
before or just after its first byte).

Only idempotent reads are hedged (GETs of a pinned version, HEADs, LISTs), and a
budget bounds the extra load: a store that is slow because it is overloaded
must not get twice the requests.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import threading
from collections import deque
from dataclasses import dataclass
from typing import Awaitable, Callable, TypeVar

__all__ = ["HedgePolicy", "Hedger"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class HedgePolicy:
    """When a slow request gets a second copy.

    Attributes:
        enabled: hedge at all.
        after_s: fixed delay before the second copy; ``None`` adapts it to the
            store: ``multiple`` times the median first-byte time of recent
            requests, kept between ``min_after_s`` and ``max_after_s``.
        multiple: how many median first-byte times a request may wait.
        min_after_s / max_after_s: bounds of the adaptive delay.
        initial_after_s: the delay before enough requests have been seen.
        budget: at most this fraction of requests is hedged (plus two), so a
            store that is slow because it is overloaded does not get twice
            the load.
    """

    enabled: bool = True
    after_s: float | None = None
    multiple: float = 3.0
    min_after_s: float = 0.05
    max_after_s: float = 2.0
    initial_after_s: float = 0.2
    budget: float = 0.1

    def __post_init__(self) -> None:
        if self.after_s is not None and self.after_s <= 0:
            raise ValueError("after_s must be > 0 (use enabled=False to switch hedging off)")
        if not 0 < self.min_after_s <= self.max_after_s:
            raise ValueError("need 0 < min_after_s <= max_after_s")
        if self.multiple <= 1 or not 0 <= self.budget <= 1:
            raise ValueError("multiple must be > 1 and budget within [0, 1]")


_SAMPLES = 64  # first-byte times kept for the median
_BURST = 2  # hedges allowed beyond the budget (a first scan's first stalls)
_MIN_SAMPLES = 8


class Hedger:
    """Runs requests with hedging and keeps the counts.

    ``await hedger.run(make_request)`` calls ``make_request()`` once, and once
    more if the first has not answered after :meth:`delay`; it returns the
    first answer and cancels the other.  ``make_request`` must return a new
    awaitable on every call (a coroutine, not a task).
    """

    def __init__(self, policy: HedgePolicy | None = None) -> None:
        self.policy = policy or HedgePolicy()
        self._ttfb: deque[float] = deque(maxlen=_SAMPLES)
        self._lock = threading.Lock()
        self.requests = 0
        #: second copies sent, and how many of them answered first.
        self.hedged = 0
        self.hedge_wins = 0

    def delay(self) -> float | None:
        """Seconds a request waits for its answer before it is hedged (None: never)."""
        p = self.policy
        if not p.enabled:
            return None
        if p.after_s is not None:
            return p.after_s
        with self._lock:
            if len(self._ttfb) < _MIN_SAMPLES:
                return p.initial_after_s
            median = statistics.median(self._ttfb)
        return min(p.max_after_s, max(p.min_after_s, p.multiple * median))

    def _may_hedge(self) -> bool:
        with self._lock:
            if self.hedged >= self.policy.budget * self.requests + _BURST:
                return False
            self.hedged += 1
            return True

    def _record(self, seconds: float) -> None:
        with self._lock:
            self._ttfb.append(seconds)

    async def run(self, make_request: Callable[[], Awaitable[T]], *, on_loser: Callable[[T], None] | None = None,
                  what: str = "request") -> T:
        """The first answer of ``make_request()`` and, when it is slow, of a second copy.

        ``on_loser`` gets an answer that arrived but lost (e.g. to close its
        body).  An error of one copy is returned only if the other fails too.
        """
        loop = asyncio.get_running_loop()
        with self._lock:
            self.requests += 1
        delay = self.delay()
        t0 = loop.time()
        first = asyncio.ensure_future(make_request())
        if delay is not None:
            try:
                done, _ = await asyncio.wait({first}, timeout=delay)
            except BaseException:
                first.cancel()
                raise
            # Answered in time (or failed: an error is not slowness), or out of budget:
            # the first copy's answer, whenever it comes.
            if not done and self._may_hedge():
                logger.debug("hedging a slow %s after %.3f s", what, delay)
                copies = [first, asyncio.ensure_future(make_request())]
                try:
                    return await self._first_answer(copies, on_loser, loop, (t0, loop.time()))
                finally:
                    for task in copies:
                        if not task.done():
                            task.cancel()
                            task.add_done_callback(lambda t: self._settle_loser(t, on_loser))
        result = await first
        self._record(loop.time() - t0)
        return result

    async def _first_answer(self, copies: list[asyncio.Future[T]], on_loser: Callable[[T], None] | None,
                            loop: asyncio.AbstractEventLoop, started: tuple[float, float]) -> T:
        pending = set(copies)
        error: BaseException | None = None
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            winners = [t for t in copies if t in done and t.exception() is None]
            for task in done:
                if task.exception() is not None and error is None:
                    error = task.exception()
            if winners:
                winner = winners[0]
                if winner is copies[1]:
                    with self._lock:
                        self.hedge_wins += 1
                # The winner's own first-byte time: the store's, not the wait for the hedge.
                self._record(loop.time() - started[copies.index(winner)])
                for task in winners[1:]:
                    self._settle_loser(task, on_loser)
                return winner.result()
        assert error is not None
        raise error

    @staticmethod
    def _settle_loser(task: asyncio.Future[T], on_loser: Callable[[T], None] | None) -> None:
        if task.cancelled() or task.exception() is not None or on_loser is None:
            return
        try:
            on_loser(task.result())
        except Exception:  # noqa: BLE001 - cleaning up a response nobody reads
            logger.debug("closing a hedged request's losing answer failed", exc_info=True)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"requests": self.requests, "hedged": self.hedged, "hedge_wins": self.hedge_wins}
