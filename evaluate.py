"""
evaluate.py: evaluation. The i.i.d. and long-document losses of a model (train.py calls these at
the end of a run), ensembles, power-law fits, data efficiency, and the tables and figures of a study.

    python evaluate.py ensemble --val out/data/val out/runs/sorted-s0/ckpt.pt out/runs/sorted-s1/ckpt.pt ...
    python evaluate.py fit 1 2 4 8 --loss 3.9 3.7 3.6 3.55     # L(x) = A / x^B + C
    python evaluate.py downstream --tasks arc_easy,piqa,sciq CKPT [CKPT ...]   # benchmark accuracy (downstream.py)
    (exit codes as every script's, cli.py: 0 done, 2 a one-line "error: ...")

Reads:  checkpoints written by train.py, token files written by pack.py.
Writes: nothing by itself; train.py, demo.py and sweep.py use its functions to measure losses, print
        Markdown tables and draw PNG figures (figures need matplotlib; without it they are skipped
        with a note).

Definitions:
  * i.i.d. loss: the mean next-token loss (nats) over every token of the held-out real documents,
    read in windows of the model's context (the last, shorter window included).
  * ensemble loss: the members' predicted probabilities are averaged (not their logits), then
    the mean next-token loss of that mixture is taken over every held-out token.
  * fit: L(x) = A / x^B + C by least squares, numpy only; x = parameters, members or real tokens;
    C is the asymptote.
  * data efficiency of a loss L: invert the real-only fit L(D) at L, and divide by the real
    tokens actually used ("the baseline needs k x more real data to reach this loss").
"""
import itertools
import math
import os
import sys
from contextlib import nullcontext

import numpy as np
import torch

import cli
from formats import DataError, TokenFile
from model import autocast, document_ids, load_model

# -----------------------------------------------------------------------------
# losses of one model: i.i.d. (held-out real documents) and long documents by position

@torch.no_grad()
def per_token_losses(model, tokens, groups, mask, bos_id, device, ctx=nullcontext()):
    """Per-token losses of (B, T + 1) token rows (targets of -1 are padding), float32, on `device`."""
    x, y = tokens[:, :-1].to(device), tokens[:, 1:].to(device)
    with ctx:
        _, loss = model(x, y, doc_ids=document_ids(x, bos_id), group_ids=groups.to(device),
                        mask_kind=mask, reduction="none")
    return loss.float()


def eval_batches(tf, T, batch_size, fixed_shape=False, shard=(0, 1)):
    """Every window of a token file once, in order, the short tail too, as (B, T + 1) token rows
    (-1 pads the tail: no target there), their (B, T) group ids and the (B, T) mask of real
    targets. fixed_shape: the last batch too has batch_size rows (rows of padding), so that a
    compiled model sees one shape. shard (rank, world): only batches rank, rank + world, ... (each
    process of a run evaluates its share)."""
    n = len(tf)
    starts = list(range(0, n - 1, T))
    rank, world = shard
    for i in range(rank * batch_size, len(starts), world * batch_size):
        rows = np.full((batch_size if fixed_shape else len(starts[i: i + batch_size]), T + 1), -1, dtype=np.int64)
        groups = np.full((len(rows), T), -1, dtype=np.int64)
        for r, s in enumerate(starts[i: i + batch_size]):
            chunk = tf.tokens[s: s + T + 1]
            rows[r, : len(chunk)] = chunk
            groups[r, : len(chunk) - 1] = tf.group_ids(s, len(chunk) - 1)
        tokens = torch.from_numpy(rows)
        valid = tokens[:, 1:] >= 0
        tokens[:, :-1].clamp_(min=0)   # padded inputs: any id will do, their targets are -1
        yield tokens, torch.from_numpy(groups), valid


def in_batch_order(own, n_batches, shape, shard, device):
    """The per-batch results of every process, in batch order, as one (n_batches, *shape) float64
    CPU tensor. `own` holds this process's (for its batches rank, rank + world, ...: eval_batches'
    shard); across processes they are combined by one all-reduce of a table in which each batch's
    row is written by one process only (x + 0 is x), so that adding them up in batch order gives,
    to the last bit, what one process computes."""
    rank, world = shard
    if world == 1:
        return torch.stack(own).double().cpu()
    table = torch.zeros(n_batches, *shape, dtype=torch.float64, device=device)
    if own:
        table[rank::world] = torch.stack(own).double()
    torch.distributed.all_reduce(table)
    return table.cpu()


