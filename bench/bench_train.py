"""
Benchmark train.py on the CPU demo shape: tokens/s, and the share of a step spent outside the
model's own forward, backward and optimizer step (data loading, masks' inputs, schedule, logging).

    python bench/bench_train.py                  # configs/cpu_demo.json, 100 steps, best of 3, per mask kind
    python bench/bench_train.py --steps 200 --repeats 5 --config configs/cpu_demo.json

Packs the demo's real budget and its sorted megadocs (out/bench_train/, GPT-2's first 1,024 ranks, as
the demo),
then, for each mask kind, runs train.py with m = 0.75 and reads its training tokens/s from
summary.json (evaluation and checkpoints excluded), and times the bare step on the same shape: the
same batches already in memory, forward + backward + clip + AdamW, nothing else. The difference
is what train.py adds around the model. Goal: under 5% of the step. The two are timed in turn
--repeats times and each keeps its best: on these shared machines one timing of a few seconds
varies by several percent, more than the difference being measured.

Then what train.py's keep_freed_memory() saves: --malloc_pairs times, two train.py processes side by
side as demo.py runs them (one thread each, the sorted run above with the causal mask), one as
train.py is and one with keep_freed_memory() turned off (glibc's own malloc defaults). Each prints
its training ms a step (summary.json) and its page faults a step (all of train.main's, evaluation
included); the last line is the ratio of the two step times, paired, as a geometric
mean with a t-based 95% interval. Pairs run at the same moment, so the machine's drift hits both.
"""
import contextlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import cli  # noqa: E402
import pack  # noqa: E402
import train  # noqa: E402
from evaluate import mean_interval  # noqa: E402
from formats import TokenFile  # noqa: E402
from model import GPT, GPTConfig, document_ids  # noqa: E402


