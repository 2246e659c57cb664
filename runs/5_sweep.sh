#!/usr/bin/env bash
# Stage 5: the paper's tuning of one recipe, a grid over epochs, m and weight decay (27 runs of
# 150M: 50M real tokens x epochs / (1 - m) each, 33.6B tokens in all; cost ~12.9 H100 hours at the
# 44% MFU of bench/bench_memory.py's model). Resumable: a rerun skips finished points. The verdict
# (is the best point locally optimal?) is in $OUT/sweep_$STREAM/sweep.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PACKED=${PACKED:-data}
OUT=${OUT:-out/replication}
CONFIG=${CONFIG:-configs/gpu_150m.json}
STREAM=${STREAM:-sorted}
python sweep.py --out_dir "$OUT/sweep_$STREAM" --epochs 2 4 8 --mix 0.5 0.75 0.9 --weight_decay 0.4 0.8 1.6 \
    -- --config "$CONFIG" --real "$PACKED/real" --synthetic "$PACKED/$STREAM" --val "$PACKED/val"
