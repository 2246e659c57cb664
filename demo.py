r"""
demo.py: the study at toy scale, on sample_data/, on a CPU, end to end: how the loss falls as the
number of synthetic generations per real document G grows, for shuffled rephrases, sorted
megadocs, latent thoughts and self-distillation, against a tuned real-only baseline on the same
real tokens, alone and in ensembles.

    python demo.py            # the study (37 minutes on 2 CPU cores); writes out/demo/
    python demo.py --quick    # one seed, fewer values of G, no ablations: a first look in ~6 minutes

Reads:  sample_data/train.jsonl, val.jsonl, long.jsonl and sample_data/synthetic/*.jsonl.
Writes: out/demo/data/ (token files, and the self-distillation samples it draws), out/demo/runs/
        (one train.py run each), out/demo/results.md (the tables printed at the end) and
        out/demo/*.png (figures, if matplotlib is installed).
Rerunning skips every finished run (train.py checks that it was run with the same settings and
data), so an interrupted demo continues where it stopped.

The method, phase by phase (each is a function below; the constants after the imports set every
number, and the report is formatted from them):
  data       The real budget: the first BUDGET documents of the study's order (the 160 documents
             with written rephrases and thoughts, in SHA-256 order of their ids, then the other
             training documents of 70-260 GPT-2 tokens in the same order), so that every smaller
             budget is a random subset of every larger one. Held out: sample_data/val.jsonl split
             in two by a hash of the id, "val" (every choice) and "test" (every reported number);
             the first LONG_DOCS long documents (Python docs) as a second domain.
  recipes    RECIPES, one line each: the pack.py stream and its values of G. A new recipe or a new
             G is one line there (its synthetic records must exist up to that G).
  tuning     Each point of every grid is trained with every seed (same init and data seeds for
             every recipe and G, so runs are paired by seed). Real only: epochs x weight decay.
             Synthetic: real epochs (Plan.syn_epochs; Plan.extend rounds would extend a grid whose
             best point is on its edge). Every choice is the lowest mean val loss over the seeds,
             so no reported seed is picked for being lucky.
  teacher    The tuned real-only model serves self-distillation samples: serve.py on a free port of
             127.0.0.1, generate.py --kind self-distill over HTTP (draw_self_distillation).
  final      The ordering ablation at ORDERING_G, the attention 2 x 2 (training mask x
             evaluation mask) at CDA_POINTS, every recipe at shuffled's tuned epochs, the ensemble
             members (seeds 0 .. 4 at the tuned points of ENSEMBLED), and the real-only data law
             on the budgets of Plan.law (each at its tuned epochs).
  results    Test losses with 95% t intervals over seeds (paired where the seeds are), the slope
             in log2 G, sorted minus shuffled at each G, data efficiency with a range from
             resampling the seeds, the second domain, ensembles over K with their asymptotes,
             tables in results.md and figures.
"""
import functools
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import cli
import evaluate
import formats
import pack
from model import PRESETS, load_model
from sweep import run_all
from tokenizer import load_tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "sample_data")
CONFIG = os.path.join(HERE, "configs", "cpu_demo.json")
TRAIN_CONFIG = json.load(open(CONFIG))                 # the model and optimizer of every run
BATCH = TRAIN_CONFIG["batch_size"]                     # sequences per step (no gradient accumulation)
BLOCK_SIZE = PRESETS[TRAIN_CONFIG["model"]]["block_size"]
TOKENIZER = "gpt2:1024"                                # GPT-2's first 1,024 ranks + BOS
MIX = 0.75                                             # m, the paper's synthetic fraction
LENGTH = (70, 260)                                     # GPT-2 tokens: the filter of the study's documents
BUDGET = 64                                            # real documents (of the 80 with 16 rephrases, 7 thoughts)
LONG_DOCS = 3
GENERATOR_PARAMS = 8e9                                 # the paper's generator, Llama 3.1 8B
SELF_DISTILL_PREFIX = 32      # real tokens each self-distillation sample starts from (its anchor to a document)
SELF_DISTILL_TOKENS = 320     # at most this many sampled after it: the budget's documents are 60-330 tokens long
PACKING = dict(tokenizer=TOKENIZER, block_size=BLOCK_SIZE, log=lambda *a: None)
EPOCH_LIMITS = (1, 64)                                 # how far a grid may be extended


@dataclass(frozen=True)
class Recipe:
    mode: str                   # pack.py --mode
    kind: str                   # the synthetic records it uses: rephrase or latent
    Gs: tuple                   # its G axis
    real_position: str = "back"


RECIPES = {
    "shuffled": Recipe("shuffled", "rephrase", (1, 2, 4, 8, 16)),   # rephrases as separate documents
    "sorted": Recipe("sorted", "rephrase", (1, 2, 4, 8, 16)),       # megadocs, real document last
    "latent": Recipe("latent", "latent", (1, 3, 7)),                # documents stretched with thoughts
    "self-distill": Recipe("shuffled", "self-distill", (1, 4)),     # samples of the real-only model
}
ORDERING_G = 8
ORDERINGS = {   # the ordering ablation at ORDERING_G, all at sorted's tuned epochs: name -> recipe
    "shuffled": Recipe("shuffled", "rephrase", (ORDERING_G,)),
    "sorted, real last": Recipe("sorted", "rephrase", (ORDERING_G,)),
    "sorted, real first": Recipe("sorted", "rephrase", (ORDERING_G,), "front"),
    "sorted, no real": Recipe("sorted", "rephrase", (ORDERING_G,), "none"),
    "shuffled, no real": Recipe("shuffled", "rephrase", (ORDERING_G,), "none"),
}
CDA_POINTS = (("real", 0), ("shuffled", 16))   # the attention 2 x 2, at these tuned points
# ensembles over K: real only (its tuned point, and the paper's member recipe: 2x the epochs, half the
# weight decay), the better of shuffled and sorted at their largest G, latent and self-distill at theirs
ENSEMBLED = ("real", "real, member recipe", "rephrases", "latent", "self-distill")
COLORS = {"shuffled": "#e67e22", "sorted": "#4a78d4", "latent": "#34495e", "real": "#7b3fa0",   # the blog's
          "self-distill": "#2a9d8f", "rephrases": "#4a78d4", "real,": "#b48ad6"}
MASKS = ("causal", "document")                 # causal lets attention cross documents ("CDA")


@dataclass
class Plan:
    seeds: tuple
    real_epochs: tuple
    real_wd: tuple
    syn_epochs: tuple             # the first grid of real epochs for every synthetic (recipe, G)
    syn_wd: float
    extend: int                   # rounds of extending a grid whose best point is on its edge
    law: dict                     # real documents -> epochs grid of the data law (BUDGET: the real-only grid)
    Gs: dict = field(default_factory=dict)   # recipe -> the G values to run (default: RECIPES)
    ablations: bool = True        # the ordering ablation and the attention 2 x 2
    members: int = 5              # ensembles of K = 1 .. members seeds at the tuned points of ENSEMBLED (0: none)


