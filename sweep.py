r"""
sweep.py: the paper's tuning, as a grid of train.py runs over any of epochs, mix, weight decay and lr.

    python sweep.py --out_dir out/sweep/sorted --epochs 1 2 4 --mix 0.5 0.75 --weight_decay 0.1 0.4 0.8 \
        -- --config configs/cpu_demo.json --real out/demo/data/real --synthetic out/demo/data/sorted \
           --val out/demo/data/val
    (everything after -- goes to every train.py run as it is; a mix of 0 drops --synthetic for that run)

The grid is over the axes given before --, and only those: each run gets its point's value of each
of them, and every other setting is what the arguments after -- (and their --config) make it. An
axis given both before and after -- is an error.

Reads:  whatever train.py reads.
Writes: OUT_DIR/<name>/ (one train.py out_dir per point of the grid; <name> is each swept axis and
        its value, e.g. epochs2_mix0.75 for a sweep over --epochs and --mix) and OUT_DIR/sweep.md
        (the table, the verdict and the code the runs ran: git commit, and whether modified).

A configuration whose summary.json exists is finished and is not run again, so an interrupted or
extended sweep picks up where it stopped (an unfinished run resumes from its own checkpoint).
At the end it prints every configuration's i.i.d. loss, the best one, and whether the best is
locally optimal: every one-step neighbour in every swept axis was run and is worse.
A best configuration on the edge of the grid has a missing neighbour: extend the grid that way.
Exit codes (cli.py): 0 done; 2 bad flags, or a run that stopped with train.py's one-line error;
1 a run that failed with a traceback (its log's last lines are printed first).

run_all() is also how demo.py runs its trainings: `jobs` worker processes run train.py's main()
one run after another, each with `threads` torch threads (on a small CPU model two one-thread runs
side by side finish sooner than two two-thread runs one after the other). It prints a line per
finished run with the time elapsed and an ETA.
"""
import contextlib
import itertools
import json
import multiprocessing
import os
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed

import cli
from evaluate import markdown_table
from formats import atomic_open

AXES = ("epochs", "mix", "weight_decay", "lr")


def finished(out_dir):
    path = os.path.join(out_dir, "summary.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return None


def train_in_worker(out_dir, args):
    """One train.py run inside a worker process (train.py is imported once per worker, not once
    per run: that saves the 1.5 s of importing torch each time). Its output goes to
    OUT_DIR/train.log. Returns train.py's exit status (cli.py): 0, 2 for its one-line error, 1 for
    a traceback."""
    import train
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "train.log"), "a") as f, contextlib.redirect_stdout(f), \
            contextlib.redirect_stderr(f):
        try:
            train.main([*args, "--out_dir", out_dir])
        except SystemExit as e:        # train.py's one-line errors (printed to the log already)
            return e.code if isinstance(e.code, int) else cli.INCOMPLETE
        except Exception:              # a bug: keep its traceback in the log
            traceback.print_exc()
            return cli.INCOMPLETE
    return cli.OK


def set_threads(threads):
    import torch
    torch.set_num_threads(threads)


def last_lines(path, n=15):
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-n:])


class RunFailed(RuntimeError):
    """A train.py run of run_all stopped: its out_dir, exit status and the last lines of its log."""

    def __init__(self, out_dir, status):
        self.out_dir, self.status, self.log = out_dir, status, os.path.join(out_dir, "train.log")
        self.last_lines = last_lines(self.log)
        super().__init__(f"train.py failed for {out_dir} (exit status {status}); the last lines of {self.log}:\n"
                         + self.last_lines)


def run_all(runs, jobs=1, threads=None, cost=None, later=0.0, log=print, started=None):
    """runs: {out_dir: [train.py arguments]}. Runs what is not finished (and checks that what is was
    run with these arguments and data), `jobs` at a time, each with
    `threads` torch threads; returns {out_dir: summary}. cost: {out_dir: relative cost} (e.g. tokens
    to train) for the ETA and to start the longest runs first; by default all runs cost the same.
    later: the cost of work that will follow these runs, counted in the ETA. started: the time.time()
    the elapsed time counts from (default: now), for a caller that calls run_all more than once. A
    failed run stops everything: a RunFailed with its log's last lines and its exit status."""
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    cost = cost or {}
    todo = sorted((d for d in runs if finished(d) is None), key=lambda d: -cost.get(d, 1))
    # a finished run goes to train.py too: it says "already finished" in a fraction of a second, or
    # refuses (exit 2, naming the difference) when the folder holds a run of other settings or data,
    # which would otherwise be taken for this one
    done_before = [d for d in runs if d not in todo]
    log(f"{len(todo)} of {len(runs)} runs to do ({len(done_before)} already finished: their settings are checked), "
        f"{jobs} at a time")
    total = sum(cost.get(d, 1) for d in todo)
    t0, done, i = time.time(), 0.0, 0
    context = multiprocessing.get_context("spawn")   # a fresh interpreter per worker: no forked torch state
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=set_threads if threads else None,
                             initargs=(threads,) if threads else ()) as pool:
        futures = {pool.submit(train_in_worker, d, runs[d]): d for d in done_before + todo}
        for future in as_completed(futures):
            out_dir = futures[future]
            status = future.result()
            if status != cli.OK:
                for f in futures:
                    f.cancel()
                raise RunFailed(out_dir, status)
            if out_dir in done_before:
                continue
            i += 1
            done += cost.get(out_dir, 1)
            rate = (time.time() - t0) / done   # seconds per unit of cost, in this call
            s = finished(out_dir)
            log(f"  [{i}/{len(todo)}] {os.path.relpath(out_dir)}: val loss {s['val_loss']:.4f} | elapsed "
                f"{(time.time() - (started or t0)) / 60:.1f} min | ETA {rate * (total + later - done) / 60:.1f} min")
    return {d: finished(d) for d in runs}


