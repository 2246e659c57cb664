#!/usr/bin/env bash
# Stage 7: self-distillation at scale: the real-only model (stage 4, seed 0) exported as a Hugging
# Face Llama, served by vLLM, sampled by generate.py, packed as a synthetic stream, trained on
# (cost, estimated: 4 samples of up to 1,024 tokens for each of 40k documents, ~0.2B tokens through
# a 150M model, about 4 minutes of an H100 at 25% MFU; then one training run, ~0.31 H100 hours).
# serve.py serves a checkpoint too, but one request at a time. The first run exports the model and
# stops (it needs transformers and safetensors); start the server, then run this again:
#     vllm serve out/hf/real --served-model-name nanosynth-real
# The export's tokenizer puts BOS before every prompt and its generation config stops at BOS, as
# the model's documents start and end.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-dclm}
TEXT_FIELD=${TEXT_FIELD:-text}
TOKENIZER=${TOKENIZER:-llama3/tokenizer.model}
PACKED=${PACKED:-data}
OUT=${OUT:-out/replication}
CONFIG=${CONFIG:-configs/gpu_150m.json}
ENDPOINT=${ENDPOINT:-http://127.0.0.1:8000/v1}
if [ ! -e out/hf/real/config.json ]; then
  python export_hf.py "$OUT/real-s0/ckpt.pt" out/hf/real
  echo "exported to out/hf/real: start the server (vllm serve out/hf/real --served-model-name nanosynth-real), then rerun"
  exit 0
fi
python generate.py --kind self-distill --input "$DATA/train.parquet" --text_field "$TEXT_FIELD" \
    --out_jsonl "$DATA/self-distill.jsonl" --G 4 --endpoint "$ENDPOINT" --model nanosynth-real \
    --tokenizer "$TOKENIZER" --concurrency 256 --max_new_tokens 1024
python pack.py --real "$DATA/train.parquet" --text_field "$TEXT_FIELD" --synthetic "$DATA/self-distill.jsonl" \
    --synthetic_kind self-distill --mode shuffled --G 4 --tokenizer "$TOKENIZER" --block_size 4096 \
    --out_prefix "$PACKED/self-distill"
python train.py --config "$CONFIG" --real "$PACKED/real" --val "$PACKED/val" --test "$PACKED/test" \
    --synthetic "$PACKED/self-distill" --mix 0.75 --epochs 4 --weight_decay 0.8 --out_dir "$OUT/self-distill-s0"
