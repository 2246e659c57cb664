"""
Benchmark one training step (forward + backward + AdamW step) of model.py's GPT for each attention
mask kind, and print a table of tokens/s and the step-time ratio against plain causal attention.

    python bench/bench_model.py                      # CPU default: 4 layers, width 256, ctx 512, batch 8, vocab 8192
    python bench/bench_model.py --vocab-size 50304   # the GPT-2 vocabulary padded to a multiple of 64
    python bench/bench_model.py --device cuda --n-layer 12 --n-embd 768 --n-head 12 --mlp-hidden 2688 \
        --block-size 4096 --batch-size 8 --vocab-size 128256          # the paper's 300M shape, with MFU

The batch imitates real packed data: documents of random length (uniform in --doc-len), each
starting with BOS, concatenated and cut into windows; source groups (megadocs) of 1 to 7 documents,
about 4 on average. doc ids are cumsum(tokens == BOS) per window, exactly as train.py derives them.
Kinds are timed round-robin (one step of each kind in turn) so machine noise hits all of them alike.
On CUDA the step runs in bfloat16 autocast, attention goes through compiled flex_attention, and MFU
is estimated from 6*N + 12*n_layer*n_embd*T FLOPs per token (N = parameters without the input
embedding; the attention term counts the full T x T score matrix, whatever the mask skips).
Reads and writes no files.
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import GPT, GPTConfig, MASK_KINDS, document_ids  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--n-layer", type=int, default=4)
parser.add_argument("--n-embd", type=int, default=256)
parser.add_argument("--n-head", type=int, default=4)
parser.add_argument("--n-kv-head", type=int, default=None, help="default: n_head")
parser.add_argument("--mlp-hidden", type=int, default=688)
parser.add_argument("--block-size", type=int, default=512, help="context length of each window")
parser.add_argument("--batch-size", type=int, default=8)
parser.add_argument("--vocab-size", type=int, default=8192)
parser.add_argument("--doc-len", type=int, nargs=2, default=(100, 600), help="min and max document length")
parser.add_argument("--warmup", type=int, default=2, help="untimed steps per kind")
parser.add_argument("--steps", type=int, default=8, help="timed steps per kind")
parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
parser.add_argument("--peak-tflops", type=float, default=312.0, help="GPU bf16 peak for MFU (A100: 312, H100 SXM: 989)")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                      "cpu" if args.device == "auto" else args.device)
torch.manual_seed(args.seed)
BOS = 0


def packed_batch(B, T, vocab, doc_len, gen):
    """(tokens, group ids) for B windows cut from one stream of random documents."""
    tokens, groups, group, left_in_group = [], [], -1, 0
    while len(tokens) < B * T:
        if left_in_group == 0:
            group, left_in_group = group + 1, int(torch.randint(1, 8, (1,), generator=gen))
        n = int(torch.randint(doc_len[0], doc_len[1] + 1, (1,), generator=gen))
        tokens += [BOS] + torch.randint(1, vocab, (n - 1,), generator=gen).tolist()
        groups += [group] * n
        left_in_group -= 1
    idx = torch.tensor(tokens[:B * T]).view(B, T)
    return idx, torch.tensor(groups[:B * T]).view(B, T)


cfg = GPTConfig(vocab_size=args.vocab_size, n_layer=args.n_layer, n_head=args.n_head,
                n_kv_head=args.n_kv_head or args.n_head, n_embd=args.n_embd, mlp_hidden=args.mlp_hidden,
                block_size=args.block_size)
model = GPT(cfg).to(device)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)

B, T = args.batch_size, args.block_size
gen = torch.Generator().manual_seed(args.seed)
idx, group_ids = packed_batch(B, T + 1, cfg.vocab_size, args.doc_len, gen)
x, y, group_ids = idx[:, :-1].to(device), idx[:, 1:].to(device), group_ids[:, :-1].to(device)
doc_ids = document_ids(x, BOS)
autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_step(kind):
    with autocast:
        _, loss = model(x, y, doc_ids=doc_ids, group_ids=group_ids, mask_kind=kind)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def mask_ms(kind, reps=5):
    impl = "flex" if device.type == "cuda" else "sdpa"
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        model.build_mask(kind, doc_ids, group_ids, B, T, device, impl)
    sync()
    return (time.perf_counter() - t0) / reps * 1e3


for _ in range(args.warmup):
    for kind in MASK_KINDS:
        train_step(kind)
times = {kind: [] for kind in MASK_KINDS}
for _ in range(args.steps):
    for kind in MASK_KINDS:  # round-robin
        sync()
        t0 = time.perf_counter()
        train_step(kind)
        sync()
        times[kind].append(time.perf_counter() - t0)

n_docs = int(sum(len(row.unique()) for row in doc_ids))
n_groups = int(sum(len(row.unique()) for row in group_ids))
print(f"device {device} ({torch.get_num_threads()} threads), torch {torch.__version__}")
print(f"model: {cfg.n_layer} layers, width {cfg.n_embd}, {cfg.n_head} heads ({cfg.n_kv_head} kv), "
      f"SwiGLU {cfg.mlp_hidden}, vocab {cfg.vocab_size}, {model.num_params():,} params")
print(f"batch: {B} x {T} tokens; {n_docs} document pieces and {n_groups} group pieces over {B} windows; "
      f"{args.warmup} warmup + {args.steps} timed steps per kind, round-robin; median step time")
flops_per_token = 6 * model.num_params(exclude_embedding=True) + 12 * cfg.n_layer * cfg.n_embd * T
causal = statistics.median(times["causal"])
header = f"{'mask':<10}{'step ms':>10}{'tokens/s':>12}{'vs causal':>11}{'mask ms':>9}"
print(header + ("" if device.type != "cuda" else f"{'MFU':>8}"))
for kind in MASK_KINDS:
    step = statistics.median(times[kind])
    row = f"{kind:<10}{step * 1e3:>10.1f}{B * T / step:>12,.0f}{step / causal:>10.3f}x{mask_ms(kind):>9.2f}"
    if device.type == "cuda":
        row += f"{flops_per_token * B * T / step / (args.peak_tflops * 1e12):>8.1%}"
    print(row)
