#!/usr/bin/env bash
# Set up feddem in ./.venv: Python venv, PyTorch (kept if already installed, e.g. a CUDA build; else the
# CPU wheel torch==2.13.0), and the project with its test extras. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # An unpinned torch pulls gigabytes of CUDA packages; users with a GPU can install their CUDA build first.
  $PIP install -q "torch==${FEDDEM_TORCH_VERSION:-2.13.0}" 2>&1 | grep -v "^WARNING: Location" || true
fi
$PIP install -q -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch, flwr, transformers; print(f'feddem ready: torch {torch.__version__}, flwr {flwr.__version__}, transformers {transformers.__version__}, cuda={torch.cuda.is_available()}')"
