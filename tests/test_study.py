"""evaluate.py, sweep.py and the sample synthetic data; a tiny pack -> train -> evaluate pipeline."""
import json
import math
import os

import numpy as np
import pytest

import evaluate
import pack
import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNTH = os.path.join(ROOT, "sample_data", "synthetic")
TINY = ["--model", "cpu-2x64", "--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--mlp_hidden", "64",
        "--block_size", "64", "--batch_size", "4", "--log_interval", "5", "--eval_batch_size", "8"]


def ids(name):
    with open(os.path.join(ROOT, "sample_data", f"{name}.jsonl")) as f:
        return {json.loads(l)["id"] for l in f}


@pytest.mark.parametrize("A,B,C", [(2.0, 0.5, 3.0), (40.0, 0.3, 3.45), (0.7, 1.2, 1.0)])
def test_fit_recovers_noiseless_power_law(A, B, C):
    x = np.array([1e3, 3e3, 1e4, 3e4, 1e5])
    fit = evaluate.fit_power_law(x, evaluate.power_law(x, A, B, C))
    assert fit == pytest.approx((A, B, C), rel=1e-4)


def test_data_efficiency_round_trip():
    law = (50.0, 0.4, 3.2)
    for real_tokens in (1e4, 2e5):
        for k in (1.0, 1.5, 3.0):
            loss = evaluate.power_law(k * real_tokens, *law)
            assert evaluate.data_efficiency(loss, law, real_tokens) == pytest.approx(k, rel=1e-9)
    assert evaluate.data_efficiency(3.1, law, 1e4) == math.inf   # below the asymptote


def test_markdown_table():
    assert evaluate.markdown_table(["a", "bb"], [[1, 2.5]]) == "| a | bb  |\n|---|-----|\n| 1 | 2.5 |"


@pytest.mark.parametrize("kind,G,fields", [("rephrase", 4, set()), ("latent", 2, {"cut_char", "num_cuts"})])
def test_sample_synthetic_data(kind, G, fields):
    train_docs = {json.loads(l)["id"]: json.loads(l)["text"] for l in open(os.path.join(ROOT, "sample_data", "train.jsonl"))}
    rows = [json.loads(l) for l in open(os.path.join(SYNTH, f"{kind}.jsonl"))]
    required = {"id", "source_id", "kind", "index", "text", "model", "prompt", "finish_reason", "usage"} | fields
    per_source = {}
    for r in rows:
        assert required <= set(r) and r["kind"] == kind and r["finish_reason"] == "stop"
        assert r["id"] == f"{r['source_id']}/{kind}/{r['index']}" and r["text"].strip()
        assert r["source_id"] in train_docs            # only real training documents, never held out
        per_source.setdefault(r["source_id"], set()).add(r["index"])
        if kind == "latent":
            assert 0 < r["cut_char"] < len(train_docs[r["source_id"]]) and r["num_cuts"] == G
    assert len(per_source) >= 150 and all(v == set(range(G)) for v in per_source.values())
    assert not set(per_source) & ids("val")
    assert len({r["text"] for r in rows}) == len(rows)   # no generation repeated


def test_self_distill_sample_data():
    path = os.path.join(SYNTH, "self-distill.jsonl")
    rows = [json.loads(l) for l in open(path)]
    assert rows and all(r["kind"] == "self-distill" and r["source_id"] in ids("train") for r in rows)


def test_local_optimum():
    grid = {"epochs": [1, 2, 4], "mix": [0.5, 0.75], "weight_decay": [0.1], "lr": [3e-3]}
    losses = {sweep.run_name(dict(epochs=e, mix=m, weight_decay=0.1, lr=3e-3)): l
              for (e, m), l in {(1, 0.5): 4.0, (2, 0.5): 3.9, (4, 0.5): 3.95, (1, 0.75): 3.8, (2, 0.75): 3.7,
                                (4, 0.75): 3.75}.items()}
    best = dict(epochs=2, mix=0.75, weight_decay=0.1, lr=3e-3)
    ok, reasons = sweep.local_optimum(best, losses, grid)
    assert not ok and reasons == ["mix = 0.75 is on the edge of the grid"]
    grid["mix"] = [0.5, 0.75, 0.9]
    losses[sweep.run_name(dict(best, mix=0.9))] = 3.71
    assert sweep.local_optimum(best, losses, grid) == (True, [])
    losses[sweep.run_name(dict(best, epochs=4))] = 3.7
    assert sweep.local_optimum(best, losses, grid)[0] is False


