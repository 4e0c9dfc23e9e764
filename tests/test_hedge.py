"""Hedged requests (cache/hedge.py): the logic, with in-process requests whose
answers are released by the test (events, not timings).  The same code against
a real S3 server behind the fault proxy: ``test_faults_store.py``."""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

import pytest

from shoal.cache.hedge import HedgePolicy, Hedger


class Copies:
    """Requests the test answers by hand: copy ``i`` returns ``("answer", i)`` once
    ``release(i)`` is called, or raises what ``fail(i, exc)`` gave it."""

    def __init__(self) -> None:
        self.started = 0
        self.cancelled: list[int] = []
        self.events: list[asyncio.Event] = []
        self.errors: dict[int, BaseException] = {}

    def make(self) -> Callable[[], Awaitable[tuple[str, int]]]:
        async def request() -> tuple[str, int]:
            me = self.started
            self.started += 1
            event = asyncio.Event()
            self.events.append(event)
            try:
                await event.wait()
            except asyncio.CancelledError:
                self.cancelled.append(me)
                raise
            if me in self.errors:
                raise self.errors[me]
            return ("answer", me)

        return request

    def release(self, i: int) -> None:
        self.events[i].set()

    def fail(self, i: int, exc: BaseException) -> None:
        self.errors[i] = exc
        self.events[i].set()


async def _until(predicate: Callable[[], bool]) -> None:
    while not predicate():
        await asyncio.sleep(0.001)


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout=20))  # type: ignore[arg-type]


def test_a_prompt_answer_is_not_hedged() -> None:
    async def main() -> None:
        hedger, copies = Hedger(HedgePolicy(after_s=5.0)), Copies()
        task = asyncio.ensure_future(hedger.run(copies.make()))
        await _until(lambda: copies.started == 1)
        copies.release(0)
        assert await task == ("answer", 0)
        assert copies.started == 1
        assert hedger.stats() == {"requests": 1, "hedged": 0, "hedge_wins": 0}

    run(main())


async def _hedged(hedger: Hedger, copies: Copies, closed: list[Any]) -> asyncio.Future[tuple[str, int]]:
    """A request whose first copy does not answer in time: returns once both copies are out."""
    task = asyncio.ensure_future(hedger.run(copies.make(), on_loser=closed.append))
    await _until(lambda: copies.started == 2)
    return task


@pytest.mark.parametrize("answering", [1, 0], ids=["the-second-copy", "the-first-copy"])
def test_once_hedged_the_first_answer_wins_and_the_other_copy_is_given_up(answering: int) -> None:
    async def main() -> None:
        closed: list[Any] = []
        hedger, copies = Hedger(HedgePolicy(after_s=0.01)), Copies()
        task = await _hedged(hedger, copies, closed)  # the first copy did not answer in 10 ms
        copies.release(answering)
        assert await task == ("answer", answering)
        await _until(lambda: copies.cancelled == [1 - answering])  # the slower copy is given up
        assert closed == []  # (it never answered: nothing to close)
        assert hedger.stats() == {"requests": 1, "hedged": 1, "hedge_wins": answering}

    run(main())


def test_an_answer_that_arrives_too_late_is_handed_to_on_loser() -> None:
    async def main() -> None:
        closed: list[Any] = []
        hedger, copies = Hedger(HedgePolicy(after_s=0.01)), Copies()
        task = await _hedged(hedger, copies, closed)
        copies.release(0)
        copies.release(1)  # both answer before the hedger looks: one is used, the other closed
        winner = await task
        assert len(closed) == 1 and {winner, closed[0]} == {("answer", 0), ("answer", 1)}

    run(main())


def test_an_error_before_the_hedge_delay_is_the_answer() -> None:
    async def main() -> None:
        hedger, copies = Hedger(HedgePolicy(after_s=5.0)), Copies()
        task = asyncio.ensure_future(hedger.run(copies.make()))
        await _until(lambda: copies.started == 1)
        copies.fail(0, PermissionError("403"))
        with pytest.raises(PermissionError):
            await task
        assert copies.started == 1  # an error is not slowness: no second copy

    run(main())


def test_one_failed_copy_waits_for_the_other_and_two_failures_raise() -> None:
    async def main() -> None:
        hedger, copies = Hedger(HedgePolicy(after_s=0.01)), Copies()
        task = await _hedged(hedger, copies, [])
        copies.fail(0, ConnectionResetError("reset"))
        await asyncio.sleep(0.01)
        assert not task.done()
        copies.release(1)
        assert await task == ("answer", 1)

        hedger, copies = Hedger(HedgePolicy(after_s=0.01)), Copies()  # (a fresh budget)
        task = await _hedged(hedger, copies, [])
        copies.fail(1, TimeoutError("second"))
        copies.fail(0, ConnectionResetError("first"))
        with pytest.raises((ConnectionResetError, TimeoutError)):
            await task

    run(main())


def test_the_budget_bounds_the_extra_requests() -> None:
    async def main() -> None:
        hedger = Hedger(HedgePolicy(after_s=0.005, budget=0.0))  # two hedges, then none
        for _ in range(4):
            copies = Copies()
            task = asyncio.ensure_future(hedger.run(copies.make()))
            await asyncio.sleep(0.03)
            copies.release(0)
            if copies.started > 1:
                copies.release(1)
            await task
        assert hedger.hedged == 2 and hedger.requests == 4

    run(main())


def test_the_delay_adapts_to_the_store_within_bounds() -> None:
    policy = HedgePolicy(multiple=3.0, min_after_s=0.05, max_after_s=2.0, initial_after_s=0.2)
    hedger = Hedger(policy)
    assert hedger.delay() == 0.2  # nothing seen yet
    for _ in range(10):
        hedger._record(0.030)
    assert hedger.delay() == pytest.approx(0.090)
    for _ in range(64):
        hedger._record(0.001)  # a LAN store: the floor, not 3 ms
    assert hedger.delay() == 0.05
    for _ in range(64):
        hedger._record(5.0)
    assert hedger.delay() == 2.0
    assert Hedger(HedgePolicy(enabled=False)).delay() is None


def test_bad_policies_are_refused() -> None:
    with pytest.raises(ValueError):
        HedgePolicy(after_s=0)
    with pytest.raises(ValueError):
        HedgePolicy(min_after_s=1.0, max_after_s=0.5)
    with pytest.raises(ValueError):
        HedgePolicy(budget=1.5)
