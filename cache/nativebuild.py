"""Build Shoal's DuckDB extension (``cache/native/shoal_pieces.cpp``) for the
installed DuckDB: ``python -m shoal.cache.nativebuild``.

DuckDB loads C++ extensions built against its own headers, for its exact
version and platform.  The headers come from the DuckDB source distribution
on PyPI (downloaded once into ``<prefix>/share/shoal/``); ``g++`` compiles the
one source file in a few seconds; the extension's metadata footer (what
``scripts/append_metadata.cmake`` in DuckDB's repository writes) names the
platform, the DuckDB version and the C++ ABI.  DuckDB refuses extensions
without a signature unless the database is opened with
``allow_unsigned_extensions``: Shoal opens its own connections so, loads this
one file, and turns the setting off again (see :mod:`shoal.cache.nativereads`).

Without a compiler or the download, nothing breaks: Shoal then reads through
its Python filesystem as before.
"""

from __future__ import annotations

import functools
import io
import re
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

__all__ = ["build", "extension_path"]

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "native" / "shoal_pieces.cpp"


@functools.cache
def _duckdb_identity() -> tuple[str, str]:
    """The installed DuckDB's version and platform (a connection costs ~15 ms: asked
    once per process, however many sessions look for the extension)."""
    import duckdb

    con = duckdb.connect()
    try:
        platform = con.execute("PRAGMA platform").fetchone()[0]
    finally:
        con.close()
    return duckdb.__version__, platform


def extension_path(prefix: str | os.PathLike[str] | None = None) -> Path:
    """Where the built extension for the installed DuckDB lives (it may not exist)."""
    version, platform = _duckdb_identity()
    base = Path(prefix if prefix is not None else sys.prefix) / "share" / "shoal"
    # DuckDB derives the entry point's name from the file name: it must be shoal_pieces.*
    return base / f"v{version}" / platform / "shoal_pieces.duckdb_extension"


def _headers(version: str, into: Path) -> Path:
    """DuckDB's ``src/include`` for ``version``, from its PyPI source distribution."""
    include = into / f"duckdb-{version}-include"
    if (include / "duckdb.hpp").exists():
        return include
    # The simple index (PEP 503), which is what package mirrors serve.
    with urllib.request.urlopen("https://pypi.org/simple/duckdb/", timeout=60) as response:
        page = response.read().decode()
    name = f"duckdb-{version}.tar.gz"
    links = re.findall(r'href="([^"]+)"', page)
    sdist = next(link.split("#", 1)[0] for link in links if link.split("#", 1)[0].endswith("/" + name))
    with urllib.request.urlopen(sdist, timeout=300) as response:
        archive = response.read()
    marker = "/external/duckdb/src/include/"
    staging = Path(tempfile.mkdtemp(dir=into))
    try:
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
            for member in tar.getmembers():
                if marker in member.name and member.isfile():
                    relative = member.name.split(marker, 1)[1]
                    target = staging / relative
                    target.parent.mkdir(parents=True, exist_ok=True)
                    source = tar.extractfile(member)
                    assert source is not None
                    target.write_bytes(source.read())
        if not (staging / "duckdb.hpp").exists():
            raise RuntimeError(f"no DuckDB headers in {sdist}")
        staging.rename(include)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return include


def _metadata(platform: str, version: str) -> bytes:
    """The 534-byte footer DuckDB reads from the end of an extension file."""
    def field(text: str) -> bytes:
        return (text.encode() + b"\0" * 32)[:32]

    fields = [field("4"), field(platform), field(f"v{version}"), field("shoal"), field("CPP"),
              field(""), field(""), field("")]
    section = b"\0" + bytes([147, 4, 16]) + b"duckdb_signature" + bytes([128, 4])
    return section + b"".join(reversed(fields)) + b"\0" * 256


def build(prefix: str | os.PathLike[str] | None = None, *, compiler: str = "g++") -> Path:
    """Compile the extension for the installed DuckDB; returns its path."""
    version, platform = _duckdb_identity()
    out = extension_path(prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    include = _headers(version, out.parent.parent.parent)
    with tempfile.TemporaryDirectory(dir=out.parent) as work:
        binary = Path(work) / out.name
        subprocess.run([compiler, "-std=c++17", "-O2", "-fPIC", "-shared", "-fvisibility=hidden",
                        f"-I{include}", "-o", str(binary), str(SOURCE)], check=True)
        with open(binary, "ab") as f:
            f.write(_metadata(platform, version))
        os.replace(binary, out)
    return out


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if shutil.which("g++") is None:
        print("shoal: no g++ here: DuckDB will read cached bytes through Python (apt-get install g++)",
              file=sys.stderr)
        return 1
    try:
        path = build()
    except (OSError, subprocess.CalledProcessError, RuntimeError, ValueError, StopIteration) as exc:
        print(f"shoal: could not build the DuckDB extension ({exc}); DuckDB will read cached bytes "
              "through Python", file=sys.stderr)
        return 1
    print(f"shoal: built {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
