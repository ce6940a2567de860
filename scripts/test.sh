#!/usr/bin/env bash
# The whole test suite: set up from nothing, lint and format-check (ruff) and type-check (mypy) the code, then pytest (unit tests on
# tiny models + the real backbones).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
exec .venv/bin/python -m pytest -q "$@"
