"""Checks of the shipped data in sample_data/ (not tests of code): the synthetic records are in
generate.py's format, belong to training documents only (never to held-out ones), and each source
has every index below G."""
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNTH = os.path.join(ROOT, "sample_data", "synthetic")


def ids(name):
    with open(os.path.join(ROOT, "sample_data", f"{name}.jsonl")) as f:
        return {json.loads(line)["id"] for line in f}


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
