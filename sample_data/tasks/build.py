r"""
sample_data/tasks/build.py: a small multiple-choice task for `evaluate.py downstream` that runs with
no network, from the held-out Jargon File entries (sample_data/val.jsonl, public domain; never
trained on). Each question is an entry's first words; the choices are the 8 words that follow in
that entry and the 8 words at the same place in 3 other entries; the answer is the entry's own.
It asks what the benchmarks ask of a small model, to prefer the text that fits, on this project's
own domain.

    python sample_data/tasks/build.py      # writes sample_data/tasks/jargon_mc.jsonl (byte-identical each run)
    python evaluate.py downstream --include_path sample_data/tasks --tasks jargon_mc CKPT   # from the repo root

jargon_mc.yaml defines the task for lm_eval (zero-shot, acc); its data file is named relative to the
repository root, so run evaluate.py from there.
"""
import json
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
import cli  # noqa: E402
from formats import atomic_open  # noqa: E402

PROMPT_WORDS, CHOICE_WORDS, CHOICES, QUESTIONS = 24, 8, 4, 200


def main(argv=None):
    cli.ArgumentParser(__doc__, __file__).parse_args(argv)   # no flags: --help, and nothing else
    with open(os.path.join(HERE, "..", "val.jsonl"), encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    words = {d["id"]: d["text"].split() for d in docs}
    usable = sorted(i for i, w in words.items() if len(w) >= PROMPT_WORDS + CHOICE_WORDS)
    rng = random.Random(0)
    chunk = lambda i: " ".join(words[i][PROMPT_WORDS: PROMPT_WORDS + CHOICE_WORDS])
    rows = []
    for doc_id in rng.sample(usable, min(QUESTIONS, len(usable))):
        others = rng.sample([i for i in usable if i != doc_id and chunk(i) != chunk(doc_id)], CHOICES - 1)
        choices = [chunk(doc_id)] + [chunk(i) for i in others]
        rng.shuffle(choices)
        rows.append({"id": doc_id, "question": " ".join(words[doc_id][:PROMPT_WORDS]), "choices": choices,
                     "answer": choices.index(chunk(doc_id))})
    with atomic_open(os.path.join(HERE, "jargon_mc.jsonl")) as f:
        f.writelines((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8") for r in rows)
    print(f"wrote {len(rows)} questions to sample_data/tasks/jargon_mc.jsonl ({len(usable)} entries usable)")


if __name__ == "__main__":
    main()
