#!/usr/bin/env bash
# One prepared check for a lent NVIDIA GPU: environment, GPU tests, results under $OUT.
# Usage (device tool): bash scripts/gpu_check.sh     (OUT defaults to ./out)
# Installs into .venv with pip's default torch for the machine (a CUDA build); takes a few minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if [ ! -x .venv-gpu/bin/python ]; then
  "$PY" -m venv .venv-gpu && .venv-gpu/bin/pip install -q -e ".[dev]" >"$OUT/install.log" 2>&1
fi
BIN=.venv-gpu/bin
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true
"$BIN/remat" env --json >"$OUT/env.json" 2>&1
timeout 420 "$BIN/python" -m pytest -q tests/gpu -rA --junitxml="$OUT/gpu-tests.xml" >"$OUT/gpu-tests.txt" 2>&1
status=$?
tail -5 "$OUT/gpu-tests.txt"
exit $status
