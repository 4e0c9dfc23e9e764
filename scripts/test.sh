#!/usr/bin/env bash
# Installs everything, then runs the whole test suite (real SeaweedFS and moto
# servers are started by the tests themselves on free loopback ports).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python -m pytest -q "$@"
