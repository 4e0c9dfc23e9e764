"""Cache-affinity hashing (pure, no Ray needed) and the ``ray`` registry entry."""

from __future__ import annotations

import sys
from collections import Counter

import pytest

from shoal.cache import CacheConfig, ObjectVersion, ShoalFileSystem
from shoal.engine import EngineError, create_executor
from shoal.engine.ray_affinity import assign, fragment_key, owner, ranking

KEYS = [fragment_key((ObjectVersion(url=f"s3://b/t/part-{i:05d}.parquet", size=1000 + i, etag=f"e{i}"),))
        for i in range(4000)]


def members(n: int) -> list[str]:
    return [f"local:{i}" for i in range(n)]


def test_owner_is_stable_and_first_in_ranking() -> None:
    for key in KEYS[:200]:
        assert owner(key, members(5)) == ranking(key, members(5))[0]
        assert owner(key, list(reversed(members(5)))) == owner(key, members(5))


def test_keys_spread_evenly() -> None:
    counts = Counter(owner(k, members(4)) for k in KEYS)
    assert set(counts) == set(members(4))
    assert all(abs(c - len(KEYS) / 4) < 0.1 * len(KEYS) / 4 for c in counts.values())


@pytest.mark.parametrize("n", [2, 3, 8, 31])
def test_joining_member_moves_only_its_share(n: int) -> None:
    before = {k: owner(k, members(n)) for k in KEYS}
    after = {k: owner(k, members(n) + ["node:new"]) for k in KEYS}
    moved = [k for k in KEYS if before[k] != after[k]]
    assert all(after[k] == "node:new" for k in moved)
    assert abs(len(moved) - len(KEYS) / (n + 1)) < 0.15 * len(KEYS) / (n + 1) + 10


@pytest.mark.parametrize("n", [2, 5])
def test_leaving_member_hands_over_only_its_own(n: int) -> None:
    before = {k: owner(k, members(n)) for k in KEYS}
    gone = members(n)[0]
    after = {k: owner(k, members(n)[1:]) for k in KEYS}
    for key in KEYS:
        if before[key] != gone:
            assert after[key] == before[key]
        else:
            assert after[key] == ranking(key, members(n))[1]


def test_version_is_part_of_the_key() -> None:
    v1 = ObjectVersion(url="s3://b/x.parquet", size=10, etag="a")
    v2 = ObjectVersion(url="s3://b/x.parquet", size=10, etag="b")
    assert fragment_key((v1,)) != fragment_key((v2,))
    assert fragment_key((v1,)) == fragment_key((ObjectVersion(url="s3://b/x.parquet", size=10, etag="a"),))


def test_bounded_load_keeps_owners_when_balanced() -> None:
    sizes = [100] * len(KEYS)
    pure = assign(KEYS, sizes, members(4), load_factor=None)
    bounded = assign(KEYS, sizes, members(4), load_factor=1.25)
    assert pure.affinity == 1.0
    assert bounded.affinity > 0.95
    assert max(bounded.load.values()) <= 1.25 * sum(sizes) / 4


def test_bounded_load_spreads_a_skewed_query() -> None:
    # Two huge fragments that hash to the same member must not both land there.
    keys = [k for k in KEYS if owner(k, members(3)) == "local:0"][:2] + KEYS[:30]
    sizes = [10_000, 10_000] + [10] * 30
    result = assign(keys, sizes, members(3), load_factor=1.25)
    assert result.members[0] != result.members[1]
    assert assign(keys, sizes, members(3), load_factor=None).members[:2] == ["local:0", "local:0"]


def test_assignment_is_deterministic() -> None:
    sizes = [len(k) for k in KEYS[:100]]
    assert assign(KEYS[:100], sizes, members(3)).members == assign(KEYS[:100], sizes, members(3)).members


def test_assign_needs_members() -> None:
    with pytest.raises(ValueError):
        assign(KEYS[:1], [1], [])


def test_ray_executor_without_ray_has_an_install_hint(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    fs = ShoalFileSystem(cache=CacheConfig(directory=tmp_path / "cache"))
    try:
        with pytest.raises(EngineError, match=r"pip install 'shoal\[ray\]'"):
            create_executor("ray", fs, workers=2)
    finally:
        fs.close()


def test_unknown_executor_lists_ray() -> None:
    with pytest.raises(EngineError, match="ray"):
        create_executor("nope", None, workers=1)  # type: ignore[arg-type]
