#!/usr/bin/env bash
# The whole test suite: set up from nothing, then pytest (unit tests on tiny models + the real backbones).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
