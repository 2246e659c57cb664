"""
bench/gpu_check.py: one prepared check of the whole CUDA path on a machine with one GPU, in at most
8 minutes, in stages ordered so that the first minutes answer "does anything crash".

    python bench/gpu_check.py                                  # on one GPU
    python bench/gpu_check.py --cpu --work_dir /tmp/gc         # the same stages on the CPU, tiny shapes (its test)

Writes: WORK_DIR (default out/gpu_check/): random token files, the runs' folders (the train
stage's train.py output in train/run.out.txt) and gpu_check.json (--out_json), rewritten atomically
after every stage: a run cut short keeps what it found. Prints one line per stage: its name, ok /
FAIL / skipped, its seconds and figures.
A stage that fails does not stop the others (a CUDA error may make the later ones fail too). Exit
code 0 if every stage is ok, 1 otherwise; a stage is skipped when the run is past --budget_s.

Stages, in this order: what could crash first, the timings last (shapes on the GPU; --cpu runs
each at tiny shapes, uncompiled but for the smoke test, flex forward only):
  env       torch and CUDA versions, the GPU, its memory and peak (evaluate.PEAK_TFLOPS), bfloat16;
            one small torch.compile'd function against eager
  train     train.py on random token files with configs/gpu_150m.json and the document mask
            (compiled, flex attention, evaluation compiled): halted at step 5, resumed to step 10 in
            a second run; the log must hold steps 1-10 once each and the summary a finite val loss
  masks     flex against SDPA for the causal, document and megadoc masks (2 layers of the 150M
            shape, 2 x 4,096 tokens, bfloat16): the loss and every gradient (on the CPU the loss)
  large_ce  model.head_cross_entropy at 8 x 4,096 rows and 128,256 classes (4.2e9 logits, past
            2^31, computed in slices), loss and gradients against F.cross_entropy summed over
            slices of 4,096 rows; its peak memory
  sampling  KV-cache sampling: greedy tokens with the cache and recomputed from scratch must be the
            same (float32, weights sharpened so that no choice is a near tie); tokens/s of
            serve.sample (bfloat16, 4 x 256 tokens)
  torchrun  train.py under torchrun with one process (NCCL; gloo on the CPU), a small model: the
            process group, DDP, the sharded evaluation
  step_150M, step_300M  configs/gpu_150m.json and paper_300m.json: their optimizer step compiled
            (grad_accum x batch_size x 4,096 tokens, --mask, default document, fused AdamW), 2
            warm-up steps then 3 timed: seconds, tokens/s, MFU, the peak memory
            (torch.cuda.max_memory_allocated) beside bench_memory.py's estimate of it (when time
            allows)
"""
import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import time
import traceback
import warnings

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import cli  # noqa: E402
import model as model_module  # noqa: E402
import serve  # noqa: E402
import train  # noqa: E402
from evaluate import mfu, peak_flops  # noqa: E402
from formats import TokenWriter, atomic_open  # noqa: E402
from model import GPT, GPTConfig, PRESETS, autocast, document_ids, head_cross_entropy  # noqa: E402

GIB = 2 ** 30
CONFIGS = {"150M": os.path.join(ROOT, "configs", "gpu_150m.json"), "300M": os.path.join(ROOT, "configs", "paper_300m.json")}
# --cpu: every model at this size (TrainConfig overrides), every token file with this vocabulary
TINY = dict(model="cpu-2x64", n_layer=1, n_embd=32, n_head=2, mlp_hidden=64, block_size=64, batch_size=2, grad_accum=2,
            eval_batch_size=2)
TINY_VOCAB = 512


