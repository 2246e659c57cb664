"""
Benchmark one training step (forward + backward + AdamW step) of model.py's GPT: a table of tokens/s
for each attention mask kind, and optionally a side-by-side comparison with nanoGPT's model.

    python bench/bench_model.py                      # CPU default: 4 layers, width 256, ctx 512, batch 8, vocab 8192
    python bench/bench_model.py --vocab_size 50304   # the GPT-2 vocabulary padded to a multiple of 64
    python bench/bench_model.py --nanogpt ../nanoGPT # also ours vs nanoGPT's GPT-2 model, same shape (vocab 50304)
    python bench/bench_model.py --nanogpt ../nanoGPT --compile   # the comparison with both models torch.compile'd
    python bench/bench_model.py --device cuda --n_layer 12 --n_embd 768 --n_head 12 --mlp_hidden 2688 \
        --block_size 4096 --batch_size 8 --vocab_size 128256          # the paper's 300M shape, with MFU

Mask table. The batch imitates real packed data: documents of random length (uniform in --doc_len),
each starting with BOS, concatenated and cut into windows; source groups (megadocs) of 1 to 7
documents, about 4 on average. doc ids are cumsum(tokens == BOS) per window, exactly as train.py
derives them. Kinds are timed round-robin (one step of each kind in turn) so machine noise hits all
of them alike. On CUDA the step runs in bfloat16 autocast, attention goes through compiled
flex_attention, and MFU is estimated from 6*N + 12*n_layer*n_embd*T FLOPs per token (N = parameters
without the input embedding; the attention term counts the full T x T score matrix, whatever the
mask skips).

Comparison (--nanogpt DIR, a checkout of https://github.com/karpathy/nanoGPT; its model.py is
imported from there at run time, nothing of it lives in this repository). Same shape and batch for
every model, causal attention, each step timed round-robin across the models, and a 2048^3 torch.mm
timed between rounds, in the same process with the same thread count, as the machine's matmul peak.
Rows: ours with AdamW as train.py builds it (fused), ours with the per-tensor AdamW that nanoGPT's
configure_optimizers() gets on CPU (so the model alone is compared), nanoGPT with bias=False (closest
to ours: no biases) and with bias=True (its default). nanoGPT's MLP is 4 x width, ours a SwiGLU of
--mlp_hidden (688 ~ the same parameters at width 256). FLOPs per token = 6 x matmul parameters (all
but the input embeddings; a tied head counts once) + 6 x n_layer x width x context (causal
attention: half the T x T scores). Columns: "first s" is each model's first step (with --compile it
compiles the model; run once with TORCHINDUCTOR_CACHE_DIR set to an empty directory for a cold
compile, then again with the same directory for a warm one), "ours/it" the first row's tokens/s over
this row's, "of mm" the row's GFLOP/s over the torch.mm figure. On the CPU everything runs with
train.py's keep_freed_memory(), as a training run does (bench/bench_train.py measures what it saves).

Reads and writes no files (torch.compile writes its own cache).
"""

import contextlib
import importlib.util
import io
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cli  # noqa: E402
from model import GPT, GPTConfig, MASK_KINDS, document_ids  # noqa: E402
from train import keep_freed_memory  # noqa: E402

parser = cli.ArgumentParser(__doc__.split("\n\n")[0], __file__)
parser.add_argument("--n_layer", type=int, default=4)
parser.add_argument("--n_embd", type=int, default=256)
parser.add_argument("--n_head", type=int, default=4)
parser.add_argument("--n_kv_head", type=int, default=None, help="default: n_head")
parser.add_argument("--mlp_hidden", type=int, default=688)
parser.add_argument("--block_size", type=int, default=512, help="context length of each window")
parser.add_argument("--batch_size", type=int, default=8)
parser.add_argument("--vocab_size", type=int, default=None, help="default: 8192, or 50304 with --nanogpt")
parser.add_argument("--doc_len", type=int, nargs=2, default=(100, 600), help="min and max document length")
parser.add_argument("--warmup", type=int, default=2, help="untimed steps per kind / model")
parser.add_argument("--steps", type=int, default=8, help="timed steps per kind / model")
parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
parser.add_argument("--peak_tflops", type=float, default=312.0, help="GPU bf16 peak for MFU (A100: 312, H100 SXM: 989)")
parser.add_argument("--nanogpt", default=None, metavar="DIR", help="a nanoGPT checkout: compare with its model.py")
parser.add_argument("--compile", action="store_true", help="torch.compile the models of the comparison")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

