"""
Benchmark train.py on the CPU demo shape: tokens/s, and where a training step's time goes.

    python bench/bench_train.py                  # configs/cpu_demo.json, 40 steps per mask kind
    python bench/bench_train.py --steps 100 --config configs/cpu_demo.json

Packs the demo's real budget and its sorted megadocs (out/bench_train/, GPT-2's first 8,192 ranks),
then runs train.py with m = 0.75 for each mask kind and reads the step-time shares that train.py
records in summary.json: data loading, forward + backward (the attention mask is built inside the
forward pass; its own cost is timed separately below), optimizer, and everything else (schedule,
logging). Goal: time outside forward/backward under 5% of the step.
"""
import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import pack  # noqa: E402
import train  # noqa: E402
from model import GPT, GPTConfig, document_ids  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "cpu_demo.json"))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out", default=os.path.join(ROOT, "out", "bench_train"))
    args = ap.parse_args()
    cfg = json.load(open(args.config))
    d = os.path.join(args.out, "data")
    os.makedirs(d, exist_ok=True)
    synth = os.path.join(ROOT, "sample_data", "synthetic", "rephrase.jsonl")
    sources = {json.loads(l)["source_id"] for l in open(synth)}
    with open(f"{d}/real.jsonl", "w") as f:
        f.writelines(l for l in open(os.path.join(ROOT, "sample_data", "train.jsonl")) if json.loads(l)["id"] in sources)
    quiet = lambda *a: None
    common = dict(tokenizer="gpt2:8192", log=quiet)
    pack.pack(f"{d}/real.jsonl", f"{d}/real", **common)
    pack.pack(os.path.join(ROOT, "sample_data", "val.jsonl"), f"{d}/val", **common)
    pack.pack(f"{d}/real.jsonl", f"{d}/sorted", "sorted", [synth], G=4, **common)

    # enough real epochs for --steps steps at m = 0.75 (2 real windows per batch of 8)
    windows = (len(pack.TokenFile(f"{d}/real")) - 1) // cfg["block_size"]
    epochs = args.steps * 2 / windows
    print(f"train.py on {args.config}: {cfg['n_layer']} layers, width {cfg['n_embd']}, context {cfg['block_size']}, "
          f"batch {cfg['batch_size']}, vocabulary 8256; {args.steps} steps at m = 0.75, {torch.get_num_threads()} threads")
    print(f"{'mask':<9} {'tokens/s':>9} {'data':>7} {'fwd+bwd':>8} {'optim':>7} {'other':>7} {'outside fwd/bwd':>16} {'mask build':>11}")
    for mask in ("causal", "document", "megadoc"):
        out_dir = os.path.join(args.out, mask)
        shutil.rmtree(out_dir, ignore_errors=True)
        with contextlib.redirect_stdout(io.StringIO()):   # keep the table readable
            train.main(["--config", args.config, "--real", f"{d}/real", "--synthetic", f"{d}/sorted", "--mix", "0.75",
                        "--val", f"{d}/val", "--epochs", f"{epochs:.6f}", "--mask", mask, "--log_interval", "100000",
                        "--out_dir", out_dir])
        s = json.load(open(os.path.join(out_dir, "summary.json")))
        shares = s["step_time_shares"]
        other = 1 - sum(shares.values())
        outside = shares["data"] + other
        # the mask's own cost: build it for one batch of the same shape, as forward does
        model_cfg = GPTConfig(**s["model_config"])
        model = GPT(model_cfg)
        x = torch.from_numpy(pack.TokenFile(f"{d}/sorted").tokens[: cfg["batch_size"] * cfg["block_size"]]
                             .astype("int64")).view(cfg["batch_size"], -1)
        groups = torch.zeros_like(x)
        t0 = time.perf_counter()
        for _ in range(20):
            model.build_mask(mask, document_ids(x, 8192), groups, *x.shape, x.device, "sdpa")
        mask_ms = (time.perf_counter() - t0) / 20 * 1e3
        step_ms = 1e3 * cfg["batch_size"] * cfg["block_size"] / s["tokens_per_s"]
        print(f"{mask:<9} {s['tokens_per_s']:>9,.0f} {shares['data']:>7.1%} {shares['forward_backward']:>8.1%} "
              f"{shares['optimizer']:>7.1%} {other:>7.1%} {outside:>16.1%} {mask_ms:>7.2f} ms ({mask_ms / step_ms:.1%})")
    print("outside fwd/bwd = data + other (goal < 5%); the mask build is inside fwd+bwd, shown as a share of the step")


if __name__ == "__main__":
    main()