def write_tokens(prefix, n_tokens, vocab, seed):
    """A token file of exactly n_tokens random tokens, in documents of up to 3,000 tokens (each its
    own source group); the last id of the vocabulary is BOS."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    with TokenWriter(prefix, vocab, bos_id=vocab - 1) as w:
        written, doc = 0, 0
        while written < n_tokens:
            n = min(int(rng.integers(50, 3000)), n_tokens - written - 1)
            w.add(0, doc, [rng.integers(0, vocab - 1, n, dtype=np.int64)])
            written, doc = written + n + 1, doc + 1


def model_shape(ctx, preset, **overrides):
    """A GPTConfig: the preset with overrides on the GPU, the tiny shape with its vocabulary on the CPU."""
    if ctx.cpu:
        overrides = dict(n_layer=1, n_embd=32, n_head=2, n_kv_head=2, mlp_hidden=64, vocab_size=TINY_VOCAB,
                         block_size=overrides.get("block_size", 64))
        preset = "cpu-2x64"
    return GPTConfig.from_preset(preset, **overrides)


def flags(values):
    return [x for k, v in values.items() for x in (f"--{k}", str(v).lower() if isinstance(v, bool) else str(v))]


def synchronize(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def batch(vocab, B, T, device, seed=0):
    """Random (B, T) inputs and targets with documents (BOS every few hundred tokens) and groups."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab - 1, (B, T + 1), generator=g)
    tokens[torch.rand(B, T + 1, generator=g) < 1 / 300] = vocab - 1   # BOS
    x, y = tokens[:, :-1].to(device), tokens[:, 1:].to(device)
    doc = document_ids(x, vocab - 1)
    return x, y, doc, doc // 2   # a group: two consecutive documents


# -----------------------------------------------------------------------------
# the stages: each returns its figures (a dict) or raises


def stage_env(ctx):
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": ctx.device}
    if ctx.cuda:
        info.update(gpu=torch.cuda.get_device_name(0), capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                    memory_gib=round(torch.cuda.get_device_properties(0).total_memory / GIB, 1),
                    bf16=torch.cuda.is_bf16_supported(),
                    peak_tflops=(peak_flops(ctx.device) or 0) / 1e12 or None)
    f = lambda x: torch.nn.functional.silu(x) * x.sum(-1, keepdim=True)
    x = torch.randn(64, 64, device=ctx.device)
    compiled = torch.compile(f)(x)
    assert torch.allclose(compiled, f(x), atol=1e-4), "torch.compile's output differs from eager"
    info["compile"] = "ok"
    return info


def stage_train(ctx):
    d = os.path.join(ctx.work_dir, "train")
    vocab = TINY_VOCAB if ctx.cpu else PRESETS["150M"]["vocab_size"]
    cfg = train.load_config(["--config", CONFIGS["150M"], *flags(TINY if ctx.cpu else {})])
    windows = cfg.batch_size * cfg.grad_accum   # one epoch = one step: 10 epochs = 10 steps
    write_tokens(f"{d}/real", windows * cfg.block_size + 1, vocab, seed=0)
    write_tokens(f"{d}/val", 2 * cfg.eval_batch_size * cfg.block_size + 1, vocab, seed=1)
    run = os.path.join(d, "run")
    argv = ["--config", CONFIGS["150M"], *flags(TINY if ctx.cpu else {}), "--real", f"{d}/real", "--val", f"{d}/val",
            "--epochs", "10", "--mask", "document", "--log_interval", "1", "--eval_interval", "0",
            "--device", ctx.device, "--out_dir", run, *(["--compile", "false"] if ctx.cpu else [])]
    with open(f"{run}.out.txt", "w") as out, contextlib.redirect_stdout(out):   # train.py's own lines
        train.main(argv + ["--halt_at", "5"])
        train.main(argv)
    log = [json.loads(line) for line in open(os.path.join(run, "log.jsonl"))]
    losses = {r["step"]: r for r in log if "loss" in r}
    assert sorted(losses) == list(range(1, 11)) and len([r for r in log if "loss" in r]) == 10, \
        f"the log's steps are {[r['step'] for r in log if 'loss' in r]}, not 1-10 once each"
    summary = json.load(open(os.path.join(run, "summary.json")))
    assert math.isfinite(summary["val_loss"]) and all(math.isfinite(r["loss"]) for r in losses.values())
    return {"loss_step_1": losses[1]["loss"], "loss_step_10": losses[10]["loss"], "val_loss": summary["val_loss"],
            "tokens_per_s": losses[10]["tokens_per_s"], "mfu": losses[10].get("mfu")}


