"""
Turn the hand-written generations in sample_data/written/ into generate.py records, by serving
them as an OpenAI-compatible chat endpoint that generate.py calls like any other model.

    python sample_data/replay.py        # rebuilds sample_data/synthetic/{rephrase,latent}.jsonl

Why a server: the records (ids, prompts, cut points, usage, the file format) then come from
generate.py itself, exactly as they would from vLLM; only the text was written by hand.

Reads:  sample_data/train.jsonl, sample_data/written/{rephrase,latent}_*.txt: blocks of
        '=== <source_id> <index>' followed by the text a language model wrote for that request.
Writes: sample_data/synthetic/rephrase.jsonl (G = 4) and latent.jsonl (G = 2).

The server finds the answer for a request from its seed: generate.py derives one seed per
(source_id, kind, index) with request_seed(), so the seed names the generation. It checks that
the prompt holds the source document (or, for a thought, the text on both sides of its cut).
"""
import glob
import json
import os
import re
import sys
import threading
from http.server import ThreadingHTTPServer

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import generate  # noqa: E402
from serve import JSONHandler  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

MODEL = "claude-written"   # see sample_data/README.md: who wrote the texts, and how
RUNS = {"rephrase": 4, "latent": 2}   # kind -> G


def read_blocks(pattern):
    answers = {}
    for path in sorted(glob.glob(os.path.join(HERE, "written", pattern))):
        text = open(path, encoding="utf-8").read()
        for m in re.finditer(r"^=== (\S+) (\d+)\n(.*?)(?=^=== |\Z)", text, flags=re.M | re.S):
            key = (m[1], int(m[2]))
            if key in answers:
                raise SystemExit(f"{path}: {key} written twice")
            answers[key] = m[3].strip()
    return answers


def serve(kind, answers, documents, enc):
    by_seed = {generate.request_seed(0, sid, kind, i): (sid, i) for sid, i in answers}

    class Handler(JSONHandler):
        def do_POST(self):
            body = self.read_json()
            sid, index = by_seed[body["seed"]]
            prompt = "".join(m["content"] for m in body["messages"])
            if documents[sid][:40] not in prompt and documents[sid][-40:] not in prompt:
                raise RuntimeError(f"the prompt for {sid} does not hold its document")
            text = answers[(sid, index)]
            reply = {"choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                  "finish_reason": "stop"}],
                     "usage": {"prompt_tokens": len(enc.encode_ordinary(prompt)),
                               "completion_tokens": len(enc.encode_ordinary(text))}}
            self.reply(200, reply)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main():
    enc, _ = load_tokenizer("gpt2")
    documents = {json.loads(l)["id"]: json.loads(l)["text"] for l in open(os.path.join(HERE, "train.jsonl"))}
    os.makedirs(os.path.join(HERE, "synthetic"), exist_ok=True)
    for kind, G in RUNS.items():
        answers = read_blocks(f"{kind}_*.txt")
        sources = sorted({sid for sid, _ in answers})
        missing = [(s, i) for s in sources for i in range(G) if (s, i) not in answers]
        if missing:
            raise SystemExit(f"{kind}: no written text for {missing[:5]}")
        inputs = os.path.join(HERE, "synthetic", f"{kind}.sources.jsonl")
        with open(inputs, "w", encoding="utf-8") as f:
            for sid in sources:
                f.write(json.dumps({"id": sid, "text": documents[sid]}, ensure_ascii=False) + "\n")
        out = os.path.join(HERE, "synthetic", f"{kind}.jsonl")
        if os.path.exists(out):
            os.remove(out)
        server = serve(kind, answers, documents, enc)
        generate.main(["--input", inputs, "--out_jsonl", out, "--endpoint", f"http://127.0.0.1:{server.server_port}/v1",
                       "--model", MODEL, "--kind", kind, "--G", str(G), "--concurrency", "4",
                       "--progress_every", "60"])
        server.shutdown()
        os.remove(inputs)
        failures = re.sub(r"\.jsonl$", "", out) + ".failures.jsonl"
        if os.path.exists(failures) and os.path.getsize(failures) == 0:
            os.remove(failures)
        # one order whatever order the requests finished in, so rebuilds are byte-identical
        rows = sorted((json.loads(l) for l in open(out, encoding="utf-8")), key=lambda r: (r["source_id"], r["index"]))
        with open(out, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        print(f"wrote {out}: {len(rows)} records for {len(sources)} documents")


if __name__ == "__main__":
    main()
