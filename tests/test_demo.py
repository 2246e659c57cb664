"""demo.py's design, without training: the study's document order and nested budgets, the run
records (an ordering variant that is a recipe is that recipe's run, seeds pair across recipes), and
the tuning rule (the lowest mean val loss over seeds; a grid grows while its best point is on an edge)."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import demo  # noqa: E402


def test_study_documents_nest_and_start_with_the_synthetic_sources():
    documents = demo.study_documents()
    ids = [d["id"] for d in documents]
    sources = {r["source_id"] for r in demo.read_jsonl(os.path.join(ROOT, "sample_data", "synthetic", "rephrase.jsonl"))}
    assert set(ids[:160]) == sources and len(set(ids)) == len(ids) >= max(demo.FULL.law)
    # the budget's documents are among the 80 with 16 rephrases and 7 thoughts
    G16 = {r["source_id"] for r in demo.read_jsonl(os.path.join(ROOT, "sample_data", "synthetic", "rephrase.jsonl"))
           if r["index"] == 15}
    assert set(ids[:80]) == G16 and demo.BUDGET <= 80


def test_runs_pair_by_seed_and_variants_reuse_recipe_runs():
    a = demo.synthetic_run("sorted, real last", 8, 8, 0.1, 2)
    b = demo.synthetic_run("sorted", 8, 8, 0.1, 2)
    assert a == b and a.name == "sorted_G8_e8_wd0.1_s2" and a.stream == "sorted_G8"
    front = demo.synthetic_run("sorted, real first", 8, 8, 0.1, 2)
    assert front.stream == "sorted_G8_front" and front.name != a.name
    assert demo.synthetic_run("self-distill", 4, 8, 0.1, 0).stream == "self-distill_G4"
    args = dict(zip(a.train_args("D")[::2], a.train_args("D")[1::2]))
    assert args["--init_seed"] == args["--data_seed"] == "2" and args["--mix"] == f"{demo.MIX:g}"


class FakeTrainer:
    """Val losses from a function of (recipe, G, epochs, seed), no training."""
    def __init__(self, val):
        self.val, self.trained = val, []

    def train(self, runs, label, later=0.0):
        self.trained += [r for r in runs if r not in self.trained]

    def log(self, *args):
        pass

    def mean_val(self, runs):
        return sum(self.val(r) for r in runs) / len(runs)


def test_tuning_extends_an_edge_and_chooses_on_the_mean_over_seeds():
    plan = demo.Plan(seeds=(0, 1, 2), real_epochs=(8,), real_wd=(0.1,), syn_epochs=(4, 8), syn_wd=0.1, extend=2, law={})
    best = {1: 4, 16: 32}                                  # G = 1 is best at 4 epochs, G = 16 at 32

    def val(run):
        noise = {0: 0.3, 1: -0.1, 2: -0.1}[run.seed] * (run.epochs == 8)   # seed 0 alone would mislead
        return abs(run.epochs - best[run.G]) / 100 + noise
    trainer = FakeTrainer(val)
    grids, chosen = demo.tune_synthetic(trainer, plan, [("shuffled", 1), ("shuffled", 16)], later=0.0)
    # G = 1: 4 is the lower edge of {4, 8}, so 2 is tried (worse): 4 is interior now
    assert sorted(grids["shuffled", 1]) == [2, 4, 8] and chosen["shuffled", 1] == 4
    # G = 16: 8 is best on the mean (seed 0's +0.3 is averaged out), then 16, then 32: two extensions
    assert sorted(grids["shuffled", 16]) == [4, 8, 16, 32] and chosen["shuffled", 16] == 32
    assert len(trainer.trained) == 3 * (3 + 4)
