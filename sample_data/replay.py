r"""
replay.py: turn the written generations in sample_data/written/ into generate.py records, by
serving them as an OpenAI-compatible chat endpoint that generate.py calls like any other model.

    python sample_data/replay.py       # rebuilds sample_data/synthetic/{rephrase,latent}.jsonl
    python sample_data/replay.py --requests latent --G 7 --ids ids.txt --out requests.txt
                                       # the exact requests generate.py makes, for a writer to answer

Why a server: the records (ids, prompts, cut points, usage, the file format) then come from
generate.py itself, exactly as they would from vLLM; only the text was written elsewhere.

Reads:  sample_data/train.jsonl, sample_data/written/{rephrase,latent}_*.txt: blocks of
        '=== <source_id> <index>' followed by the text a language model wrote for that request.
Writes: sample_data/synthetic/rephrase.jsonl and latent.jsonl, records sorted by (source_id, index).
        Each source gets every index that was written for it (0 .. G-1; G differs between sources:
        sample_data/README.md says which have what). The file is built the way a user grows one:
        generate.py runs at the smallest G for every source, then again at each larger G for the
        sources that have it, so the later runs add only the new indices (for thoughts, the new
        cut ranks of the nested order: the cuts of earlier runs stay where they are).
        --requests: one block '=== <source_id> <index>' per request, its system and user messages
        exactly as sent, for the sources listed in --ids (one id per line).

The server finds the answer for a request from its seed: generate.py derives one seed per
(source_id, kind, index) with request_seed(), so the seed names the generation. It checks that
the prompt holds the source document (or, for a thought, the text on both sides of its cut).
"""
import glob
import json
import os
import re
import sys
import tempfile
import threading
from http.server import ThreadingHTTPServer

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import cli  # noqa: E402
import generate  # noqa: E402
from serve import JSONHandler  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

MODEL = "claude-written"   # see sample_data/README.md: who wrote the texts, and how
KINDS = ("rephrase", "latent")


def read_blocks(pattern):
    """{(source_id, index): text} of every written file matching the pattern."""
    answers = {}
    for path in sorted(glob.glob(os.path.join(HERE, "written", pattern))):
        text = open(path, encoding="utf-8").read()
        for m in re.finditer(r"^=== (\S+) (\d+)\n(.*?)(?=^=== |\Z)", text, flags=re.M | re.S):
            key = (m[1], int(m[2]))
            if key in answers:
                cli.fail(f"{path}: {key} written twice")
            answers[key] = m[3].strip()
    return answers


def serve(kind, answer, documents, enc):
    """A chat endpoint on 127.0.0.1 that answers request (source_id, index) with answer(sid, index, messages)."""
    class Handler(JSONHandler):
        def do_POST(self):
            body = self.read_json()
            sid, index = self.server.by_seed[body["seed"]]
            prompt = "".join(m["content"] for m in body["messages"])
            if documents[sid][:40] not in prompt and documents[sid][-40:] not in prompt:
                raise RuntimeError(f"the prompt for {sid} does not hold its document")
            text = answer(sid, index, body["messages"])
            reply = {"choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                  "finish_reason": "stop"}],
                     "usage": {"prompt_tokens": len(enc.encode_ordinary(prompt)),
                               "completion_tokens": len(enc.encode_ordinary(text))}}
            self.reply(200, reply)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.by_seed = {}
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def run_generate(server, kind, sources, G, documents, out):
    """generate.py --kind KIND --G G over `sources`, appending to `out`."""
    server.by_seed.update({generate.request_seed(0, sid, kind, i): (sid, i) for sid in sources for i in range(G)})
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", encoding="utf-8", delete=False) as f:
        f.writelines(json.dumps({"id": sid, "text": documents[sid]}, ensure_ascii=False) + "\n" for sid in sources)
    try:
        generate.main(["--input", f.name, "--out_jsonl", out, "--endpoint", f"http://127.0.0.1:{server.server_port}/v1",
                       "--model", MODEL, "--kind", kind, "--G", str(G), "--concurrency", "4", "--progress_every", "60"])
    finally:
        os.remove(f.name)


def rebuild(kind, documents, enc):
    answers = read_blocks(f"{kind}_*.txt")
    G_of = {}
    for sid, index in answers:
        G_of[sid] = max(G_of.get(sid, 0), index + 1)
    missing = [(sid, i) for sid, G in G_of.items() for i in range(G) if (sid, i) not in answers]
    if missing:
        cli.fail(f"{kind}: no written text for {missing[:5]}")
    out = os.path.join(HERE, "synthetic", f"{kind}.jsonl")
    if os.path.exists(out):
        os.remove(out)
    server = serve(kind, lambda sid, i, messages: answers[(sid, i)], documents, enc)
    for G in sorted(set(G_of.values())):   # smallest G for all, then each larger G adds its new indices
        run_generate(server, kind, sorted(sid for sid in G_of if G_of[sid] >= G), G, documents, out)
    server.shutdown()
    # one order whatever order the requests finished in, so rebuilds are byte-identical
    rows = sorted((json.loads(line) for line in open(out, encoding="utf-8")), key=lambda r: (r["source_id"], r["index"]))
    with open(out, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    counts = sorted({G: sum(1 for g in G_of.values() if g == G) for G in G_of.values()}.items())
    print(f"wrote {out}: {len(rows)} records; " + ", ".join(f"{n} documents with G = {G}" for G, n in counts))


def dump_requests(kind, G, ids, out_path, documents, enc):
    """Write the requests generate.py makes for these sources, each answered with a placeholder."""
    asked = {}

    def record(sid, index, messages):
        asked[(sid, index)] = messages
        return f"(placeholder {sid} {index})"
    server = serve(kind, record, documents, enc)
    with tempfile.TemporaryDirectory() as tmp:
        run_generate(server, kind, ids, G, documents, os.path.join(tmp, "out.jsonl"))
    server.shutdown()
    with open(out_path, "w", encoding="utf-8") as f:
        for sid in ids:
            for index in range(G):
                if (sid, index) in asked:
                    messages = asked[(sid, index)]
                    f.write(f"=== {sid} {index}\n" + "".join(f"[{m['role']}]\n{m['content']}\n" for m in messages) + "\n")
    print(f"wrote {out_path}: {len(asked)} requests")


def main():
    ap = cli.ArgumentParser(__doc__, __file__)
    ap.add_argument("--requests", choices=KINDS, help="write the requests of this kind instead of rebuilding")
    ap.add_argument("--G", type=int, default=1, help="with --requests: generations per source")
    ap.add_argument("--ids", help="with --requests: a file of source ids, one per line")
    ap.add_argument("--out", help="with --requests: where to write them")
    args = ap.parse_args()
    enc, _ = load_tokenizer("gpt2")
    documents = {json.loads(line)["id"]: json.loads(line)["text"] for line in open(os.path.join(HERE, "train.jsonl"))}
    if args.requests:
        if not (args.ids and args.out):
            ap.error("--requests needs --ids and --out")
        ids = [line.strip() for line in open(args.ids) if line.strip()]
        dump_requests(args.requests, args.G, ids, args.out, documents, enc)
        return
    os.makedirs(os.path.join(HERE, "synthetic"), exist_ok=True)
    for kind in KINDS:
        rebuild(kind, documents, enc)


if __name__ == "__main__":
    main()
