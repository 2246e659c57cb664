"""
sweep.py: the paper's tuning, as a grid of train.py runs: epochs x mix x weight decay (x lr).

    python sweep.py --out out/sweep/sorted --epochs 1 2 4 --mix 0.5 0.75 --weight_decay 0.1 0.4 0.8 \
        -- --config configs/cpu_demo.json --real out/demo/data/real --synthetic out/demo/data/sorted \
           --val out/demo/data/val
    (everything after -- goes to every train.py run; a mix of 0 drops --synthetic for that run)

Reads:  whatever train.py reads.
Writes: OUT/<epochs>_<mix>_<wd>_<lr>/ (one train.py out_dir per configuration) and OUT/sweep.md.

A configuration whose summary.json exists is finished and is not run again, so an interrupted or
extended sweep picks up where it stopped (an unfinished run resumes from its own checkpoint).
At the end it prints every configuration's i.i.d. loss, the best one, and whether the best is
locally optimal: every one-step neighbour in every coordinate of the grid was run and is worse.
A best configuration on the edge of the grid has a missing neighbour: extend the grid that way.

run_all() is also how demo.py runs its trainings: each run is a train.py subprocess, `jobs` at a
time, each with `threads` torch threads (on a small CPU model two one-thread runs side by side
finish sooner than two two-thread runs one after the other).
"""
import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from evaluate import markdown_table

HERE = os.path.dirname(os.path.abspath(__file__))
AXES = ("epochs", "mix", "weight_decay", "lr")


def finished(out_dir):
    path = os.path.join(out_dir, "summary.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return None


def run_all(runs, jobs=1, threads=None, log=print):
    """runs: {out_dir: [train.py arguments]}. Runs what is not finished; returns {out_dir: summary}."""
    todo = [(d, a) for d, a in runs.items() if finished(d) is None]
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    if todo:
        log(f"{len(todo)} of {len(runs)} runs to do ({len(runs) - len(todo)} already finished), {jobs} at a time")
    t0 = time.time()

    def one(item):
        out_dir, args = item
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "train.log"), "a") as logf:
            code = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), *args, "--out_dir", out_dir],
                                  stdout=logf, stderr=subprocess.STDOUT, env=env).returncode
        if code != 0:
            raise RuntimeError(f"train.py failed for {out_dir} (exit {code}); see {out_dir}/train.log")
        s = finished(out_dir)
        log(f"  done {out_dir}: val loss {s['val_loss']:.4f} ({s['train_seconds']:.0f}s training; {time.time() - t0:.0f}s elapsed)")
        return s

    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(one, todo))
    return {d: finished(d) for d in runs}


def run_name(config):
    return "_".join(f"{k}{config[k]:g}" for k in AXES)


def local_optimum(best, losses, grid):
    """(is locally optimal, reasons): each one-step neighbour of `best` in every axis must have
    been run and be worse."""
    reasons = []
    for axis in AXES:
        values = grid[axis]
        i = values.index(best[axis])
        for j in (i - 1, i + 1):
            if not 0 <= j < len(values):
                if len(values) > 1:
                    reasons.append(f"{axis} = {best[axis]:g} is on the edge of the grid")
                continue
            neighbour = run_name(dict(best, **{axis: values[j]}))
            if neighbour not in losses:
                reasons.append(f"neighbour {neighbour} was not run")
            elif losses[neighbour] <= losses[run_name(best)]:
                reasons.append(f"neighbour {neighbour} is as good or better")
    return not reasons, reasons


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--epochs", type=float, nargs="+", default=[1.0])
    ap.add_argument("--mix", type=float, nargs="+", default=[0.0])
    ap.add_argument("--weight_decay", type=float, nargs="+", default=[0.1])
    ap.add_argument("--lr", type=float, nargs="+", default=[3e-3])
    ap.add_argument("--jobs", type=int, default=1, help="train.py runs at a time")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    args = ap.parse_args(argv[:split])
    train_args = argv[split + 1:]
    grid = {axis: sorted(getattr(args, axis)) for axis in AXES}
    if any(m > 0 for m in grid["mix"]) and "--synthetic" not in train_args:
        ap.error("a mix > 0 needs --synthetic among the train.py arguments (after --)")

    runs, configs = {}, {}
    for values in itertools.product(*(grid[a] for a in AXES)):
        config = dict(zip(AXES, values))
        extra = list(train_args)
        if config["mix"] == 0 and "--synthetic" in extra:   # real only: no synthetic stream
            i = extra.index("--synthetic")
            del extra[i: i + 2]
        out_dir = os.path.join(args.out, run_name(config))
        runs[out_dir] = extra + [x for a in AXES for x in (f"--{a}", f"{config[a]:g}")]
        configs[out_dir] = config
    summaries = run_all(runs, jobs=args.jobs, threads=args.threads or None)

    losses = {run_name(configs[d]): s["val_loss"] for d, s in summaries.items()}
    rows = sorted(((configs[d], s) for d, s in summaries.items()), key=lambda cs: cs[1]["val_loss"])
    best = rows[0][0]
    table = markdown_table(["epochs", "mix", "weight decay", "lr", "steps", "i.i.d. loss"],
                           [[f"{c['epochs']:g}", f"{c['mix']:g}", f"{c['weight_decay']:g}", f"{c['lr']:g}",
                             s["steps"], f"{s['val_loss']:.4f}"] for c, s in rows])
    ok, reasons = local_optimum(best, losses, grid)
    verdict = (f"best: {run_name(best)} (i.i.d. loss {losses[run_name(best)]:.4f}); " +
               ("locally optimal: every one-step neighbour was run and is worse" if ok
                else "NOT shown locally optimal: " + "; ".join(reasons)))
    print(table + "\n\n" + verdict)
    with open(os.path.join(args.out, "sweep.md"), "w") as f:
        f.write(table + "\n\n" + verdict + "\n")


if __name__ == "__main__":
    main()