def stream_loss(model, tf, mask, batch_size, device, ctx=nullcontext(), fixed_shape=False, shard=(0, 1)):
    """Mean loss (nats) over every token of a token file (sharded over processes with shard, see
    eval_batches and in_batch_order: the same loss as one process's)."""
    T = model.config.block_size
    own = []   # (loss sum, real targets) of each of this process's batches
    for tokens, groups, valid in eval_batches(tf, T, batch_size, fixed_shape, shard):
        loss = per_token_losses(model, tokens, groups, mask, tf.bos_id, device, ctx)
        valid = valid.to(device)
        own.append(torch.stack([loss[valid].double().sum(), valid.sum().double()]))
    total, count = 0.0, 0
    windows = len(range(0, len(tf) - 1, T))
    for loss_sum, n in in_batch_order(own, -(-windows // batch_size), (2,), shard, device).tolist():
        total += loss_sum
        count += int(n)
    return total / count


def loss_by_position(model, tf, mask, batch_size, device, ctx=nullcontext(), fixed_shape=False, shard=(0, 1)):
    """Mean loss by position inside long documents: each document's first block_size tokens,
    aligned to its start, bucketed by powers of two (position 1-1, 2-3, 4-7, ...). fixed_shape and
    shard as for stream_loss."""
    T = model.config.block_size
    ends = list(tf.starts[1:]) + [len(tf)]
    rows = [np.asarray(tf.tokens[s: s + T + 1], dtype=np.int64) for s, e in zip(tf.starts, ends) if e - s > T]
    if not rows:
        return {}
    rank, world = shard
    own = []   # the sums over rows of each of this process's batches, by position
    for i in range(rank * batch_size, len(rows), world * batch_size):
        batch = rows[i: i + batch_size]
        tokens = torch.from_numpy(np.stack(batch + [np.full(T + 1, -1)] * (batch_size - len(batch) if fixed_shape else 0)))
        tokens[:, :-1].clamp_(min=0)   # padding rows: no target anywhere, a loss of 0
        groups = torch.zeros(tokens.size(0), T, dtype=torch.long)
        own.append(per_token_losses(model, tokens, groups, mask, tf.bos_id, device, ctx).double().sum(0))
    sums = torch.zeros(T, dtype=torch.float64)
    for batch_sums in in_batch_order(own, -(-len(rows) // batch_size), (T,), shard, device):
        sums += batch_sums
    by_position = sums / len(rows)     # position p predicts token p + 1 of the document
    buckets, lo = {}, 1
    while lo < T:
        hi = min(2 * lo, T)
        buckets[f"{lo}-{hi - 1}"] = by_position[lo:hi].mean().item()
        lo = hi
    return buckets


def evaluate_model(model, val, test=None, long=None, mask="causal", batch_size=16, device="cpu", ctx=nullcontext(),
                   train=None, fixed_shape=False, shard=(0, 1)):
    """{"val_loss"} on the held-out token file `val`, "test_loss" on a second held-out split when
    given, "long_loss" and "long_loss_by_position" when a token file of long documents is given, and
    "train_loss" on the training tokens when given. Leaves the model in train mode. model may be a
    torch.compile'd one: fixed_shape pads the last batch so that it sees one shape. shard (rank,
    world): each of a run's processes evaluates every world-th batch and all get the metrics one
    process would (in_batch_order)."""
    model.eval()
    loss = lambda tf: stream_loss(model, tf, mask, batch_size, device, ctx, fixed_shape, shard)
    metrics = {"val_loss": loss(val)}
    if train is not None:
        metrics["train_loss"] = loss(train)
    if test is not None:
        metrics["test_loss"] = loss(test)
    if long is not None:
        metrics["long_loss"] = loss(long)
        metrics["long_loss_by_position"] = loss_by_position(model, long, mask, batch_size, device, ctx, fixed_shape,
                                                            shard)
    model.train()
    return metrics


# -----------------------------------------------------------------------------
# ensembles


@torch.no_grad()
def target_log_probs(model, tf, mask, batch_size=16, device="cpu"):
    """log p(next token) of one model at every held-out token of a token file, in file order
    (float64, on the CPU): all an ensemble needs of a member, so its memory does not grow with the
    vocabulary (the model's loss never holds more than a slice of the logits: model.head_cross_entropy).
    Run on `device` (bfloat16 autocast on CUDA, the tail batch padded there: model.autocast)."""
    parts, on_cpu = [], str(device).startswith("cpu")
    for tokens, groups, valid in eval_batches(tf, model.config.block_size, batch_size, fixed_shape=not on_cpu):
        loss = per_token_losses(model, tokens, groups, mask, tf.bos_id, device, autocast(device))
        parts.append(-loss.cpu()[valid].double())
    return torch.cat(parts)


def ensemble_losses(ckpt_paths, prefix, mask=None, batch_size=16, device="cpu"):
    """[loss of the ensemble of the first K members for K = 1 .. N] on a token file: the members'
    probabilities are averaged (not their logits). Each member is run once: its log-probabilities of
    the targets are added to a running log-sum-exp, so that log mean_k p_k = logsumexp_k log p_k -
    log K for every prefix K. mask: the attention mask to evaluate with (default: the members'
    training mask, which they must share)."""
    tf = TokenFile(prefix)
    running, losses, shape = None, [], None
    for k, path in enumerate(ckpt_paths, 1):
        model, ckpt = load_model(path, device)
        T, member_mask = ckpt["config"]["block_size"], ckpt["config"]["mask"]
        if shape is None:
            shape = (T, member_mask)
        if (T, mask or member_mask) != (shape[0], mask or shape[1]):
            raise ValueError(f"{path}: ensemble members must share block_size and mask kind "
                             f"({T}, {member_mask} here, {shape[0]}, {shape[1]} for the first)")
        if tf.vocab_size > model.config.vocab_size:
            raise ValueError(f"{tf.bin_path} has a vocabulary of {tf.vocab_size} ids, more than the model's "
                             f"{model.config.vocab_size} ({path}): pack it with the tokenizer the models were trained with")
        logp = target_log_probs(model, tf, mask or member_mask, batch_size, device)
        running = logp if running is None else torch.logaddexp(running, logp)
        losses.append(-(running - math.log(k)).mean().item())
    return losses


def ensemble_curve(member_log_probs):
    """The expected loss of an ensemble of K members for K = 1 .. N: for each K, the mean over every
    subset of K of the N members of the loss of their probability average. member_log_probs: N
    tensors of target log-probabilities over the same tokens (target_log_probs)."""
    stacked = torch.stack(list(member_log_probs))
    curve = []
    for k in range(1, len(stacked) + 1):
        losses = [-(torch.logsumexp(stacked[list(subset)], 0) - math.log(k)).mean().item()
                  for subset in itertools.combinations(range(len(stacked)), k)]
        curve.append(sum(losses) / len(losses))
    return curve


def ensemble_loss(ckpt_paths, prefix, mask=None, batch_size=16, device="cpu"):
    """Mean loss (nats) of the average of the members' probabilities on every held-out token."""
    return ensemble_losses(ckpt_paths, prefix, mask, batch_size, device)[-1]


# -----------------------------------------------------------------------------
# fits and data efficiency


EXPONENT_RANGE = (1e-4, 10.0)   # where fit_power_law searches B


def fit_power_law(x, y, warn=lambda message: print(message, file=sys.stderr)):
    """Least-squares fit of y = A / x^B + C; returns (A, B, C). For a fixed B the model is linear
    in (A, C), so B is found by a 1-D search over EXPONENT_RANGE (a log-spaced grid, then repeated
    refinement) and A, C by linear least squares at each B. Every problem of fit_problems() is
    passed to `warn` (printed to stderr by default)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 3:
        raise ValueError(f"a fit of A / x^B + C needs at least 3 points, got {len(x)}")

    def solve(B):
        design = np.stack([x ** -B, np.ones_like(x)], axis=1)
        (A, C), *_ = np.linalg.lstsq(design, y, rcond=None)
        return float(np.sum((design @ [A, C] - y) ** 2)), A, C

    grid = np.logspace(np.log10(EXPONENT_RANGE[0]), np.log10(EXPONENT_RANGE[1]), 200)
    for _ in range(40):
        errors = [solve(B)[0] for B in grid]
        i = int(np.argmin(errors))
        lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
        if hi - lo < 1e-12:
            break
        grid = np.linspace(lo, hi, 21)
    B = float(grid[i])
    _, A, C = solve(B)
    law = (float(A), B, float(C))
    for problem in fit_problems(law):
        warn(f"warning: {problem}")
    return law


def fit_problems(law):
    """Why a fitted (A, B, C) cannot be read as a power law with an asymptote: an exponent on the
    edge of the search range (the data do not determine it: the fit is a straight line in log x or
    a step), A <= 0 (not decreasing), or C < 0 (an asymptote below zero loss)."""
    A, B, C = law
    problems = []
    if not EXPONENT_RANGE[0] * 1.001 < B < EXPONENT_RANGE[1] / 1.001:
        problems.append(f"the fit's exponent B = {B:.3g} is on the edge of its search range "
                        f"{EXPONENT_RANGE}: the power law with asymptote is not identifiable from these points")
    if A <= 0:
        problems.append(f"the fit's A = {A:.3g} <= 0: the points do not decrease with x")
    if C < 0:
        problems.append(f"the fit's asymptote C = {C:.3g} is below zero: no loss can be")
    return problems


def power_law(x, A, B, C):
    return A / np.asarray(x, dtype=float) ** B + C


def invert_power_law(loss, A, B, C):
    """The x at which A / x^B + C equals loss (inf at or below the asymptote C)."""
    if loss <= C or A <= 0:
        return math.inf
    return (A / (loss - C)) ** (1 / B)


def data_efficiency(loss, real_law, real_tokens):
    """k such that the real-only law needs k x real_tokens to reach this loss."""
    return invert_power_law(loss, *real_law) / real_tokens


def interpolated_budget(loss, budgets, losses):
    """The real budget at which measured real-only losses reach `loss`: a model-free alternative to
    inverting a power law. The measured losses are first made non-increasing in the budget (a
    larger budget can do at least as well as a smaller one, so a worse measured loss there is
    under-tuning or noise and is replaced by the best loss of any smaller budget); then the loss is
    interpolated linearly in log(budget) between the two neighbouring budgets that bracket it.
    Returns (budget, relation): relation "=" inside the measured range, ">" when `loss` is below
    every measured loss (budget is then the largest one measured: the true budget is more), "<"
    when it is above every measured loss."""
    points = sorted(zip(budgets, losses))
    envelope = [(d, min(l for _, l in points[: i + 1])) for i, (d, _) in enumerate(points)]
    if loss > envelope[0][1]:
        return envelope[0][0], "<"
    for (d0, l0), (d1, l1) in zip(envelope, envelope[1:]):
        if l1 <= loss <= l0 and l1 < l0:
            t = (l0 - loss) / (l0 - l1)
            return math.exp(math.log(d0) + t * (math.log(d1) - math.log(d0))), "="
    if loss == envelope[0][1]:
        return envelope[0][0], "="
    if loss >= envelope[-1][1]:   # on a flat stretch of the envelope: the first budget that reached it
        return next(d for d, l in envelope if l <= loss), "="
    return envelope[-1][0], ">"


# -----------------------------------------------------------------------------
# statistics over seeds: every difference with its 95% interval, t-based (few seeds)


def t_quantile(p, df):
    """The p-quantile of Student's t distribution with df degrees of freedom (df may be fractional,
    as Welch's is), by bisection on its CDF: numpy only, accurate to ~1e-10."""
    def cdf(t):   # P(T <= t) through the regularized incomplete beta function
        tail = 0.5 * regularized_beta(df / (df + t * t), df / 2, 0.5)
        return 1 - tail if t > 0 else tail
    lo, hi = -1e4, 1e4
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def regularized_beta(x, a, b):
    """I_x(a, b) by its continued fraction (modified Lentz), for t_quantile."""
    if x <= 0 or x >= 1:
        return float(x >= 1)
    if x > (a + 1) / (a + b + 2):   # the fraction converges fast on this side only
        return 1 - regularized_beta(1 - x, b, a)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(1 - x)) / a
    f, c, d = 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            step = 1.0
        elif i % 2 == 0:
            step = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            step = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1 / (1 + step * d if abs(1 + step * d) > 1e-300 else 1e-300)
        c = 1 + step / c if abs(1 + step / c) > 1e-300 else 1e-300
        f *= c * d
        if abs(c * d - 1) < 1e-15:
            break
    return front * (f - 1)


def mean_interval(values, level=0.95):
    """(mean, half width of its t interval); the half width is nan for fewer than 2 values."""
    values = np.asarray(values, dtype=float)
    n = len(values)
    if n < 2:
        return float(values.mean()), math.nan
    return float(values.mean()), t_quantile((1 + level) / 2, n - 1) * float(values.std(ddof=1)) / math.sqrt(n)


def paired_difference(a, b, level=0.95):
    """a - b for runs paired by seed (a[i] and b[i] share init and data seed): the mean difference
    and the half width of its t interval over the n - 1 degrees of freedom of the differences."""
    if len(a) != len(b):
        raise ValueError(f"paired differences need as many values on each side, got {len(a)} and {len(b)}")
    return mean_interval(np.asarray(a, dtype=float) - np.asarray(b, dtype=float), level)


def welch_difference(a, b, level=0.95):
    """mean(a) - mean(b) for independent samples, with Welch's t interval (unequal variances)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    if not va + vb > 0:
        return float(a.mean() - b.mean()), math.nan
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return float(a.mean() - b.mean()), t_quantile((1 + level) / 2, df) * math.sqrt(va + vb)


def slope_interval(x, y_by_seed, level=0.95):
    """The least-squares slope of y against x, fitted for each seed (y_by_seed: one list of y over
    x per seed), then the mean slope and the half width of its t interval over seeds: the seeds are
    the independent replicates, so the spread of their slopes is the honest error."""
    x = np.asarray(x, dtype=float)
    slopes = [np.polyfit(x, np.asarray(y, dtype=float), 1)[0] for y in y_by_seed]
    return mean_interval(slopes, level)


def resolved(mean, half_width):
    """True when the interval mean +- half_width excludes zero."""
    return bool(half_width == half_width and abs(mean) > half_width)


def format_interval(mean, half_width, digits=4):
    if half_width != half_width:
        return f"{mean:+.{digits}f}"
    return f"{mean:+.{digits}f} ± {half_width:.{digits}f}"


def seed_bootstrap(statistic, *per_seed, level=0.95):
    """A percentile interval of statistic(*means) over every resample of the seeds with replacement
    (n^n of them for n seeds: 27 for 3), resampling all inputs with the same seed indices, because
    their runs are paired by seed. per_seed: sequences of per-seed values (or of per-seed lists of
    values). Returns (low, high). With 3 seeds the resamples take only 10 distinct sets, so the
    interval is coarse: a range, not an exact 95%."""
    n = len(per_seed[0])
    values = []
    for picks in itertools.product(range(n), repeat=n):
        means = [np.mean([np.asarray(seq[i], dtype=float) for i in picks], axis=0) for seq in per_seed]
        values.append(statistic(*means))
    values = np.asarray(values, dtype=float)
    return float(np.quantile(values, (1 - level) / 2)), float(np.quantile(values, (1 + level) / 2))


# -----------------------------------------------------------------------------
# compute

def training_flops(model_config, tokens):
    """FLOPs of training a model (a dict of GPTConfig fields) on `tokens` tokens: 6 x matmul
    parameters per token (forward and backward; the input embedding is a lookup, the output head
    a matmul) plus causal attention, 6 x layers x width x context per token (QK^T and AV over
    half the T x T scores, forward and backward)."""
    c = model_config
    kv_width = c["n_kv_head"] * (c["n_embd"] // c["n_head"])
    per_layer = 2 * c["n_embd"] ** 2 + 2 * c["n_embd"] * kv_width + 3 * c["n_embd"] * c["mlp_hidden"]
    matmul_params = c["n_layer"] * per_layer + c["n_embd"] * c["vocab_size"]
    return tokens * (6 * matmul_params + 6 * c["n_layer"] * c["n_embd"] * c["block_size"])


# Dense bfloat16 tensor-core peaks (TFLOP/s, no sparsity) of known GPUs, from their vendors' data
# sheets, found by a part of torch.cuda.get_device_name() (the first that matches: more specific first).
PEAK_TFLOPS = (("H100 PCIe", 756), ("H100 NVL", 835), ("H200 NVL", 835), ("H100", 989), ("H200", 989),
               ("B200", 2250), ("A100", 312), ("L40S", 362), ("L4", 121), ("A10", 125), ("RTX 4090", 165))


def peak_flops(device):
    """The dense bfloat16 peak (FLOP/s) of a CUDA device, from PEAK_TFLOPS by its name; None for
    other devices (the CPU) and GPUs the table does not know (train.py: give --peak_tflops)."""
    if not str(device).startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for part, tflops in PEAK_TFLOPS if part in name), None)


def mfu(tokens_per_s, model_config, peak):
    """Model FLOPs utilization: training_flops per token x tokens/s over the device's peak FLOP/s."""
    return tokens_per_s * training_flops(model_config, 1) / peak


def generation_flops(tokens, generator_params=8e9):
    """FLOPs a generator of `generator_params` parameters spends on `tokens` tokens (prompt and
    completion): 2 per parameter per token (the paper's generator: Llama 3.1 8B)."""
    return 2 * generator_params * tokens


# -----------------------------------------------------------------------------
# tables and figures


def markdown_table(headers, rows):
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells])


def pyplot_or_note(path):
    """matplotlib.pyplot (drawing to files), or None with a note that `path` is skipped."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"note: matplotlib is not installed, skipping {path} (pip install matplotlib)")
        return None
    return plt


def error_bars(spreads):
    """matplotlib's yerr from per-point spreads: half widths, or (low, high) distances below and above."""
    if spreads is None:
        return None
    if any(isinstance(v, (tuple, list)) for v in spreads):
        return np.array([[v[0] for v in spreads], [v[1] for v in spreads]], dtype=float)
    return np.asarray(spreads, dtype=float)


def bar_figure(path, title, labels, means, spreads, ylabel="i.i.d. validation loss (nats)", colors=None):
    """A bar chart with error bars (half widths); returns the path, or None (with a note) without
    matplotlib."""
    plt = pyplot_or_note(path)
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(labels)), 4.0))
    ax.tick_params(axis="x", labelsize=8)
    spreads = [0.0 if s != s else s for s in spreads]   # nan (one seed): no bar
    ax.bar(labels, means, yerr=spreads, capsize=4, color=colors or "#4c72b0")
    for i, m in enumerate(means):
        ax.annotate(f"{m:.3f}", (i, m), textcoords="offset points", xytext=(12, 2), fontsize=8)
    lo, hi = min(m - s for m, s in zip(means, spreads)), max(m + s for m, s in zip(means, spreads))
    ax.set_ylim(lo - 0.25 * (hi - lo + 1e-3), hi + 0.15 * (hi - lo + 1e-3))
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", linestyle=":", alpha=0.5)
    if not any("\n" in label for label in labels):   # one-line labels lean; several-line ones stand
        plt.setp(ax.get_xticklabels(), rotation=15, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def line_figure(path, title, xlabel, series, ylabel="i.i.d. validation loss (nats)", logx=True, hlines=None,
                dashed=(), points=None, colors=None, yticks=None):
    """series: {label: (xs, ys, spreads)}, spreads as half widths or (below, above) pairs, or None;
    hlines: {label: y} drawn as horizontal lines; series named in `dashed` are drawn dashed;
    points: {label: (xs, ys)} drawn as faint dots (single seeds behind their mean), in the colour of
    the series of the same label; colors: {label: colour} for series and lines; yticks: the values
    the y axis shows (e.g. a grid's values), or None. Returns the path, or None without
    matplotlib."""
    plt = pyplot_or_note(path)
    if plt is None:
        return None
    colors = {label: (colors or {}).get(label, f"C{i}") for i, label in enumerate([*series, *(hlines or {})])}
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, (xs, ys) in (points or {}).items():
        ax.scatter(xs, ys, color=colors.get(label, "gray"), alpha=0.25, s=18)
    for label, (xs, ys, spreads) in series.items():
        ax.errorbar(xs, ys, yerr=error_bars(spreads), marker=None if label in dashed else "o", capsize=3,
                    label=label, color=colors[label], linestyle="--" if label in dashed else "-")
    for label, y in (hlines or {}).items():
        ax.axhline(y, color=colors[label], linestyle=":", label=label)
    ticks = sorted({x for label, (xs, _, _) in series.items() if label not in dashed for x in xs})
    if logx:
        ax.set_xscale("log", base=2)
    if logx or all(float(t).is_integer() for t in ticks):   # the measured x values as the ticks
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    if yticks is not None:
        ax.set_yticks(yticks, [f"{t:g}" for t in yticks])
        margin = 0.1 * ((max(yticks) - min(yticks)) or 1)
        ax.set_ylim(min(yticks) - margin, max(yticks) + margin)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(linestyle=":", alpha=0.5)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def downstream_main(args, parser):
    """evaluate.py downstream: the lm_eval integration lives in downstream.py (optional: lm-eval).
    Every flag is checked before a checkpoint is loaded."""
    try:
        import downstream
    except ImportError as e:
        if e.name is None or not e.name.startswith("lm_eval"):
            raise
        cli.fail("evaluate.py downstream needs lm-evaluation-harness: pip install 'lm-eval>=0.4,<0.5'")
    tasks = [t for t in args.tasks.split(",") if t]
    if not tasks:
        parser.error(f"--tasks {args.tasks!r} names no task")
    for name, low in (("batch_size", 1), ("limit", 1), ("num_fewshot", 0)):
        if getattr(args, name) is not None and getattr(args, name) < low:
            parser.error(f"--{name} must be >= {low}, got {getattr(args, name)}")
    if args.include_path and not os.path.isdir(args.include_path):
        parser.error(f"--include_path {args.include_path}: not a folder")
    if args.out_json and not os.path.isdir(os.path.dirname(os.path.abspath(args.out_json))):
        parser.error(f"--out_json {args.out_json}: its folder does not exist")   # found now, not after the run
    device = cli.pick_device(args.device)
    results = downstream.evaluate_tasks(args.ckpts, tasks, args.include_path, args.batch_size, device, args.limit,
                                        args.num_fewshot)
    print(downstream.results_table(results))
    if args.out_json:
        downstream.write_json(args.out_json, results)


def main(argv=None):
    ap = cli.ArgumentParser(__doc__, __file__)
    sub = ap.add_subparsers(dest="command", required=True)
    e = sub.add_parser("ensemble", help="loss of the probability-averaged ensemble of checkpoints")
    e.add_argument("--val", required=True, help="pack.py prefix of the held-out real tokens")
    e.add_argument("--device", default="auto", help="auto (cuda if there is one, else cpu), cpu, cuda, cuda:N, ...")
    e.add_argument("ckpts", nargs="+", help="checkpoints written by train.py (the ensemble's members)")
    f = sub.add_parser("fit", help="fit L(x) = A / x^B + C")
    f.add_argument("x", type=float, nargs="+", help="x of each point (parameters, members, real tokens)")
    f.add_argument("--loss", type=float, nargs="+", required=True, help="the loss at each x")
    d = sub.add_parser("downstream", help="benchmark accuracy through lm-evaluation-harness (see downstream.py)")
    d.add_argument("--tasks", required=True, help="lm_eval task names, comma-separated (the paper: arc_easy,piqa,sciq)")
    d.add_argument("ckpts", nargs="+", help="checkpoints written by train.py (several: their ensemble)")
    d.add_argument("--include_path", help="a folder of lm_eval task YAML files of your own, beside the built-in tasks")
    d.add_argument("--num_fewshot", type=int, default=0, help="examples in each prompt (the paper: 0)")
    d.add_argument("--limit", type=int, help="only the first N questions of each task (a quick look)")
    d.add_argument("--batch_size", type=int, default=16, help="requests per forward pass")
    d.add_argument("--device", default="auto", help="auto (cuda if there is one, else cpu), cpu, cuda, cuda:N, ...")
    d.add_argument("--out_json", help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    try:
        if args.command == "downstream":
            return downstream_main(args, d)
        if args.command == "ensemble":
            device = cli.pick_device(args.device)
            for k, loss in enumerate(ensemble_losses(args.ckpts, args.val, device=device), 1):
                print(f"K = {k}: ensemble loss {loss:.4f}")
        else:
            if len(args.x) != len(args.loss):
                raise ValueError(f"{len(args.x)} x values but {len(args.loss)} --loss values")
            A, B, C = fit_power_law(args.x, args.loss)
            print(f"L(x) = {A:.4g} / x^{B:.4g} + {C:.4f}   (asymptote {C:.4f})")
    except (ValueError, FileNotFoundError, DataError) as err:
        cli.fail(err)


if __name__ == "__main__":
    main()
