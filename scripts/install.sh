#!/usr/bin/env bash
# Set up a virtual environment with basicsr 1.4.2, a torch/torchvision pair that works with it, and
# this package (editable). Idempotent: re-running skips what is already installed.
#
#   bash scripts/install.sh            # creates ./.venv
#   VENV=/path/to/env bash scripts/install.sh
#
# Why three steps: basicsr 1.4.2 is an sdist whose setup_requires names torch, so pip's default build
# isolation installs a second multi-GB torch only to build a pure-Python wheel. Installing torch first
# and basicsr with --no-build-isolation avoids that.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

case "$(uname -m)" in
  x86_64)  TORCH_PIN=${TORCH_PIN:-"torch==2.14.1 torchvision==0.29.1"} ;;
  aarch64|arm64) TORCH_PIN=${TORCH_PIN:-"torch==2.9.1 torchvision==0.24.1"} ;;
  *) TORCH_PIN=${TORCH_PIN:-"torch torchvision"} ;;
esac

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check -q)

# shellcheck disable=SC2086
if ! "$PY" -c "import torch, torchvision" >/dev/null 2>&1; then
  echo "[install] $TORCH_PIN"
  "${PIP[@]}" $TORCH_PIN
fi
if ! "$PY" -c "import basicsr, mmengine, einops, lmdb, cv2, yaml, tqdm, PIL, pytest, pypiqe" >/dev/null 2>&1; then
  echo "[install] basicsr==1.4.2 (no build isolation) and the other dependencies"
  # pypiqe is test-only: the independent PIQE implementation tests/test_metrics_quality.py compares against
  "${PIP[@]}" --no-build-isolation basicsr==1.4.2 mmengine einops lmdb opencv-python pyyaml tqdm Pillow pytest pypiqe
fi
if ! "$PY" -c "import matplotlib, sklearn, onnx, onnxruntime, safetensors" >/dev/null 2>&1; then
  echo "[install] figures and export: matplotlib, scikit-learn, onnx, onnxruntime, safetensors"
  "${PIP[@]}" matplotlib scikit-learn onnx onnxruntime safetensors
fi
echo "[install] baryir-plugin (editable)"
"${PIP[@]}" --no-build-isolation --no-deps -e .
"$PY" -c "import baryir_plugin, basicsr, torch; print('[install] ok: baryir-plugin', baryir_plugin.__version__, '| basicsr', basicsr.__version__, '| torch', torch.__version__)"
