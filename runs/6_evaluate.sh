#!/usr/bin/env bash
# Stage 6: the final numbers on the test split (cost: minutes of one GPU). Each run's summary.json
# holds its val and test losses; this prints the loss of the ensemble of the first K seeds of each
# recipe (probabilities averaged; one pass per member), for K = 1 .. the seeds trained in stage 4.
# With TASKS (the paper: TASKS=arc_easy,piqa,sciq), also benchmark accuracy, zero-shot, of each
# recipe's ensemble (needs lm-eval; the harness fetches the tasks' data from the Hub on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
PACKED=${PACKED:-data}
OUT=${OUT:-out/replication}
TASKS=${TASKS:-}
for recipe in real shuffled sorted latent; do
  echo "$recipe:"
  python evaluate.py ensemble --val "$PACKED/test" --device auto "$OUT/$recipe"-s*/ckpt.pt
  if [ -n "$TASKS" ]; then
    python evaluate.py downstream --tasks "$TASKS" --out_json "$OUT/$recipe-benchmarks.json" "$OUT/$recipe"-s*/ckpt.pt
  fi
done
