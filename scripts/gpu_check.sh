#!/usr/bin/env bash
# The one prepared GPU check (run on a lent GPU machine through the device tool, from the repo root):
# compiled-kernel tests, then the kernel benchmark, logs into $OUT (or ./out). About 5-8 minutes on an H200.
# The GPU image has jax 0.11.2 + CUDA, numpy, pytest, hypothesis and flax; nothing else is needed for these.
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c 'import jax; print(jax.__version__, jax.devices())' | tee -a "$OUT/gpu.txt"
# Numerics of the compiled Triton kernels vs the reference and the float64 oracle (full f32 dots: no TF32).
timeout 300 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py 2>&1 | tee "$OUT/kernel_tests.log"
# Speed: decode at batch 1-64 and long contexts, prefill chunks; GB/s and TFLOP/s beside measured ceilings.
timeout 240 python3 scripts/bench_kernels.py --batch 1,16,32,64 --context 512,2048,8192 --page-size 16,128 \
  --dtype bfloat16,float32 2>&1 | tee "$OUT/bench_kernels.md"