def stage_masks(ctx):
    B, T = (2, 64) if ctx.cpu else (2, 4096)
    shape = model_shape(ctx, "150M", n_layer=2, vocab_size=32768, block_size=T)
    torch.manual_seed(0)
    model = GPT(shape).to(ctx.device)
    x, y, doc, group = batch(shape.vocab_size, B, T, ctx.device)
    out = {}
    # (on the CPU flex runs uncompiled, forward only, and says so in a long warning for each mask)
    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    for mask in model_module.MASK_KINDS:
        results = {}
        for impl in ("flex", "sdpa"):
            model.zero_grad(set_to_none=True)
            with torch.set_grad_enabled(ctx.cuda), autocast(ctx.device):
                _, loss = model(x, y, doc_ids=doc, group_ids=group, mask_kind=mask, attn_impl=impl)
            if ctx.cuda:
                loss.backward()
            results[impl] = (loss.item(), [p.grad.float().clone() for p in model.parameters()] if ctx.cuda else [])
        (flex, flex_grads), (sdpa, sdpa_grads) = results["flex"], results["sdpa"]
        grad_error = max((torch.linalg.norm(a - b) / torch.linalg.norm(b)).item() for a, b in zip(flex_grads, sdpa_grads)) \
            if ctx.cuda else None
        out[mask] = {"loss_flex": flex, "loss_sdpa": sdpa, "max_relative_grad_error": grad_error}
        assert abs(flex - sdpa) < (2e-2 if ctx.cuda else 1e-5), f"{mask}: flex loss {flex} vs SDPA {sdpa}"
        assert grad_error is None or grad_error < 5e-2, f"{mask}: gradients differ by {grad_error:.3g} (relative)"
    return out


def stage_large_ce(ctx):
    N, C, V = (64, 16, 50) if ctx.cpu else (8 * 4096, 512, PRESETS["150M"]["vocab_size"])
    reference_rows = 7 if ctx.cpu else 4096
    saved = model_module.CE_PIECE_ELEMENTS
    if ctx.cpu:
        model_module.CE_PIECE_ELEMENTS = 9 * V   # several slices, as 2^29 gives at the real shape
    try:
        g = torch.Generator(device=ctx.device).manual_seed(0)
        rows = torch.randn(N, C, device=ctx.device, generator=g, requires_grad=True)
        weight = (torch.randn(V, C, device=ctx.device, generator=g) * 0.05).requires_grad_()
        targets = torch.randint(0, V, (N,), device=ctx.device, generator=g)
        targets[::97] = -1
        if ctx.cuda:
            torch.cuda.reset_peak_memory_stats()
        with autocast(ctx.device):
            loss = head_cross_entropy(rows, weight, targets)
        loss.backward()
        synchronize(ctx.device)
        peak = torch.cuda.max_memory_allocated() / GIB if ctx.cuda else None
        grads = rows.grad.clone(), weight.grad.clone()
        rows.grad = weight.grad = None
        total = 0.0
        for i in range(0, N, reference_rows):   # the reference: F.cross_entropy of small slices, summed
            with autocast(ctx.device):
                part = torch.nn.functional.cross_entropy(torch.nn.functional.linear(rows[i:i + reference_rows], weight).float(),
                                                         targets[i:i + reference_rows], ignore_index=-1, reduction="sum")
            (part / (targets != -1).sum()).backward()
            total += part.item()
        reference = total / (targets != -1).sum().item()
        error = max((torch.linalg.norm(a - b.grad) / torch.linalg.norm(b.grad)).item() for a, b in zip(grads, (rows, weight)))
    finally:
        model_module.CE_PIECE_ELEMENTS = saved
    assert abs(loss.item() - reference) < 1e-4 * abs(reference), f"loss {loss.item()} vs reference {reference}"
    assert error < 1e-2, f"gradients differ from the reference by {error:.3g} (relative)"
    return {"logits_elements": N * V, "loss": loss.item(), "reference": reference, "max_relative_grad_error": error,
            "peak_memory_gib": peak}


