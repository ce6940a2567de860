#!/usr/bin/env bash
# The main job: set up from nothing, then run `pedro demo` on the default backbone (SmolLM2-135M).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/pedro demo "$@"