torch.set_num_threads(args.threads)
device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                      "cpu" if args.device == "auto" else args.device)
freed_memory_kept = device.type == "cpu" and keep_freed_memory()   # as train.py on the CPU
vocab_size = args.vocab_size or (50304 if args.nanogpt else 8192)
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


def train_py_adamw(params):
    # the optimizer as train.py builds it (its defaults: betas 0.9/0.95, eps 1e-8, weight decay 0.1);
    # the weight-decay groups do not change the speed, so one group stands for them
    return torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, fused=True)


cfg = GPTConfig(vocab_size=vocab_size, n_layer=args.n_layer, n_head=args.n_head,
                n_kv_head=args.n_kv_head or args.n_head, n_embd=args.n_embd, mlp_hidden=args.mlp_hidden,
                block_size=args.block_size)
model = GPT(cfg).to(device)
optimizer = train_py_adamw(model.parameters())

B, T = args.batch_size, args.block_size
gen = torch.Generator().manual_seed(args.seed)
idx, group_ids = packed_batch(B, T + 1, cfg.vocab_size, args.doc_len, gen)
x, y, group_ids = idx[:, :-1].to(device), idx[:, 1:].to(device), group_ids[:, :-1].to(device)
doc_ids = document_ids(x, BOS)
autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn):
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


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


print(f"device {device} ({torch.get_num_threads()} threads), torch {torch.__version__}"
      + (", malloc keeps freed memory (train.py's keep_freed_memory)" if freed_memory_kept else ""))

# -----------------------------------------------------------------------------
# mask kinds

for _ in range(args.warmup):
    for kind in MASK_KINDS:
        train_step(kind)
times = {kind: [] for kind in MASK_KINDS}
for _ in range(args.steps):
    for kind in MASK_KINDS:  # round-robin
        times[kind].append(timed(lambda: train_step(kind)))

n_docs = int(sum(len(row.unique()) for row in doc_ids))
n_groups = int(sum(len(row.unique()) for row in group_ids))
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
del model, optimizer  # free their memory before the comparison builds its models

# -----------------------------------------------------------------------------
# side by side with nanoGPT

print()
if not args.nanogpt:
    print("comparison with nanoGPT skipped: get it with `git clone https://github.com/karpathy/nanoGPT` "
          "and pass --nanogpt path/to/nanoGPT")
    sys.exit(0)


