#!/usr/bin/env bash
# Create (idempotently) the side Python environment with duckdb 1.5.5 and the
# pip-packaged tpch/httpfs extensions.
#
# DuckDB extensions cannot be downloaded at run time here, and the PyPI
# packages that ship extension binaries (duckdb-extension-*) exist only for
# duckdb 1.5.5, while Shoal itself uses duckdb 2.0.x. TPC-H data generation
# (benchmarks/tpch_data.py) and the DuckDB-httpfs baseline therefore run with
# this environment's python; extensions are loaded by file path through
# benchmarks/duckdb155_ext.py.
#
# Usage:  bash benchmarks/duckdb155_env.sh        # prints the venv path last
# Env:    SHOAL_DUCKDB155_VENV  venv path (default: <repo>/.venv-duckdb155)
#         PYTHON                interpreter used to create it (default: python3)
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SHOAL_DUCKDB155_VENV:-$REPO_ROOT/.venv-duckdb155}"
PYTHON="${PYTHON:-python3}"

# Pinned set that resolves together (the extension packages require duckdb==1.5.5).
PACKAGES=(
  "duckdb==1.5.5"
  "duckdb-extension-tpch==1.5.5"
  "duckdb-extension-httpfs==1.5.5"
  "pyarrow==26.0.1"
)

# Succeeds when the venv already has everything, extension files included.
check_env() {
  [ -x "$VENV/bin/python" ] || return 1
  "$VENV/bin/python" - "$REPO_ROOT/benchmarks" <<'EOF' >/dev/null 2>&1
import sys
sys.path.insert(0, sys.argv[1])
import duckdb, pyarrow  # noqa: F401
assert duckdb.__version__ == "1.5.5", duckdb.__version__
from duckdb155_ext import extension_path
extension_path("tpch")
extension_path("httpfs")
EOF
}

if check_env; then
  echo "duckdb 1.5.5 env already present: $VENV" >&2
else
  echo "creating duckdb 1.5.5 env: $VENV" >&2
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PACKAGES[@]}"
  check_env || { echo "duckdb 1.5.5 env at $VENV failed its check" >&2; exit 1; }
fi
echo "$VENV"
