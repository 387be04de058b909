#!/usr/bin/env bash
# Everything the GPU path needs checked, in one run on a CUDA machine (fla-core 0.4.2 installed):
# the GPU tests with full failure output, then the small-preset benchmark of bench/RESULTS.md.
# Logs and the benchmark's JSON go to $OUT (or the current folder). The first run on a fresh
# machine spends 2-4 minutes compiling and autotuning fla's Triton kernels.
set -uo pipefail
out=${OUT:-.}
export TRITON_CACHE_AUTOTUNING=1 PYTHONUNBUFFERED=1
python -m pytest tests/gpu -q -rfE --tb=long 2>&1 | tee "$out/gpu_tests.log" | tail -40
python launch/bench.py model --preset small --steps 6 --warmup 3 \
    --variants ours ours-compiled ours-compiled+mtp hf --out "$out/bench.json" 2>&1 | tee "$out/bench.log" | tail -12
