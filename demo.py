"""
demo.py: the whole study at toy scale, on sample_data/, on a CPU, end to end.

    python demo.py                 # about 11 minutes on 2 CPU cores; writes out/demo/
    python demo.py --seeds 1       # one seed per recipe: a first look in about half the time

Reads:  sample_data/train.jsonl, val.jsonl, long.jsonl and sample_data/synthetic/*.jsonl.
Writes: out/demo/data/ (token files), out/demo/runs/ (one train.py run each), out/demo/results.md
        (the tables printed at the end) and out/demo/*.png (figures, if matplotlib is installed).
Rerunning skips every finished run, so an interrupted demo continues where it stopped.

The setting, scaled down from the paper (DESIGN.md):
  real budget   the 160 Jargon File entries that have written rephrases and latent thoughts
                (~27k tokens with GPT-2's first 8,192 ranks as the vocabulary)
  model         configs/cpu_demo.json: 2 layers, width 128, context 256 (2.5M parameters)
  recipes       real      real data only, 6 epochs
                shuffled  rephrases (G = 4) as separate documents, 1.5 real epochs, m = 0.75
                sorted    the same rephrases as megadocs, real document last, 1.5 epochs, m = 0.75
                latent    documents stretched with G = 2 latent thoughts, 1.5 epochs, m = 0.75
                All four take the same number of steps (equal compute), 3 seeds each.
  ablations     one seed each: G = 2 for shuffled and sorted; ordering at G = 4 (no real
                document, real first); attention blocked at document boundaries (no CDA).
  data law      the real-only recipe (6 epochs) on 40, 80 and 320 documents, plus the 160;
                fitted with L(D) = A / D^B + C. A recipe's data efficiency is the real budget
                that law needs for the recipe's loss, divided by the 160 documents' tokens.
"""
import argparse
import json
import os
import statistics
import time

import evaluate
import pack
from sweep import run_all

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "sample_data")
TOKENIZER = "gpt2:8192"
CONFIG = os.path.join(HERE, "configs", "cpu_demo.json")
CONTEXT = json.load(open(CONFIG))["block_size"]
REAL_EPOCHS, SYN_EPOCHS, MIX = 6, 1.5, 0.75   # 6 real epochs = 1.5 real epochs at m = 0.75: same steps
LAW_BUDGETS = (40, 80, 320)                   # documents, besides the main 160
LONG_DOCS = 4                                 # long documents evaluated (each run reads all of them)


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return path


