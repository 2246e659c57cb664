r"""
demo.py: the whole study at toy scale, on sample_data/, on a CPU, end to end.

    python demo.py            # about 17 minutes on 2 CPU cores; writes out/demo/
    python demo.py --quick    # one seed, smaller grids: a first look in about 5 minutes

Reads:  sample_data/train.jsonl, val.jsonl, long.jsonl and sample_data/synthetic/*.jsonl.
Writes: out/demo/data/ (token files), out/demo/runs/ (one train.py run each), out/demo/results.md
        (the tables printed at the end) and out/demo/*.png (figures, if matplotlib is installed).
Rerunning skips every finished run, so an interrupted demo continues where it stopped.

The setting: a fixed budget of real text, a model that can memorize it, and many epochs, so that
real data, not compute, limits the loss (the paper's regime, scaled down). The numbers below were
chosen from measured runs on 2 CPU cores (docs/demo_design.md has the measurements):
  real budget   the 160 Jargon File entries that have written rephrases and latent thoughts:
                39,159 tokens with GPT-2's first 1,024 ranks as the vocabulary (a small vocabulary
                moves compute from the output head into the transformer)
  model         configs/cpu_demo.json: 2 layers, width 64, 2 heads, context 1,024 (the median
                megadoc of 5 documents is 1,290 tokens), 240k parameters; batch 4 x 1,024, lr 6e-3
                with 20% warmup, cosine. Past 16 epochs it overfits the budget.
  held out      sample_data/val.jsonl split in two by a hash of the id: "val" (tuning: every
                choice below is made on it) and "test" (every final number is measured on it)
  recipes       real      real documents only; grid: epochs {4, 8, 16, 32} x weight decay
                          {0.1, 1.0} (wd 0.1 with 3 seeds at every point: the overfitting curve)
                shuffled  rephrases (G = 4) as separate documents, m = 0.75
                sorted    the same rephrases as megadocs, real document last, m = 0.75
                latent    documents stretched with G = 2 latent thoughts, m = 0.75
                          grid: real epochs {4, 8, 16}, weight decay 0.1
                every recipe's point is chosen on seed 0's val loss (the paper's practice: tune on
                one seed), then measured with 3 seeds
  ablations     at 4 real epochs, 2 seeds: real document first / none in the megadocs; the
                document and megadoc attention masks (causal is the default)
  data law      the real-only recipe (its chosen weight decay) on 40, 80, 160, 320 and 640
                documents, each at its best epochs of a small grid; a recipe's data efficiency is
                the real budget this law needs for the recipe's loss, divided by the 160
                documents' tokens
  compute       training FLOPs of each run, and the FLOPs the paper's 8B generator would spend on
                the synthetic tokens (prompt and completion) a recipe uses
"""
import argparse
import hashlib
import json
import math
import os
import statistics
import time

import evaluate
import formats
import pack
from sweep import run_all

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "sample_data")
TOKENIZER = "gpt2:1024"
CONFIG = os.path.join(HERE, "configs", "cpu_demo.json")
BLOCK_SIZE = 1024                       # the cpu-2x64 preset's context (configs/cpu_demo.json uses it as is)
MIX = 0.75                              # the paper's m
LONG_DOCS = 3                           # long documents for the second-domain loss by position
GENERATOR_PARAMS = 8e9                  # the paper's generator, Llama 3.1 8B
RECIPES = {"shuffled": "shuffled_G4", "sorted": "sorted_G4", "latent": "latent_G2"}   # recipe -> stream
ABLATIONS = {   # name -> (stream, mask); each at ablation_epochs, compared with sorted and shuffled
    "sorted, real first": ("sorted_G4_front", "causal"),
    "sorted, no real": ("sorted_G4_none", "causal"),
    "sorted, document mask": ("sorted_G4", "document"),
    "sorted, megadoc mask": ("sorted_G4", "megadoc"),
}
# The full grids fit in 20 minutes on 2 cores (docs/demo_design.md, section 3): the first weight
# decay has every seed at every epoch count, to show overfitting with its spread; the others seed 0.
FULL = dict(seeds=3, real_epochs=(4, 8, 16, 32), real_wd=(0.1, 1.0), syn_epochs=(4, 8, 16), syn_wd=0.1,
            ablation_epochs=4, ablation_seeds=2, ablations=tuple(ABLATIONS),
            law={40: (8, 16, 32), 80: (8, 16, 32), 320: (8, 16), 640: (4, 8)})
