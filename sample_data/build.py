"""
Rebuild the real sample documents from their Debian sources.

    python sample_data/build.py              # fetches the two .deb files with apt-get download
    python sample_data/build.py --debs DIR   # or uses jargon-text_*.deb / python3.11-doc_*.deb in DIR

Reads:  Debian packages jargon-text (the Jargon File 4.4.7, public domain) and python3.11-doc
        (the Python 3.11 documentation sources, PSF license).
Writes: sample_data/train.jsonl  Jargon File lexicon entries for training      {"id", "text", "source"}
        sample_data/val.jsonl    held-out Jargon File entries (i.i.d. validation)
        sample_data/long.jsonl   long Python documentation pages (second domain, long context)

The split is a hash of the entry's id, so it is stable whatever order the entries come in, and no
validation entry can reach training. The output is byte-identical from run to run.
"""
import glob
import gzip
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import cli  # noqa: E402
VAL_PERCENT = 10            # ~10% of the ~2,300 entries: ~230 held-out documents
LONG_DOC_BYTES = (12_000, 40_000)  # documentation pages of ~3k-10k GPT-2 tokens each
LONG_DOC_DIRS = ("howto", "tutorial", "faq", "library")
LONG_DOC_COUNT = 40


def fetch_debs(workdir):
    """apt-get download needs only Debian's package registry, which these machines reach."""
    subprocess.run(["apt-get", "download", "jargon-text", "python3.11-doc"], cwd=workdir, check=True,
                   stdout=subprocess.DEVNULL)
    return workdir


def extract(deb, dest):
    subprocess.run(["dpkg-deb", "-x", deb, dest], check=True)


def jargon_entries(text):
    """Split the lexicon (from the first ':term:' line to Part III) into (term, entry text)."""
    start = text.index("\n   :(TM):")
    end = re.search(r"Part\sIII\.\sAppendices", text).start()
    lexicon = text[start:end]
    # an entry starts with a line '   :term: pronunciation, part of speech'
    heads = list(re.finditer(r"^   :(.+?):(.*)$", lexicon, flags=re.M))
    for head, nxt in zip(heads, heads[1:] + [None]):
        body = lexicon[head.end(): nxt.start() if nxt else len(lexicon)]
        # the last entry of each letter is followed by the next letter's heading ('  O', indented
        # two spaces, not three) and its list of entry names: navigation, not part of the entry
        body = re.split(r"\n  [A-Z]\n", body)[0]
        body = textwrap.dedent(body.strip("\n")).strip()
        term, rest = head.group(1), head.group(2).strip()
        first = f"{term}: {rest}" if rest and rest != "//" else term
        yield term, f"{first}\n\n{body}"


def is_val(doc_id):
    return int(hashlib.sha256(doc_id.encode()).hexdigest(), 16) % 100 < VAL_PERCENT


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {path}: {len(rows)} documents, {os.path.getsize(path) / 1e6:.2f} MB")


def main():
    ap = cli.ArgumentParser(__doc__, __file__)
    ap.add_argument("--debs", help="folder holding the two .deb files (default: apt-get download them)")
    ap.add_argument("--out", default=HERE)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        debs = args.debs or fetch_debs(tmp)
        for pattern in ("jargon-text_*.deb", "python3.11-doc_*.deb"):
            found = sorted(glob.glob(os.path.join(debs, pattern)))
            if not found:
                cli.fail(f"--debs {debs}: no {pattern} there")
            extract(found[-1], os.path.join(tmp, "root"))
        doc = os.path.join(tmp, "root", "usr", "share", "doc")

        with gzip.open(os.path.join(doc, "jargon-text", "jargon.txt.gz"), "rt", encoding="utf-8") as f:
            jargon = f.read()
        train, val, seen = [], [], {}
        for term, text in jargon_entries(jargon):
            slug = re.sub(r"[^a-z0-9]+", "-", term.lower()).strip("-") or "x"
            seen[slug] = seen.get(slug, 0) + 1
            doc_id = f"jargon/{slug}" + (f"-{seen[slug]}" if seen[slug] > 1 else "")
            row = {"id": doc_id, "text": text, "source": "Jargon File 4.4.7 (public domain)"}
            (val if is_val(doc_id) else train).append(row)

        sources = os.path.join(doc, "python3.11", "html", "_sources")
        pages = []
        for sub in LONG_DOC_DIRS:
            for path in sorted(glob.glob(os.path.join(sources, sub, "*.rst.txt"))):
                if LONG_DOC_BYTES[0] <= os.path.getsize(path) <= LONG_DOC_BYTES[1]:
                    pages.append(path)
        long_docs = []
        for path in pages[:LONG_DOC_COUNT]:
            rel = os.path.relpath(path, sources)[: -len(".rst.txt")]
            with open(path, encoding="utf-8") as f:
                text = f.read().strip()
            long_docs.append({"id": f"pydoc/{rel}", "text": text,
                              "source": "Python 3.11 documentation (PSF License)"})

    os.makedirs(args.out, exist_ok=True)
    write_jsonl(os.path.join(args.out, "train.jsonl"), train)
    write_jsonl(os.path.join(args.out, "val.jsonl"), val)
    write_jsonl(os.path.join(args.out, "long.jsonl"), long_docs)


if __name__ == "__main__":
    main()