def step_stage(name):
    def stage(ctx):
        cfg = train.load_config(["--config", CONFIGS[name], *flags(TINY if ctx.cpu else {})])
        model_cfg = train.model_config(cfg, TINY_VOCAB if ctx.cpu else PRESETS[cfg.model]["vocab_size"])
        torch.manual_seed(0)
        model = GPT(model_cfg).to(ctx.device)
        optimizer = torch.optim.AdamW(train.param_groups(model, cfg), lr=cfg.lr, fused=True)
        run = torch.compile(model) if cfg.compile and not ctx.cpu else model
        T = model_cfg.block_size
        micro = [batch(model_cfg.vocab_size, cfg.batch_size, T, ctx.device, seed=i) for i in range(cfg.grad_accum)]

        def step():
            for x, y, doc, group in micro:
                with autocast(ctx.device):
                    _, loss = run(x, y, doc_ids=doc, group_ids=group, mask_kind=ctx.mask)
                    (loss / cfg.grad_accum).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss

        t0 = time.time()
        for _ in range(2):
            step()
        synchronize(ctx.device)
        warmup = time.time() - t0
        if ctx.cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        for _ in range(3):
            loss = step()
        loss = loss.item()
        seconds = (time.time() - t0) / 3
        tok_s = cfg.grad_accum * cfg.batch_size * T / seconds
        peak = peak_flops(ctx.device)
        out = {"compiled": run is not model, "mask": ctx.mask, "tokens_per_step": cfg.grad_accum * cfg.batch_size * T,
               "warmup_seconds": warmup, "seconds_per_step": seconds, "tokens_per_s": tok_s,
               "mfu": mfu(tok_s, vars(model_cfg), peak) if peak else None,
               "peak_memory_gib": torch.cuda.max_memory_allocated() / GIB if ctx.cuda else None, "loss": loss}
        if time.time() - ctx.start < ctx.budget_s - 60:   # bench_memory's estimate of the same step, when time allows
            sys.path.insert(0, os.path.join(ROOT, "bench"))
            import bench_memory
            estimate = bench_memory.fake_run(cfg, model_cfg, compiled=run is not model, peak_flops=989e12, bandwidth=3.35e12)
            out["estimated_peak_memory_gib"] = estimate["step"] / GIB
        assert math.isfinite(loss), f"loss {loss}"
        return out
    return stage


def stage_sampling(ctx):
    shape = model_shape(ctx, "150M", block_size=512)
    torch.manual_seed(0)
    model = GPT(shape).to(ctx.device).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)   # sharp distributions: greedy choices are not near ties
    prompt = torch.randint(0, shape.vocab_size, (2, 16), device=ctx.device)
    cached, recomputed = (model.generate(prompt, 48, temperature=0, use_cache=use) for use in (True, False))
    same = (cached == recomputed).all(dim=0)
    first_difference = None if same.all() else int((~same).nonzero()[0]) - prompt.size(1)
    vocab = shape.vocab_size - 1   # the last id is the stop id, and is never sampled: every choice runs to length
    n, tokens = (2, 64) if ctx.cpu else (4, 256)
    synchronize(ctx.device)
    t0 = time.time()
    out = serve.sample(model, [0] * 16, n, tokens, 1.0, None, 0, vocab, ctx.device, vocab_size=vocab)
    synchronize(ctx.device)
    seconds = time.time() - t0
    assert all(len(t) == tokens for t, _ in out)
    assert first_difference is None, f"cached and recomputed greedy tokens differ from new token {first_difference} on"
    return {"cached_equals_recomputed": True, "sample_tokens_per_s": n * tokens / seconds}


