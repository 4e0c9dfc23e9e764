"""Properties of the loader's epoch plans and schedules (pure; no I/O)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.engine.loader_plan import EpochPlan, Item, Schedule


def merged(schedule: Schedule) -> list[tuple[int, int]]:
    """Batches in the order a DataLoader takes them from its workers: round robin, skipping empty lanes."""
    lanes = [[(item.start, b) for item in lane for b in range(item.b0, item.b1)] for lane in schedule.lanes]
    out, turn = [], 0
    while any(len(lane) > turn for lane in lanes):
        out.extend(lane[turn] for lane in lanes if len(lane) > turn)
        turn += 1
    return out


def plans(counts: list[int], world: int, **kw) -> list[EpochPlan]:
    return [EpochPlan(counts, world_size=world, rank=r, **kw) for r in range(world)]


def rows_of(plan: EpochPlan) -> list[tuple[int, int]]:
    return [(p.unit, i) for w in plan.windows() for p in plan.pieces(w.start, w.rows) for i in range(p.lo, p.hi)]



shapes = st.fixed_dictionaries({
    "counts": st.lists(st.integers(0, 60), max_size=12),
    "batch": st.integers(1, 8),
    "windows": st.integers(1, 4),
    "world": st.integers(1, 4),
    "remainder": st.sampled_from(["partial", "drop", "pad"]),
    "shuffle": st.booleans(),
    "epoch": st.integers(0, 3),
})


@settings(max_examples=300, deadline=None)
@given(shapes)
def test_every_rank_gets_the_same_batches_and_rows_follow_the_policy(shape) -> None:
    counts, b, world = shape["counts"], shape["batch"], shape["world"]
    ps = plans(counts, world, epoch=shape["epoch"], seed=5, shuffle=shape["shuffle"], batch_size=b,
               window=b * shape["windows"], remainder=shape["remainder"])
    assert len({p.num_batches for p in ps}) == 1
    for p in ps:
        windows = p.windows()
        assert sum(w.batches for w in windows) == p.num_batches
        sizes = [p.batch_rows(w, k) for w in windows for k in range(w.b0, w.b1)]
        assert all(hi - lo == b for lo, hi in sizes[:-1])  # only the last batch may be short
    rows = sorted(r for p in ps for r in rows_of(p))
    every = sorted((u, i) for u, n in enumerate(counts) for i in range(n))
    n = len(every)
    if shape["remainder"] == "partial":
        assert rows == every
    elif shape["remainder"] == "drop":
        assert len(set(rows)) == len(rows) and set(rows) <= set(every) and n - len(rows) < world * b
    else:
        assert set(rows) == set(every) and len(rows) - n < world * b


@settings(max_examples=300, deadline=None)
@given(shapes, st.integers(1, 5), st.integers(1, 5), st.data())
def test_advance_continues_the_round_robin_order_and_regroup_keeps_batches(shape, workers, other, data) -> None:
    b = shape["batch"]
    plan = EpochPlan(shape["counts"], epoch=shape["epoch"], seed=1, shuffle=shape["shuffle"], batch_size=b,
                     window=b * shape["windows"], world_size=shape["world"], rank=0, remainder=shape["remainder"])
    schedule = Schedule.fresh(plan.windows(), workers)
    assert len(schedule.lanes) == workers
    assert max(schedule.lengths) - min(schedule.lengths) <= 1
    order = merged(schedule)
    assert len(order) == plan.num_batches == len(set(order))
    if order:  # the (maybe short) last batch of the stream comes last
        last = max((item.start, item.b1 - 1) for lane in schedule.lanes for item in lane)
        assert order[-1] == last
    n = data.draw(st.integers(0, len(order)))
    rest = schedule.advance(n)
    assert order[:n] + merged(rest) == order
    m = data.draw(st.integers(0, len(order) - n))
    assert order[:n + m] + merged(rest.advance(m)) == order
    assert sorted(merged(rest.regroup(other))) == sorted(order[n:])
    assert Schedule.from_state(rest.to_state()) == rest


def test_shuffle_is_deterministic_per_seed_and_epoch() -> None:
    kw = dict(seed=3, shuffle=True, batch_size=4, window=8, world_size=1, rank=0, remainder="partial")
    counts = [10] * 20
    a, b = EpochPlan(counts, epoch=0, **kw), EpochPlan(counts, epoch=0, **kw)
    assert rows_of(a) == rows_of(b)
    assert [tuple(a.permutation(w.start, w.rows)) for w in a.windows()] == \
        [tuple(b.permutation(w.start, w.rows)) for w in b.windows()]
    assert rows_of(EpochPlan(counts, epoch=1, **kw)) != rows_of(a)
    plain = EpochPlan(counts, epoch=0, **{**kw, "shuffle": False})
    assert rows_of(plain) == [(u, i) for u in range(20) for i in range(10)]
    assert plain.permutation(0, 8) is None


def test_partial_gives_short_ranks_an_empty_last_batch() -> None:
    ps = plans([9], 2, epoch=0, seed=0, shuffle=False, batch_size=4, window=4, remainder="partial")
    assert [p.num_batches for p in ps] == [2, 2]
    assert [[p.batch_rows(w, k) for w in p.windows() for k in range(w.b0, w.b1)] for p in ps] == \
        [[(0, 4), (0, 1)], [(0, 4), (0, 0)]]


def test_empty_source_has_no_batches() -> None:
    for remainder in ("partial", "drop", "pad"):
        p = EpochPlan([], epoch=0, seed=0, shuffle=True, batch_size=4, window=8, world_size=3, rank=2,
                      remainder=remainder)
        assert p.num_batches == 0 and p.windows() == []


def test_invalid_plans_are_refused() -> None:
    with pytest.raises(ValueError, match="remainder"):
        EpochPlan([1], epoch=0, seed=0, shuffle=False, batch_size=1, window=1, world_size=1, rank=0, remainder="x")
    with pytest.raises(ValueError, match="multiple"):
        EpochPlan([1], epoch=0, seed=0, shuffle=False, batch_size=4, window=6, world_size=1, rank=0,
                  remainder="drop")
    with pytest.raises(ValueError, match="rank"):
        EpochPlan([1], epoch=0, seed=0, shuffle=False, batch_size=1, window=1, world_size=2, rank=2,
                  remainder="drop")


def test_pieces_wrap_around_for_pad() -> None:
    p = EpochPlan([3, 2], epoch=0, seed=0, shuffle=False, batch_size=4, window=4, world_size=2, rank=1,
                  remainder="pad")
    assert p.num_batches == 1
    (window,) = p.windows()
    assert window == Item(4, 4, 0, 1)
    assert [tuple(x) for x in p.pieces(window.start, window.rows)] == [(1, 1, 2), (0, 0, 3)]
    assert np.array_equal(p.offsets, [0, 3, 5])
