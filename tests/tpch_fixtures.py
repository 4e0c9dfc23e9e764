"""TPC-H SF 0.01 data for the engine tests: generated once, uploaded per server.

Data comes from DuckDB's tpch extension, which is only packaged for duckdb
1.5.5, so generation runs in the side environment made by
``benchmarks/duckdb155_env.sh`` (``.ci/run`` creates it; so does this module
when it is missing).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "benchmarks"
TPCH_TABLES = ("lineitem", "orders", "partsupp", "part", "customer", "supplier", "nation", "region")


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"shoal_bench_{name}", BENCHMARKS / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


answers = _load("tpch_answers")


def queries() -> dict[str, str]:
    return {p.stem: p.read_text() for p in sorted((BENCHMARKS / "tpch" / "queries").glob("q*.sql"))}


def generate(sf: float = 0.01) -> Path:
    """Local Parquet TPC-H data at ``sf`` (cached under benchmarks/data/)."""
    out = BENCHMARKS / "data" / f"tpch-sf{sf:g}"
    if (out / "_manifest.json").exists():
        return out
    venv = Path(os.environ.get("SHOAL_DUCKDB155_VENV", REPO / ".venv-duckdb155"))
    subprocess.run(["bash", str(BENCHMARKS / "duckdb155_env.sh")], check=True, capture_output=True)
    subprocess.run(
        [str(venv / "bin" / "python"), str(BENCHMARKS / "tpch_data.py"), "--sf", str(sf), "--out", str(out)],
        check=True, capture_output=True,
    )
    return out


def upload(client: object, bucket: str, data_dir: Path, prefix: str = "tpch") -> None:
    for path in sorted(data_dir.rglob("*.parquet")):
        key = f"{prefix}/{path.relative_to(data_dir).as_posix()}"
        client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())  # type: ignore[attr-defined]
