#!/usr/bin/env bash
# Create .venv and install megatron_longpo with its dev extras.
# On a machine without an NVIDIA GPU, torch is installed FIRST as the CPU build (torch==2.13.0,
# or the PyTorch CPU index as a fallback), so that `torch>=2.6` in setup.py is already satisfied
# and pip never pulls multi-GB CUDA wheels. On CUDA machines the existing / default torch is used.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-dev}
stamp="$VENV/.megatron_longpo-$(cat setup.py tools/setup_env.sh | sha1sum | cut -c1-12)-$EXTRAS"
if [ -f "$stamp" ]; then exit 0; fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[setup] NVIDIA GPU found: installing the default (CUDA) torch"
    $PIP install -q "torch>=2.6"
  else
    echo "[setup] no GPU: installing the CPU build of torch"
    $PIP install -q torch==2.13.0 \
      || $PIP install -q --index-url https://download.pytorch.org/whl/cpu "torch>=2.6"
  fi
fi
echo "[setup] installing megatron_longpo[$EXTRAS] (editable)"
$PIP install -q -e ".[$EXTRAS]"
if [[ ",$EXTRAS," == *,dev,* ]]; then
  # Test data, never imported: TRL ships the original chat templates of public models (Qwen3, ...)
  # as files; tests/unit/test_data_chat_tokens.py renders them. --no-deps: its own dependencies
  # (datasets, accelerate) are not needed to read files.
  $PIP install -q --no-deps "trl==1.16.0"
fi
# megatron-core warns 4x on import that TE / Apex are absent (expected on CPU; docs/install.md)
"$VENV/bin/python" -W "ignore:Transformer Engine and Apex are not installed:UserWarning" \
  -c "import torch, megatron.core; print(f'[setup] torch {torch.__version__}, megatron-core {megatron.core.__version__}, cuda={torch.cuda.is_available()}')"
touch "$stamp"
