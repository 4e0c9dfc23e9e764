"""Cache affinity: which worker owns a fragment's blocks.

Ownership is rendezvous (highest-random-weight) hashing of an object at its
version over the *live* workers: each worker scores the object, the highest
score owns it, and every fragment of the object (its files, or row groups of
one file) runs there.  So each block of the object is fetched from the store
by one worker only, and a repeated query finds it in that worker's SSD cache.
A worker joining takes from every other worker only the objects it now wins;
a worker leaving hands only its own objects to their second choice: a change
of membership moves ``~1/n`` of the data, and nothing else moves.

The key is the object, not the fragment: fragments of one file split by row
groups share the file's footer and the blocks at their boundaries (a 4 MiB
row group is smaller than a block), and giving them different owners would
fetch those blocks once per owner (see ``benchmarks/bench_ray.py``).

Skew (one large object, few objects) is the executor's business at run
time: an idle worker takes queued fragments of a busy one (soft affinity).
:func:`assign` also offers static bounded loads (Mirrokni et al. 2018), whose
placement depends on the rest of the query and so is off by default.

Pure Python, no Ray: the benchmark's scale-out simulation uses it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import xxhash

from shoal.cache import ObjectVersion

__all__ = ["fragment_key", "score", "ranking", "owner", "assign", "Assignment"]


def fragment_key(files: Sequence[ObjectVersion]) -> str:
    """The ownership key of a fragment: its objects at their versions."""
    return "|".join(f"{v.url}@{v.token}" for v in files)


def score(member: str, key: str) -> int:
    """The rendezvous weight of ``member`` for ``key`` (64-bit, stable across processes)."""
    return xxhash.xxh3_64_intdigest(f"{member}\0{key}".encode())


def ranking(key: str, members: Iterable[str]) -> list[str]:
    """Members by decreasing weight for ``key``; the first owns it."""
    return sorted(members, key=lambda m: (score(m, key), m), reverse=True)


def owner(key: str, members: Iterable[str]) -> str:
    """The member that owns ``key`` (highest weight)."""
    best: tuple[int, str] | None = None
    for member in members:
        candidate = (score(member, key), member)
        if best is None or candidate > best:
            best = candidate
    if best is None:
        raise ValueError("no members to own a fragment")
    return best[1]


@dataclass
class Assignment:
    """Which member runs which item, and how far it is from pure hashing."""

    #: item index -> member
    members: list[str]
    #: item index -> True when the item went to its hash owner
    on_owner: list[bool]
    #: member -> bytes assigned
    load: dict[str, int]

    @property
    def affinity(self) -> float:
        """Share of items placed on their owner."""
        return sum(self.on_owner) / len(self.on_owner) if self.on_owner else 1.0


def assign(keys: Sequence[str], sizes: Sequence[int], members: Sequence[str], *,
           load_factor: float | None = None, weights: Mapping[str, float] | None = None) -> Assignment:
    """Place items (``keys`` with byte ``sizes``) on ``members``.

    ``load_factor=None`` is pure rendezvous hashing.  Otherwise a member's
    bytes are capped at ``load_factor`` x its share of the total (shares from
    ``weights``, equal by default); an item that fits nowhere under the cap
    goes to the least-loaded member.  Items are placed largest first.
    """
    if not members:
        raise ValueError("no members to assign fragments to")
    if len(keys) != len(sizes):
        raise ValueError("keys and sizes differ in length")
    weights = {m: float((weights or {}).get(m, 1.0)) for m in members}
    total_weight = sum(weights.values()) or 1.0
    total = sum(sizes)
    load = {m: 0 for m in members}
    chosen: list[str] = [""] * len(keys)
    on_owner = [False] * len(keys)
    order = sorted(range(len(keys)), key=lambda i: (-sizes[i], keys[i]))
    for i in order:
        ranked = ranking(keys[i], members)
        pick = ranked[0]
        if load_factor is not None and total:
            pick = ""
            for member in ranked:
                cap = load_factor * total * weights[member] / total_weight
                if load[member] + sizes[i] <= cap:
                    pick = member
                    break
            if not pick:
                pick = min(members, key=lambda m: (load[m] / weights[m], ranked.index(m)))
        chosen[i] = pick
        on_owner[i] = pick == ranked[0]
        load[pick] += sizes[i]
    return Assignment(members=chosen, on_owner=on_owner, load=load)
