#!/usr/bin/env bash
# Stage 0: check the CUDA path before spending GPU hours (cost: at most 8 minutes of one GPU).
# Every stage prints one line; the figures land in out/gpu_check/gpu_check.json. Put its MFU beside
# the README's estimates: they come from bench/bench_memory.py's model, not from a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
python bench/gpu_check.py