# The grids come from measurements at 80 documents (docs/demo_design.md, section 5): real only is
# best near 16 epochs; every synthetic recipe near 8 real epochs at every G (4 undertrains, 16
# overfits, the more the smaller G). Two values a grid, no extension: that is what fits the time.
FULL = Plan(seeds=(0, 1, 2), real_epochs=(8, 16, 32), real_wd=(0.1, 1.0), syn_epochs=(8, 12), syn_wd=0.1, extend=0,
            law={BUDGET // 4: (16, 32), BUDGET // 2: (16, 32), 2 * BUDGET: (8, 16), 4 * BUDGET: (8, 16)})
QUICK = Plan(seeds=(0,), real_epochs=(8, 16, 32), real_wd=(0.1,), syn_epochs=(8,), syn_wd=0.1, extend=0,
             law={BUDGET // 4: (32,), BUDGET // 2: (16,), 2 * BUDGET: (16,), 4 * BUDGET: (8,)},
             Gs={"shuffled": (1, 4, 16), "sorted": (1, 4, 16), "latent": (1, 7), "self-distill": (1, 4)},
             ablations=False, members=0)


def stream_name(recipe, G):
    what = recipe.mode if recipe.kind == "rephrase" else recipe.kind
    return f"{what}_G{G}" + ("" if recipe.real_position == "back" else f"_{recipe.real_position}")


@dataclass(frozen=True)
class Run:
    """One train.py run of the study."""
    recipe: str                 # "real", a name of RECIPES or of ORDERINGS
    G: int                      # generations per document (0: real only)
    epochs: float               # passes over the real documents
    weight_decay: float
    seed: int                   # init seed = data seed
    documents: int = BUDGET     # the real budget
    mask: str = "causal"
    stream: str = ""            # the synthetic token file ("" for real only)

    @property
    def name(self):
        what = self.recipe.replace(", ", "-").replace(" ", "-") + (f"_G{self.G}" if self.G else "")
        budget = "" if self.documents == BUDGET else f"_d{self.documents}"
        mask = "" if self.mask == "causal" else f"_{self.mask}"
        return f"{what}{budget}{mask}_e{self.epochs:g}_wd{self.weight_decay:g}_s{self.seed}"

    def train_args(self, data):
        args = ["--config", CONFIG, "--real", f"{data}/real{self.documents}", "--val", f"{data}/val",
                "--test", f"{data}/test", "--long", f"{data}/long", "--epochs", f"{self.epochs:g}",
                "--weight_decay", f"{self.weight_decay:g}", "--mask", self.mask, "--init_seed", str(self.seed),
                "--data_seed", str(self.seed), "--log_interval", "1000"]
        if self.stream:
            args += ["--synthetic", f"{data}/{self.stream}", "--mix", f"{MIX:g}"]
        if self.recipe == "real" and self.documents == BUDGET:
            args += ["--eval_train", "true"]   # the overfitting curve
        return args


def real_run(epochs, wd, seed, documents=BUDGET, mask="causal"):
    return Run("real", 0, epochs, wd, seed, documents, mask)


def synthetic_run(name, G, epochs, wd, seed, mask="causal"):
    """A run of a recipe (an ordering variant that is one of RECIPES is that recipe's run)."""
    recipe = RECIPES.get(name) or ORDERINGS[name]
    name = next((n for n, r in RECIPES.items() if (r.mode, r.kind, r.real_position) ==
                 (recipe.mode, recipe.kind, recipe.real_position)), name)
    return Run(name, G, epochs, wd, seed, mask=mask, stream=stream_name(recipe, G))


class Trainer:
    """Trains Runs with sweep.run_all (`jobs` at a time, one thread each) and keeps their summaries."""

    def __init__(self, out, data, tokens, jobs, started, log):
        self.out, self.data, self.tokens, self.jobs, self.started, self.log = out, data, tokens, jobs, started, log
        self.summaries = {}

    def dir(self, run):
        return os.path.join(self.out, run.name)

    def ckpt(self, run):
        return os.path.join(self.out, run.name, "ckpt.pt")

    def cost(self, run):
        """Tokens trained: real epochs x real tokens / (1 - m) with a synthetic stream."""
        return run.epochs * self.tokens[f"real{run.documents}"] / (1 - MIX if run.stream else 1)

    def train(self, runs, label, later=0.0):
        runs = list(dict.fromkeys(runs))   # each run once, in order
        self.log(f"\n{label}: {len(runs)} runs")
        summaries = run_all({self.dir(r): r.train_args(self.data) for r in runs}, jobs=self.jobs,
                            threads=1 if self.jobs > 1 else None, cost={self.dir(r): self.cost(r) for r in runs},
                            later=later, log=self.log, started=self.started)
        self.summaries.update({r: summaries[self.dir(r)] for r in runs})

    def metric(self, runs, key="test_loss"):
        return [self.summaries[r][key] for r in runs]

    def mean_val(self, runs):
        return statistics.mean(self.metric(runs, "val_loss"))


# -----------------------------------------------------------------------------
# data


def read_jsonl(path):
    return [obj for _, obj in formats.read_jsonl(path)]


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return path


def study_documents():
    """The study's order of training documents: the 160 with written synthetic data (SHA-256 order
    of their ids), then every other training document of LENGTH GPT-2 tokens in the same order."""
    enc, _ = load_tokenizer("gpt2")
    train = read_jsonl(os.path.join(DATA, "train.jsonl"))
    sources = {r["source_id"] for r in read_jsonl(os.path.join(DATA, "synthetic", "rephrase.jsonl"))}
    first = [r for r in train if r["id"] in sources]
    rest = [r for r in train if r["id"] not in sources and LENGTH[0] <= len(enc.encode_ordinary(r["text"])) <= LENGTH[1]]
    return sorted(first, key=sha256_of_id) + sorted(rest, key=sha256_of_id)


def sha256_of_id(doc):
    return hashlib.sha256(doc["id"].encode()).hexdigest()


def synthetic_file(kind, d):
    """The records of a kind: the shipped sample data, or the self-distillation samples the study draws."""
    return os.path.join(d, "self-distill.jsonl") if kind == "self-distill" else \
        os.path.join(DATA, "synthetic", f"{kind}.jsonl")


def prepare_data(d, plan, log):
    """Token files of every real budget, val, test and the long documents. Returns their pack
    summaries and the budget's documents."""
    os.makedirs(d, exist_ok=True)
    documents = study_documents()
    packed = {}
    for n in sorted({BUDGET, *plan.law}):
        packed[f"real{n}"] = pack.pack(write_jsonl(f"{d}/real{n}.jsonl", documents[:n]), f"{d}/real{n}", **PACKING)
    val = read_jsonl(os.path.join(DATA, "val.jsonl"))
    test_half = {r["id"] for r in val if int(sha256_of_id(r)[:2], 16) % 2}   # a split that ignores file order
    for name, rows in (("val", [r for r in val if r["id"] not in test_half]),
                       ("test", [r for r in val if r["id"] in test_half]),
                       ("long", read_jsonl(os.path.join(DATA, "long.jsonl"))[:LONG_DOCS])):
        packed[name] = pack.pack(write_jsonl(f"{d}/{name}.jsonl", rows), f"{d}/{name}", **PACKING)
    log(f"packed {len(packed)} real and held-out token files into {d}/ (tokenizer {TOKENIZER}, windows of {BLOCK_SIZE})")
    return packed, documents[:BUDGET]


def pack_streams(d, streams, budget, log):
    """Token files of the synthetic streams [(recipe, G)] on the real budget. Returns their pack
    summaries and, per stream, the prompt + completion tokens of the records it uses."""
    budget_ids = {r["id"] for r in budget}
    packed, generated, paths = {}, {}, {}
    for kind in {recipe.kind for recipe, _ in streams}:   # the records of the budget's documents only
        paths[kind] = write_jsonl(f"{d}/{kind}.budget.jsonl", [r for r in read_jsonl(synthetic_file(kind, d))
                                                              if r["source_id"] in budget_ids])
    for recipe, G in sorted(set(streams), key=lambda rg: stream_name(*rg)):
        path, name = paths[recipe.kind], stream_name(recipe, G)
        packed[name] = pack.pack(f"{d}/real{BUDGET}.jsonl", f"{d}/{name}", recipe.mode, [path], G=G,
                                 real_position=recipe.real_position, synthetic_kind=recipe.kind if recipe.mode != "latent"
                                 else None, keep_truncated=recipe.kind == "self-distill", **PACKING)
        if packed[name]["sources with fewer than G generations"]:
            raise SystemExit(f"error: {name}: {packed[name]['sources with fewer than G generations']} of the {BUDGET} "
                             f"documents have fewer than {G} {recipe.kind} records in {path}")
        generated[name] = sum(r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"]
                              for r in read_jsonl(path) if r["index"] < G)
    log(f"packed {len(packed)} synthetic streams: " + ", ".join(packed))
    return packed, generated


def draw_self_distillation(teacher_ckpt, d, G, log):
    """SELF_DISTILL_G samples per budget document from the tuned real-only model, the way a user
    would draw them: serve.py serves the checkpoint on a free port of 127.0.0.1 and generate.py
    samples it over HTTP (resumable: a rerun adds only what is missing). Returns the cost:
    {"records", "completion_tokens", "seconds"} (seconds of the run that drew them)."""
    out, cost_path = os.path.join(d, "self-distill.jsonl"), os.path.join(d, "self-distill.cost.json")
    server = subprocess.Popen([sys.executable, os.path.join(HERE, "serve.py"), "--ckpt", teacher_ckpt, "--port", "0",
                               "--device", "cpu", "--quiet"], stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()   # "serving ... on http://127.0.0.1:PORT/v1 (...)"
        url = line.split(" on ", 1)[1].split()[0] if " on http" in line else None
        if url is None:
            raise SystemExit(f"error: serve.py did not start ({line.strip() or 'no output'})")
        started = time.time()
        subprocess.run([sys.executable, os.path.join(HERE, "generate.py"), "--input", f"{d}/real{BUDGET}.jsonl",
                        "--out_jsonl", out, "--endpoint", url, "--model", "nanosynth", "--kind", "self-distill",
                        "--G", str(G), "--n_per_request", str(G), "--prefix_tokens", str(SELF_DISTILL_PREFIX),
                        "--max_new_tokens", str(SELF_DISTILL_TOKENS), "--tokenizer", TOKENIZER, "--keep_truncated",
                        "--concurrency", "1", "--progress_every", "30"], check=True)
        seconds = time.time() - started
    finally:
        server.terminate()
        server.wait()
    records = read_jsonl(out)
    cost = {"records": len(records), "completion_tokens": sum(r["usage"]["completion_tokens"] for r in records),
            "truncated": sum(r["finish_reason"] == "length" for r in records)}
    if not os.path.exists(cost_path) or json.load(open(cost_path))["records"] != len(records):
        with formats.atomic_open(cost_path, "w") as f:   # the seconds of the run that drew them all
            json.dump(dict(cost, seconds=round(seconds, 1)), f)
    cost = json.load(open(cost_path))
    log(f"self-distillation: {cost['records']} samples, {cost['completion_tokens']:,} tokens sampled in "
        f"{cost['seconds']:.0f} s, {cost['truncated']} cut at {SELF_DISTILL_TOKENS} tokens")
    return cost


# -----------------------------------------------------------------------------
# tuning: every choice on the mean val loss over seeds


def tune_real_only(trainer, plan, later):
    """The real-only grid (epochs x weight decay, every seed): {(wd, epochs): runs} and the choice."""
    grid = {(wd, e): [real_run(e, wd, s) for s in plan.seeds] for wd in plan.real_wd for e in plan.real_epochs}
    trainer.train([r for runs in grid.values() for r in runs], "real only: the epochs x weight decay grid", later)
    return grid, min(grid, key=lambda k: trainer.mean_val(grid[k]))


def tune_synthetic(trainer, plan, keys, later):
    """Real epochs for every (recipe, G) in keys: the first grid for all, then, for a point whose best
    epochs are on the edge of its grid, the next doubling (or halving) with every seed, for up to
    plan.extend rounds. Returns {key: {epochs: runs}} and {key: chosen epochs}."""
    def runs_of(key, epochs):
        return [synthetic_run(key[0], key[1], epochs, plan.syn_wd, seed) for seed in plan.seeds]
    grids = {key: {e: runs_of(key, e) for e in plan.syn_epochs} for key in keys}
    for round_ in range(plan.extend + 1):
        trainer.train([r for key in keys for runs in grids[key].values() for r in runs],
                      f"synthetic recipes: real epochs, tuning round {round_ + 1}", later)
        chosen = {key: min(grids[key], key=lambda e: trainer.mean_val(grids[key][e])) for key in keys}
        grow = {}
        for key, best in chosen.items():
            if len(grids[key]) > 1 and best == max(grids[key]) and 2 * best <= EPOCH_LIMITS[1]:
                grow[key] = 2 * best
            elif len(grids[key]) > 1 and best == min(grids[key]) and best / 2 >= EPOCH_LIMITS[0]:
                grow[key] = best / 2
        if not grow or round_ == plan.extend:
            return grids, chosen
        for key, e in grow.items():
            grids[key][e] = runs_of(key, e)
        trainer.log("extending the grid where the best epochs are on its edge: " +
                    ", ".join(f"{r} G={G} -> {e:g}" for (r, G), e in grow.items()))


def tune_law(trainer, plan, wd, grid_80, later):
    """The real-only data law: for each budget of plan.law, its grid of epochs with every seed;
    returns {documents: {epochs: runs}} (the study's own budget: its real-only grid at wd) and the
    chosen epochs of each budget."""
    law = {n: {e: [real_run(e, wd, s, n) for s in plan.seeds] for e in grid} for n, grid in plan.law.items()}
    law[BUDGET] = {e: runs for (w, e), runs in grid_80.items() if w == wd}
    trainer.train([r for n, grid in law.items() if n != BUDGET for runs in grid.values() for r in runs],
                  "the real-only data law: each budget's epochs grid", later)
    return law, {n: min(grid, key=lambda e: trainer.mean_val(grid[e])) for n, grid in law.items()}


# -----------------------------------------------------------------------------
# the runs that depend on the choices


def final_runs(plan, trainer, real_point, syn_chosen, syn_grids):
    """Runs at the tuned points: the ordering ablation (every variant at sorted's tuned epochs at
    ORDERING_G), the attention 2 x 2 (the tuned points of CDA_POINTS trained with the document mask),
    sorted / latent / self-distill at shuffled's tuned epochs for the same (or nearest) G, and the
    ensemble members (seeds 0 .. plan.members - 1 at the tuned points of ENSEMBLED)."""
    seeds, wd = plan.seeds, plan.syn_wd
    real_wd, real_e = real_point
    ordering, cda, controlled, members = {}, {}, {}, {}
    if plan.ablations:
        e = syn_chosen[("sorted", ORDERING_G)]
        ordering = {name: [synthetic_run(name, ORDERING_G, e, wd, s) for s in seeds] for name in ORDERINGS}
        for recipe, G in CDA_POINTS:
            for mask in MASKS:
                if recipe == "real":
                    cda[recipe, G, mask] = [real_run(real_e, real_wd, s, mask=mask) for s in seeds]
                else:
                    cda[recipe, G, mask] = [synthetic_run(recipe, G, syn_chosen[recipe, G], wd, s, mask) for s in seeds]
    shuffled_Gs = sorted(G for r, G in syn_chosen if r == "shuffled")
    for (recipe, G) in syn_chosen:
        if recipe != "shuffled" and shuffled_Gs:
            nearest = min(shuffled_Gs, key=lambda g: abs(math.log2(g) - math.log2(G)))
            e = syn_chosen["shuffled", nearest]
            controlled[recipe, G] = (nearest, e, [synthetic_run(recipe, G, e, wd, s) for s in seeds])
    if plan.members:
        member_seeds = range(plan.members)
        largest = {name: max(G for r, G in syn_chosen if r == name) for name in RECIPES}
        rephrases = min(("shuffled", "sorted"), key=lambda name: trainer.mean_val(
            syn_grids[name, largest[name]][syn_chosen[name, largest[name]]]))
        members["real"] = [real_run(real_e, real_wd, s) for s in member_seeds]
        members["real, member recipe"] = [real_run(2 * real_e, real_wd / 2, s) for s in member_seeds]
        for label, name in (("rephrases", rephrases), ("latent", "latent"), ("self-distill", "self-distill")):
            G = largest[name]
            members[label] = [synthetic_run(name, G, syn_chosen[name, G], wd, s) for s in member_seeds]
    return ordering, cda, controlled, members


# -----------------------------------------------------------------------------
# results


def ratio_line(packed, D):
    """Synthetic tokens per real token and per generation, the axis on which G compares with the paper."""
    per_G = {name: packed[stream_name(RECIPES[name], 1)]["per_kind"][RECIPES[name].kind]["tokens"] / D
             for name in ("shuffled", "self-distill") if stream_name(RECIPES[name], 1) in packed}
    if "shuffled" not in per_G:
        return ""
    return (f"\n\nA rephrase here is {per_G['shuffled']:.2f} real documents' worth of tokens (synthetic tokens per real "
            f"token at G = 1); in the paper about 0.57 (708-token rephrases of 1,243-token documents), so G here holds "
            f"about {per_G['shuffled'] / 0.57:.1f}x the synthetic text per real token of the paper's same G.")


def on_edge(grid, epochs):
    """" (edge)" for a choice on the edge of a grid of 3 or more values (of 2, every choice is)."""
    return " (edge)" if len(grid) > 2 and epochs in (min(grid), max(grid)) else ""


def half_width(values):
    """The half width of the 95% t interval of a mean over seeds (0 for one seed: no error bar)."""
    return evaluate.mean_interval(values)[1] if len(values) > 1 else 0.0


def fmt(values, digits=4):
    """mean ± std over seeds (the mean alone for one seed)."""
    if len(values) < 2:
        return f"{statistics.mean(values):.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def interval(mean_half):
    """A difference with its 95% interval and whether the interval excludes zero."""
    mean, half = mean_half
    if half != half:
        return evaluate.format_interval(mean, half) + " (one seed: no interval)"
    return evaluate.format_interval(mean, half) + (" (resolved)" if evaluate.resolved(mean, half) else " (not resolved)")


class DataLaw:
    """The real-only law: per-seed test losses at each budget's tuned epochs, and data efficiency by
    interpolation and by the fit L(D) = A / D^B + C, with ranges from resampling the seeds."""

    def __init__(self, tokens, losses_by_budget):
        self.budgets = sorted(losses_by_budget)
        self.tokens = [tokens[f"real{n}"] for n in self.budgets]
        self.losses = [losses_by_budget[n] for n in self.budgets]
        self.problems = []
        self.fit = evaluate.fit_power_law(self.tokens, [statistics.mean(l) for l in self.losses],
                                          warn=self.problems.append)

    @functools.lru_cache(maxsize=None)
    def resampled_fit(self, law_means):
        problems = []
        fit = evaluate.fit_power_law(self.tokens, list(law_means), warn=problems.append)
        return None if problems else fit

    def efficiency(self, recipe_losses, D):
        """(interpolated k, its relation, (low, high)), (fit k or None, (low, high) or None)."""
        means = [statistics.mean(l) for l in self.losses]
        budget, relation = evaluate.interpolated_budget(statistics.mean(recipe_losses), self.tokens, means)

        def by_interpolation(loss, *law_means):
            return evaluate.interpolated_budget(loss, self.tokens, law_means)[0] / D

        def by_fit(loss, *law_means):
            fit = self.resampled_fit(tuple(float(m) for m in law_means))
            return math.nan if fit is None else evaluate.data_efficiency(loss, fit, D)
        n = len(recipe_losses)
        if n < 2:
            ranges = (math.nan, math.nan), (math.nan, math.nan)
        else:
            ranges = (evaluate.seed_bootstrap(by_interpolation, recipe_losses, *self.losses),
                      evaluate.seed_bootstrap(by_fit, recipe_losses, *self.losses))
        fit_k = None if self.problems else evaluate.data_efficiency(statistics.mean(recipe_losses), self.fit, D)
        return (budget / D, relation, ranges[0]), (fit_k, ranges[1])


def efficiency_text(estimate):
    (k, relation, (lo, hi)), (fit_k, (flo, fhi)) = estimate
    interp = f"{'>' if relation == '>' else ''}{k:.2f}x" + ("" if lo != lo else f" [{lo:.2f}, {hi:.2f}]")
    if fit_k is None:
        return interp, "n/a (fit not identifiable)"
    fit = "above the fit's asymptote" if fit_k == math.inf else f"{fit_k:.2f}x"
    return interp, fit + ("" if flo != flo else f" [{flo:.2f}, {fhi:.2f}]" if fhi == fhi else " [some resamples not identifiable]")


@dataclass
class Study:
    """Everything the results are computed from: the plan, the trainer with every run's summary,
    the token files, and the grids and choices of each phase."""
    plan: Plan
    out: str
    trainer: Trainer
    packed: dict                  # token file -> its pack summary
    generated: dict               # stream -> generator tokens (prompt + completion) of its records
    self_distill: dict = None     # the cost of drawing the self-distillation samples
    real_grid: dict = None        # (wd, epochs) -> runs
    real_point: tuple = None      # the chosen (wd, epochs)
    syn_grids: dict = None        # (recipe, G) -> {epochs: runs}
    syn_chosen: dict = None       # (recipe, G) -> chosen epochs
    ordering: dict = None         # variant -> runs
    cda: dict = None              # (recipe, G, training mask) -> runs
    controlled: dict = None       # (recipe, G) -> (shuffled's G, its epochs, runs)
    members: dict = None          # ENSEMBLED name -> runs (seeds 0 .. members - 1)
    law_grid: dict = None         # documents -> {epochs: runs}
    law_chosen: dict = None       # documents -> chosen epochs


def main():
    ap = cli.ArgumentParser(__doc__, __file__)
    ap.add_argument("--out_dir", default=os.path.join(HERE, "out", "demo"), help="where data, runs and results go")
    ap.add_argument("--quick", action="store_true", help="one seed, three values of G, no ablations: about 6 minutes")
    ap.add_argument("--jobs", type=int, default=2, help="train.py runs side by side (one torch thread each)")
    args = ap.parse_args()
    if args.jobs < 1:
        ap.error("--jobs must be >= 1")
    plan = QUICK if args.quick else FULL
    out = os.path.join(args.out_dir, "quick") if args.quick else args.out_dir
    data = os.path.join(out, "data")
    started = time.time()
    log = functools.partial(print, flush=True)

    # ---- data: the real budgets and held-out splits, the streams of the written synthetic data
    packed, budget = prepare_data(data, plan, log)
    syn_keys = [(name, G) for name, recipe in RECIPES.items() for G in plan.Gs.get(name, recipe.Gs)]
    written = [(RECIPES[r], G) for r, G in syn_keys if RECIPES[r].kind != "self-distill"]
    written += [(recipe, ORDERING_G) for recipe in ORDERINGS.values()] if plan.ablations else []
    streams, generated = pack_streams(data, written, budget, log)
    trainer = Trainer(os.path.join(out, "runs"), data, {name: p["tokens"] for name, p in packed.items()},
                      args.jobs, started, log)
    study = Study(plan, out, trainer, {**packed, **streams}, generated)
    guess = estimated_cost(trainer, plan, syn_keys)

    # ---- real only, tuned on the val split; its tuned model is the self-distillation teacher
    study.real_grid, study.real_point = tune_real_only(trainer, plan, sum(guess.values()) - guess["real"])
    teacher = study.real_grid[study.real_point][0]
    distilled = [(RECIPES[r], G) for r, G in syn_keys if RECIPES[r].kind == "self-distill"]
    if distilled:
        study.self_distill = draw_self_distillation(trainer.ckpt(teacher), data, max(G for _, G in distilled), log)
        streams, generated = pack_streams(data, distilled, budget, log)
        study.packed.update(streams)
        study.generated.update(generated)
    trainer.tokens.update({name: p["tokens"] for name, p in study.packed.items()})

    # ---- the synthetic recipes' real epochs, tuned on the val split
    study.syn_grids, study.syn_chosen = tune_synthetic(trainer, plan, syn_keys, guess["final"] + guess["law"])
    log(f"chosen on the mean val loss over seeds: real only {study.real_point[1]:g} epochs, wd "
        f"{study.real_point[0]:g}; " + ", ".join(f"{r} G={G} {e:g}" for (r, G), e in study.syn_chosen.items()))

    # ---- runs at the tuned points, and the data law
    study.ordering, study.cda, study.controlled, study.members = final_runs(plan, trainer, study.real_point,
                                                                            study.syn_chosen, study.syn_grids)
    trainer.train([r for runs in (*study.ordering.values(), *study.cda.values(), *study.members.values(),
                                  *(c[2] for c in study.controlled.values())) for r in runs],
                  "at the tuned points: ordering, attention masks, controlled epochs, ensemble members", guess["law"])
    study.law_grid, study.law_chosen = tune_law(trainer, plan, study.real_point[0], study.real_grid, later=0.0)

    # ---- results on the test split, tables and figures
    log("\nevaluating on the test split: ensembles, the attention masks' cross-evaluation")
    report, figures = results(study, args.quick)
    report += "\n\nFigures: " + (", ".join(os.path.basename(f) for f in figures if f) or
                                 "none (matplotlib not installed)")
    commits = sorted({(s.get("code") or {}).get("commit") or "unknown" for s in trainer.summaries.values()})
    modified = any((s.get("code") or {}).get("modified") for s in trainer.summaries.values())
    report += (f"\n\nCode: {len(trainer.summaries)} runs trained by commit {', '.join(c[:12] for c in commits)}" +
               (" (with uncommitted changes)" if modified else ""))
    report += f"\n\nWall time: {time.time() - started:.0f} s"
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(report + "\n")
    print("\n" + report)


def estimated_cost(trainer, plan, syn_keys):
    """The cost (tokens) of each phase if no grid is extended, for the ETA of the earlier phases."""
    def cost(runs):
        return sum(trainer.cost(r) for r in runs)
    seeds, middle = plan.seeds, statistics.median(plan.syn_epochs)
    final = (len(ORDERINGS) - 2 + len(CDA_POINTS)) * len(seeds) if plan.ablations else 0
    final += (len(ENSEMBLED) - 1) * (plan.members - len(seeds)) + plan.members if plan.members else 0
    return {
        "real": cost(real_run(e, wd, s) for wd in plan.real_wd for e in plan.real_epochs for s in seeds),
        "synthetic": cost(synthetic_run(r, G, e, plan.syn_wd, s) for r, G in syn_keys for e in plan.syn_epochs
                          for s in seeds),
        "final": final * cost([synthetic_run("shuffled", 1, middle, plan.syn_wd, 0)]),
        "law": cost(real_run(e, plan.real_wd[0], s, n) for n, grid in plan.law.items() for e in grid for s in seeds),
    }


def results(study, quick):
    """Every table of results.md, from the summaries (test split) and a few evaluations."""
    out, plan, trainer, packed, generator_tokens = study.out, study.plan, study.trainer, study.packed, study.generated
    real_grid, real_point, syn_grids, syn_chosen = study.real_grid, study.real_point, study.syn_grids, study.syn_chosen
    ordering, cda, controlled, law_grid, law_chosen = (study.ordering, study.cda, study.controlled, study.law_grid,
                                                       study.law_chosen)
    losses_of = trainer.metric   # losses_of(runs, key='test_loss'): one value per seed
    seeds = plan.seeds
    D = trainer.tokens[f"real{BUDGET}"]
    data = os.path.join(out, "data")
    real_runs = real_grid[real_point]
    real_test = losses_of(real_runs)
    tuned = {key: syn_grids[key][e] for key, e in syn_chosen.items()}
    law = DataLaw(trainer.tokens, {n: losses_of(grid[law_chosen[n]]) for n, grid in law_grid.items()})
    Gs = {name: sorted(G for r, G in tuned if r == name) for name in RECIPES}
    Gs = {name: g for name, g in Gs.items() if g}
    sections = []

    # -- the setting, formatted from the constants
    first = trainer.summaries[real_runs[0]]
    n_syn = round(MIX * BATCH)
    sections.append(
        f"# nanosynth CPU study{' (--quick)' if quick else ''}\n\n"
        f"Model: {first['params']:,} parameters ({os.path.relpath(CONFIG, HERE)}), vocabulary {TOKENIZER} + BOS padded "
        f"to {first['model_config']['vocab_size']}, context {BLOCK_SIZE}, batch {BATCH} x {BLOCK_SIZE} tokens, lr "
        f"{TRAIN_CONFIG['lr']:g} with {TRAIN_CONFIG['warmup_frac']:.0%} warmup, cosine. Real budget: {BUDGET} documents, "
        f"{D:,} tokens ({packed[f'real{BUDGET}']['tokens'] // BLOCK_SIZE} windows). Held out: val "
        f"{packed['val']['documents']} documents ({trainer.tokens['val']:,} tokens; every choice), test "
        f"{packed['test']['documents']} documents ({trainer.tokens['test']:,} tokens; every reported number). "
        f"Synthetic recipes mix m = {MIX:g}: {n_syn} of the {BATCH} sequences of every step are synthetic, so a real "
        f"epoch takes {1 / (1 - MIX):g}x the steps of a real-only epoch. Seeds {', '.join(map(str, seeds))} (init = "
        f"data seed) for every point, so runs are paired by seed across recipes and G. Losses are mean next-token "
        f"losses in nats on the test split, mean ± standard deviation over seeds; a difference is given with its 95% t "
        f"interval (paired by seed) and called resolved only when the interval excludes zero.")

    # -- 1. loss against G
    rows, by_recipe = [], {}
    rows.append(["real only", "-", ", ".join(f"{e:g}" for e in plan.real_epochs) + " (wd " +
                 ", ".join(f"{wd:g}" for wd in plan.real_wd) + ")", f"{real_point[1]:g} (wd {real_point[0]:g})",
                 first["steps"], 0, "0", fmt(real_test), "", *efficiency_text(law.efficiency(real_test, D)),
                 f"{evaluate.ensemble_loss([trainer.ckpt(r) for r in real_runs], f'{data}/test'):.4f}" if len(seeds) > 1 else ""])
    for (name, G), runs in tuned.items():
        stream = packed[stream_name(RECIPES[name], G)]
        syn_tokens = stream["per_kind"].get(RECIPES[name].kind, {}).get("tokens", 0) if name != "latent" else \
            stream["tokens"] - D
        losses = losses_of(runs)
        estimate = law.efficiency(losses, D)
        by_recipe.setdefault(name, {})[G] = losses
        largest = G == Gs[name][-1]
        ensemble = f"{evaluate.ensemble_loss([trainer.ckpt(r) for r in runs], f'{data}/test'):.4f}" \
            if largest and len(seeds) > 1 else ""
        rows.append([name, G, ", ".join(f"{e:g}" for e in sorted(syn_grids[name, G])),
                     f"{syn_chosen[name, G]:g}{on_edge(syn_grids[name, G], syn_chosen[name, G])}",
                     trainer.summaries[runs[0]]["steps"], f"{syn_tokens:,}",
                     f"{evaluate.generation_flops(generator_tokens[stream_name(RECIPES[name], G)], GENERATOR_PARAMS):.2e}",
                     fmt(losses), interval(evaluate.paired_difference(losses, real_test)), *efficiency_text(estimate),
                     ensemble])
    sections.append("## 1. Loss against G, each (recipe, G) at its own tuned real epochs\n\n" + evaluate.markdown_table(
        ["recipe", "G", "epochs tried", "chosen", "steps", "synthetic tokens", "generation FLOPs", "test loss",
         "vs real only (95% CI)", "data efficiency (interpolated) [range]", "data efficiency (fit) [range]",
         f"ensemble of {len(seeds)} seeds" if len(seeds) > 1 else "ensemble (needs seeds)"], rows) +
        ratio_line(packed, D) +
        f"\n\nSynthetic tokens: tokens of the stream's synthetic documents (thoughts: the stream minus the real "
        f"documents); generation FLOPs: 2 x {GENERATOR_PARAMS:.0e} x the prompt and completion tokens of the records "
        f"used, as the paper's 8B generator would spend them. Data efficiency: the real budget the real-only law "
        f"needs for the recipe's mean test loss, over the {D:,} tokens used (\">\" beyond the largest budget "
        "measured); " + (f"[range]: 2.5-97.5% of the same estimate over the {len(seeds) ** len(seeds)} resamples of "
                         f"the seeds (recipe and law resampled together; with {len(seeds)} seeds a coarse range, not "
                         "an exact 95% interval). " if len(seeds) > 1 else "no range with one seed. ") +
        "Ensembles average the seeds' probabilities (largest G of each recipe).")

    # -- 2. the trend in log2 G and the sorted - shuffled gap
    lines = []
    for name, losses_by_G in by_recipe.items():
        G_values = sorted(losses_by_G)
        if len(G_values) > 1:
            slope = evaluate.slope_interval([math.log2(G) for G in G_values],
                                            [[losses_by_G[G][s] for G in G_values] for s in range(len(seeds))])
            lines.append(f"- {name}: slope of test loss per doubling of G (G = {', '.join(map(str, G_values))}): "
                         f"{interval(slope)}")
    gap_rows, gaps = [], {}
    common_Gs = sorted(set(by_recipe.get("shuffled", {})) & set(by_recipe.get("sorted", {})))
    for G in common_Gs:
        iid = evaluate.paired_difference(by_recipe["sorted"][G], by_recipe["shuffled"][G])
        long_ = evaluate.paired_difference(losses_of(tuned["sorted", G], "long_loss"), losses_of(tuned["shuffled", G], "long_loss"))
        gaps[G] = (iid, long_)
        gap_rows.append([G, interval(iid), interval(long_)])
    if len(common_Gs) > 1:
        for label, key in (("test", "test_loss"), ("long documents", "long_loss")):
            widening = evaluate.slope_interval(
                [math.log2(G) for G in common_Gs],
                [[losses_of(tuned["sorted", G], key)[s] - losses_of(tuned["shuffled", G], key)[s] for G in common_Gs]
                 for s in range(len(seeds))])
            lines.append(f"- sorted minus shuffled ({label}): change of the gap per doubling of G: {interval(widening)}"
                         " (negative: the gap widens in sorted's favour)")
    sections.append("## 2. The trend in G, and sorted minus shuffled\n\n" + "\n".join(lines) + "\n\n" +
                    evaluate.markdown_table(["G", "sorted - shuffled, test (95% CI)",
                                             "sorted - shuffled, long documents (95% CI)"], gap_rows))

    # -- 3. best epochs against G, and the real-only overfitting curve
    all_epochs = sorted({e for grid in syn_grids.values() for e in grid})
    epoch_rows = [[name, G, *[f"{trainer.mean_val(grid[e]):.4f}" if e in grid else "" for e in all_epochs],
                   f"{syn_chosen[name, G]:g}{on_edge(grid, syn_chosen[name, G])}"] for (name, G), grid in syn_grids.items()]
    curve_rows = [[f"{wd:g}", f"{e:g}", trainer.summaries[runs[0]]["steps"], fmt(losses_of(runs, "train_loss")),
                   fmt(losses_of(runs, "val_loss")), fmt(losses_of(runs))] for (wd, e), runs in real_grid.items()]
    # the overfitting past the chosen epochs, and what more weight decay does to it, paired by seed
    best_e, top_e = real_point[1], max(plan.real_epochs)
    overfitting = [f"- val loss at {top_e:g} minus {best_e:g} epochs, wd {wd:g}: " + interval(evaluate.paired_difference(
        losses_of(real_grid[wd, top_e], "val_loss"), losses_of(real_grid[wd, best_e], "val_loss")))
        for wd in plan.real_wd if top_e != best_e]
    if len(plan.real_wd) > 1:
        low, high = min(plan.real_wd), max(plan.real_wd)
        overfitting.append(f"- test loss at {top_e:g} epochs, wd {high:g} minus wd {low:g}: " + interval(
            evaluate.paired_difference(losses_of(real_grid[high, top_e]), losses_of(real_grid[low, top_e]))))
    sections.append(
        f"## 3. Tuning: best real epochs against G (mean val loss over {len(seeds)} seeds), and real data only "
        "against epochs\n\n" +
        evaluate.markdown_table(["recipe", "G", *[f"{e:g} epochs" for e in all_epochs], "chosen"], epoch_rows) +
        ("\n\nWith two values a grid, a choice says which of the two is better, not where the optimum lies "
         "(docs/demo_design.md, section 3, has a wider grid at 80 documents)." if len(plan.syn_epochs) == 2 else "") +
        "\n\n" + evaluate.markdown_table(["wd", "real epochs", "steps", "train loss", "val loss", "test loss"],
                                         curve_rows) +
        f"\n\nChosen for real only on the mean val loss: {real_point[1]:g} epochs, wd {real_point[0]:g}." +
        "".join(f"\n{line}" for line in overfitting))

    # -- 4. controlled epochs: sorted and latent at shuffled's tuned epochs
    control_rows = []
    for (name, G), (nearest, e, runs) in controlled.items():
        losses, reference = losses_of(runs), by_recipe["shuffled"][nearest]
        control_rows.append([name, G, f"{syn_chosen[name, G]:g}", fmt(by_recipe[name][G]), f"{e:g} (shuffled G={nearest})",
                             fmt(losses), interval(evaluate.paired_difference(losses, reference))])
    sections.append("## 4. Sorted and latent at shuffled's tuned epochs (is the gain retuning?)\n\n" +
                    evaluate.markdown_table(["recipe", "G", "own epochs", "test loss", "shuffled's epochs",
                                             "test loss there", "minus shuffled (95% CI)"], control_rows))

    # -- 5. ordering and 6. attention across documents
    figures_extra = {}
    if ordering:
        reference = losses_of(ordering["sorted, real last"])
        rows = [[name, fmt(losses_of(runs)), "" if name == "sorted, real last" else
                 interval(evaluate.paired_difference(losses_of(runs), reference))] for name, runs in ordering.items()]
        e = syn_chosen["sorted", ORDERING_G]
        sections.append(f"## 5. Ordering at G = {ORDERING_G} (every variant at sorted's tuned {e:g} real epochs)\n\n" +
                        evaluate.markdown_table(["variant", "test loss", "minus sorted, real last (95% CI)"], rows))
        figures_extra["ordering"] = {name: losses_of(runs) for name, runs in ordering.items()}
    if cda:
        cross, rows = {}, []
        for (recipe, G, train_mask), runs in cda.items():
            for eval_mask in MASKS:
                cross[recipe, G, train_mask, eval_mask] = [
                    evaluate.ensemble_loss([trainer.ckpt(r)], f"{data}/test", mask=eval_mask) for r in runs]
        for recipe, G in CDA_POINTS:
            label = recipe + (f" G={G}" if G else "")
            for train_mask in MASKS:
                rows.append([label, train_mask, *[fmt(cross[recipe, G, train_mask, m]) for m in MASKS]])
            for m in MASKS:
                rows.append([label, f"training effect at eval {m}", "", interval(evaluate.paired_difference(
                    cross[recipe, G, "document", m], cross[recipe, G, "causal", m]))])
            for t in MASKS:
                rows.append([label, f"evaluation effect, trained {t}", "", interval(evaluate.paired_difference(
                    cross[recipe, G, t, "document"], cross[recipe, G, t, "causal"]))])
        sections.append("## 6. Attention across documents: training mask x evaluation mask (test)\n\n" +
                        evaluate.markdown_table(["recipe", "trained with", *[f"evaluated {m}" for m in MASKS]],
                                                [r if len(r) == 4 else r + [""] for r in rows]) +
                        "\n\nEffects are document minus causal, paired by seed (training) or by model (evaluation). "
                        "Evaluated with the document mask, a test document never sees the unrelated documents "
                        "before it in its window; with the causal mask it does.")
        figures_extra["cda"] = cross

    # -- 7. the second domain
    rows = [["real only", "-", fmt(losses_of(real_runs, "long_loss"))]]
    rows += [[name, G, fmt(losses_of(runs, "long_loss"))] for (name, G), runs in tuned.items()]
    points = {"real only": real_runs, **{f"{n} G={G}": tuned[n, G] for n in Gs for G in Gs[n][-1:]}}
    buckets = list(trainer.summaries[real_runs[0]]["long_loss_by_position"])
    position_rows = [[label, *[f"{statistics.mean(trainer.summaries[r]['long_loss_by_position'][b] for r in runs):.3f}"
                               for b in buckets]] for label, runs in points.items()]
    sections.append(f"## 7. The second domain: {LONG_DOCS} long Python-documentation pages\n\n" +
                    evaluate.markdown_table(["recipe", "G", "long-document loss"], rows) + "\n\n" +
                    "Loss by position (first window of each document, mean over seeds):\n\n" +
                    evaluate.markdown_table(["recipe", *buckets], position_rows))

    # -- 8. the data law
    rows = [[n, f"{trainer.tokens[f'real{n}']:,}", ", ".join(f"{e:g}" for e in sorted(grid)),
             f"{law_chosen[n]:g}{on_edge(grid, law_chosen[n])}", fmt(losses_of(grid[law_chosen[n]])),
             f"{evaluate.power_law(trainer.tokens[f'real{n}'], *law.fit):.4f}"] for n, grid in sorted(law_grid.items())]
    A, B, C = law.fit
    sections.append(
        "## 8. The real-only data law (budgets nested: each a random superset of the smaller)\n\n" +
        evaluate.markdown_table(["real documents", "real tokens", "epochs tried", "chosen (val)", "test loss",
                                 "power-law fit"], rows) +
        f"\n\nFit of the mean test losses: L(D) = {A:.4g} / D^{B:.4g} + {C:.4f}, {len(rows)} points for 3 "
        "parameters" + (": **not identifiable** (" + "; ".join(law.problems) + "), so no data efficiency comes from it."
                        if law.problems else "."))

    # -- 9. self-distillation, and ensembles over K
    if study.self_distill:
        c = study.self_distill
        teacher_runs = real_runs[:1]
        rows = [[G, fmt(losses_of(syn_grids["self-distill", G][syn_chosen["self-distill", G]])),
                 fmt(by_recipe["shuffled"][G]) if G in by_recipe.get("shuffled", {}) else "",
                 interval(evaluate.paired_difference(by_recipe["self-distill"][G], by_recipe["shuffled"][G]))
                 if G in by_recipe.get("shuffled", {}) else ""] for G in Gs.get("self-distill", [])]
        sections.append(
            "## 9. Self-distillation, and ensembles over K\n\n"
            f"Teacher: the tuned real-only model (seed 0, test loss {losses_of(teacher_runs)[0]:.4f}), served by "
            f"serve.py on 127.0.0.1 and sampled over HTTP by generate.py --kind self-distill: {c['records']} samples "
            f"({max(Gs['self-distill'])} per budget document) at temperature 1, each from the document's first "
            f"{SELF_DISTILL_PREFIX} tokens, at most {SELF_DISTILL_TOKENS} new tokens ({c['truncated']} reached it and "
            f"are kept as they are): {c['completion_tokens']:,} tokens sampled in {c['seconds']:.0f} s. The student "
            "mixes them with the real documents as shuffled does with rephrases.\n\n" +
            evaluate.markdown_table(["G", "self-distill, test loss", "shuffled rephrases, test loss",
                                     "self-distill minus shuffled (95% CI)"], rows))
    if study.members:
        test_file = formats.TokenFile(f"{data}/test")
        log_probs = {label: [evaluate.target_log_probs(load_model(trainer.ckpt(r))[0], test_file, r.mask)
                             for r in runs] for label, runs in study.members.items()}
        ensembles = {label: ensemble_asymptote(lp) for label, lp in log_probs.items()}
        K = range(1, plan.members + 1)
        rows = []
        for label, (curve, fit, problems, (low, high), kept) in ensembles.items():
            r = study.members[label][0]
            point = f"{r.recipe}{f' G={r.G}' if r.G else ''}, {r.epochs:g} epochs, wd {r.weight_decay:g}"
            rows.append([label, point, *[f"{v:.4f}" for v in curve], f"{fit[0]:.3g} / K^{fit[1]:.3g} + {fit[2]:.4f}",
                         f"{fit[2]:.4f} [{low:.4f}, {high:.4f}]" + (f" ({kept} of {plan.members} leave-one-out fits)"
                                                                      if kept < plan.members else ""),
                         "; ".join(problems) or "-"])
        sections.append(
            ("" if study.self_distill else "## 9. Ensembles over K\n\n") +
            f"Ensembles of K members (seeds 0 .. {plan.members - 1} at one tuned point; probabilities averaged), "
            f"test loss of the average over every subset of K members, and the fit L(K) = A / K^B + C with its "
            f"asymptote C; [interval]: C ± t x its jackknife standard error (each of the {plan.members} members left "
            "out in turn; a leave-one-out fit that is not identifiable is left out and counted). 'rephrases' is the "
            "better of shuffled and sorted (mean val loss) at its largest G.\n\n" +
            evaluate.markdown_table(["members", "tuned point", *[f"K={k}" for k in K], "fit", "asymptote C [95% interval]",
                                     "fit problems"], rows))
        figures_extra["ensembles"] = ensembles

    figures = draw_figures(out, plan, trainer, real_grid, real_runs, syn_grids, syn_chosen, by_recipe, gaps, law,
                           D, figures_extra, Gs)
    return "\n\n".join(sections), figures


def ensemble_asymptote(member_log_probs):
    """The ensemble curve over K (evaluate.ensemble_curve), its fit A / K^B + C and the fit's
    problems, and a 95% interval for the asymptote C by the jackknife over members: C is fitted
    again with each member left out (the curve over K = 1 .. N - 1 of the other N - 1), and the
    spread of those N values gives C's standard error, times the t quantile with N - 1 degrees of
    freedom. (Resampling members with replacement would put copies of one member in an ensemble and
    bias C upwards.) Returns the curve, the fit, its problems, (low, high) and the number of
    leave-one-out fits that were identifiable."""
    n, K = len(member_log_probs), list(range(1, len(member_log_probs) + 1))
    curve = evaluate.ensemble_curve(member_log_probs)
    problems = []
    fit = evaluate.fit_power_law(K, curve, warn=problems.append)
    left_out = []
    for i in range(n):
        others = [lp for j, lp in enumerate(member_log_probs) if j != i]
        fit_problems = []
        C = evaluate.fit_power_law(K[:-1], evaluate.ensemble_curve(others), warn=fit_problems.append)[2]
        if not fit_problems:
            left_out.append(C)
    if len(left_out) < 2:
        return curve, fit, problems, (math.nan, math.nan), len(left_out)
    m = len(left_out)
    se = math.sqrt((m - 1) / m * sum((c - statistics.mean(left_out)) ** 2 for c in left_out))
    half = evaluate.t_quantile(0.975, m - 1) * se
    return curve, fit, problems, (fit[2] - half, fit[2] + half), m


def colors_of(labels):
    """Each recipe in the blog's colour, whatever follows its name in the label."""
    return {label: COLORS[label.split()[0]] for label in labels if label.split()[0] in COLORS}


def draw_figures(out, plan, trainer, real_grid, real_runs, syn_grids, syn_chosen, by_recipe, gaps, law, D, extra, Gs):
    """The blog's figures, drawn from this study's runs (None for each one without matplotlib)."""
    def line_figure(path, title, xlabel, series, **options):
        return evaluate.line_figure(path, title, xlabel, series,
                                    colors=colors_of([*series, *options.get("hlines", {})]), **options)
    half = half_width
    real_mean = statistics.mean(trainer.metric(real_runs))
    figures = [line_figure(
        f"{out}/loss_vs_G.png", "Test loss against generations per document (95% CI over seeds)",
        "generations per document G", {name: (list(by_G), [statistics.mean(v) for v in by_G.values()],
                                              [half(v) for v in by_G.values()]) for name, by_G in by_recipe.items()},
        ylabel="test loss (nats)", hlines={f"real only, tuned: {real_mean:.3f}": real_mean})]
    if gaps:
        figures.append(line_figure(
            f"{out}/sorted_minus_shuffled.png", "Sorted minus shuffled, paired by seed (95% CI)",
            "generations per document G", {
                "test (i.i.d.)": (list(gaps), [g[0][0] for g in gaps.values()], [g[0][1] for g in gaps.values()]),
                "long documents": (list(gaps), [g[1][0] for g in gaps.values()], [g[1][1] for g in gaps.values()])},
            ylabel="loss difference (nats)", hlines={"no difference": 0.0}))
    series = {}
    for name, by_G in by_recipe.items():
        xs, ys, spreads = [], [], []
        for G, losses in by_G.items():
            (k, _, (lo, hi)), _ = law.efficiency(losses, D)
            xs.append(G)
            ys.append(k)
            spreads.append((k - lo, hi - k) if lo == lo else (0.0, 0.0))
        series[name] = (xs, ys, spreads)
    figures.append(line_figure(f"{out}/efficiency_vs_G.png", "Data efficiency against G (interpolated law)",
                                        "generations per document G", series, ylabel="data efficiency (x real data)",
                                        hlines={"real only": 1.0}))
    top = {name: Gs[name][-1] for name in Gs}
    figures.append(line_figure(
        f"{out}/loss_vs_epochs.png", "Val loss against real epochs at the largest G (dots: seeds)", "real epochs",
        {f"{name} G={G}": (sorted(syn_grids[name, G]), [trainer.mean_val(syn_grids[name, G][e])
                                                         for e in sorted(syn_grids[name, G])], None)
         for name, G in top.items()},
        points={f"{name} G={G}": ([e for e in sorted(syn_grids[name, G]) for _ in plan.seeds],
                                  [v for e in sorted(syn_grids[name, G])
                                   for v in trainer.metric(syn_grids[name, G][e], "val_loss")])
                for name, G in top.items()},
        ylabel="val loss (nats)", hlines={"real only, tuned (val)": trainer.mean_val(real_runs)}))
    tried = sorted({e for grid in syn_grids.values() for e in grid})
    figures.append(line_figure(
        f"{out}/best_epochs_vs_G.png", f"Tuned real epochs against G (tried: {', '.join(f'{e:g}' for e in tried)})",
        "generations per document G", {name: (Gs[name], [syn_chosen[name, G] for G in Gs[name]], None) for name in Gs},
        ylabel="real epochs", yticks=tried))
    figures.append(line_figure(
        f"{out}/real_epochs.png", "Real data only: loss against epochs", "real epochs",
        {f"{split}, wd {wd:g}": (list(plan.real_epochs),
                                 [statistics.mean(trainer.metric(real_grid[wd, e], key)) for e in plan.real_epochs],
                                 [half(trainer.metric(real_grid[wd, e], key)) for e in plan.real_epochs])
         for wd in plan.real_wd for split, key in (("val", "val_loss"), ("train", "train_loss"))},
        ylabel="loss (nats)", dashed=[f"train, wd {wd:g}" for wd in plan.real_wd]))
    if "ordering" in extra:
        o = extra["ordering"]
        figures.append(evaluate.bar_figure(f"{out}/ordering.png", f"Ordering at G = {ORDERING_G} (test, 95% CI)",
                                           list(o), [statistics.mean(v) for v in o.values()],
                                           [half(v) for v in o.values()], ylabel="test loss (nats)"))
    if "cda" in extra:
        c = extra["cda"]
        labels = [f"{r}{f' G={G}' if G else ''}\ntrain {t}\neval {e}" for (r, G, t, e) in c]
        figures.append(evaluate.bar_figure(f"{out}/attention_masks.png", "Training x evaluation mask (test, 95% CI)",
                                           labels, [statistics.mean(v) for v in c.values()],
                                           [half(v) for v in c.values()], ylabel="test loss (nats)"))
    figures.append(line_figure(
        f"{out}/long_vs_G.png", "Second domain (Python docs) against G", "generations per document G",
        {name: (Gs[name], [statistics.mean(trainer.metric(syn_grids[name, G][syn_chosen[name, G]], "long_loss"))
                           for G in Gs[name]],
                [half(trainer.metric(syn_grids[name, G][syn_chosen[name, G]], "long_loss")) for G in Gs[name]])
         for name in Gs}, ylabel="long-document loss (nats)",
        hlines={"real only, tuned": statistics.mean(trainer.metric(real_runs, "long_loss"))}))
    figures.append(line_figure(
        f"{out}/data_law.png", "Real-only loss against real tokens (test, each budget tuned)", "real tokens",
        {"real only": (law.tokens, [statistics.mean(l) for l in law.losses], [half(l) for l in law.losses])},
        ylabel="test loss (nats)", hlines={f"{name} G={G}": statistics.mean(by_recipe[name][G]) for name, G in top.items()}))
    if "ensembles" in extra:
        series = {}
        for label, (curve, fit, _, _, _) in extra["ensembles"].items():
            K = list(range(1, len(curve) + 1))
            series[label] = (K, curve, None)
            smooth = [1 + i * (len(curve) - 1) / 50 for i in range(51)]
            series[f"{label}: fit, C = {fit[2]:.3f}"] = (smooth, list(evaluate.power_law(smooth, *fit)), None)
        figures.append(evaluate.line_figure(
            f"{out}/ensembles.png", "Ensembles of K members (test): loss and fit A / K^B + C", "members K", series,
            ylabel="test loss (nats)", logx=False, dashed=[label for label in series if ": fit" in label],
            colors={label: COLORS.get(label.split()[0].rstrip(":"), "gray") for label in series}))
    return figures


if __name__ == "__main__":
    main()
