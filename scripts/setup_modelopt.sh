#!/usr/bin/env bash
# Create .venv-modelopt: NVIDIA ModelOpt's ONNX AutoCast, the peer benchmarks/peers_bench.py runs
# through benchmarks/peers/modelopt_autocast.py. It has a venv of its own because its [onnx] extra pins
# onnx ~=1.21 and onnxruntime-gpu ~=1.24 (older than .venv's) and pulls cupy; in .venv it would
# downgrade what autoprec is tested with. Idempotent: a stamp holding the hash of this script makes a
# second run return in well under a second.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
venv=.venv-modelopt
stamp=$venv/.modelopt-setup
want=$(sha256sum scripts/setup_modelopt.sh | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$venv/bin/python" -c "import modelopt" 2>/dev/null; then
  exit 0
fi
[ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
"$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
# modelopt requires torch (modelopt.onnx imports it at import time). Pinned first, as scripts/setup.sh
# does: 2.13.0 is the CPU wheel these machines carry; modelopt's unpinned "torch>=2.8" would otherwise
# pull a multi-GB CUDA build. The already installed 2.13.0 satisfies it, so the next step keeps it.
"${pip[@]}" "torch==2.13.0"
"${pip[@]}" "torch==2.13.0" "nvidia-modelopt[onnx]==0.47.0"
cuda=$("$venv/bin/python" -c "import torch; print(torch.version.cuda)")
if [ "$cuda" != "None" ]; then
  echo "error: $venv got a CUDA torch (cuda $cuda); remove $venv and check the torch pin" >&2
  exit 1
fi
"$venv/bin/python" -c "from modelopt.onnx.autocast import convert_to_mixed_precision" 2>/dev/null
echo "$want" > "$stamp"
