"""
train.py: the data-constrained training loop of the paper, for one run.

    python train.py --config configs/cpu_demo.json --real out/data/real --val out/data/val \
        --out_dir out/runs/real                                     # real data only
    python train.py --config configs/cpu_demo.json --real out/data/real --synthetic out/data/sorted \
        --mix 0.75 --epochs 4 --weight_decay 0.4 --out_dir out/runs/sorted
    torchrun --nproc_per_node 8 train.py --config configs/paper_300m.json ...   # DDP, same global batch

Reads:  token files written by pack.py (OUT.bin/.idx/.json): --real (training), --synthetic
        (optional), --val (held-out real documents), --long (optional second domain, long documents).
Writes: OUT_DIR/ckpt.pt (atomically; resumed from automatically), OUT_DIR/log.jsonl (one JSON
        object per log line and per evaluation), OUT_DIR/summary.json (config + final metrics).

The semantics:
  * The real token file is cut into fixed windows of block_size + 1 tokens (no padding; a document
    longer than a window continues in the next). `epochs` counts passes over these real windows;
    inside each pass they are drawn without replacement, in an order reshuffled every pass from
    data_seed (separate from the init seed).
  * A fraction `mix` (m) of every batch's sequences comes from the synthetic stream, which repeats
    (reshuffled) when exhausted. Total steps = steps_per_real_epoch x epochs / (1 - m), where a
    real-only step would take batch_size x grad_accum x world_size real windows.
  * The data order is a pure function of (data_seed, step), so a resumed run sees exactly the
    batches it would have seen.
"""
import argparse
import dataclasses
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from evaluate import evaluate_model
from formats import DataError, TokenFile, atomic_open
from model import GPT, GPTConfig, MASK_KINDS, PRESETS, document_ids


@dataclass
class TrainConfig:
    # data
    real: str = "out/data/real"        # pack.py prefix of the real training tokens
    synthetic: str = ""                # pack.py prefix of a synthetic stream ("" = none)
    val: str = "out/data/val"          # held-out real documents for the i.i.d. loss
    long: str = ""                     # second domain of long documents ("" = skip)
    mix: float = 0.0                   # m: fraction of each batch drawn from the synthetic stream
    epochs: float = 1.0                # passes over the real windows
    data_seed: int = 0
    # model
    model: str = "cpu-4x256"            # a preset of model.py; the fields below override it when > 0
    n_layer: int = 0
    n_head: int = 0
    n_kv_head: int = 0
    n_embd: int = 0
    mlp_hidden: int = 0
    block_size: int = 0                # context length
    vocab_size: int = 0                # default: the token file's vocabulary padded to a multiple of 64
    mask: str = "causal"               # causal | document | megadoc
    init_seed: int = 0
    # optimization
    batch_size: int = 8                # sequences per micro-step per process
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_frac: float = 0.0           # cosine floor as a fraction of lr
    warmup_frac: float = 0.01
    weight_decay: float = 0.1
    decay_embedding: bool = False      # the paper's framework excluded the input embedding from wd
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    # system
    device: str = "auto"               # auto | cpu | cuda
    compile: bool = False
    out_dir: str = "out/runs/run"
    log_interval: int = 10
    eval_interval: int = 0             # 0: evaluate only at the end
    ckpt_interval: int = 100
    eval_batch_size: int = 16
    halt_at: int = 0                   # stop after this step, as if preempted (tests resume from here)


