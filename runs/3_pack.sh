#!/usr/bin/env bash
# Stage 3: token files with the Llama-3 vocabulary (cost: minutes of CPU; no GPU).
# $TOKENIZER: Llama 3's original/tokenizer.model (a tiktoken ranks file), downloaded beforehand.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-dclm}
G=${G:-4}
TEXT_FIELD=${TEXT_FIELD:-text}
TOKENIZER=${TOKENIZER:-llama3/tokenizer.model}
PACKED=${PACKED:-data}
for mode in real shuffled sorted; do
  python pack.py --real "$DATA/train.parquet" --text_field "$TEXT_FIELD" --synthetic "$DATA/rephrase.jsonl" \
      --mode $mode --G "$G" --tokenizer "$TOKENIZER" --block_size 4096 --out_prefix "$PACKED/$mode"
done
python pack.py --real "$DATA/train.parquet" --text_field "$TEXT_FIELD" --synthetic "$DATA/latent.jsonl" \
    --mode latent --G "$G" --tokenizer "$TOKENIZER" --block_size 4096 --out_prefix "$PACKED/latent"
for split in val test; do
  python pack.py --real "$DATA/$split.parquet" --text_field "$TEXT_FIELD" --tokenizer "$TOKENIZER" \
      --out_prefix "$PACKED/$split"
done
