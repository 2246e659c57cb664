#!/usr/bin/env bash
# Stage 1: real data (cost: the download, then a few minutes of CPU; no GPU).
# The one stage that downloads (nothing in nanosynth does at run time): run it once where the
# Hugging Face Hub is reachable. The paper's own split of DCLM, konwoo/dclm-164k-docs-train and
# -val (Parquet), joined into $DATA/train.parquet (the first $TRAIN_DOCS documents: 40,000, about
# 50M Llama-3 tokens; the paper's 200M real tokens are the whole 164k), $DATA/val.parquet (1,000
# documents of the val split: every choice is made on them) and $DATA/test.parquet (the 1,000
# training-split documents after $TRAIN_DOCS, which no run trains on: every final number).
# Not verified from here (these machines cannot reach the Hub): the files' names and columns. If the
# text column is not named text, set TEXT_FIELD for the later stages. Needs huggingface_hub, pyarrow.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-dclm}
TRAIN_DOCS=${TRAIN_DOCS:-40000}
python - "$DATA" "$TRAIN_DOCS" <<'PY'
import glob, sys
import pyarrow as pa, pyarrow.parquet as pq
from huggingface_hub import snapshot_download
data, train_docs = sys.argv[1], int(sys.argv[2])
tables = {}
for split in ("train", "val"):
    snapshot_download(f"konwoo/dclm-164k-docs-{split}", repo_type="dataset", local_dir=f"{data}/{split}")
    files = sorted(glob.glob(f"{data}/{split}/**/*.parquet", recursive=True))
    tables[split] = pa.concat_tables([pq.read_table(f) for f in files])
if len(tables["train"]) < train_docs + 1000:
    sys.exit(f"error: the train split has {len(tables['train'])} documents: TRAIN_DOCS={train_docs} leaves no 1,000 for test")
for name, split, start, n in (("train", "train", 0, train_docs), ("test", "train", train_docs, 1000), ("val", "val", 0, 1000)):
    pq.write_table(tables[split].slice(start, n), f"{data}/{name}.parquet")
PY
