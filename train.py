r"""
train.py: the data-constrained training loop of the paper, for one run.

    python train.py --config configs/cpu_demo.json --real out/data/real --val out/data/val \
        --out_dir out/runs/real                                     # real data only
    python train.py --config configs/cpu_demo.json --real out/data/real --synthetic out/data/sorted \
        --mix 0.75 --epochs 4 --weight_decay 0.4 --out_dir out/runs/sorted
    torchrun --nproc_per_node 8 train.py --config configs/paper_300m.json ...   # DDP, same global batch

Reads:  token files written by pack.py (OUT.bin/.idx/.json): --real (training), --synthetic
        (optional), --val (held-out real documents), --long (optional second domain, long documents).
Writes: OUT_DIR/ckpt.pt (atomically; resumed from automatically), OUT_DIR/log.jsonl (one JSON
        object per log line and per evaluation; a resumed run repairs it and appends; tokens/s,
        and MFU on a GPU of evaluate.PEAK_TFLOPS or with --peak_tflops, are timed from the second
        step of each (re)start: the first compiles and warms up), and
        OUT_DIR/summary.json (config, final metrics, and the code that ran: "code" holds the git
        commit of this checkout and whether its tracked files were modified).
        With --wandb_project P (optional: pip install wandb), every log.jsonl record also goes to
        a Weights & Biases run of project P, which a resumed run continues (see start_wandb).

The semantics:
  * The real token file is cut into fixed windows of block_size + 1 tokens (no padding; a document
    longer than a window continues in the next). `epochs` counts passes over these real windows;
    inside each pass they are drawn without replacement, in an order reshuffled every pass from
    data_seed (separate from the init seed).
  * A fraction `mix` (m) of every batch's sequences comes from the synthetic stream, which repeats
    (reshuffled) when exhausted. Total steps = steps_per_real_epoch x epochs / (1 - m), where a
    real-only step takes batch_size x grad_accum real windows, on one process or on N (the rule,
    in one place: Mixture).
  * The data order is a pure function of (data_seed, step), so a resumed run sees exactly the
    batches it would have seen.
  * The device is waited for once a step (for its loss). Each step's batch is built once, on the
    host, while the device works through the step before it (in pinned memory on CUDA, copied
    without blocking). Evaluation runs on the training device, through the compiled model when
    training is compiled, each process of a torchrun evaluating its share of the batches.

Exit codes (cli.py): 0 trained, or already finished; 2 bad settings or files, one line "error: ...";
1 a bug, with its traceback.
"""
import argparse
import ctypes
import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

import cli
from evaluate import evaluate_model, mfu, peak_flops
from formats import DataError, TokenFile, atomic_open, cut_partial_line, read_jsonl, require
from model import GPT, GPTConfig, MASK_KINDS, PRESETS, autocast, document_ids, read_checkpoint