def load_config(argv=None):
    """Defaults <- --config FILE (JSON) <- --key value flags. Every value is validated later."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="JSON file of TrainConfig values")
    for f in dataclasses.fields(TrainConfig):
        kind = {bool: lambda s: s.lower() in ("1", "true", "yes")}.get(f.type, f.type)
        ap.add_argument(f"--{f.name}", type=kind, default=None)
    args = ap.parse_args(argv)
    values = {}
    if args.config:
        with open(args.config) as fh:
            values = json.load(fh)
        unknown = set(values) - {f.name for f in dataclasses.fields(TrainConfig)}
        if unknown:
            ap.error(f"{args.config}: unknown keys {sorted(unknown)}")
    values.update({k: v for k, v in vars(args).items() if v is not None and k != "config"})
    return TrainConfig(**values)


def check(ok, message):
    if not ok:
        raise ValueError(message)


# -----------------------------------------------------------------------------
# data: windows of the token files, the exact mixing schedule

class Windows:
    """Fixed windows of block_size + 1 tokens over a token file, in a fresh random order per pass."""

    def __init__(self, token_file, block_size, seed, stream):
        self.tf, self.T, self.seed, self.stream = token_file, block_size, seed, stream
        self.n = (len(token_file) - 1) // block_size
        check(self.n > 0, f"{token_file.bin_path}: {len(token_file)} tokens make no window of {block_size + 1}")

    def order(self, epoch):
        return np.random.default_rng([self.seed, self.stream, epoch]).permutation(self.n)

    def pick(self, first, count):
        """Window numbers of the stream's sequences first .. first + count - 1 (passes repeat)."""
        out, cache = [], {}
        for i in range(first, first + count):
            epoch, pos = divmod(i, self.n)
            if epoch not in cache:
                cache[epoch] = self.order(epoch)
            out.append(int(cache[epoch][pos]))
        return out

    def window(self, w):
        """Tokens (block_size + 1) and per-token source-group ids (block_size) of window w."""
        return self.tf.tokens[w * self.T: (w + 1) * self.T + 1], self.tf.group_ids(w * self.T, self.T)


def global_batch(step, real, syn, n_real, n_syn):
    """The windows of one step's global batch, as (stream, window number) pairs: n_syn synthetic
    sequences, then n_real real ones. Step s takes sequences s x n ... s x n + n - 1 of each stream,
    so the data order is a pure function of (data_seed, step) and a resumed run sees the same batches."""
    return ([(syn, w) for w in syn.pick(step * n_syn, n_syn)] if n_syn else []) + \
        [(real, w) for w in real.pick(step * n_real, n_real)]


def batch_split(cfg, world_size):
    """(real, synthetic) sequences per global batch; m x batch must be a whole number."""
    global_batch = cfg.batch_size * cfg.grad_accum * world_size
    n_syn = cfg.mix * global_batch
    check(abs(n_syn - round(n_syn)) < 1e-9, f"mix {cfg.mix} x global batch {global_batch} = {n_syn:g} "
          "synthetic sequences per batch: choose mix and batch so this is a whole number")
    n_syn = round(n_syn)
    return global_batch - n_syn, n_syn


def total_steps(n_real_windows, epochs, n_real_per_batch):
    """steps_per_real_epoch x epochs / (1 - m), as a whole number of steps that never repeats a
    real window inside a pass: (real windows x epochs) / real sequences per batch, rounded down."""
    return int(n_real_windows * epochs) // n_real_per_batch


def lr_at(step, steps, cfg):
    """Linear warmup over warmup_frac of the steps, then cosine from lr down to min_lr_frac x lr."""
    warmup = max(1, round(cfg.warmup_frac * steps))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    floor = cfg.min_lr_frac * cfg.lr
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def param_groups(model, cfg):
    """Weight decay on weight matrices only: not on norm gains, and not on the input embedding
    unless decay_embedding (the paper's framework excluded it)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        is_embedding = name.endswith("wte.weight")
        (decay if p.dim() >= 2 and (cfg.decay_embedding or not is_embedding) else no_decay).append(p)
    return [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# -----------------------------------------------------------------------------
# checkpoints

def save_checkpoint(path, model, optimizer, step, cfg, model_cfg, tokenizer, metrics):
    """Written atomically: a crash never leaves a half-written checkpoint under the final name."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
             "config": dataclasses.asdict(cfg), "model_config": dataclasses.asdict(model_cfg),
             "tokenizer": tokenizer, "metrics": metrics, "torch_rng": torch.get_rng_state()}
    with atomic_open(path) as f:
        torch.save(state, f)


# -----------------------------------------------------------------------------
# the run