def load_nanogpt(path):
    """nanoGPT's model.py as a module, imported from its checkout under a name that does not clash
    with our model.py."""
    spec = importlib.util.spec_from_file_location("nanogpt_model", os.path.join(path, "model.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


nano = load_nanogpt(args.nanogpt)
attn_flops = 6 * cfg.n_layer * cfg.n_embd * T  # per token: causal attention computes half the T x T scores


def ours(fused):
    torch.manual_seed(args.seed)
    m = GPT(cfg).to(device)
    # nanoGPT's configure_optimizers() asks for fused AdamW on CUDA only: the per-tensor loop elsewhere
    opt = train_py_adamw(m.parameters()) if fused else torch.optim.AdamW(
        m.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=device.type == "cuda")
    return m, opt, 6 * m.num_params(exclude_embedding=True) + attn_flops


def nanogpt(bias):
    torch.manual_seed(args.seed)
    conf = nano.GPTConfig(block_size=T, vocab_size=cfg.vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                          n_embd=cfg.n_embd, dropout=0.0, bias=bias)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its parameter count
        m = nano.GPT(conf).to(device)
    opt = m.configure_optimizers(weight_decay=0.1, learning_rate=1e-4, betas=(0.9, 0.95), device_type=device.type)
    # get_num_params() leaves out the position embedding and counts the tied head once
    return m, opt, 6 * m.get_num_params(non_embedding=True) + attn_flops


contenders = {  # name: (model, optimizer, FLOPs per token)
    "ours, AdamW as train.py": ours(fused=True),
    "ours, AdamW as nanoGPT": ours(fused=False),
    "nanoGPT bias=False": nanogpt(bias=False),
    "nanoGPT bias=True": nanogpt(bias=True),
}
# nanoGPT uses plain causal attention: ours runs with mask_kind="causal" (the default)
steppers = {name: (torch.compile(m) if args.compile else m, opt) for name, (m, opt, _) in contenders.items()}


cx, cy = x.contiguous(), y.contiguous()  # nanoGPT view()s its targets, as its loader makes them contiguous


def compare_step(name):
    m, opt = steppers[name]
    with autocast:
        _, loss = m(cx, cy)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


# the machine's matmul peak: a 2048^3 fp32 product into a preallocated output, timed between rounds
mm_a, mm_b = torch.randn(2048, 2048, device=device), torch.randn(2048, 2048, device=device)
mm_out = torch.empty(2048, 2048, device=device)
mm_flops = 2 * 2048 ** 3

first = {name: timed(lambda: compare_step(name)) for name in contenders}  # compiles, with --compile
for _ in range(args.warmup - 1):
    for name in contenders:
        compare_step(name)
step_s, mm_s = {name: [] for name in contenders}, []
for r in range(args.steps):
    # round-robin, in reversed order every other round: on these shared machines a step's place in
    # the round can move its time by a few percent
    for name in (list(contenders) if r % 2 == 0 else list(reversed(contenders))):
        step_s[name].append(timed(lambda: compare_step(name)))
    mm_s += [timed(lambda: torch.mm(mm_a, mm_b, out=mm_out)) for _ in range(3)]

mm_gflops = mm_flops / statistics.median(mm_s) / 1e9
print(f"side by side with nanoGPT ({os.path.abspath(args.nanogpt)}), {'torch.compile' if args.compile else 'eager'}, "
      f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}, causal attention, {torch.get_num_threads()} threads")
print(f"shape: {cfg.n_layer} layers, width {cfg.n_embd}, {cfg.n_head} heads, context {T}, batch {B}, "
      f"vocab {cfg.vocab_size}; {args.warmup} warmup + {args.steps} timed steps per model, round-robin; median")
print(f"torch.mm 2048^3 fp32 in the same rounds: {mm_gflops:.1f} GFLOP/s (median of {len(mm_s)})")
ours_tok_s = B * T / statistics.median(step_s["ours, AdamW as train.py"])
print(f"{'model':<26}{'FLOPs/token':>13}{'first s':>9}{'step ms':>9}{'tokens/s':>10}{'ours/it':>9}{'GFLOP/s':>9}{'of mm':>7}")
for name, (_, _, fpt) in contenders.items():
    step = statistics.median(step_s[name])
    gflops = fpt * B * T / step / 1e9
    print(f"{name:<26}{fpt / 1e6:>12.1f}M{first[name]:>9.1f}{step * 1e3:>9.0f}{B * T / step:>10,.0f}"
          f"{ours_tok_s / (B * T / step):>8.3f}x{gflops:>9.1f}{gflops / mm_gflops:>7.1%}")
nano_tok_s = B * T / statistics.median(step_s["nanoGPT bias=False"])
same_adamw_tok_s = B * T / statistics.median(step_s["ours, AdamW as nanoGPT"])
# the same ratio round by round: the two steps of one round ran within seconds of each other, so
# the spread of these ratios shows how much of a difference the machine's noise can make
paired = sorted(b / a for a, b in zip(step_s["ours, AdamW as train.py"], step_s["nanoGPT bias=False"]))
print(f"ratio ours/nanoGPT (bias=False) tokens/s: {ours_tok_s / nano_tok_s:.3f} "
      f"(the models alone, both with nanoGPT's AdamW: {same_adamw_tok_s / nano_tok_s:.3f}); "
      f"round by round: median {statistics.median(paired):.3f}, {sum(x >= 1 for x in paired)} of {len(paired)} "
      f"rounds >= 1, range {paired[0]:.3f}-{paired[-1]:.3f}")
