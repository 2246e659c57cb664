#!/usr/bin/env bash
# Stage 4: one training run per recipe at the paper's settings (150M, configs/gpu_150m.json; cost
# per run and seed: 0.8B tokens, ~0.31 H100 hours at the 44% MFU that bench/bench_memory.py's
# model gives the compiled step; run runs/0_check.sh for the measured figure). $SEEDS: several
# seeds for ensembles (runs/6_evaluate.sh), each one more run per recipe. On N GPUs, put
# "torchrun --nproc_per_node N" before train.py: the global batch (64 x 4096 tokens) stays the same.
set -euo pipefail
cd "$(dirname "$0")/.."
PACKED=${PACKED:-data}
OUT=${OUT:-out/replication}
CONFIG=${CONFIG:-configs/gpu_150m.json}
SEEDS=${SEEDS:-0}
common=(--config "$CONFIG" --real "$PACKED/real" --val "$PACKED/val" --test "$PACKED/test")
for seed in $SEEDS; do
  seeds=(--init_seed "$seed" --data_seed "$seed")
  python train.py "${common[@]}" "${seeds[@]}" --epochs 16 --weight_decay 1.6 --out_dir "$OUT/real-s$seed"
  for stream in shuffled sorted latent; do
    python train.py "${common[@]}" "${seeds[@]}" --synthetic "$PACKED/$stream" --mix 0.75 --epochs 4 \
        --weight_decay 0.8 --out_dir "$OUT/$stream-s$seed"
  done
done
