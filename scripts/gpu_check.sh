#!/usr/bin/env bash
# The one prepared GPU check: everything an H200 session should measure, in ONE device call of <= 8 minutes,
# <= 8 result files in $OUT. Every stage runs under its own timeout inside a global deadline and writes its
# own log, so one failure or hang does not lose the others' results; summary.md comes last.
#
# Before the call, here (in the checkout the device tool sends, e.g. /work/main), once:
#   bash scripts/gpu_check.sh prepare       # downloads the gguf wheel into .whl/ (ignored by git)
# The call (device tool `run`), carrying the wheels:
#   run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=540)
# The GPU image has jax 0.11.2 + the CUDA 13 plugin, numpy, pytest (+ pytest-timeout), hypothesis, flax,
# tokenizers, jinja2, absl; only gguf (for the engine's model loader) travels as a wheel.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "prepare" ]; then
  grep -qx '/.whl/' "$(git rev-parse --git-path info/exclude)" 2>/dev/null || echo '/.whl/' >> "$(git rev-parse --git-path info/exclude)"
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl gguf==0.19.0
  exit $?
fi

OUT=${OUT:-out/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
START=$(date +%s)
DEADLINE=${GPU_CHECK_SECONDS:-470}
STATUS=()

# stage NAME CAP_SECONDS LOGFILE COMMAND...: runs COMMAND under min(CAP, time left), appending to LOGFILE.
stage() {
  local name=$1 cap=$2 log=$3; shift 3
  local left=$(( DEADLINE - ($(date +%s) - START) ))
  local limit=$(( cap < left ? cap : left ))
  if [ "$limit" -lt 15 ]; then STATUS+=("$name: SKIPPED (out of time)"); return; fi
  echo "=== $name (limit ${limit}s) ===" >> "$log"
  local t0=$(date +%s)
  timeout --kill-after=5 "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  local verdict=ok; [ $rc -ne 0 ] && verdict="FAILED (exit $rc)"; [ $rc -eq 124 ] && verdict="TIMED OUT"
  STATUS+=("$name: $verdict in $(( $(date +%s) - t0 ))s (log: $(basename "$log"))")
}

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c 'import jax, jaxlib; print("jax", jax.__version__, "jaxlib", jaxlib.__version__, jax.devices(), jax.devices()[0].device_kind)'
  python3 -m pip list 2>/dev/null | grep -iE '^(jax|triton|numpy|gguf|pytest)' ; } > "$OUT/env.txt" 2>&1

# 1. The compiled kernel against the float64 oracle at test sizes: every failure reported (no -x), each
#    test under a timeout, 4 workers compiling in parallel (pytest-timeout and -xdist are on the GPU image;
#    without preallocation, so 4 processes share the GPU).
PYTEST_OPTS=()
python3 -c 'import pytest_timeout' 2>/dev/null && PYTEST_OPTS+=(--timeout=90)
python3 -c 'import xdist' 2>/dev/null && PYTEST_OPTS+=(-n 4)
stage kernel-tests 120 "$OUT/kernel_tests.log" env XLA_PYTHON_CLIENT_PREALLOCATE=false \
  python3 -m pytest -q -p no:cacheprovider -rfE "${PYTEST_OPTS[@]}" tests/test_kernels.py -k Compiled
# 2. Realistic sizes: bf16/f32 vs float64 and the jnp reference, twice bitwise equal, a pool over 4 GiB.
stage numerics 70 "$OUT/numerics.md" python3 scripts/gpu_numerics.py
# 3. Speed inside one jitted 30-layer loop, engine-width tables, beside the measured copy and matmul rates.
stage bench 70 "$OUT/bench_kernels.md" python3 scripts/bench_kernels.py --dtype bfloat16 --kinds decode,prefill \
  --batch 32,256 --context 1024,8192 --page-size 16,128 --prefill-batch 1,4 --prefill-context 2048 --iters 5
# num_warps x num_stages at two points (the default, 4 warps x 2 stages, is in the rows above).
stage sweep 40 "$OUT/bench_kernels.md" python3 scripts/bench_kernels.py --dtype bfloat16 --kinds decode \
  --backends pallas --batch 32 --context 8192 --page-size 16,128 --sweep num_warps=4,8 --sweep num_stages=1,3 --iters 5
# A mixed step (255 decodes + a 512 chunk): the tile the N/R heuristic picks (4 tokens) vs 16.
stage mixed 30 "$OUT/bench_kernels.md" python3 scripts/bench_kernels.py --dtype bfloat16 --kinds mixed \
  --backends pallas --batch 255 --context 2048 --page-size 128 --sweep block_q=4,16 --iters 5
# 4. The whole engine (public API), --devices gpu, on a SmolLM2-shaped random GGUF written here.
MODEL=/tmp/smollm2_shaped.gguf
stage engine-model 20 "$OUT/engine.log" python3 scripts/gpu_engine_check.py write-model --model $MODEL --results "$OUT/engine.jsonl"
stage engine-decode 100 "$OUT/engine.log" python3 scripts/gpu_engine_check.py decode --model $MODEL --results "$OUT/engine.jsonl"
stage engine-greedy 50 "$OUT/engine.log" python3 scripts/gpu_engine_check.py greedy --model $MODEL --results "$OUT/engine.jsonl"
stage engine-warmup 50 "$OUT/engine.log" python3 scripts/gpu_engine_check.py warmup --model $MODEL --results "$OUT/engine.jsonl"

{ echo "# GPU check summary ($(( $(date +%s) - START ))s)"; echo; echo '```'; cat "$OUT/env.txt"; echo '```'
  echo; echo "## Stages"; printf -- '- %s\n' "${STATUS[@]}"
  echo; echo "## Kernel tests"; grep -E '^(FAILED|ERROR)|passed|failed' "$OUT/kernel_tests.log" | tail -15
  echo; echo "## Numerics"; grep -E '^\| ' "$OUT/numerics.md" | awk '!seen[$0]++' | tail -14
  echo; echo "## Kernel speed (us per layer call, 30-layer loop)"; grep -E 'ceilings|^\| (decode|prefill|mixed)' "$OUT/bench_kernels.md" | awk '!seen[$0]++' | tail -45
  echo; echo "## Engine"; cat "$OUT/engine.jsonl" 2>/dev/null | cut -c1-400
} > "$OUT/summary.md" 2>&1
cat "$OUT/summary.md"
