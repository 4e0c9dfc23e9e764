"""Cache affinity: which worker owns a fragment's blocks.

Ownership is rendezvous (highest-random-weight) hashing over the *live*
workers: each worker scores a fragment's key, the highest score owns it.  A
worker joining takes from every other worker only the fragments it now wins;
a worker leaving hands only its own fragments to their second choice.  So a
change of membership moves ``~1/n`` of the fragments, and every other
fragment keeps finding its blocks in the same worker's SSD cache.

Assignment is *soft*: with ``load_factor`` set, a worker takes fragments
until it holds ``load_factor`` times its fair share of the query's bytes, and
the next fragment goes to the fragment's next-ranked worker instead
(consistent hashing with bounded loads, Mirrokni et al. 2018), or to the
least-loaded worker when every ranked choice is full.  The assignment is a
pure function of the fragments and the membership, so a repeated query lands
on the same workers and finds its blocks cached.

Pure Python, no Ray: the benchmark's scale-out simulation uses it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import xxhash

from shoal.cache import ObjectVersion

__all__ = ["fragment_key", "score", "ranking", "owner", "assign", "Assignment"]


def fragment_key(files: Sequence[ObjectVersion], row_groups: Sequence[int] | None = None) -> str:
    """The cache identity of a fragment: its objects at their versions (and row groups).

    Row groups are part of the key: fragments of one file read (mostly)
    disjoint byte ranges, so they may live on different workers.
    """
    key = "|".join(f"{v.url}@{v.token}" for v in files)
    if row_groups is not None:
        key += "#" + ",".join(str(g) for g in row_groups)
    return key


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
           load_factor: float | None = 1.25, weights: Mapping[str, float] | None = None) -> Assignment:
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
