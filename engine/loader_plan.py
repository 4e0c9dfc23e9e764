"""Which rows each rank and each DataLoader worker reads in an epoch, and in which order.

Pure functions of the source's *units* (row groups, with their row counts
after any filter); no I/O.  Every process of a job computes the same plan
from the same inputs, so nothing has to be sent between them.

An epoch, step by step:

1. **Units are shuffled globally** with ``rng(seed, epoch)``; concatenated in
   that order they form the epoch's *stream* of ``N`` rows.
2. **Each rank takes a contiguous span** of the stream (contiguous, so a rank
   reads only about ``1/W`` of the data), sized by the remainder policy so that
   every rank gets the same number of batches ``nb``:

   * ``"partial"`` (default): every row exactly once; each rank's last batch
     may be short (even empty when fewer than ``W`` rows remain for it);
     ``nb = ceil(N / (W*B))``.
   * ``"drop"``: only full batches; the last ``N mod (W*B)`` rows of the
     stream are not read this epoch (with shuffling, different rows each
     epoch); ``nb = N // (W*B)``.
   * ``"pad"``: only full batches; the stream wraps around to its start for
     the missing ``W*B*nb - N`` rows (fewer than ``W*B`` rows repeat);
     ``nb = ceil(N / (W*B))``.

3. **A rank's span is cut into windows** of ``S`` rows (``S``, the shuffle
   buffer, is a multiple of ``B``).  A window's rows are permuted with
   ``rng(seed, epoch, window start)`` and cut into batches, so every batch but
   the rank's last is full.
4. **Windows go to DataLoader workers** in contiguous, batch-balanced runs
   (:meth:`Schedule.fresh`); a window may be split between two workers at a
   batch boundary.  The DataLoader takes one batch from each worker in turn
   (round robin), so the order the trainer sees is fixed by (seed, epoch,
   world size, rank, number of workers).

A :class:`Schedule` lists, per worker, the batches still to come as
:class:`Item` s ``(window start, window rows, first batch, end batch)``.  An
item describes its window completely (the permutation is seeded by its start),
so any process can read any item: that is what makes resuming with another
number of workers, or another world size, possible.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable, NamedTuple, Sequence

import numpy as np

__all__ = ["REMAINDER_POLICIES", "Item", "Piece", "EpochPlan", "Schedule", "batches_in", "delivered_order", "shuffle_quality"]

REMAINDER_POLICIES = ("partial", "drop", "pad")

_UNIT_ORDER_STREAM = 0x5E0A1
_WINDOW_STREAM = 0x5E0A2


class Piece(NamedTuple):
    """Rows ``[lo, hi)`` of one unit (counted among the unit's selected rows)."""

    unit: int
    lo: int
    hi: int


class Item(NamedTuple):
    """Batches ``[b0, b1)`` of the window of ``rows`` rows starting at stream position ``start``."""

    start: int
    rows: int
    b0: int
    b1: int

    @property
    def batches(self) -> int:
        return self.b1 - self.b0


def batches_in(rows: int, batch_size: int) -> int:
    """Batches of a window: the last may be short; a window of 0 rows is one empty batch."""
    return max(1, -(-rows // batch_size))


def _rng(*words: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([w & 0xFFFFFFFFFFFFFFFF for w in words])))


class EpochPlan:
    """One epoch of one rank: its windows, their pieces and permutations."""

    def __init__(self, counts: Sequence[int] | np.ndarray, *, epoch: int, seed: int, shuffle: bool,
                 batch_size: int, window: int, world_size: int, rank: int, remainder: str) -> None:
        if remainder not in REMAINDER_POLICIES:
            raise ValueError(f"remainder must be one of {', '.join(REMAINDER_POLICIES)}, got {remainder!r}")
        if batch_size < 1 or window < batch_size or window % batch_size:
            raise ValueError("window must be a positive multiple of batch_size")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        self.epoch, self.seed, self.shuffle = epoch, seed, shuffle
        self.batch_size, self.window, self.world_size, self.rank = batch_size, window, world_size, rank
        self.remainder = remainder
        counts = np.asarray(counts, dtype=np.int64)
        self.order = _rng(seed, epoch, _UNIT_ORDER_STREAM).permutation(len(counts)) if shuffle else np.arange(len(counts))
        self.offsets = np.concatenate([[0], np.cumsum(counts[self.order])]).astype(np.int64)
        self.total = int(self.offsets[-1])
        self.num_batches, self.span_start, self.span_rows, self.empty_tail = self._span()

    def _span(self) -> tuple[int, int, int, bool]:
        """(batches per rank, this rank's first stream position, its rows, whether its last batch is empty)."""
        n, w, b, r = self.total, self.world_size, self.batch_size, self.rank
        if n == 0:
            return 0, 0, 0, False
        if self.remainder == "drop":
            nb = n // (w * b)
            return nb, r * nb * b, nb * b, False
        nb = -(-n // (w * b))
        if self.remainder == "pad":
            return nb, r * nb * b, nb * b, False
        full = (nb - 1) * b
        rest = n - w * full  # 0 < rest <= w*b, shared out as evenly as possible
        share = [rest // w + (q < rest % w) for q in range(w)]
        start = r * full + sum(share[:r])
        return nb, start, full + share[r], share[r] == 0

    def windows(self) -> list[Item]:
        """This rank's windows in stream order, each as a whole item."""
        items = []
        for lo in range(0, self.span_rows, self.window):
            rows = min(self.window, self.span_rows - lo)
            items.append(Item(self.span_start + lo, rows, 0, batches_in(rows, self.batch_size)))
        if self.empty_tail:
            items.append(Item(self.span_start + self.span_rows, 0, 0, 1))
        return items

    def pieces(self, start: int, rows: int) -> list[Piece]:
        """The unit pieces holding stream rows ``[start, start + rows)`` (wrapping past the end for "pad")."""
        out: list[Piece] = []
        n = self.total
        position, left = start, rows
        while left > 0 and n > 0:
            position %= n
            i = int(np.searchsorted(self.offsets, position, side="right")) - 1
            lo = position - int(self.offsets[i])
            take = min(left, int(self.offsets[i + 1]) - position)
            out.append(Piece(int(self.order[i]), lo, lo + take))
            position += take
            left -= take
        return out

    def permutation(self, start: int, rows: int) -> np.ndarray | None:
        """The order of a window's rows (None: stream order)."""
        if not self.shuffle or rows <= 1:
            return None
        return _rng(self.seed, self.epoch, _WINDOW_STREAM, start).permutation(rows)

    def batch_rows(self, item: Item, batch: int) -> tuple[int, int]:
        """Window-relative rows ``[lo, hi)`` of batch number ``batch`` of an item's window."""
        lo = batch * self.batch_size
        return lo, min(lo + self.batch_size, item.rows)


@dataclass(frozen=True)
class Schedule:
    """The batches still to come, per worker lane, in the order each lane yields them.

    Batches are consumed round robin over the lanes (lane 0's next batch, then
    lane 1's, ...; exhausted lanes are skipped), which is how PyTorch's
    DataLoader takes them from its workers (``in_order=True``).
    """

    lanes: tuple[tuple[Item, ...], ...]

    @classmethod
    def fresh(cls, windows: Sequence[Item], workers: int) -> "Schedule":
        return cls(((*windows,),)).regroup(workers)

    @property
    def lengths(self) -> list[int]:
        return [sum(item.batches for item in lane) for lane in self.lanes]

    @property
    def total(self) -> int:
        return sum(self.lengths)

    def regroup(self, workers: int) -> "Schedule":
        """The same batches over ``workers`` lanes: stream order, cut into runs whose
        batch counts differ by at most one (the identity when the lane count already
        matches).  Consumed round robin, the stream's last batch comes last."""
        workers = max(1, workers)
        if len(self.lanes) == workers:
            return self
        items = sorted((item for lane in self.lanes for item in lane), key=lambda it: (it.start, it.b0))
        total = sum(item.batches for item in items)
        # The longer lanes are the last ones: the lane holding the stream's last (maybe
        # short) batch then yields it in the last round, last, as without workers.
        quotas = [total // workers + (w >= workers - total % workers) for w in range(workers)]
        lanes: list[list[Item]] = [[] for _ in range(workers)]
        lane = 0
        for item in items:
            b0 = item.b0
            while b0 < item.b1:
                while lane < workers - 1 and quotas[lane] == 0:
                    lane += 1
                take = min(item.b1 - b0, quotas[lane]) if lane < workers - 1 else item.b1 - b0
                lanes[lane].append(item._replace(b0=b0, b1=b0 + take))
                quotas[lane] -= take
                b0 += take
        return Schedule(tuple(tuple(lane) for lane in lanes))

    def _rounds(self, n: int) -> tuple[list[int], list[int], int]:
        """(lengths, batches taken per lane, index of the lane that yields next) after ``n`` batches."""
        lengths = self.lengths
        n = min(max(n, 0), sum(lengths))
        # After t full rounds f(t) = sum(min(length, t)) batches are taken; find the largest t with f(t) <= n.
        lo, hi = 0, max(lengths, default=0)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if sum(min(length, mid) for length in lengths) <= n:
                lo = mid
            else:
                hi = mid - 1
        taken = [min(length, lo) for length in lengths]
        active = [lane for lane, length in enumerate(lengths) if length > lo]
        extra = n - sum(taken)  # < len(active): part of round ``lo``
        for lane in active[:extra]:
            taken[lane] += 1
        following = active[extra] if extra < len(active) else 0
        return lengths, taken, following

    def consumed(self, n: int) -> list[int]:
        """Batches taken from each lane once ``n`` batches were consumed round robin."""
        return self._rounds(n)[1]

    def advance(self, n: int) -> "Schedule":
        """What is left after ``n`` batches were consumed, lanes rotated so that
        consuming the result round robin continues the original order exactly."""
        _, taken, following = self._rounds(n)
        remaining = [_drop(lane, t) for lane, t in zip(self.lanes, taken)]
        k = len(remaining)
        return Schedule(tuple(remaining[(following + i) % k] for i in range(k)))

    def to_state(self) -> list[list[list[int]]]:
        return [[list(item) for item in lane] for lane in self.lanes]

    @classmethod
    def from_state(cls, lanes: Iterable[Iterable[Iterable[int]]]) -> "Schedule":
        return cls(tuple(tuple(Item(*map(int, item)) for item in lane) for lane in lanes))


def _drop(lane: Sequence[Item], batches: int) -> tuple[Item, ...]:
    out: list[Item] = []
    for item in lane:
        if batches >= item.batches:
            batches -= item.batches
            continue
        out.append(item._replace(b0=item.b0 + batches))
        batches = 0
    return tuple(out)


def fingerprint(parts: Iterable[bytes | str]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
        digest.update(b"\0")
    return digest.hexdigest()


def delivered_order(plan: EpochPlan, counts: Sequence[int] | np.ndarray) -> np.ndarray:
    """Source positions (rows numbered in source order) of this rank's rows, in the order one
    stream (no DataLoader workers) delivers them."""
    starts = np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64))])
    out = []
    for window in plan.windows():
        rows = [np.arange(starts[p.unit] + p.lo, starts[p.unit] + p.hi) for p in plan.pieces(window.start, window.rows)]
        block = np.concatenate(rows) if rows else np.empty(0, dtype=np.int64)
        order = plan.permutation(window.start, window.rows)
        out.append(block if order is None else block[order])
    return np.concatenate(out) if out else np.empty(0, dtype=np.int64)


def shuffle_quality(plan: EpochPlan, counts: Sequence[int] | np.ndarray) -> dict[str, float]:
    """How well an epoch is shuffled, for one rank (single stream).

    * ``displacement``: mean ``|delivered position - source position| / N``; a uniform
      random permutation of the rank's rows scores about 1/3, no shuffle 0.
    * ``groups_per_batch``: mean number of distinct row groups in a batch, over the
      number a uniform shuffle of the whole source would give (1.0 is ideal): rows of
      one row group stay in one window, so this is what the window size buys.
    * ``adjacent_same_batch``: fraction of source-adjacent row pairs (same row group)
      that land in the same batch (a uniform shuffle: about ``batch_size / N``).
    """
    counts = np.asarray(counts, dtype=np.int64)
    order = delivered_order(plan, counts)
    n = int(counts.sum())
    if not len(order) or n == 0:
        return {"displacement": 0.0, "groups_per_batch": 0.0, "adjacent_same_batch": 0.0}
    displacement = float(np.abs(order - np.arange(len(order)) - plan.span_start).mean() / n)
    unit_of = np.searchsorted(np.cumsum(counts), order, side="right")
    b = plan.batch_size
    full = len(order) // b * b
    groups = np.array([len(np.unique(unit_of[i:i + b])) for i in range(0, full, b)]) if full else np.array([0])
    weights = counts[counts > 0] / n
    expected = float(np.sum(1 - (1 - weights) ** b))  # distinct groups among b uniform draws
    batch_of = np.empty(n, dtype=np.int64)
    batch_of[order] = np.arange(len(order)) // b
    mask = np.zeros(n, dtype=bool)
    mask[order] = True
    same_group = np.ones(n - 1, dtype=bool)
    same_group[np.cumsum(counts)[:-1][np.cumsum(counts)[:-1] < n] - 1] = False
    pairs = same_group & mask[:-1] & mask[1:]
    adjacent = float((batch_of[:-1][pairs] == batch_of[1:][pairs]).mean()) if pairs.any() else 0.0
    return {"displacement": displacement, "groups_per_batch": float(groups.mean() / expected) if expected else 0.0,
            "adjacent_same_batch": adjacent}