def run_name(config):
    """The folder name of a point of the grid: each swept axis and its value, e.g. epochs2_mix0.75."""
    return "_".join(f"{k}{config[k]:g}" for k in AXES if k in config)


def local_optimum(best, losses, grid):
    """(is locally optimal, reasons): each one-step neighbour of `best` in every axis must have
    been run and be worse."""
    reasons = []
    for axis in grid:
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


def code_line(summaries):
    """The code the runs ran (summary.json's "code"), for sweep.md."""
    codes = sorted({(s["code"]["commit"] or "not a git checkout") + (" (modified)" if s["code"]["modified"] else "")
                    for s in summaries if "code" in s})
    return "code: " + ("; ".join(codes) if codes else "not recorded")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    ap = cli.ArgumentParser(__doc__, __file__)
    ap.add_argument("--out_dir", required=True, help="one train.py out_dir per configuration goes in here")
    ap.add_argument("--epochs", type=float, nargs="+", help="real epochs to try")
    ap.add_argument("--mix", type=float, nargs="+", help="synthetic fractions m to try")
    ap.add_argument("--weight_decay", type=float, nargs="+", help="weight decays to try")
    ap.add_argument("--lr", type=float, nargs="+", help="peak learning rates to try")
    ap.add_argument("--jobs", type=int, default=1, help="train.py runs at a time (>= 1)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    args = ap.parse_args(argv[:split])
    if args.jobs < 1:
        ap.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.threads < 0:
        ap.error(f"--threads must be >= 0, got {args.threads}")
    train_args = argv[split + 1:]
    grid = {axis: sorted(set(getattr(args, axis))) for axis in AXES if getattr(args, axis) is not None}
    if not grid:
        ap.error("give at least one axis to sweep: " + ", ".join(f"--{a}" for a in AXES))
    for axis in grid:   # a value after -- would be overridden for every run: say so instead
        if any(a == f"--{axis}" or a.startswith(f"--{axis}=") for a in train_args):
            ap.error(f"--{axis} is given both as an axis of the sweep and among the train.py arguments after --")
    if any(m > 0 for m in grid.get("mix", [])) and "--synthetic" not in train_args:
        ap.error("a --mix > 0 needs --synthetic among the train.py arguments (after --)")

    runs, configs = {}, {}
    for values in itertools.product(*grid.values()):
        config = dict(zip(grid, values))
        extra = list(train_args)
        if config.get("mix") == 0 and "--synthetic" in extra:   # real only: no synthetic stream
            i = extra.index("--synthetic")
            del extra[i: i + 2]
        out_dir = os.path.join(args.out_dir, run_name(config))
        runs[out_dir] = extra + [x for a in config for x in (f"--{a}", f"{config[a]:g}")]
        configs[out_dir] = config
    try:
        summaries = run_all(runs, jobs=args.jobs, threads=args.threads or None)
    except RunFailed as e:
        print(f"the last lines of {e.log}:\n" + "".join(f"    {line}\n" for line in e.last_lines.splitlines()),
              file=sys.stderr, end="")
        cli.fail(f"train.py failed for {e.out_dir} (its log ends as above)",
                 code=e.status if e.status == cli.USER_ERROR else cli.INCOMPLETE)

    losses = {run_name(configs[d]): s["val_loss"] for d, s in summaries.items()}
    rows = sorted(((configs[d], s) for d, s in summaries.items()), key=lambda cs: cs[1]["val_loss"])
    best = rows[0][0]
    # every run's actual values, swept or not (those not swept come from the arguments after --)
    table = markdown_table(["epochs", "mix", "weight decay", "lr", "steps", "i.i.d. loss"],
                           [[f"{s['config'][a]:g}" for a in AXES] + [s["steps"], f"{s['val_loss']:.4f}"]
                            for c, s in rows])
    ok, reasons = local_optimum(best, losses, grid)
    verdict = (f"best: {run_name(best)} (i.i.d. loss {losses[run_name(best)]:.4f}); " +
               ("locally optimal: every one-step neighbour was run and is worse" if ok
                else "NOT shown locally optimal: " + "; ".join(reasons)))
    report = table + "\n\n" + verdict + "\n\n" + code_line(summaries.values())
    print(report)
    with atomic_open(os.path.join(args.out_dir, "sweep.md"), "w") as f:
        f.write(report + "\n")


if __name__ == "__main__":
    main()
