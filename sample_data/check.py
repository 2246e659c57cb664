r"""
check.py: the mechanical checks of the shipped synthetic data, with the figures that
sample_data/README.md reports (tests/test_sample_data.py asserts the same checks).

    python sample_data/check.py

Reads:  sample_data/train.jsonl, val.jsonl and synthetic/{rephrase,latent}.jsonl.
Writes: nothing; prints, per kind, the documents by G, whether every (source, index) up to each
        document's G is there exactly once, every thought's cut against generate.latent_cuts, the
        usage counts against the GPT-2 tokenizer, and the diversity of the rephrases.

Diversity of two texts: the share of word 5-grams they have in common, |A & B| / min(|A|, |B|)
over their sets of lower-cased word 5-grams. For each document, the largest value over every pair
of its rephrases: a near-copy scores close to 1, independent rewrites far less.
"""
import itertools
import json
import os
import re
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import generate  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

# The largest 5-gram share allowed between two rephrases of one document. The 80 documents with 16
# rephrases were written to stay at or below 0.35 for every pair involving a new rephrase; the
# largest pair among their first 4 (an earlier writing) is 0.43. The first 4 rephrases of the other
# 80 reach 0.68 for one document (jargon/optimism, whose entry is mostly one quoted example).
MAX_OVERLAP = {16: 0.45, 4: 0.70}


def word_grams(text, n=5):
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def overlap(a, b):
    A, B = word_grams(a), word_grams(b)
    return len(A & B) / max(1, min(len(A), len(B)))


def load():
    """(train documents {id: text}, val ids, {kind: [records]})."""
    def rows(path):
        return [json.loads(line) for line in open(os.path.join(HERE, path), encoding="utf-8")]
    train = {r["id"]: r["text"] for r in rows("train.jsonl")}
    val = {r["id"] for r in rows("val.jsonl")}
    return train, val, {kind: rows(f"synthetic/{kind}.jsonl") for kind in ("rephrase", "latent")}


def problems(train, val, records):
    """Every way the records break the format, the indices, the cuts or the usage counts: a list of
    lines (empty when all is well), and {source_id: G} per kind."""
    enc, _ = load_tokenizer("gpt2")
    out, G_of = [], {}
    for kind, rows in records.items():
        seen = {}
        for r in rows:
            key, where = (r["source_id"], r["index"]), f"{kind} {r['source_id']} {r['index']}"
            seen[key] = seen.get(key, 0) + 1
            if r["id"] != f"{r['source_id']}/{kind}/{r['index']}" or r["kind"] != kind:
                out.append(f"{where}: id or kind wrong")
            if r["source_id"] not in train or r["source_id"] in val:
                out.append(f"{where}: not a training document")
            if r["finish_reason"] != "stop" or not r["text"].strip():
                out.append(f"{where}: empty or truncated")
            if r["usage"]["completion_tokens"] != len(enc.encode_ordinary(r["text"])):
                out.append(f"{where}: completion_tokens {r['usage']['completion_tokens']} is not the GPT-2 count")
            # the prompt as generate.py sends it (these documents are far shorter than its
            # --max_source_tokens: the whole document, or the whole text on each side of the cut)
            doc = train.get(r["source_id"], "")
            prompt = generate.PROMPTS[r["prompt"]]
            user = prompt["user"].format(document=doc) if kind == "rephrase" else \
                prompt["user"].format(prefix=doc[:r["cut_char"]], suffix=doc[r["cut_char"]:])
            if r["usage"]["prompt_tokens"] != len(enc.encode_ordinary(prompt["system"] + user)):
                out.append(f"{where}: prompt_tokens {r['usage']['prompt_tokens']} is not the GPT-2 count of its prompt")
        G = {}
        for sid, index in seen:
            G[sid] = max(G.get(sid, 0), index + 1)
        for sid, g in G.items():
            missing = [i for i in range(g) if seen.get((sid, i)) != 1]
            if missing:
                out.append(f"{kind} {sid}: indices {missing} not present exactly once")
        if kind == "latent":
            for r in rows:
                text = train[r["source_id"]]
                bounds = generate.token_bounds(enc, enc.encode_ordinary(text))
                cuts = generate.latent_cuts(text, bounds, r["index"] + 1)
                if r.get("cut_rule") != "nested" or r["cut_char"] != bounds[cuts[r["index"]]]:
                    out.append(f"latent {r['source_id']} {r['index']}: cut_char {r['cut_char']} is not "
                               f"generate.py's cut {bounds[cuts[r['index']]]}")
        G_of[kind] = G
    return out, G_of


def largest_overlaps(records):
    """{source_id: (largest 5-gram share over pairs of its rephrases, the pair)}."""
    texts = {}
    for r in records["rephrase"]:
        texts.setdefault(r["source_id"], {})[r["index"]] = r["text"]
    return {sid: max((overlap(by_index[i], by_index[j]), (i, j)) for i, j in itertools.combinations(sorted(by_index), 2))
            for sid, by_index in texts.items()}


def main():
    train, val, records = load()
    found, G_of = problems(train, val, records)
    for kind, G in G_of.items():
        counts = sorted({g: sum(1 for x in G.values() if x == g) for g in G.values()}.items())
        print(f"{kind}: {len(records[kind])} records; " + ", ".join(f"{n} documents with G = {g}" for g, n in counts))
    print("format, indices, cut positions, usage: " + ("all as expected" if not found else f"{len(found)} problems"))
    for line in found[:20]:
        print("  " + line)
    largest = largest_overlaps(records)
    for g in sorted(MAX_OVERLAP, reverse=True):
        values = sorted(v for sid, (v, _) in largest.items() if G_of["rephrase"][sid] == g)
        q = statistics.quantiles(values, n=4)
        top_sid = max((sid for sid in largest if G_of["rephrase"][sid] == g), key=lambda s: largest[s][0])
        print(f"rephrase diversity, documents with G = {g} ({len(values)}): largest 5-gram share per document: "
              f"min {values[0]:.3f}, quartiles {q[0]:.3f} / {q[1]:.3f} / {q[2]:.3f}, max {values[-1]:.3f} "
              f"({top_sid}, rephrases {largest[top_sid][1][0]} and {largest[top_sid][1][1]}); allowed {MAX_OVERLAP[g]}")
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