def test_tiny_pipeline_pack_train_sweep_evaluate(tmp_path):
    """pack real + sorted megadocs -> a 2x1 sweep of train.py runs -> ensemble evaluation."""
    train_rows = [json.loads(l) for l in open(os.path.join(ROOT, "sample_data", "train.jsonl"))]
    synth = [json.loads(l) for l in open(os.path.join(SYNTH, "rephrase.jsonl"))]
    sources = sorted({r["source_id"] for r in synth})[:30]
    (tmp_path / "real.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train_rows if r["id"] in sources))
    val = open(os.path.join(ROOT, "sample_data", "val.jsonl")).readlines()[:8]
    (tmp_path / "val.jsonl").write_text("".join(val))
    quiet = lambda *a: None
    d = str(tmp_path)
    pack.pack(f"{d}/real.jsonl", f"{d}/real", tokenizer="gpt2:512", log=quiet)
    pack.pack(f"{d}/val.jsonl", f"{d}/val", tokenizer="gpt2:512", log=quiet)
    s = pack.pack(f"{d}/real.jsonl", f"{d}/sorted", "sorted", [os.path.join(SYNTH, "rephrase.jsonl")], G=2,
                  tokenizer="gpt2:512", log=quiet)
    assert s["per_kind"]["rephrase"]["documents"] == 60 and s["per_kind"]["real"]["documents"] == 30

    argv = ["--out_dir", f"{d}/sweep", "--epochs", "1", "--mix", "0", "0.5", "--", *TINY,
            "--real", f"{d}/real", "--synthetic", f"{d}/sorted", "--val", f"{d}/val"]
    sweep.main(argv)
    table = open(f"{d}/sweep/sweep.md").read()
    assert "best: " in table and "mix = " in table   # a 2-point grid: the best is on its edge
    summaries = {m: json.load(open(f"{d}/sweep/{sweep.run_name(dict(epochs=1, mix=m, weight_decay=0.1, lr=3e-3))}/summary.json"))
                 for m in (0, 0.5)}
    windows = summaries[0]["real_windows"]
    assert (summaries[0]["steps"], summaries[0.5]["steps"]) == (windows // 4, windows // 2)  # 4 vs 2 real per batch
    assert summaries[0.5]["synthetic_sequences_seen"] == summaries[0.5]["real_sequences_seen"]
    mtime = os.path.getmtime(f"{d}/sweep/{sweep.run_name(dict(epochs=1, mix=0, weight_decay=0.1, lr=3e-3))}/summary.json")
    sweep.main(argv)                                                      # finished runs are skipped
    assert os.path.getmtime(f"{d}/sweep/{sweep.run_name(dict(epochs=1, mix=0, weight_decay=0.1, lr=3e-3))}/summary.json") == mtime

    # an ensemble of K copies of one model is that model
    run = f"{d}/sweep/{sweep.run_name(dict(epochs=1, mix=0.5, weight_decay=0.1, lr=3e-3))}"
    single = summaries[0.5]["val_loss"]
    assert evaluate.ensemble_loss([f"{run}/ckpt.pt"] * 3, f"{d}/val") == pytest.approx(single, abs=1e-6)
    other = f"{d}/sweep/{sweep.run_name(dict(epochs=1, mix=0, weight_decay=0.1, lr=3e-3))}/ckpt.pt"
    pair = evaluate.ensemble_loss([f"{run}/ckpt.pt", other], f"{d}/val")
    assert pair < (single + summaries[0]["val_loss"]) / 2      # mixing probabilities beats the mean loss (Jensen)