def stage_torchrun(ctx):
    d = os.path.join(ctx.work_dir, "torchrun")
    small = dict(TINY, batch_size=2, grad_accum=2, block_size=256 if ctx.cuda else 64)
    vocab = TINY_VOCAB
    write_tokens(f"{d}/real", 8 * small["block_size"] + 1, vocab, seed=2)
    write_tokens(f"{d}/val", 4 * small["block_size"] + 1, vocab, seed=3)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           os.path.join(ROOT, "train.py"), *flags(small), "--real", f"{d}/real", "--val", f"{d}/val", "--epochs", "2",
           "--device", ctx.device, "--out_dir", f"{d}/run"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, f"exit code {r.returncode}: {r.stderr.strip().splitlines()[-1:] or ''}"
    summary = json.load(open(f"{d}/run/summary.json"))
    assert math.isfinite(summary["val_loss"])
    return {"backend": "nccl" if ctx.cuda else "gloo", "steps": summary["steps"], "val_loss": summary["val_loss"]}


# the checks of what could crash first, the timings (which compile the largest graphs) last
STAGES = [("env", stage_env), ("train", stage_train), ("masks", stage_masks), ("large_ce", stage_large_ce),
          ("sampling", stage_sampling), ("torchrun", stage_torchrun), ("step_150M", step_stage("150M")),
          ("step_300M", step_stage("300M"))]


def line(name, result):
    figures = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()
                        if k not in ("status", "seconds", "error") and not isinstance(v, dict) and v is not None)
    nested = "; ".join(f"{k}: " + ", ".join(f"{a} {b:.4g}" if isinstance(b, float) else f"{a} {b}"
                                            for a, b in v.items() if b is not None)
                       for k, v in result.items() if isinstance(v, dict))
    detail = result.get("error") or "; ".join(x for x in (figures, nested) if x)
    return f"{name:<10} {result['status']:<7} {result['seconds']:>6.1f}s  {detail}"


def main(argv=None):
    ap = cli.ArgumentParser(__doc__, __file__)
    ap.add_argument("--cpu", action="store_true", help="run every stage on the CPU at tiny shapes (the test)")
    ap.add_argument("--work_dir", default=os.path.join(ROOT, "out", "gpu_check"), help="token files and runs go here")
    ap.add_argument("--out_json", default="", help="the results (default: WORK_DIR/gpu_check.json)")
    ap.add_argument("--budget_s", type=float, default=480, help="stages that would start later than this are skipped")
    ap.add_argument("--mask", default="document", choices=model_module.MASK_KINDS, help="the timed steps' mask")
    ap.add_argument("--stages", nargs="+", default=[name for name, _ in STAGES], choices=[name for name, _ in STAGES],
                    help="run only these stages (in the order above)")
    args = ap.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        cli.fail("no CUDA device here: run on a machine with a GPU, or with --cpu for the tiny-shape check")
    ctx = argparse.Namespace(cpu=args.cpu, cuda=not args.cpu, device="cpu" if args.cpu else "cuda", mask=args.mask,
                             work_dir=args.work_dir, budget_s=args.budget_s, start=time.time())
    os.makedirs(args.work_dir, exist_ok=True)
    out_json = args.out_json or os.path.join(args.work_dir, "gpu_check.json")
    report = {"argv": sys.argv[1:] if argv is None else list(argv), "device": ctx.device, "stages": {}}
    print(f"gpu_check on {ctx.device}: {len(args.stages)} stages, budget {args.budget_s:g} s; results in {out_json}")
    for name, stage in STAGES:
        if name not in args.stages:
            continue
        t0 = time.time()
        if t0 - ctx.start > args.budget_s:
            result = {"status": "skipped", "error": f"past the budget of {args.budget_s:g} s"}
        else:
            try:
                result = {"status": "ok", **stage(ctx)}
            except (Exception, SystemExit) as e:   # one stage's failure (train.py's exit too) is its result; the next run
                result = {"status": "FAIL", "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e) else ''}",
                          "traceback": traceback.format_exc()[-4000:]}
        result["seconds"] = time.time() - t0
        report["stages"][name] = result
        report["total_seconds"] = time.time() - ctx.start
        print(line(name, {k: v for k, v in result.items() if k != "traceback"}), flush=True)
        with atomic_open(out_json, "w") as f:
            json.dump(report, f, indent=1)
    failed = [name for name, r in report["stages"].items() if r["status"] != "ok"]
    print(f"total {report['total_seconds']:.1f} s: " + (f"not ok: {', '.join(failed)}" if failed else "every stage ok"))
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