def arg(default, help):
    """A TrainConfig field with its --help text."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # data
    real: str = arg("out/data/real", "pack.py prefix of the real training tokens")
    synthetic: str = arg("", "pack.py prefix of a synthetic stream ('' = none)")
    val: str = arg("out/data/val", "held-out real documents for the i.i.d. loss (the split you tune on)")
    test: str = arg("", "a second held-out split for final numbers ('' = none)")
    long: str = arg("", "long documents of a second domain, for the loss by position ('' = none)")
    mix: float = arg(0.0, "m: the fraction of every batch drawn from the synthetic stream, in [0, 1) (see Mixture)")
    epochs: float = arg(1.0, "passes over the real windows")
    data_seed: int = arg(0, "seed of the data order")
    # model
    model: str = arg("cpu-4x256", f"a preset of model.py: {', '.join(PRESETS)}; the fields below override it when > 0")
    n_layer: int = arg(0, "layers (0: the preset's)")
    n_head: int = arg(0, "attention heads (0: the preset's)")
    n_kv_head: int = arg(0, "key/value heads (0: the preset's, or n_head when n_head is set)")
    n_embd: int = arg(0, "width (0: the preset's)")
    mlp_hidden: int = arg(0, "SwiGLU hidden size (0: the preset's)")
    block_size: int = arg(0, "context length (0: the preset's)")
    vocab_size: int = arg(0, "embedding rows (0: the token files' vocabulary padded to a multiple of 64)")
    mask: str = arg("causal", f"attention mask: {', '.join(MASK_KINDS)}")
    init_seed: int = arg(0, "seed of the initial weights")
    # optimization
    batch_size: int = arg(8, "sequences per micro-step")
    grad_accum: int = arg(1, "micro-steps per optimizer step; the global batch is batch_size x grad_accum "
                             "sequences, whatever the number of processes")
    lr: float = arg(3e-3, "peak learning rate")
    min_lr_frac: float = arg(0.0, "the cosine schedule's floor, as a fraction of lr")
    warmup_frac: float = arg(0.01, "linear warmup, as a fraction of the steps")
    weight_decay: float = arg(0.1, "AdamW weight decay on weight matrices (not norms, not the input embedding)")
    decay_embedding: bool = arg(False, "also decay the input embedding (the paper's framework did not)")
    beta1: float = arg(0.9, "AdamW beta1")
    beta2: float = arg(0.95, "AdamW beta2")
    eps: float = arg(1e-8, "AdamW epsilon")
    grad_clip: float = arg(1.0, "gradient norm clip")
    # system
    device: str = arg("auto", "auto, cpu, cuda or cuda:N")
    compile: bool = arg(False, "torch.compile the model (a win on GPUs; on the CPU demo's small runs it is not)")
    peak_tflops: float = arg(0.0, "the device's peak bfloat16 TFLOP/s, for the MFU in the log (0: from "
                                  "evaluate.PEAK_TFLOPS by the GPU's name; no MFU on the CPU)")
    out_dir: str = arg("out/runs/run", "checkpoint, log and summary go here; a run resumes from its checkpoint")
    log_interval: int = arg(10, "steps between log lines")
    eval_interval: int = arg(0, "steps between evaluations (0: only at the end)")
    ckpt_interval: int = arg(100, "steps between checkpoints")
    eval_batch_size: int = arg(16, "sequences per evaluation batch")
    halt_at: int = arg(0, "stop after this step as if preempted (0: never; tests resume from here)")
    eval_train: bool = arg(False, "also measure the loss on the real training tokens (train_loss) at evaluation")
    wandb_project: str = arg("", "a Weights & Biases project to mirror log.jsonl to ('' = none; needs wandb)")


# fields that do not change what a run computes: a resumed run may change them
RESUMABLE_CHANGES = {"val", "test", "long", "eval_train", "device", "compile", "peak_tflops", "out_dir", "log_interval",
                     "eval_interval", "ckpt_interval", "eval_batch_size", "halt_at", "wandb_project"}


def parse_bool(text):
    value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value


def load_config(argv=None):
    """Defaults <- --config FILE (JSON) <- --key value flags. A bad file, key or value is a one-line
    error; every value is checked again against the token files by setup()."""
    ap = cli.ArgumentParser(__doc__, __file__)
    ap.add_argument("--config", help="JSON file of TrainConfig values (flags override it)")
    for f in dataclasses.fields(TrainConfig):
        ap.add_argument(f"--{f.name}", type=parse_bool if f.type is bool else f.type, default=None,
                        help=f"{f.metadata['help']} (default: {f.default!r})")
    args = ap.parse_args(argv)
    values = {}
    if args.config:
        try:
            with open(args.config) as fh:
                values = json.load(fh)
        except OSError as e:
            ap.error(f"--config {args.config}: {e.strerror}")
        except ValueError as e:
            ap.error(f"--config {args.config}: not JSON ({e})")
        if not isinstance(values, dict):
            ap.error(f"--config {args.config}: expected a JSON object of TrainConfig values")
        types = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
        for key, value in values.items():
            if key not in types:
                ap.error(f"--config {args.config}: unknown key {key!r}")
            ok = isinstance(value, types[key]) or (types[key] is float and isinstance(value, int))
            if not ok or (isinstance(value, bool) and types[key] is not bool):
                ap.error(f"--config {args.config}: {key} must be {types[key].__name__}, got {value!r}")
    values.update({k: v for k, v in vars(args).items() if v is not None and k != "config"})
    return TrainConfig(**values)


def check(ok, message):
    if not ok:
        raise ValueError(message)


# -----------------------------------------------------------------------------
# data: windows of the token files, and the mixing rule

class Windows:
    """Fixed windows of block_size + 1 tokens over a token file, in a fresh random order per pass."""

    def __init__(self, token_file, block_size, seed, stream):
        self.tf, self.T, self.seed, self.stream = token_file, block_size, seed, stream
        self.n = (len(token_file) - 1) // block_size
        check(self.n > 0, f"{token_file.bin_path}: {len(token_file)} tokens make no window of {block_size + 1}")
        self._order = (None, None)   # (pass, its order): drawn once per pass, not once per step

    def order(self, epoch):
        if self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, self.stream, epoch]).permutation(self.n))
        return self._order[1]

    def pick(self, first, count):
        """Window numbers of the stream's sequences first .. first + count - 1 (passes repeat)."""
        return [int(self.order(i // self.n)[i % self.n]) for i in range(first, first + count)]

    def window(self, w):
        """Tokens (block_size + 1) and per-token source-group ids (block_size) of window w."""
        return self.tf.tokens[w * self.T: (w + 1) * self.T + 1], self.tf.group_ids(w * self.T, self.T)


class Mixture:
    """The mixing rule, all of it: which windows make up each step's batch, and how many steps a
    run takes.

    A step's global batch is B = batch_size x grad_accum sequences, whatever the number of
    processes: N processes share the grad_accum micro-steps (as nanoGPT does), so grad_accum must
    be a multiple of N. n_syn = m x B of its sequences come from the synthetic stream (m x B must
    be a whole number), then n_real = B - n_syn from the real one. Each stream is read in order,
    step s taking its sequences s x n .. s x n + n - 1 (Windows: a fresh random order of the
    windows per pass), so the data order is a pure function of (data_seed, step) and a resumed run
    sees the batches it would have seen. The run ends when the real sequences reach real windows x
    epochs, in whole steps: steps = floor(real windows x epochs / n_real), i.e. steps per real
    epoch x epochs / (1 - m). The synthetic stream repeats, reshuffled, as often as that takes.

    A schedule over m (m_s at step s) changes this class only: n_syn and n_real become functions
    of the step (m_s x B and B - m_s x B), each stream's first sequence at step s becomes the sum
    of its counts over the steps before s (instead of s x n), and steps the first step at which
    the real sequences reach real windows x epochs. Nothing else in train.py reads m."""

    def __init__(self, cfg, real, synthetic, world_size):
        B = cfg.batch_size * cfg.grad_accum
        check(cfg.grad_accum % world_size == 0, f"grad_accum {cfg.grad_accum} is not a multiple of the {world_size} "
              "processes: the global batch (batch_size x grad_accum) is shared between them")
        n_syn = cfg.mix * B
        check(abs(n_syn - round(n_syn)) < 1e-9, f"mix {cfg.mix} x global batch {B} = {n_syn:g} synthetic "
              "sequences per batch: choose mix and batch so this is a whole number")
        self.n_syn = round(n_syn)
        self.n_real = B - self.n_syn
        self.batch_size, self.world_size, self.micro_steps = cfg.batch_size, world_size, cfg.grad_accum // world_size
        self.real = Windows(real, cfg.block_size, cfg.data_seed, stream=0)
        self.syn = Windows(synthetic, cfg.block_size, cfg.data_seed, stream=1) if self.n_syn else None
        self.steps = int(self.real.n * cfg.epochs) // self.n_real
        check(self.steps >= 1, f"{self.real.n} real windows x {cfg.epochs:g} epochs make no batch of "
              f"{self.n_real} real sequences")

    def global_batch(self, step):
        """The windows of one step's global batch, as (stream, window number) pairs: the n_syn
        synthetic sequences, then the n_real real ones."""
        return ([(self.syn, w) for w in self.syn.pick(step * self.n_syn, self.n_syn)] if self.n_syn else []) + \
            [(self.real, w) for w in self.real.pick(step * self.n_real, self.n_real)]

    def step_batch(self, step, rank):
        """What process `rank` trains on in one step, built once: tokens (micro_steps, batch_size,
        block_size + 1) and source-group ids (micro_steps, batch_size, block_size). Its micro-step
        `micro` takes the slice of the global batch that starts at (micro x world_size + rank) x
        batch_size."""
        batch, B = self.global_batch(step), self.batch_size
        rows = [batch[(micro * self.world_size + rank) * B + i] for micro in range(self.micro_steps) for i in range(B)]
        tokens, groups = zip(*[stream.window(w) for stream, w in rows])
        return (np.stack(tokens).astype(np.int64).reshape(self.micro_steps, B, -1),
                np.stack(groups).reshape(self.micro_steps, B, -1))


def host_batch(mix, step, rank, pin):
    """One step's batch of this process (Mixture.step_batch) as CPU tensors; in pinned memory when
    pin (on CUDA), from which the copy to the GPU does not block the host."""
    tensors = [torch.from_numpy(a) for a in mix.step_batch(step, rank)]
    return [t.pin_memory() for t in tensors] if pin else tensors


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
# the state of a run on disk: checkpoint, log, summary, and the code that ran

def data_identity(data):
    return {name: [len(data[name]), len(data[name].starts)] for name in ("real", "synthetic") if name in data}


def settings_changed(ckpt, cfg, data):
    """What differs between the run that wrote `ckpt` and this one, in anything that changes what
    the run computes (model, vocabulary, optimization, epochs, mix, data files); "" if nothing."""
    old, new = ckpt["config"], dataclasses.asdict(cfg)
    changes = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in new.items() if k not in RESUMABLE_CHANGES and old.get(k) != v]
    for name, identity in data_identity(data).items():
        if ckpt.get("data", {}).get(name) != identity:
            changes.append(f"{name} token file {ckpt.get('data', {}).get(name)} -> {identity} (tokens, documents)")
    return "; ".join(changes)


def checkpoint_to_resume(path, cfg, data):
    """The checkpoint of this run folder (loaded to the CPU), or None for a fresh start. A file that
    is not a checkpoint, or one of a run with other settings, is a ValueError naming the file and
    every difference."""
    if not os.path.exists(path):
        return None
    try:
        ckpt = read_checkpoint(path)
    except ValueError as e:
        raise ValueError(f"{e}; cannot resume from it: remove it to start the run again, or use another --out_dir")
    changed = settings_changed(ckpt, cfg, data)
    if changed:
        raise ValueError(f"{path} belongs to a run with other settings ({changed}); use another --out_dir, or the "
                         "same settings to resume it")
    return ckpt


def resume(ckpt, model, optimizer):
    """Put the model, the optimizer and torch's RNG where the checkpoint left them; returns the
    training state (step, train_seconds, train_loss, metrics, codes, wandb_run_id): that of step 0
    without one."""
    if ckpt is None:
        return dict(step=0, train_seconds=0.0, train_loss=float("nan"), metrics={}, codes=[], wandb_run_id=None)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["torch_rng"])
    return dict(step=ckpt["step"], train_seconds=ckpt["train_seconds"], train_loss=ckpt["train_loss"],
                metrics=ckpt["metrics"], codes=ckpt.get("codes", []), wandb_run_id=ckpt.get("wandb_run_id"))


def checkpoint(cfg, model_cfg, data, model, optimizer, state, tokenizer):
    """Everything a resumed run needs, and load_model too: weights, optimizer, config, data identity,
    training state and the CPU RNG."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": state["step"],
            "config": dataclasses.asdict(cfg), "model_config": dataclasses.asdict(model_cfg),
            "data": data_identity(data), "tokenizer": tokenizer, "metrics": state["metrics"],
            "train_loss": state["train_loss"], "train_seconds": state["train_seconds"], "codes": state["codes"],
            "wandb_run_id": state["wandb_run_id"], "torch_rng": torch.get_rng_state()}


def save_checkpoint(path, state):
    """Written atomically: a crash never leaves a half-written checkpoint under the final name."""
    with atomic_open(path) as f:
        torch.save(state, f)


def repair_log(path, last_step):
    """Make the log end at last_step, where the run goes on from (0 for a fresh start): a partial
    last line left by a crash, a full disk or a power cut is cut off, and the lines of later steps
    (logged after the checkpoint it resumes from) are dropped, so that the run appends without
    gaps or repeats."""
    removed = cut_partial_line(path)
    if removed:
        print(f"{path}: removed a partial last line ({removed} bytes) left by an interrupted run", file=sys.stderr)
    if not os.path.exists(path):
        return
    lines = list(read_jsonl(path))
    keep = [json.dumps(r) + "\n" for lineno, r in lines if require(r, "step", (int,), f"{path}:{lineno}") <= last_step]
    if len(keep) < len(lines):
        with atomic_open(path, "w") as f:
            f.writelines(keep)


def wandb_module():
    """The wandb package for --wandb_project, or a ValueError naming the flag if it cannot be
    imported (found before any work, not after the first steps)."""
    try:
        import wandb
    except ImportError as e:
        raise ValueError(f"--wandb_project needs wandb (pip install wandb): {e}") from None
    return wandb


def start_wandb(wandb, cfg, model_cfg, run_id=None):
    """The Weights & Biases run that mirrors log.jsonl: a new one, or with the run_id a checkpoint
    holds, the same run resumed. Logged by step, as log.jsonl is: after a crash, steps between the
    checkpoint and the crash are logged again with the values they had (resume is exact), and wandb
    keeps one value per step. WANDB_MODE=offline writes the run to disk only (wandb sync sends it)."""
    return wandb.init(project=cfg.wandb_project, id=run_id, resume="allow",   # id None: a new run
                      name=os.path.basename(os.path.normpath(cfg.out_dir)),
                      config={**dataclasses.asdict(cfg), "model_config": dataclasses.asdict(model_cfg)})


def code_version():
    """The code this process runs: {"commit": the git commit of the checkout train.py is in,
    "modified": whether its tracked files differ from that commit}; None for both outside a git
    checkout (or without git)."""
    here = os.path.dirname(os.path.abspath(__file__))
    git = lambda *args: subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=30)
    try:
        commit, status = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None, "modified": None}
    if commit.returncode or status.returncode:
        return {"commit": None, "modified": None}
    return {"commit": commit.stdout.strip(), "modified": bool(status.stdout.strip())}


def codes_with_this_one(codes, log):
    """The code versions (code_version) a run has run under, this process's last; a run resumed
    under other code says so."""
    code = code_version()
    if codes and codes[-1] != code:
        log(f"note: this run was begun under other code ({codes[-1]}); it goes on under {code}")
    return codes if codes[-1:] == [code] else codes + [code]


# glibc's malloc maps every block of its mmap threshold or more straight from the kernel and unmaps
# it when it is freed (the threshold is 128 KiB at first, raised to the size of a mapped block when
# one is freed, up to 32 MiB), and it gives the top of its heap back whenever more than twice the
# threshold is free there. A CPU training step frees all its activations at its end and allocates
# them again in the next step, so under these defaults it faults the same pages in anew each step:
# thousands of page faults a step at the CPU demo's shape (2,000-8,000 measured), for nanoGPT's model
# as for ours.
# mallopt's parameters, from glibc's <malloc.h>:
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory():
    """Make glibc's malloc keep the memory a training step frees for the next step (blocks under
    1 GiB, a free heap top under 2 GiB) instead of giving it back to the kernel. The process then
    holds on to its peak memory until it exits, a peak a training run reaches every step anyway.
    Numbers are unchanged; bench/bench_train.py measures the time it saves a step (about 6% at
    the CPU demo's shape). True if set; False where the C library is not glibc (macOS,
    musl), which is left as it is."""
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1))


def train_device(name):
    """--device as cli.pick_device reads it; train.py runs on cpu or cuda."""
    device = cli.pick_device(name)
    check(device.split(":")[0] in ("cpu", "cuda"), f"--device {name!r}: train.py runs on cpu or cuda")
    return device


# -----------------------------------------------------------------------------
# the run

def model_config(cfg, vocab):
    """The model a run trains: the preset, the fields of cfg that override it (those > 0), and
    vocab_size, or else the token files' vocabulary `vocab` padded to a multiple of 64."""
    overrides = {k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_kv_head", "n_embd", "mlp_hidden", "block_size")
                 if getattr(cfg, k) > 0}
    if cfg.n_head > 0 and cfg.n_kv_head == 0:
        overrides["n_kv_head"] = cfg.n_head
    overrides["vocab_size"] = cfg.vocab_size or -(-vocab // 64) * 64
    return GPTConfig.from_preset(cfg.model, **overrides)


def setup(cfg):
    """Validate the config against the token files; return data, model config, device info."""
    check(0 <= cfg.mix < 1, f"mix must be in [0, 1), got {cfg.mix}")
    check(0 < cfg.epochs < math.inf, f"epochs must be a number > 0, got {cfg.epochs}")
    for name in ("lr", "weight_decay", "grad_clip", "warmup_frac", "min_lr_frac", "beta1", "beta2", "eps", "peak_tflops"):
        check(math.isfinite(getattr(cfg, name)), f"{name} must be a finite number, got {getattr(cfg, name)}")
    check(cfg.peak_tflops >= 0, f"peak_tflops must be >= 0 (0: from the GPU's name), got {cfg.peak_tflops}")
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
    if cfg.test:
        data["test"] = TokenFile(cfg.test)
    if cfg.long:
        data["long"] = TokenFile(cfg.long)
    vocab, bos = data["real"].vocab_size, data["real"].bos_id
    for name, tf in data.items():
        check((tf.vocab_size, tf.bos_id) == (vocab, bos), f"{name} token file {tf.bin_path} has vocabulary "
              f"{tf.vocab_size} / BOS {tf.bos_id}, the real one {vocab} / {bos}: pack them with one tokenizer")
    model_cfg = model_config(cfg, vocab)
    check(model_cfg.vocab_size >= vocab, f"vocab_size {model_cfg.vocab_size} is smaller than the token "
          f"files' vocabulary {vocab}")
    cfg.block_size, cfg.vocab_size = model_cfg.block_size, model_cfg.vocab_size
    check(len(data["real"]) > cfg.block_size, f"block_size {cfg.block_size} leaves no window in the real token "
          f"file {data['real'].bin_path} ({len(data['real']):,} tokens)")
    return data, model_cfg, bos


def main(argv=None):
    cfg = load_config(argv)
    ddp = int(os.environ.get("RANK", -1)) != -1   # started by torchrun
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    master = rank == 0
    ckpt_path, log_path, summary_path = (os.path.join(cfg.out_dir, f) for f in ("ckpt.pt", "log.jsonl", "summary.json"))
    try:   # every check of the settings and files, before any work
        device = train_device(cfg.device)
        data, model_cfg, bos_id = setup(cfg)
        mix = Mixture(cfg, data["real"], data.get("synthetic"), world)
        ckpt = checkpoint_to_resume(ckpt_path, cfg, data)
        wandb = wandb_module() if cfg.wandb_project else None
        if master:
            repair_log(log_path, ckpt["step"] if ckpt else 0)
    except (ValueError, DataError) as e:
        cli.fail(e)
    log = print if master else (lambda *a, **k: None)
    if ckpt and ckpt["step"] == mix.steps and os.path.exists(summary_path):
        log(f"{cfg.out_dir}: this run is already finished (see {summary_path})")
        return

    if ddp:
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
    cuda = device.startswith("cuda")
    if not cuda:
        keep_freed_memory()
    ctx = autocast(device)

    torch.manual_seed(cfg.init_seed)
    model = GPT(model_cfg).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                  fused=True)   # one fused kernel; on CPU too: several times faster than the loop
    state = resume(ckpt, model, optimizer)
    del ckpt
    if master:
        state["codes"] = codes_with_this_one(state["codes"], log)
    if state["step"]:
        log(f"resuming from {ckpt_path} at step {state['step']}")
    # static shapes: one graph for the training step and one for evaluation (its last batch padded),
    # none of them a dynamic-shape recompile when the evaluation batch differs from the training one
    compiled = torch.compile(model, dynamic=False) if cfg.compile else model
    train_model = torch.nn.parallel.DistributedDataParallel(compiled) if ddp else compiled
    tokenizer = data["real"].meta.get("tokenizer", "gpt2")

    def evaluate():
        # every process evaluates its share of the batches, on the training device, through the
        # compiled model when training is compiled (at one shape: the last batch padded)
        return evaluate_model(compiled, data["val"], data.get("test"), data.get("long"), cfg.mask, cfg.eval_batch_size,
                              device, ctx, train=data["real"] if cfg.eval_train else None,
                              fixed_shape=cfg.compile or cuda, shard=(rank, world))

    steps, micro_steps = mix.steps, mix.micro_steps
    log(f"model {cfg.model}: {model.num_params():,} parameters (vocabulary {model_cfg.vocab_size}, "
        f"context {cfg.block_size}), mask {cfg.mask}, device {device}, {world} process(es)")
    log(f"data: {mix.real.n:,} real windows x {cfg.epochs:g} epochs, mix {cfg.mix:g}: {mix.n_real} real + "
        f"{mix.n_syn} synthetic sequences per batch of {mix.n_real + mix.n_syn}, {steps:,} steps")
    peak = cfg.peak_tflops * 1e12 or peak_flops(device)
    if cuda and not peak:
        log(f"note: no MFU in the log: {torch.cuda.get_device_name(device)} is not in evaluate.PEAK_TFLOPS "
            "(give --peak_tflops)")
    if master:
        os.makedirs(cfg.out_dir, exist_ok=True)
    log_file = open(log_path, "a") if master else None
    wandb_run = start_wandb(wandb, cfg, model_cfg, state["wandb_run_id"]) if master and wandb else None
    if wandb_run:   # kept in the checkpoint: a resumed run continues this one
        state["wandb_run_id"] = wandb_run.id
    def record(obj):
        if master:
            log_file.write(json.dumps(obj) + "\n")
            log_file.flush()
        if wandb_run:
            wandb_run.log({k: v for k, v in obj.items() if k != "step"}, step=obj["step"])

    tokens_per_step = (mix.n_real + mix.n_syn) * cfg.block_size
    # the rate in the log is timed from the second step of this segment (since the (re)start): the
    # first compiles the model (--compile) and warms up the device
    step, start_step, first_seconds, later_seconds = state["step"], state["step"], 0.0, 0.0
    batch = host_batch(mix, step, rank, pin=cuda) if step < steps else None
    while step < steps:
        t0 = time.time()
        lr = lr_at(step, steps, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # forward and backward over this process's micro-batches, then one optimizer step; the
        # loss stays on the device until the step's one wait for it
        tokens, groups = (t.to(device, non_blocking=True) for t in batch)
        step_loss = torch.zeros((), dtype=torch.float64, device=device)
        for micro in range(micro_steps):
            x, y = tokens[micro, :, :-1], tokens[micro, :, 1:]
            sync = nullcontext() if (not ddp or micro == micro_steps - 1) else train_model.no_sync()
            with sync, ctx:
                _, loss = train_model(x, y, doc_ids=document_ids(x, bos_id), group_ids=groups[micro], mask_kind=cfg.mask)
                (loss / micro_steps).backward()
            step_loss += loss.detach().double() / micro_steps
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step + 1 < steps:   # the next step's batch, built on the host while the device works through this one
            batch = host_batch(mix, step + 1, rank, pin=cuda)
        if ddp:   # the logged loss is the global batch's mean
            dist.all_reduce(step_loss)
        loss_sum = step_loss.item() / world   # the step's one host sync
        step += 1
        dt = time.time() - t0   # the sync waited for the device: this time is honest
        if step == start_step + 1:
            first_seconds = dt
        else:
            later_seconds += dt
        state.update(step=step, train_loss=loss_sum, train_seconds=state["train_seconds"] + dt)

        if step % cfg.log_interval == 0 or step == steps:
            seconds_per_step = later_seconds / (step - start_step - 1) if step > start_step + 1 else first_seconds
            tok_s = tokens_per_step / seconds_per_step
            utilization = mfu(tok_s / world, dataclasses.asdict(model_cfg), peak) if peak else None
            log(f"step {step:>6}/{steps} | loss {loss_sum:.4f} | lr {lr:.2e} | {tok_s:,.0f} tok/s | "
                + (f"MFU {utilization:.1%} | " if peak else "") + f"eta {(steps - step) * seconds_per_step / 60:.1f} min")
            record({"step": step, "loss": loss_sum, "lr": lr, "tokens_per_s": tok_s,
                    **({"mfu": utilization} if peak else {})})
        if (cfg.eval_interval and step % cfg.eval_interval == 0) or step == steps:
            state["metrics"] = evaluate()
            log(f"eval step {step}: " + ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in state["metrics"].items()
                                                  if isinstance(v, float)))
            record({"step": step, **state["metrics"]})
        if master and (step % cfg.ckpt_interval == 0 or step == steps or step == cfg.halt_at):
            save_checkpoint(ckpt_path, checkpoint(cfg, model_cfg, data, model, optimizer, state, tokenizer))
        if step == cfg.halt_at:
            log(f"halting at step {step} (halt_at)")
            break

    if step == steps and not state["metrics"]:   # finished before a crash that came between the last checkpoint and the summary
        state["metrics"] = evaluate()
    if master and step == steps:
        summary = {"config": dataclasses.asdict(cfg), "model_config": dataclasses.asdict(model_cfg),
                   "params": model.num_params(), "steps": steps, "real_windows": mix.real.n,
                   "real_sequences_seen": steps * mix.n_real, "synthetic_sequences_seen": steps * mix.n_syn,
                   "real_tokens": len(data["real"]), "final_train_loss": state["train_loss"], **state["metrics"],
                   "train_seconds": state["train_seconds"],
                   "tokens_per_s": steps * tokens_per_step / max(state["train_seconds"], 1e-9),
                   "code": state["codes"][-1],
                   **({"code_of_earlier_segments": state["codes"][:-1]} if len(state["codes"]) > 1 else {})}
        with atomic_open(summary_path, "w") as f:
            json.dump(summary, f, indent=1)
    if wandb_run:
        wandb_run.finish()
    if ddp:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
