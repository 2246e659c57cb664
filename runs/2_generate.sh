#!/usr/bin/env bash
# Stage 2: rephrases and latent thoughts from a generator behind an OpenAI-compatible server (cost,
# estimated at 25% MFU of an H100 for an 8B generator: ~5.8 GPU hours per kind at G = 4 for 40k
# documents, ~47 at G = 32; less with prefix caching, which computes each document's prompt once).
# Start the server first, on this machine or another, e.g.
#     pip install vllm
#     vllm serve meta-llama/Llama-3.1-8B-Instruct --max-model-len 8192 --enable-prefix-caching
# Generate once at the largest G you want: pack.py --G takes any smaller prefix, of rephrases and
# thoughts alike, and a rerun with a larger G adds only the new indices. Several servers: repeat
# --endpoint; several machines: --shard i/n, then concatenate.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-dclm}
G=${G:-4}
TEXT_FIELD=${TEXT_FIELD:-text}
ENDPOINT=${ENDPOINT:-http://127.0.0.1:8000/v1}
GENERATOR=${GENERATOR:-meta-llama/Llama-3.1-8B-Instruct}
for kind in rephrase latent; do
  python generate.py --input "$DATA/train.parquet" --text_field "$TEXT_FIELD" --out_jsonl "$DATA/$kind.jsonl" \
      --kind $kind --G "$G" --endpoint "$ENDPOINT" --model "$GENERATOR" --n_per_request "$G" --concurrency 256 \
      --max_new_tokens 1024 --max_source_tokens 2048
done
