"""Where block files live (``BlockDisk``): one level of 256 directories; a cache
written with diskcache's two-level layout (earlier Shoal versions) stays readable."""

from __future__ import annotations

import os
from pathlib import Path

import diskcache

from shoal.cache.blockcache import BlockCache
from shoal.cache.blockfile import Sealed
from shoal.cache.config import CacheConfig

MiB = 1 << 20


def test_block_files_sit_one_directory_deep(tmp_path: Path) -> None:
    cache = BlockCache(CacheConfig(directory=tmp_path / "c", block_size=MiB))
    for n in range(40):
        assert cache.put(f"obj:{n}", os.urandom(64 << 10))
        assert cache.put_piece(f"obj:{100 + n}", 4096, os.urandom(40 << 10))
    files = [p.relative_to(tmp_path / "c") for p in (tmp_path / "c").rglob("*.val")]
    assert len(files) == 80
    assert all(len(f.parts) == 2 and len(f.parts[0]) == 2 for f in files), files[:3]
    assert len({f.parts[0] for f in files}) > 20  # spread over the 256 directories
    cache.close()


def test_a_cache_written_in_the_two_level_layout_is_still_read(tmp_path: Path) -> None:
    data = os.urandom(200 << 10)
    old = diskcache.Cache(str(tmp_path / "c"))  # diskcache's own layout: xx/yy/name.val
    old.set("obj:0", Sealed(data), read=True)
    old.close()
    assert any(len(p.relative_to(tmp_path / "c").parts) == 3 for p in (tmp_path / "c").rglob("*.val"))
    cache = BlockCache(CacheConfig(directory=tmp_path / "c", block_size=MiB))
    assert bytes(cache.get("obj:0")) == data
    cache.close()
