#!/usr/bin/env bash
# One prepared check for a lent NVIDIA GPU (H100 / H200), in one call, well inside 8 minutes.
#
# Uses the python3 the machine has (torch with CUDA, transformers, pytest...): no venv, nothing
# fetched (PIP_NO_INDEX=1, Hugging Face offline); remat is imported from src/ (PYTHONPATH).
#   1. versions    the interpreter, torch / CUDA / cuDNN, the GPU and the libraries found
#   2. tests       tests/gpu: the tracker against torch.cuda.max_memory_allocated (1%) on the
#                  built-ins and a transformers Llama; offload (pinned memory, side stream);
#                  selective with CUDA's fused attention kernels; bf16 autocast. And
#                  tests/unit/test_compat_versions.py: remat._compat on this machine's torch
#   3. estimate    scripts/gpu_estimate_check.py: `remat plan --device <this GPU>` predictions
#                  (unplanned, full, solver plan) beside the allocator's measured peaks
#   4. bench       remat bench on a GPT-2-medium-shaped model in bf16, every peer (offload too)
#   5. bench_compile  the same model under torch.compile's activation_memory_budget (compile:0.5),
#                  a run of its own so that a slow compile cannot cost the bench above
# Each step has a time limit, and all of them end within 420 s (GPU_CHECK_BUDGET_S).
# Writes at most 8 files under $OUT (default out/gpu-check): summary.json, run.log,
# gpu-tests.log, estimate.json, estimate.md, bench.json, bench.md, bench.png.
#
# Usage:  bash scripts/gpu_check.sh              (on the GPU machine, through the device tool)
#         bash scripts/gpu_check.sh --rehearse   (here: every step the CPU can run, tiny shapes)
# Exit code 0 when every step did. See docs/gpu.md.
set -uo pipefail
cd "$(dirname "$0")/.."

REHEARSE=0
for arg in "$@"; do
  case "$arg" in
    --rehearse) REHEARSE=1 ;;
    -h | --help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument: $arg (expected --rehearse)" >&2; exit 2 ;;
  esac
done

OUT=${OUT:-out/gpu-check}
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif [ "$REHEARSE" = 1 ] && [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
else
  PY=python3
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PIP_NO_INDEX=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
# what an earlier run left here would be taken for this run's
rm -f "$OUT"/{summary.json,run.log,gpu-tests.log,estimate.json,estimate.md,bench.json,bench.md,bench.png}
LOG="$OUT/run.log"
: >"$LOG"

# All steps together stop by DEADLINE (420 s from here unless GPU_CHECK_BUDGET_S says otherwise),
# so that the whole call ends well inside 8 minutes even when every step runs to its limit.
DEADLINE=$(($(date +%s) + ${GPU_CHECK_BUDGET_S:-420}))

# step NAME LIMIT_S STDOUT COMMAND...: run COMMAND with a time limit (its own, or what is left
# before DEADLINE), its stdout to the file STDOUT (- for this script's), its stderr to run.log;
# record its exit code and seconds (124: out of time).
step() {
  local name=$1 limit=$2 stdout=$3 begun code left
  shift 3
  begun=$(date +%s)
  left=$((DEADLINE - begun))
  if [ "$left" -lt "$limit" ]; then limit=$left; fi
  if [ "$limit" -lt 5 ]; then
    echo "== $name: not run, the time is up" | tee -a "$LOG"
    printf '%s\t124\t0\t0\n' "$name" >>"$WORK/steps.tsv"
    return
  fi
  echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
  if [ "$stdout" = - ]; then
    timeout --kill-after=10 "$limit" "$@" 2>>"$LOG"
  else
    timeout --kill-after=10 "$limit" "$@" >"$stdout" 2>>"$LOG"
  fi
  code=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$code" "$(($(date +%s) - begun))" "$limit" >>"$WORK/steps.tsv"
  echo "== $name: exit $code after $(($(date +%s) - begun))s" | tee -a "$LOG"
}

if [ "$REHEARSE" = 1 ]; then
  ESTIMATE_ARGS=(--rehearse)
  BENCH_MODEL=(gpt --device cpu --set n_layer=2 d_model=16 n_head=2 vocab=32 --seq 8 --batch 1
    --strategies none --budgets min --steps 1 --warmup 0 --no-dominate)
else
  ESTIMATE_ARGS=()
  BENCH_MODEL=(gpt --device cuda --dtype bfloat16 --set n_layer=24 d_model=1024 n_head=16
    vocab=50304 --seq 1024 --batch 8)
  nvidia-smi >>"$LOG" 2>&1
fi

step versions 30 - "$PY" scripts/gpu_summary.py versions --out "$WORK/versions.json"
step tests 120 "$OUT/gpu-tests.log" "$PY" -m pytest -q -rA -p no:cacheprovider tests/gpu \
  tests/unit/test_compat_versions.py --junitxml="$WORK/gpu-tests.xml"
tail -3 "$OUT/gpu-tests.log"
step estimate 80 - "$PY" scripts/gpu_estimate_check.py ${ESTIMATE_ARGS[@]+"${ESTIMATE_ARGS[@]}"} \
  --out "$OUT/estimate.json" --markdown "$OUT/estimate.md"
if [ "$REHEARSE" = 1 ]; then
  step bench 120 /dev/null "$PY" -m remat.cli.main bench "${BENCH_MODEL[@]}" --out "$WORK/bench"
  printf 'bench_compile\tskipped\t0\t0\n' >>"$WORK/steps.tsv"
else
  PLOT=()  # bench.png needs matplotlib, which the GPU machine may lack: then JSON and table only
  if ! "$PY" -c "import matplotlib" 2>/dev/null; then
    PLOT=(--no-plot)
    echo "== no matplotlib: bench.png is not made" | tee -a "$LOG"
  fi
  step bench 140 /dev/null "$PY" -m remat.cli.main bench "${BENCH_MODEL[@]}" \
    --strategies none,full,every_n:2,every_n:3,sqrt_n,megatron,save_matmuls,offload \
    --budgets 80%,50%,25%,min --steps 3 ${PLOT[@]+"${PLOT[@]}"} --out "$WORK/bench"
  step bench_compile 120 /dev/null "$PY" -m remat.cli.main bench "${BENCH_MODEL[@]}" \
    --strategies none --budgets '' --no-dominate --with-compile --compile-fractions 0.5 \
    --steps 3 --no-plot --out "$WORK/bench-compile"
fi
for name in bench.json bench.md bench.png; do
  if [ -f "$WORK/bench/$name" ]; then cp "$WORK/bench/$name" "$OUT/$name"; fi
done
if [ -f "$OUT/bench.md" ]; then sed -n '/^| strategy/,/^$/p' "$OUT/bench.md"; fi
"$PY" scripts/gpu_summary.py summary --out "$OUT" --work "$WORK" \
  $([ "$REHEARSE" = 1 ] && echo --rehearse) 2>>"$LOG"
"$PY" - "$OUT/summary.json" <<'EOF'
import json, sys
ok = json.load(open(sys.argv[1]))["ok"]
sys.exit(0 if ok else 1)
EOF