def prepare_data(out, log):
    """Real budgets, held-out and long documents, and every synthetic stream, as token files."""
    d = os.path.join(out, "data")
    os.makedirs(d, exist_ok=True)
    train = read_jsonl(os.path.join(DATA, "train.jsonl"))
    rephrase = os.path.join(DATA, "synthetic", "rephrase.jsonl")
    latent = os.path.join(DATA, "synthetic", "latent.jsonl")
    sources = {r["source_id"] for r in read_jsonl(rephrase)}
    budget = [r for r in train if r["id"] in sources]
    others = [r for r in train if r["id"] not in sources]
    subsets = {len(budget): budget, **{n: (budget + others)[:n] for n in LAW_BUDGETS}}
    quiet = lambda *a: None
    common = dict(tokenizer=TOKENIZER, context=CONTEXT, log=quiet)
    streams = {}
    for n, rows in subsets.items():
        streams[f"real{n}"] = pack.pack(write_jsonl(f"{d}/real{n}.jsonl", rows), f"{d}/real{n}", **common)
    main = f"{d}/real{len(budget)}.jsonl"
    streams["val"] = pack.pack(os.path.join(DATA, "val.jsonl"), f"{d}/val", **common)
    long_rows = read_jsonl(os.path.join(DATA, "long.jsonl"))[:LONG_DOCS]
    streams["long"] = pack.pack(write_jsonl(f"{d}/long.jsonl", long_rows), f"{d}/long", **common)
    for G in (2, 4):
        for mode in ("shuffled", "sorted"):
            streams[f"{mode}_G{G}"] = pack.pack(main, f"{d}/{mode}_G{G}", mode, [rephrase], G=G, **common)
    streams["shuffled_G4_none"] = pack.pack(main, f"{d}/shuffled_G4_none", "shuffled", [rephrase], G=4,
                                            real_position="none", **common)
    for position in ("front", "none"):
        streams[f"sorted_G4_{position}"] = pack.pack(main, f"{d}/sorted_G4_{position}", "sorted", [rephrase], G=4,
                                                     real_position=position, **common)
    streams["latent_G2"] = pack.pack(main, f"{d}/latent_G2", "latent", [latent], G=2, **common)
    log(f"packed {len(streams)} token files into {d}/")
    for name in ("real160", "shuffled_G4", "sorted_G4", "latent_G2"):
        s = streams[name]
        log(f"  {name:<12} {s['documents']:>5} documents {s['tokens']:>8,} tokens; windows of {CONTEXT} with 2+ "
            f"documents of one source: {100 * s['windows with 2+ documents of one source']:.0f}%")
    return d, len(budget), streams


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(HERE, "out", "demo"))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=2, help="train.py runs side by side (one torch thread each)")
    args = ap.parse_args()
    t0 = time.time()
    log = lambda *a: print(*a, flush=True)
    d, n_budget, streams = prepare_data(args.out, log)

    base = ["--config", CONFIG, "--val", f"{d}/val", "--long", f"{d}/long", "--log_interval", "1000"]
    real = ["--real", f"{d}/real{n_budget}"]
    recipes = {"real": real + ["--epochs", str(REAL_EPOCHS)]}
    for name, stream in (("shuffled", "shuffled_G4"), ("sorted", "sorted_G4"), ("latent", "latent_G2")):
        recipes[name] = real + ["--synthetic", f"{d}/{stream}", "--mix", str(MIX), "--epochs", str(SYN_EPOCHS)]
    synthetic = lambda stream: real + ["--synthetic", f"{d}/{stream}", "--mix", str(MIX), "--epochs", str(SYN_EPOCHS)]
    ablations = {
        **{f"{mode} G=2": synthetic(f"{mode}_G2") for mode in ("shuffled", "sorted")},
        "shuffled, no real": synthetic("shuffled_G4_none"),
        "sorted, no real": synthetic("sorted_G4_none"),
        "sorted, real first": synthetic("sorted_G4_front"),
        "real, no CDA": recipes["real"] + ["--mask", "document"],
        "shuffled, no CDA": recipes["shuffled"] + ["--mask", "document"],
        # the data law: the real-only recipe (same epochs) at other budgets
        **{f"real, {n} documents": ["--real", f"{d}/real{n}", "--epochs", str(REAL_EPOCHS)] for n in LAW_BUDGETS},
    }
    runs_dir = os.path.join(args.out, "runs")
    slug = lambda name: name.replace(", ", "_").replace(" ", "_").replace("=", "")
    runs = {}   # the longest run (the largest real budget) first, so it does not run alone at the end
    for name, extra in sorted(ablations.items(), key=lambda kv: "320 documents" not in kv[0]):
        runs[f"{runs_dir}/{slug(name)}_s0"] = base + extra + ["--init_seed", "0", "--data_seed", "0"]
    for name, extra in recipes.items():
        for seed in range(args.seeds):
            runs[f"{runs_dir}/{name}_s{seed}"] = base + extra + ["--init_seed", str(seed), "--data_seed", str(seed)]
    log(f"training {len(runs)} models ({len(recipes)} recipes x {args.seeds} seeds, {len(ablations)} single-seed "
        f"ablation and data-law runs)")
    summaries = run_all(runs, jobs=args.jobs, threads=1 if args.jobs > 1 else None, log=log)

    seeds = lambda name: [summaries[f"{runs_dir}/{name}_s{s}"] for s in range(args.seeds)]
    one = lambda name: summaries[f"{runs_dir}/{slug(name)}_s0"]

    # the real-only data law and data efficiency
    budget_tokens = {n: streams[f"real{n}"]["tokens"] for n in (*LAW_BUDGETS, n_budget)}
    law_points = sorted([(budget_tokens[n], one(f"real, {n} documents")["val_loss"]) for n in LAW_BUDGETS] +
                        [(budget_tokens[n_budget], statistics.mean(s["val_loss"] for s in seeds("real")))])
    law = evaluate.fit_power_law(*zip(*law_points))
    efficiency = lambda loss: evaluate.data_efficiency(loss, law, budget_tokens[n_budget])

    rows, bars = [], {}
    for name in recipes:
        losses = [s["val_loss"] for s in seeds(name)]
        mean = statistics.mean(losses)
        spread = statistics.stdev(losses) if len(losses) > 1 else 0.0
        long_loss = statistics.mean(s["long_loss"] for s in seeds(name))
        ckpts = [f"{runs_dir}/{name}_s{s}/ckpt.pt" for s in range(args.seeds)]
        ens = evaluate.ensemble_loss(ckpts, f"{d}/val") if len(ckpts) > 1 else mean
        cfg = seeds(name)[0]["config"]
        rows.append([name, f"{cfg['epochs']:g}", f"{cfg['mix']:g}", len(losses), f"{mean:.4f} ± {spread:.4f}",
                     f"{long_loss:.4f}", f"{ens:.4f}", f"{efficiency(mean):.2f}x"])
        bars[name] = (mean, spread)
    main_table = evaluate.markdown_table(
        ["recipe", "real epochs", "m", "seeds", "i.i.d. loss (mean ± std)", "long-doc loss",
         f"ensemble of {args.seeds}", "data efficiency"], rows)
    law_table = evaluate.markdown_table(
        ["real documents", "real tokens", "i.i.d. loss", "fit"],
        [[n, f"{budget_tokens[n]:,}", f"{dict(law_points)[budget_tokens[n]]:.4f}",
          f"{evaluate.power_law(budget_tokens[n], *law):.4f}"] for n in sorted(budget_tokens)])
    abl_rows = [[name, f"{one(name)['val_loss']:.4f}", f"{efficiency(one(name)['val_loss']):.2f}x"]
                for name in ablations if "documents" not in name]
    abl_rows += [[f"{name} (seed 0 of the main runs)", f"{seeds(name)[0]['val_loss']:.4f}",
                  f"{efficiency(seeds(name)[0]['val_loss']):.2f}x"] for name in ("real", "shuffled", "sorted")]
    abl_table = evaluate.markdown_table(["ablation (seed 0)", "i.i.d. loss", "data efficiency"], abl_rows)
    buckets = seeds("sorted")[0].get("long_loss_by_position", {})
    pos_table = evaluate.markdown_table(
        ["recipe (seed 0)", *buckets],
        [[name, *(f"{seeds(name)[0]['long_loss_by_position'][b]:.3f}" for b in buckets)] for name in recipes])

    figures = [
        evaluate.bar_figure(f"{args.out}/recipes.png", "Recipes at equal compute (mean ± std over seeds)",
                            list(bars), [m for m, _ in bars.values()], [s for _, s in bars.values()]),
        evaluate.line_figure(f"{args.out}/loss_vs_G.png", "Rephrases per document (seed 0)", "G", {
            mode: ([2, 4], [one(f"{mode} G=2")["val_loss"], seeds(mode)[0]["val_loss"]], [0, 0])
            for mode in ("shuffled", "sorted")}),
        evaluate.bar_figure(f"{args.out}/ordering.png", "Ordering at G = 4 (seed 0)",
                            ["shuffled\nno real", "sorted\nno real", "shuffled", "sorted\nback", "sorted\nfront"],
                            [one("shuffled, no real")["val_loss"], one("sorted, no real")["val_loss"],
                             seeds("shuffled")[0]["val_loss"], seeds("sorted")[0]["val_loss"],
                             one("sorted, real first")["val_loss"]], [0] * 5),
        evaluate.bar_figure(f"{args.out}/cda.png", "Attention across documents (seed 0)",
                            ["real\nCDA", "real\nno CDA", "shuffled\nCDA", "shuffled\nno CDA"],
                            [seeds("real")[0]["val_loss"], one("real, no CDA")["val_loss"],
                             seeds("shuffled")[0]["val_loss"], one("shuffled, no CDA")["val_loss"]], [0] * 4),
    ]
    params = seeds("real")[0]["params"]
    report = "\n\n".join([
        f"# nanosynth CPU demo ({params:,}-parameter model, vocabulary {seeds('real')[0]['config']['vocab_size']} "
        f"= GPT-2's first 8,192 ranks + BOS, padded; context {CONTEXT})",
        f"Real budget: {n_budget} documents, {budget_tokens[n_budget]:,} tokens. i.i.d. loss: mean next-token loss "
        f"(nats) on {streams['val']['documents']} held-out documents ({streams['val']['tokens']:,} tokens). "
        f"Every recipe takes {seeds('real')[0]['steps']} steps of {8 * CONTEXT} tokens. Ensembles average the "
        "members' probabilities.",
        main_table,
        f"Real-only data law: L(D) = {law[0]:.4g} / D^{law[1]:.4g} + {law[2]:.4f} (D = real tokens; the real-only "
        f"recipe, {REAL_EPOCHS} epochs, at every budget):",
        law_table,
        abl_table,
        "Loss by position in the long documents (second domain, Python docs):",
        pos_table,
        "Figures: " + (", ".join(os.path.basename(f) for f in figures if f) or "none (matplotlib not installed)"),
        f"Wall time: {time.time() - t0:.0f} s",
    ])
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(report + "\n")
    print("\n" + report)


if __name__ == "__main__":
    main()
