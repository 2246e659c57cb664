"""Checks of the shipped data in sample_data/ (not tests of code), through sample_data/check.py:
the synthetic records are in generate.py's format, belong to training documents only (never to
held-out ones), have every index up to their document's G exactly once (rephrases: G = 16 for the
first 80 documents in SHA-256 order of their ids, 4 for the next 80; thoughts: 7 and 2), every
thought sits at the cut generate.py computes now, usage counts are GPT-2's, and the rephrases of
one document are no near-copies of each other."""
import hashlib
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "sample_data"))
import check  # noqa: E402


@pytest.fixture(scope="module")
def data():
    train, val, records = check.load()
    return train, val, records, check.problems(train, val, records)


def test_format_indices_cuts_and_usage(data):
    _, _, _, (found, _) = data
    assert found == []


def test_G_by_document(data):
    _, _, records, (_, G_of) = data
    sources = sorted(G_of["rephrase"], key=lambda s: hashlib.sha256(s.encode()).hexdigest())
    assert len(sources) == 160 and set(G_of["latent"]) == set(sources)
    assert [G_of["rephrase"][s] for s in sources] == [16] * 80 + [4] * 80
    assert [G_of["latent"][s] for s in sources] == [7] * 80 + [2] * 80
    assert len(records["rephrase"]) == 80 * 16 + 80 * 4 and len(records["latent"]) == 80 * 7 + 80 * 2
    assert all(r["model"] == "claude-written" and r["temperature"] == 1.0 for rows in records.values() for r in rows)


def test_rephrases_are_not_near_copies(data):
    _, _, records, (_, G_of) = data
    largest = check.largest_overlaps(records)
    too_close = {sid: v for sid, v in largest.items() if v[0] > check.MAX_OVERLAP[G_of["rephrase"][sid]]}
    assert too_close == {}
    assert len({r["text"] for r in records["rephrase"]}) == len(records["rephrase"])   # no text repeated


def test_overlap_measure():
    text = "one two three four five six seven eight"
    assert check.overlap(text, text) == 1.0
    # 4 and 5 word 5-grams, 1 in common ("one two three four five": case and punctuation ignored)
    assert check.overlap(text, "One two three four five. Nine ten eleven twelve") == 1 / 4
    assert check.overlap(text, "eight seven six five four three two one") == 0.0


def test_self_distill_sample_data():
    path = os.path.join(ROOT, "sample_data", "synthetic", "self-distill.jsonl")
    train = {json.loads(line)["id"] for line in open(os.path.join(ROOT, "sample_data", "train.jsonl"))}
    rows = [json.loads(line) for line in open(path)]
    assert rows and all(r["kind"] == "self-distill" and r["source_id"] in train for r in rows)


def test_jargon_mc_task_is_built_from_held_out_entries():
    """sample_data/tasks/jargon_mc.jsonl (build.py): each answer is the 8 words that follow the question
    in that held-out entry, the 3 other choices come from other held-out entries, none from training."""
    val = {d["id"]: d["text"].split() for d in map(json.loads, open(os.path.join(ROOT, "sample_data", "val.jsonl")))}
    rows = [json.loads(line) for line in open(os.path.join(ROOT, "sample_data", "tasks", "jargon_mc.jsonl"))]
    assert len(rows) == 198 and len({r["id"] for r in rows}) == 198
    chunks = {" ".join(w[24:32]): i for i, w in val.items()}
    for r in rows:
        words = val[r["id"]]
        assert r["question"] == " ".join(words[:24]) and r["choices"][r["answer"]] == " ".join(words[24:32])
        assert len(set(r["choices"])) == 4 and all(chunks.get(c) not in (None, r["id"]) for i, c in
                                                   enumerate(r["choices"]) if i != r["answer"])