def setup(cfg):
    """Validate the config against the token files; return data, model config, device info."""
    check(0 <= cfg.mix < 1, f"mix must be in [0, 1), got {cfg.mix}")
    check(cfg.epochs > 0, f"epochs must be > 0, got {cfg.epochs}")
    check(cfg.mask in MASK_KINDS, f"mask must be one of {MASK_KINDS}, got {cfg.mask!r}")
    check(cfg.model in PRESETS, f"model must be a preset of model.py {sorted(PRESETS)}, got {cfg.model!r}")
    check(cfg.mix == 0 or cfg.synthetic, "mix > 0 needs a --synthetic token file")
    check(not cfg.synthetic or cfg.mix > 0, "a --synthetic token file needs mix > 0")
    for name in ("batch_size", "grad_accum", "log_interval", "ckpt_interval", "eval_batch_size"):
        check(getattr(cfg, name) > 0, f"{name} must be > 0, got {getattr(cfg, name)}")
    check(cfg.lr > 0 and cfg.weight_decay >= 0 and cfg.grad_clip > 0, "lr and grad_clip must be > 0, weight_decay >= 0")
    data = {"real": TokenFile(cfg.real), "val": TokenFile(cfg.val)}
    if cfg.synthetic:
        data["synthetic"] = TokenFile(cfg.synthetic)
    if cfg.long:
        data["long"] = TokenFile(cfg.long)
    vocab, bos = data["real"].vocab_size, data["real"].bos_id
    for name, tf in data.items():
        check((tf.vocab_size, tf.bos_id) == (vocab, bos), f"{name} token file {tf.bin_path} has vocabulary "
              f"{tf.vocab_size} / BOS {tf.bos_id}, the real one {vocab} / {bos}: pack them with one tokenizer")
    overrides = {k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_kv_head", "n_embd", "mlp_hidden", "block_size")
                 if getattr(cfg, k) > 0}
    if cfg.n_head > 0 and cfg.n_kv_head == 0:
        overrides["n_kv_head"] = cfg.n_head
    overrides["vocab_size"] = cfg.vocab_size or -(-vocab // 64) * 64
    check(overrides["vocab_size"] >= vocab, f"vocab_size {overrides['vocab_size']} is smaller than the token "
          f"files' vocabulary {vocab}")
    model_cfg = GPTConfig.from_preset(cfg.model, **overrides)
    cfg.block_size, cfg.vocab_size = model_cfg.block_size, model_cfg.vocab_size
    return data, model_cfg, bos


def main(argv=None):
    cfg = load_config(argv)
    try:
        data, model_cfg, bos_id = setup(cfg)
    except (ValueError, DataError) as e:
        sys.exit(f"error: {e}")

    ddp = int(os.environ.get("RANK", -1)) != -1
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if ddp:
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if device == "cuda":
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
    else:
        rank, world = 0, 1
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else nullcontext()

    n_real, n_syn = batch_split(cfg, world)
    real = Windows(data["real"], cfg.block_size, cfg.data_seed, stream=0)
    syn = Windows(data["synthetic"], cfg.block_size, cfg.data_seed, stream=1) if n_syn else None
    steps = total_steps(real.n, cfg.epochs, n_real)
    if steps < 1:
        sys.exit(f"error: {real.n} real windows x {cfg.epochs} epochs make no batch of {n_real} real sequences")

    def get_batch(step, micro):
        """Inputs, targets and source-group ids of one micro-batch of this process: micro-step
        `micro` of process `rank` takes the slice of the global batch that starts at
        (micro x world + rank) x batch_size."""
        lo = (micro * world + rank) * cfg.batch_size
        rows, groups = zip(*[stream.window(w) for stream, w in
                             global_batch(step, real, syn, n_real, n_syn)[lo: lo + cfg.batch_size]])
        tokens = torch.from_numpy(np.stack(rows).astype(np.int64))
        x, y, g = tokens[:, :-1], tokens[:, 1:], torch.from_numpy(np.stack(groups))
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True), g.to(device, non_blocking=True)

    torch.manual_seed(cfg.init_seed)
    model = GPT(model_cfg).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                  fused=device.startswith("cuda"))
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    os.makedirs(cfg.out_dir, exist_ok=True)
    step = 0
    if os.path.exists(ckpt_path):
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["torch_rng"])
        step = ckpt["step"]
        log(f"resuming from {ckpt_path} at step {step}")
    train_model = torch.compile(model) if cfg.compile else model
    if ddp:
        train_model = torch.nn.parallel.DistributedDataParallel(train_model)
    tokenizer = data["real"].meta.get("tokenizer", "gpt2")

    log(f"model {cfg.model}: {model.num_params():,} parameters (vocabulary {model_cfg.vocab_size}, "
        f"context {cfg.block_size}), mask {cfg.mask}, device {device}, {world} process(es)")
    log(f"data: {real.n:,} real windows x {cfg.epochs:g} epochs, mix {cfg.mix:g}: {n_real} real + {n_syn} "
        f"synthetic sequences per batch of {n_real + n_syn}, {steps:,} steps")

    log_file = open(os.path.join(cfg.out_dir, "log.jsonl"), "a") if master else None
    def record(obj):
        if master:
            log_file.write(json.dumps(obj) + "\n")
            log_file.flush()

    tokens_per_step = (n_real + n_syn) * cfg.block_size
    metrics, train_seconds, start_step = {}, 0.0, step   # train_seconds: evaluation and checkpoints excluded
    while step < steps:
        t0 = time.time()
        lr = lr_at(step, steps, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # forward and backward over the micro-batches of this step, then one optimizer step
        loss_sum = 0.0
        for micro in range(cfg.grad_accum):
            x, y, groups = get_batch(step, micro)
            sync = nullcontext() if (not ddp or micro == cfg.grad_accum - 1) else train_model.no_sync()
            with sync, ctx:
                _, loss = train_model(x, y, doc_ids=document_ids(x, bos_id), group_ids=groups, mask_kind=cfg.mask)
                (loss / cfg.grad_accum).backward()
            loss_sum += loss.item() / cfg.grad_accum
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ddp:   # the logged loss is the global batch's mean
            loss_t = torch.tensor(loss_sum, device=device)
            dist.all_reduce(loss_t)
            loss_sum = loss_t.item() / world
        step += 1
        train_seconds += time.time() - t0   # loss.item() waited for the device: this time is honest

        if step % cfg.log_interval == 0 or step == steps:
            tok_s = (step - start_step) * tokens_per_step / train_seconds
            eta = (steps - step) * train_seconds / (step - start_step)
            log(f"step {step:>6}/{steps} | loss {loss_sum:.4f} | lr {lr:.2e} | {tok_s:,.0f} tok/s | "
                f"eta {eta / 60:.1f} min")
            record({"step": step, "loss": loss_sum, "lr": lr, "tokens_per_s": tok_s})
        if master and ((cfg.eval_interval and step % cfg.eval_interval == 0) or step == steps):
            metrics = evaluate_model(model, data["val"], data.get("long"), cfg.mask, cfg.eval_batch_size, device, ctx)
            log(f"eval step {step}: val loss {metrics['val_loss']:.4f}" +
                (f", long-document loss {metrics['long_loss']:.4f}" if "long_loss" in metrics else ""))
            record({"step": step, **metrics})
        if master and (step % cfg.ckpt_interval == 0 or step == steps or step == cfg.halt_at):
            save_checkpoint(ckpt_path, model, optimizer, step, cfg, model_cfg, tokenizer, metrics)
        if step == cfg.halt_at:
            log(f"halting at step {step} (halt_at)")
            break

    if master and step == steps:
        summary = {"config": dataclasses.asdict(cfg), "model_config": dataclasses.asdict(model_cfg),
                   "params": model.num_params(), "steps": steps, "real_windows": real.n,
                   "real_sequences_seen": steps * n_real, "synthetic_sequences_seen": steps * n_syn,
                   "real_tokens": len(data["real"]), "final_train_loss": loss_sum, **metrics,
                   "train_seconds": train_seconds,
                   "tokens_per_s": (steps - start_step) * tokens_per_step / max(train_seconds, 1e-9)}
        with atomic_open(os.path.join(cfg.out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    if ddp:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
