#!/usr/bin/env bash
# One prepared check for a lent NVIDIA GPU, well inside 8 minutes:
#   1. tests/gpu: the tracker against torch.cuda.max_memory_allocated (within 1%) on the built-in
#      models; offload with pinned memory and a side stream (gradients equal, peak lower, predicted
#      within 2%); selective recompute and bf16 autocast (gradients bitwise equal);
#   2. remat bench on a GPT-2-medium-sized model (24 layers, d=1024, 16 heads, seq 1024) in bf16:
#      every peer (offload included, on CUDA) and remat's plans, with the allocator's peaks.
# Results go under $OUT (default ./out): env.json, nvidia-smi.txt, gpu-tests.{txt,xml}, bench/.
# Usage (device tool): bash scripts/gpu_check.sh
# Installs into .venv-gpu with pip's default torch for the machine (a CUDA build).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if [ ! -x .venv-gpu/bin/python ]; then
  "$PY" -m venv .venv-gpu && .venv-gpu/bin/pip install -q -e ".[dev,plot]" >"$OUT/install.log" 2>&1
fi
BIN=.venv-gpu/bin
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true
"$BIN/remat" env --json >"$OUT/env.json" 2>&1
timeout 240 "$BIN/python" -m pytest -q tests/gpu -rA --junitxml="$OUT/gpu-tests.xml" >"$OUT/gpu-tests.txt" 2>&1
tests=$?
tail -5 "$OUT/gpu-tests.txt"
timeout 240 "$BIN/remat" bench gpt --device cuda --dtype bfloat16 \
  --set n_layer=24 d_model=1024 n_head=16 vocab=50304 --seq 1024 --batch 8 \
  --budgets 80%,60%,50%,40%,25% --steps 5 --out "$OUT/bench" >"$OUT/bench.txt" 2>"$OUT/bench.log"
bench=$?
tail -25 "$OUT/bench.txt"
date -u +%Y-%m-%dT%H:%M:%SZ >"$OUT/date.txt"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
