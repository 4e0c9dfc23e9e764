#!/usr/bin/env bash
# Installs everything, then runs the demo: a loopback S3 server with TPC-H data,
# queried cold and warm through Shoal's SSD cache with the `shoal` CLI.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python benchmarks/demo.py "$@"
