"""
Benchmark the training step at candidate shapes for the CPU demo: tokens/s of forward + backward +
AdamW on one thread (the demo runs two such jobs side by side), and the cost of a document's text
for each vocabulary. These are the measurements behind configs/cpu_demo.json (docs/demo_design.md).

    python bench/bench_demo_shapes.py

Reads sample_data/ (to count tokens per vocabulary); writes nothing.
"""
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from model import GPT, GPTConfig, document_ids  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

SHAPES = [  # layers, width, vocabulary (padded), context, batch, mask
    (2, 128, 8256, 256, 8, "causal"),     # the previous demo's model (GPT-2's first 8,192 ranks)
    (2, 128, 1088, 512, 4, "causal"),
    (2, 128, 1088, 1024, 4, "causal"),
    (2, 128, 1088, 2048, 2, "causal"),
    (2, 128, 2112, 1024, 4, "causal"),
    (4, 128, 1088, 1024, 4, "causal"),
    (2, 64, 1088, 1024, 4, "causal"),     # the demo's model
    (2, 64, 1088, 1024, 4, "document"),
    (2, 64, 1088, 1024, 4, "megadoc"),
]


def tokens_per_second(L, d, V, T, B, mask, steps=6):
    hidden = (int(8 / 3 * d) + 15) // 16 * 16
    heads = max(1, d // 32)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=V, n_layer=L, n_head=heads, n_kv_head=heads, n_embd=d, mlp_hidden=hidden,
                          block_size=T))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randint(1, V, (B, T)), torch.randint(0, V, (B, T))
    x[:, ::250] = 0                                   # a document start every 250 tokens
    doc = document_ids(x, 0)
    groups = doc // 5                                 # megadocs of 5 documents
    for i in range(steps + 1):
        if i == 1:                                    # the first step warms up
            t0 = time.perf_counter()
        _, loss = model(x, y, doc_ids=doc, group_ids=groups, mask_kind=mask)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return B * T * steps / (time.perf_counter() - t0), model.num_params()


def main():
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread; forward + backward + AdamW, fp32")
    print(f"{'layers':>6} {'width':>5} {'vocab':>6} {'context':>7} {'batch':>5} {'mask':>9} {'params':>10} {'tokens/s':>9}")
    for L, d, V, T, B, mask in SHAPES:
        tok_s, params = tokens_per_second(L, d, V, T, B, mask)
        print(f"{L:>6} {d:>5} {V:>6} {T:>7} {B:>5} {mask:>9} {params:>10,} {tok_s:>9,.0f}")

    rephrase = [json.loads(line) for line in open(os.path.join(ROOT, "sample_data", "synthetic", "rephrase.jsonl"))]
    sources = sorted({r["source_id"] for r in rephrase})
    train = {json.loads(line)["id"]: json.loads(line)["text"] for line in open(os.path.join(ROOT, "sample_data", "train.jsonl"))}
    print("\ntokens of the demo's 160 budget documents, and of a megadoc (the real document + its 4 rephrases), by vocabulary")
    print(f"{'vocabulary':>10} {'budget tokens':>13} {'median megadoc':>14} {'90th pct megadoc':>16}")
    for n in (512, 1024, 2048, 4096, 8192):
        enc, _ = load_tokenizer(f"gpt2:{n}")
        count = lambda text: len(enc.encode_ordinary(text)) + 1      # + BOS
        mega = {s: count(train[s]) for s in sources}
        for r in rephrase:
            mega[r["source_id"]] += count(r["text"])
        sizes = sorted(mega.values())
        print(f"{'gpt2:' + str(n):>10} {sum(count(train[s]) for s in sources):>13,} {sizes[len(sizes) // 2]:>14,} "
              f"{sizes[int(0.9 * len(sizes))]:>16,}")


if __name__ == "__main__":
    main()