QUICK = dict(seeds=1, real_epochs=(4, 8, 16, 32), real_wd=(0.1,), syn_epochs=(8,), syn_wd=0.1,
             ablation_epochs=8, ablation_seeds=1, ablations=("sorted, no real", "sorted, document mask"),
             law={40: (16, 32), 80: (16, 32), 320: (8, 16)})


def read_jsonl(path):
    return [obj for _, obj in formats.read_jsonl(path)]


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return path


def prepare_data(d, budgets, log):
    """Token files of every real budget, the two held-out splits, the long documents and every
    synthetic stream; returns {name: pack summary} and the generator tokens of each stream."""
    os.makedirs(d, exist_ok=True)
    train = read_jsonl(os.path.join(DATA, "train.jsonl"))
    rephrase = os.path.join(DATA, "synthetic", "rephrase.jsonl")
    latent = os.path.join(DATA, "synthetic", "latent.jsonl")
    sources = {r["source_id"] for r in read_jsonl(rephrase)}
    main = [r for r in train if r["id"] in sources]            # the 160 documents with synthetic data
    others = [r for r in train if r["id"] not in sources]      # more real text, for larger budgets
    subsets = {n: (main + others)[:n] for n in sorted(set(budgets) | {len(main)})}
    val = read_jsonl(os.path.join(DATA, "val.jsonl"))
    half = lambda r: hashlib.sha256(r["id"].encode()).digest()[0] % 2   # a split that ignores file order
    common = dict(tokenizer=TOKENIZER, block_size=BLOCK_SIZE, log=lambda *a: None)
    streams = {}
    for n, rows in subsets.items():
        streams[f"real{n}"] = pack.pack(write_jsonl(f"{d}/real{n}.jsonl", rows), f"{d}/real{n}", **common)
    for name, rows in (("val", [r for r in val if half(r) == 0]), ("test", [r for r in val if half(r) == 1]),
                       ("long", read_jsonl(os.path.join(DATA, "long.jsonl"))[:LONG_DOCS])):
        streams[name] = pack.pack(write_jsonl(f"{d}/{name}.jsonl", rows), f"{d}/{name}", **common)
    real = f"{d}/real{len(main)}.jsonl"
    for mode, position in (("shuffled", "back"), ("sorted", "back"), ("sorted", "front"), ("sorted", "none")):
        name = f"{mode}_G4" + ("" if position == "back" else f"_{position}")
        streams[name] = pack.pack(real, f"{d}/{name}", mode, [rephrase], G=4, real_position=position, **common)
    streams["latent_G2"] = pack.pack(real, f"{d}/latent_G2", "latent", [latent], G=2, **common)

    # what the synthetic records of each stream cost a generator: prompt + completion tokens
    def generated_tokens(path, G):
        return sum(r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"] for r in read_jsonl(path)
                   if r["index"] < G and r["source_id"] in sources)
    gen_tokens = {"real": 0, "shuffled": generated_tokens(rephrase, 4), "sorted": generated_tokens(rephrase, 4),
                  "latent": generated_tokens(latent, 2)}
    log(f"packed {len(streams)} token files into {d}/ (tokenizer {TOKENIZER}, windows of {BLOCK_SIZE})")
    for name in (f"real{len(main)}", "val", "test", *RECIPES.values()):
        s = streams[name]
        log(f"  {name:<12} {s['documents']:>5} documents {s['tokens']:>8,} tokens; mean megadoc "
            f"{s['mean megadoc tokens']:,.0f} tokens; windows with 2+ documents of one source: "
            f"{100 * s['windows with 2+ documents of one source']:.0f}%")
    return streams, len(main), gen_tokens


def mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def pm(values):
    m, s = mean_std(values)
    return f"{m:.4f} ± {s:.4f}" if len(values) > 1 else f"{m:.4f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out_dir", default=os.path.join(HERE, "out", "demo"), help="where data, runs and results go")
    ap.add_argument("--quick", action="store_true", help="one seed and smaller grids: about 5 minutes")
    ap.add_argument("--jobs", type=int, default=2, help="train.py runs side by side (one torch thread each)")
    args = ap.parse_args()
    if args.jobs < 1:
        ap.error("--jobs must be >= 1")
    P = QUICK if args.quick else FULL
    out = os.path.join(args.out_dir, "quick" if args.quick else "")
    out = out.rstrip("/")
    t0 = time.time()
    log = lambda *a: print(*a, flush=True)
    d = os.path.join(out, "data")
    streams, n_main, gen_tokens = prepare_data(d, P["law"], log)
    runs_dir = os.path.join(out, "runs")
    tokens = lambda name: streams[name]["tokens"]
    seeds = range(P["seeds"])

    def run(name, real, epochs, wd, seed, stream=None, mask="causal", extra=()):
        """One train.py run: its out_dir, arguments and cost (tokens it trains on)."""
        a = ["--config", CONFIG, "--real", f"{d}/{real}", "--val", f"{d}/val", "--test", f"{d}/test",
             "--epochs", f"{epochs:g}", "--weight_decay", f"{wd:g}", "--mask", mask,
             "--init_seed", str(seed), "--data_seed", str(seed), "--log_interval", "1000", *extra]
        if stream:
            a += ["--synthetic", f"{d}/{stream}", "--mix", f"{MIX:g}"]
        cost = epochs * tokens(real) / (1 - MIX if stream else 1) * (1.25 if mask != "causal" else 1)
        return os.path.join(runs_dir, f"{name}_e{epochs:g}_wd{wd:g}_s{seed}"), a, cost

    def train_all(specs, label, later=0.0):
        specs = list({o: (o, a, c) for o, a, c in specs}.values())   # each run once
        log(f"\n{label}: {len(specs)} runs")
        return run_all({o: a for o, a, _ in specs}, jobs=args.jobs, threads=1 if args.jobs > 1 else None,
                       cost={o: c for o, _, c in specs}, later=later, log=log, started=t0)

    # ---- phase 1: the grids that every choice is made from (on the "val" split); the long
    # documents are evaluated here only (the recipes' seed 0 runs are among these)
    main_real = f"real{n_main}"
    long = ("--long", f"{d}/long")
    curve_wd = P["real_wd"][0]
    real_grid = {(wd, e, s): run("real", main_real, e, wd, s, extra=(*long, "--eval_train", "true"))
                 for wd in P["real_wd"] for e in P["real_epochs"] for s in (seeds if wd == curve_wd else [0])}
    syn_grid = {(r, e): run(r, main_real, e, P["syn_wd"], 0, stream, extra=long)
                for r, stream in RECIPES.items() for e in P["syn_epochs"]}

    def phase2(chosen):
        """The runs that depend on the choices: recipes {name: [runs]}, ablations {name: [runs]}
        and the data law {documents: {epochs: run}}."""
        real_wd, real_e = chosen["real"]
        recipe_runs = {"real": [real_grid.get((real_wd, real_e, s)) or run("real", main_real, real_e, real_wd, s)
                                for s in seeds]}
        for r, stream in RECIPES.items():
            recipe_runs[r] = [syn_grid[r, chosen[r][1]]] + [run(r, main_real, chosen[r][1], P["syn_wd"], s, stream)
                                                          for s in seeds[1:]]
        E, ab_seeds = P["ablation_epochs"], range(P["ablation_seeds"])
        ablation_runs = {f"{r} (reference)": [run(r, main_real, E, P["syn_wd"], s, RECIPES[r]) for s in ab_seeds]
                         for r in ("shuffled", "sorted")}
        for name in P["ablations"]:
            stream, mask = ABLATIONS[name]
            slug = name.replace(", ", "-").replace(" ", "-")
            ablation_runs[name] = [run(slug, main_real, E, P["syn_wd"], s, stream, mask) for s in ab_seeds]
        law_runs = {n: {e: run(f"real{n}", f"real{n}", e, real_wd, 0) for e in grid} for n, grid in P["law"].items()}
        return recipe_runs, ablation_runs, law_runs

    def all_runs(recipe_runs, ablation_runs, law_runs):
        return ([spec for runs_ in (*recipe_runs.values(), *ablation_runs.values()) for spec in runs_] +
                [spec for grid in law_runs.values() for spec in grid.values()])

    phase1 = list(real_grid.values()) + list(syn_grid.values())
    guess = {"real": (P["real_wd"][0], 16), **{r: (P["syn_wd"], P["ablation_epochs"]) for r in RECIPES}}
    done1 = {o for o, _, _ in phase1}
    later = sum({o: c for o, _, c in all_runs(*phase2(guess)) if o not in done1}.values())
    S = train_all(phase1, "phase 1, the tuning grids", later=later)
    summary = lambda spec: S[spec[0]]

    real_curve = {(wd, e): [summary(real_grid[k]) for k in real_grid if k[:2] == (wd, e)]
                  for wd in P["real_wd"] for e in P["real_epochs"]}
    real_wd, real_e = min(real_curve, key=lambda k: real_curve[k][0]["val_loss"])   # seed 0, as for every recipe
    chosen = {"real": (real_wd, real_e)}
    for r in RECIPES:
        chosen[r] = (P["syn_wd"], min(P["syn_epochs"], key=lambda e: summary(syn_grid[r, e])["val_loss"]))
    log("chosen on the val split: " + ", ".join(f"{r} {e:g} epochs (wd {wd:g})" for r, (wd, e) in chosen.items()))

    # ---- phase 2: seeds at the chosen points, ablations, and the data law
    recipe_runs, ablation_runs, law_runs = phase2(chosen)
    S.update(train_all(all_runs(recipe_runs, ablation_runs, law_runs),
                       "phase 2: seeds at the chosen points, ablations, data law"))

    # ---- results: every final number on the "test" split
    log("\nevaluating ensembles")
    test = lambda specs_: [summary(spec)["test_loss"] for spec in specs_]
    law_points = {n_main: statistics.mean(test(recipe_runs["real"]))}
    law_epochs = {n_main: real_e}
    for n, grid in law_runs.items():
        best = min(grid, key=lambda e: summary(grid[e])["val_loss"])
        law_points[n], law_epochs[n] = summary(grid[best])["test_loss"], best
    budgets = sorted(law_points)
    budget_tokens = [tokens(f"real{n}") for n in budgets]
    problems = []
    law = evaluate.fit_power_law(budget_tokens, [law_points[n] for n in budgets], warn=problems.append)
    D = tokens(main_real)

    def efficiency(loss):
        """Data efficiency by interpolation between measured budgets, and by the fit (if it holds)."""
        budget, relation = evaluate.interpolated_budget(loss, budget_tokens, [law_points[n] for n in budgets])
        k = evaluate.data_efficiency(loss, law, D)
        by_fit = "n/a" if problems else f"{k:.2f}x" if k < math.inf else "below the fit's asymptote"
        return f"{relation if relation != '=' else ''}{budget / D:.2f}x", by_fit

    rows, bars = [], {}
    real_mean, real_std = mean_std(test(recipe_runs["real"]))
    for r, specs_ in recipe_runs.items():
        losses = test(specs_)
        m, s = mean_std(losses)
        ens = evaluate.ensemble_loss([f"{o}/ckpt.pt" for o, _, _ in specs_], f"{d}/test") if len(specs_) > 1 else m
        first = summary(specs_[0])
        batch_tokens = first["config"]["batch_size"] * first["config"]["grad_accum"] * BLOCK_SIZE
        train_flops = evaluate.training_flops(first["model_config"], first["steps"] * batch_tokens)
        gen_flops = evaluate.generation_flops(gen_tokens[r], GENERATOR_PARAMS)
        se = math.sqrt((s ** 2 + real_std ** 2) / len(losses)) if len(losses) > 1 else float("nan")
        diff = "" if r == "real" else f"{m - real_mean:+.4f} ± {se:.4f} ({(m - real_mean) / se:+.1f} SE)" \
            if len(losses) > 1 else f"{m - real_mean:+.4f}"
        rows.append([r, f"{chosen[r][1]:g}", f"{chosen[r][0]:g}", f"{0 if r == 'real' else MIX:g}", first["steps"],
                     len(losses), pm(losses), f"{ens:.4f}", diff, *efficiency(m), f"{train_flops:.2e}",
                     f"{gen_flops:.2e}", f"{train_flops + gen_flops:.2e}"])
        bars[r] = (m, s)
    recipe_table = evaluate.markdown_table(
        ["recipe", "real epochs", "wd", "m", "steps", "seeds", "test loss (mean ± std)", f"ensemble of {len(seeds)}",
         "vs real-only (± SE)", "data efficiency (interpolated)", "data efficiency (fit)", "training FLOPs",
         "generation FLOPs", "total FLOPs"], rows)

    curve_rows = []
    for (wd, e), runs_ in real_curve.items():
        curve_rows.append([f"{wd:g}", f"{e:g}", runs_[0]["steps"], len(runs_), pm([x["train_loss"] for x in runs_]),
                           pm([x["val_loss"] for x in runs_]), pm([x["test_loss"] for x in runs_])])
    curve_table = evaluate.markdown_table(["wd", "real epochs", "steps", "seeds", "train loss (mean ± std)",
                                           "val loss (mean ± std)", "test loss (mean ± std)"], curve_rows)
    overfit_lines = []
    for wd in P["real_wd"]:
        means = {e: mean_std([x["val_loss"] for x in real_curve[wd, e]]) for e in P["real_epochs"]}
        best = min(means, key=lambda e: means[e][0])
        inside = best not in (P["real_epochs"][0], P["real_epochs"][-1])
        line = f"wd {wd:g}: minimum at {best:g} epochs (val {means[best][0]:.4f})" + ("" if inside else ", on the edge of the grid")
        later = [e for e in P["real_epochs"] if e > best]
        if later:
            e2 = later[0]
            gap, spread = means[e2][0] - means[best][0], max(means[e2][1], means[best][1])
            line += f"; at {e2:g} epochs it is {gap:+.4f} higher" + (f" ({gap / spread:.1f} std)" if spread > 0 else "")
        overfit_lines.append("- " + line + ("" if len(real_curve[wd, best]) > 1 else " (seed 0 only)"))
    overfit_lines.append(f"- chosen for the real-only recipe on seed 0's val loss, as for every recipe: wd {real_wd:g}, "
                         f"{real_e:g} epochs")

    grid_table = evaluate.markdown_table(
        ["recipe", *[f"{e:g} epochs (val, seed 0)" for e in P["syn_epochs"]], "chosen"],
        [[r, *[f"{summary(syn_grid[r, e])['val_loss']:.4f}" for e in P["syn_epochs"]], f"{chosen[r][1]:g}"]
         for r in RECIPES])

    ablation_table = evaluate.markdown_table(
        ["variant", "real epochs", "seeds", "test loss (mean ± std)"],
        [[name, f"{summary(specs_[0])['config']['epochs']:g}", len(specs_), pm(test(specs_))]
         for name, specs_ in ablation_runs.items()])

    law_grids = {n_main: P["real_epochs"], **{n: tuple(grid) for n, grid in law_runs.items()}}
    law_table = evaluate.markdown_table(
        ["real documents", "real tokens", "epochs tried", "best (val)", "test loss", "power-law fit"],
        [[n, f"{tokens(f'real{n}'):,}", ", ".join(f"{e:g}" for e in law_grids[n]),
          f"{law_epochs[n]:g}" + (" (edge)" if law_epochs[n] in (law_grids[n][0], law_grids[n][-1]) else ""),
          f"{law_points[n]:.4f}", f"{evaluate.power_law(tokens(f'real{n}'), *law):.4f}"] for n in budgets])
    law_text = (f"Power-law fit L(D) = {law[0]:.4g} / D^{law[1]:.4g} + {law[2]:.4f} (D = real tokens), "
                f"{len(budgets)} points for 3 parameters. " +
                ("**The fit is not identifiable at this scale**: " + "; ".join(problems) + ", so the recipe table gives "
                 "no data efficiency from it. " if problems else
                 "Its parameters are inside their search range, but 4-5 points barely determine 3 parameters: read "
                 "its data efficiency as a second opinion. ") +
                "The estimator the demo relies on is model-free: data efficiency (interpolated) is the real budget at "
                "which the measured real-only losses reach the recipe's loss, interpolated linearly in log D between "
                "the two neighbouring measured budgets (\">\" when the loss is below every measured budget's), "
                f"divided by the {D:,} tokens the recipes use.")

    buckets = summary(recipe_runs["real"][0]).get("long_loss_by_position", {})
    position_table = evaluate.markdown_table(
        ["recipe (seed 0)", *buckets],
        [[r, *(f"{summary(specs_[0])['long_loss_by_position'][b]:.3f}" for b in buckets)]
         for r, specs_ in recipe_runs.items()])

    figures = [
        evaluate.line_figure(f"{out}/real_epochs.png", "Real data only: loss against epochs", "real epochs", {
            **{f"val, wd {wd:g}": (list(P["real_epochs"]),
                                   *zip(*[mean_std([x["val_loss"] for x in real_curve[wd, e]]) for e in P["real_epochs"]]))
               for wd in P["real_wd"]},
            **{f"train, wd {wd:g}": (list(P["real_epochs"]),
                                     *zip(*[mean_std([x["train_loss"] for x in real_curve[wd, e]])
                                            for e in P["real_epochs"]]))
               for wd in P["real_wd"]}},
            ylabel="loss (nats)", dashed=[f"train, wd {wd:g}" for wd in P["real_wd"]]),
        evaluate.bar_figure(f"{out}/recipes.png", "Each recipe at its tuned point (test, mean ± std over seeds)",
                            list(bars), [m for m, _ in bars.values()], [s for _, s in bars.values()],
                            ylabel="test loss (nats)"),
        evaluate.bar_figure(f"{out}/ablations.png", f"Ordering and masks at {P['ablation_epochs']:g} real epochs (test)",
                            [n.replace(", ", "\n").replace(" mask", "\nmask").replace(" (reference)", "") for n in ablation_runs],
                            *zip(*[mean_std(test(s_)) for s_ in ablation_runs.values()]), ylabel="test loss (nats)"),
        evaluate.line_figure(f"{out}/data_law.png", "Real-only loss against real tokens (test)", "real tokens", {
            "real only, best epochs": (budget_tokens, [law_points[n] for n in budgets], [0] * len(budgets))},
            ylabel="test loss (nats)", hlines={r: bars[r][0] for r in RECIPES}),
    ]
    params = summary(recipe_runs["real"][0])["params"]
    report = "\n\n".join([
        f"# nanosynth CPU demo{' (--quick)' if args.quick else ''}",
        f"Model: {params:,} parameters (configs/cpu_demo.json), vocabulary {TOKENIZER} + BOS padded to "
        f"{summary(recipe_runs['real'][0])['model_config']['vocab_size']}, context {BLOCK_SIZE}, batch 4. Real budget: "
        f"{n_main} documents, {D:,} tokens. Held out: val {streams['val']['documents']} documents "
        f"({tokens('val'):,} tokens; every choice is made on it), test {streams['test']['documents']} documents "
        f"({tokens('test'):,} tokens; every final number). Synthetic recipes use m = {MIX:g} (a quarter of each "
        "batch is real), so a real epoch takes 4x the steps of a real-only epoch. Losses are mean next-token "
        "losses in nats; ± is the standard deviation over seeds; ensembles average the seeds' probabilities.",
        "## 1. Real data only: loss against epochs", curve_table, "\n".join(overfit_lines),
        "## 2-4. Recipes, each at its own tuned point", grid_table, recipe_table,
        "Generation FLOPs: 2 x 8e9 x (prompt + completion tokens) of the synthetic records each recipe uses, as the "
        "paper's Llama 3.1 8B generator would spend them. Training FLOPs: one run (one seed).",
        "## 5. Ordering and attention masks", ablation_table,
        "## 6. The real-only data law", law_table, law_text,
        "## Loss by position in long documents (second domain, Python docs)", position_table,
        "Figures: " + (", ".join(os.path.basename(f) for f in figures if f) or "none (matplotlib not installed)"),
        f"Wall time: {time.time() - t0:.0f} s",
    ])
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(report + "\n")
    print("\n" + report)


if __name__ == "__main__":
    main()