def bare_step_seconds(model_cfg, cfg, tf, mask, steps):
    """Mean seconds of forward + backward + clip + AdamW on batches prepared beforehand, from a
    fresh model, first step included (as train.py's own figure)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**model_cfg))
    optimizer = torch.optim.AdamW(train.param_groups(model, train.TrainConfig(**cfg)), lr=1e-3, betas=(0.9, 0.95),
                                  fused=True)   # as train.py builds it
    B, T = cfg["batch_size"], model_cfg["block_size"]
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(4):
        starts = rng.integers(0, len(tf) - T - 1, B)
        tokens = torch.from_numpy(np.stack([tf.tokens[s: s + T + 1] for s in starts]).astype(np.int64))
        groups = torch.from_numpy(np.stack([tf.group_ids(s, T) for s in starts]))
        batches.append((tokens[:, :-1], tokens[:, 1:], groups))
    t0 = time.perf_counter()
    for i in range(steps):
        x, y, g = batches[i % len(batches)]
        _, loss = model(x, y, doc_ids=document_ids(x, tf.bos_id), group_ids=g, mask_kind=mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
    return (time.perf_counter() - t0) / steps


# one train.py run in a process of its own: argv = [setting, train.py arguments...]; prints its
# training ms a step and the page faults of train.main (evaluation included) a step, as JSON
MALLOC_CHILD = """
import json, resource, sys
import train
if sys.argv[1] == "glibc":
    train.keep_freed_memory = lambda: False   # the control: glibc's own malloc defaults
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
train.main(sys.argv[2:])
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
summary = json.load(open(sys.argv[-1] + "/summary.json"))
print(json.dumps({"ms": summary["train_seconds"] / summary["steps"] * 1e3, "faults": faults / summary["steps"]}))
"""


def malloc_pair(train_args, out_dir):
    """{setting: {"ms", "faults"}} of two train.py processes started together, one per setting."""
    procs = {}
    for setting in ("kept", "glibc"):
        run_dir = os.path.join(out_dir, setting)
        shutil.rmtree(run_dir, ignore_errors=True)
        procs[setting] = subprocess.Popen([sys.executable, "-c", MALLOC_CHILD, setting, *train_args, "--out_dir", run_dir],
                                          cwd=ROOT, stdout=subprocess.PIPE, text=True,
                                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    return {setting: json.loads(proc.communicate()[0].splitlines()[-1]) for setting, proc in procs.items()}


def main():
    ap = cli.ArgumentParser(__doc__, __file__)
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "cpu_demo.json"))
    ap.add_argument("--steps", type=int, default=100, help="training steps per timing")
    ap.add_argument("--repeats", type=int, default=3, help="timings of each side, in turn; the best counts")
    ap.add_argument("--malloc_pairs", type=int, default=8, help="pairs of runs for keep_freed_memory (0: none)")
    ap.add_argument("--out_dir", default=os.path.join(ROOT, "out", "bench_train"))
    args = ap.parse_args()
    cfg = json.load(open(args.config))
    d = os.path.join(args.out_dir, "data")
    os.makedirs(d, exist_ok=True)
    synth = os.path.join(ROOT, "sample_data", "synthetic", "rephrase.jsonl")
    sources = {json.loads(line)["source_id"] for line in open(synth)}
    with open(f"{d}/real.jsonl", "w") as f:
        f.writelines(line for line in open(os.path.join(ROOT, "sample_data", "train.jsonl"))
                     if json.loads(line)["id"] in sources)
    quiet = lambda *a: None
    common = dict(tokenizer="gpt2:1024", log=quiet)
    pack.pack(f"{d}/real.jsonl", f"{d}/real", **common)
    pack.pack(os.path.join(ROOT, "sample_data", "val.jsonl"), f"{d}/val", **common)
    pack.pack(f"{d}/real.jsonl", f"{d}/sorted", "sorted", [synth], G=4, **common)

    # the model shape as train.py resolves it (the config's preset, its overrides, the vocabulary)
    _, shape, _ = train.setup(train.load_config(["--config", args.config, "--real", f"{d}/real", "--val", f"{d}/val"]))
    # enough real epochs for --steps steps at m = 0.75 (a quarter of each batch is real)
    windows = (len(TokenFile(f"{d}/real")) - 1) // shape.block_size
    epochs = args.steps * cfg["batch_size"] // 4 / windows
    print(f"train.py on {args.config}: {shape.n_layer} layers, width {shape.n_embd}, context {shape.block_size}, "
          f"batch {cfg['batch_size']}; {args.steps} steps at m = 0.75, {torch.get_num_threads()} threads, "
          f"best of {args.repeats}")
    train_args = lambda mask: ["--config", args.config, "--real", f"{d}/real", "--synthetic", f"{d}/sorted", "--mix",
                               "0.75", "--val", f"{d}/val", "--epochs", f"{epochs:.6f}", "--mask", mask,
                               "--log_interval", "100000"]
    print(f"{'mask':<9} {'train.py tok/s':>15} {'bare step tok/s':>16} {'outside the model step':>23}")
    for mask in ("causal", "document", "megadoc"):
        out_dir = os.path.join(args.out_dir, mask)
        train_tok_s, bare_s = 0.0, float("inf")
        for _ in range(args.repeats):
            shutil.rmtree(out_dir, ignore_errors=True)
            with contextlib.redirect_stdout(io.StringIO()):   # keep the table readable
                train.main([*train_args(mask), "--out_dir", out_dir])
            s = json.load(open(os.path.join(out_dir, "summary.json")))
            train_tok_s = max(train_tok_s, s["tokens_per_s"])
            bare_s = min(bare_s, bare_step_seconds(s["model_config"], cfg, TokenFile(f"{d}/sorted"), mask, args.steps))
        tokens = cfg["batch_size"] * shape.block_size
        print(f"{mask:<9} {train_tok_s:>15,.0f} {tokens / bare_s:>16,.0f} {1 - train_tok_s * bare_s / tokens:>23.1%}")
    print("outside the model step = 1 - train.py tok/s / bare step tok/s (goal < 5%; noise can make it negative)")

    if args.malloc_pairs:
        print(f"\nkeep_freed_memory: {args.malloc_pairs} pairs of train.py processes side by side (causal, one thread each)")
        print(f"{'pair':<6}{'kept ms/step':>14}{'glibc ms/step':>15}{'kept faults/step':>18}{'glibc faults/step':>19}")
        pairs = []
        for i in range(args.malloc_pairs):
            pair = malloc_pair(train_args("causal"), os.path.join(args.out_dir, "malloc"))
            pairs.append(pair)
            print(f"{i + 1:<6}{pair['kept']['ms']:>14.1f}{pair['glibc']['ms']:>15.1f}{pair['kept']['faults']:>18,.0f}"
                  f"{pair['glibc']['faults']:>19,.0f}", flush=True)
        log_ratio, half = mean_interval([math.log(p["glibc"]["ms"] / p["kept"]["ms"]) for p in pairs])
        print(f"a step under glibc's defaults takes {math.exp(log_ratio):.3f}x as long as with keep_freed_memory "
              f"[{math.exp(log_ratio - half):.3f}, {math.exp(log_ratio + half):.3f}]")


if __name__ == "__main__":
    main()
