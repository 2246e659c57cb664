"""
generate.py: the synthetic-data sampler. Calls any OpenAI-compatible server (vLLM, SGLang,
llama.cpp's server, tokasaurus, OpenAI, or serve.py) to write, for every source document, G
generations of one kind:

  rephrase      G Wikipedia-style rewrites of the document (chat API, prompt "wikipedia")
  latent        G latent thoughts: the document is cut into G+1 pieces and thought i is written
                from the text before and after cut i (chat API, prompt "latent")
  self-distill  G continuations of a short real prefix of the document, sampled from a model
                trained on the real data only (completions API, e.g. python serve.py)

Run
  python generate.py --input sample_data/train.jsonl --out synth/rephrase.jsonl \
      --endpoint http://127.0.0.1:8000/v1 --model meta-llama/Llama-3.1-8B-Instruct \
      --kind rephrase --G 4 --concurrency 64
  (repeat --endpoint to share the load between servers; --shard i/n to split a corpus between
  machines; the API key is read from $OPENAI_API_KEY, or the variable named by --api-key-env)

Reads   --input: JSONL, one {"id": str, "text": str, ...} per line.
Writes  --out: JSONL, one line per generation, append-only:
          {"id": "<source_id>/<kind>/<index>", "source_id", "kind", "index", "text", "model",
           "prompt", "finish_reason", "usage": {"prompt_tokens", "completion_tokens"},
           "temperature"}  and for latent thoughts also "cut_char" and "num_cuts" (= G).
        --failures (default <out>.failures.jsonl): generations that ran out of tries.
Rerunning the same command resumes: every (source_id, kind, index) already in --out is skipped,
and a partial last line left by a crash is cut off. Ctrl-C stops cleanly (twice: at once).
"""
import argparse
from concurrent.futures import ThreadPoolExecutor
import email.utils
import hashlib
import json
import math
import os
import random
import re
import signal
import string
import sys
import threading
import time

import requests

from formats import DataError, read_jsonl, require
from tokenizer import load_tokenizer

SYSTEM = "Reply with the requested text only, with no preamble, notes or commentary."
PROMPTS = {
    "wikipedia": {"name": "wikipedia", "system": SYSTEM, "user": (
        "Rewrite the document below as a complete, high-quality English article in the style of an "
        "encyclopedia such as Wikipedia. Whatever the document's form (a glossary entry, notes, a manual "
        "page, a story), keep all of its content and facts, and add nothing it does not support.\n\n"
        "Document:\n{document}")},
    "latent": {"name": "latent", "system": SYSTEM, "user": (
        "Below are two consecutive parts of one document, with a gap between them. Write the hidden line "
        "of thought that a knowledgeable reader would need to get from the first part to the second: the "
        "reasoning, background facts and definitions that the second part takes for granted. Write concise "
        "declarative sentences in plain prose without markdown. Do not mention the parts, the gap or the "
        "document itself; just state the thinking.\n\nFirst part:\n{prefix}\n\nSecond part:\n{suffix}")},
}
FIELDS = ("document", "prefix", "suffix", "id")
KINDS = {"rephrase": "wikipedia", "latent": "latent", "self-distill": None}  # kind -> default prompt


class Fatal(Exception):
    """A configuration problem (4xx from the server, bad input): stop the whole run."""


class GiveUp(Exception):
    """A request ran out of tries; its generations go to the failures file."""
    def __init__(self, error, tries):
        super().__init__(error)
        self.error, self.tries = error, tries


class Abandoned(Exception):
    """The run is stopping (Ctrl-C or a fatal error): drop this request, a rerun redoes it."""

# -----------------------------------------------------------------------------
# prompts, and cutting documents on token boundaries


def load_prompt(args):
    if args.kind == "self-distill":
        if args.prompt_file:
            raise Fatal("--prompt-file does not apply to --kind self-distill (it samples from a real prefix)")
        return None
    if not args.prompt_file:
        return PROMPTS[KINDS[args.kind]]
    try:
        with open(args.prompt_file, encoding="utf-8") as f:
            p = json.load(f)
    except (OSError, ValueError) as e:
        raise Fatal(f"--prompt-file {args.prompt_file}: {e}") from None
    if not isinstance(p, dict) or not isinstance(p.get("name"), str) or not isinstance(p.get("user"), str) \
            or not isinstance(p.get("system", ""), str):
        raise Fatal(f'--prompt-file {args.prompt_file}: expected {{"name": str, "system": str (optional), "user": str}}')
    try:  # collect the {fields} of the template; attribute or index access counts as unknown
        used = {name for _, name, _, _ in string.Formatter().parse(p["user"]) if name is not None}
    except ValueError as e:
        raise Fatal(f"--prompt-file {args.prompt_file}: bad template ({e}); write literal braces as {{{{ and }}}}") from None
    unknown = sorted(used - set(FIELDS))
    if unknown:
        raise Fatal(f"--prompt-file {args.prompt_file}: unknown field(s) {', '.join('{%s}' % u for u in unknown)} in "
                    f"the user template; allowed: {', '.join('{%s}' % f for f in FIELDS)}")
    needed = {"rephrase": {"document"}, "latent": {"prefix", "suffix"}}[args.kind]
    if not needed <= used:
        raise Fatal(f"--prompt-file {args.prompt_file}: --kind {args.kind} needs "
                    f"{' and '.join('{%s}' % f for f in sorted(needed))} in the user template")
    return {"name": p["name"], "system": p.get("system", ""), "user": p["user"]}


CONTINUATION = bytes(range(0x80, 0xC0))  # UTF-8 continuation bytes: they start no character


def token_bounds(enc, tokens):
    """Character offset of every boundary of a token list (len(tokens) + 1 of them) in its text,
    or None where a boundary falls inside a multi-byte character (the text cannot be cut there)."""
    bounds, pos = [0], 0
    for b in enc.decode_tokens_bytes(tokens):
        if b[0] in CONTINUATION and bounds[-1] is not None:
            bounds[-1] = None
        pos += len(b.translate(None, CONTINUATION))  # the characters that start inside this token
        bounds.append(pos)
    return bounds


def span(text, bounds, i, j):
    """The text from token boundary i to token boundary j, shrunk inward to whole characters."""
    while bounds[i] is None:
        i += 1
    while bounds[j] is None:
        j -= 1
    return text[bounds[i]:bounds[j]] if i < j else ""


SENTENCE_END = re.compile(r"[.!?][\"')\]\u201d\u2019]*$")


def cut_rank(text, c):
    """How good a place character offset c is to cut at: 0 after the end of a sentence or a
    paragraph, 1 after the end of a line (hard-wrapped text), 2 anywhere else."""
    if text[max(0, c - 2):c] == "\n\n" or (SENTENCE_END.search(text[max(0, c - 4):c]) and
                                             (c == len(text) or text[c].isspace())):
        return 0
    return 1 if text[c - 1] == "\n" else 2


def latent_cuts(text, bounds, G):
    """G token boundaries that cut the text into G+1 pieces of about equal token length. Each cut
    moves to the nearest sentence end (else line end) within a quarter piece of its even position.
    Deterministic: the same text, tokenizer and G always give the same cuts (resume relies on it)."""
    n, cuts, prev = len(bounds) - 1, [], 0
    piece = n / (G + 1)
    for i in range(1, G + 1):
        ideal = i * piece
        lo, hi = max(prev + 1, math.ceil(ideal - piece / 4)), min(n - 1, math.floor(ideal + piece / 4))
        near = [k for k in range(lo, hi + 1) if bounds[k] is not None]
        if near:
            k = min(near, key=lambda k: (cut_rank(text, bounds[k]), abs(k - ideal), k))
        else:  # very short document: the next cuttable boundary (bounds[n] always is one)
            k = next(j for j in range(min(max(prev + 1, round(ideal)), n), n + 1) if bounds[j] is not None)
        cuts.append(k)
        prev = k
    return cuts


def request_seed(seed, source_id, kind, index):
    # one seed per generation, so that the G samples of a document differ but a rerun repeats them
    h = hashlib.sha256(f"{seed}/{source_id}/{kind}/{index}".encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF  # int32: some servers reject larger seeds

# -----------------------------------------------------------------------------
# input documents and the output file


def read_docs(path):
    """Yield (line number, document) of a JSONL file; a bad line stops the run naming file and line
    (the reader and checks of formats.py, so generate.py and pack.py accept exactly the same input)."""
    try:
        for lineno, doc in read_jsonl(path):
            require(doc, "id", (str,), f"{path}:{lineno}")
            require(doc, "text", (str,), f"{path}:{lineno}")
            yield lineno, doc
    except DataError as e:
        raise Fatal(str(e)) from None


def scan_output(path, kind, G):
    """{(source_id, kind): bitmask of the indices already written}. A partial last line (a crash
    mid-write) is truncated off, so that appending continues on a line boundary."""
    done, good = {}, 0
    if not os.path.exists(path):
        return done
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.endswith(b"\n"):
                break  # the partial last line
            good += len(line)
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                key, index = (r["source_id"], r["kind"]), int(r["index"])
            except (ValueError, KeyError, TypeError) as e:
                raise Fatal(f"{path}:{lineno}: not a generate.py record ({e}); fix or remove that line") from None
            if r["kind"] == "latent" and kind == "latent" and r.get("num_cuts") != G:
                raise Fatal(f"{path}:{lineno}: latent thoughts made with num_cuts={r.get('num_cuts')}, but --G {G} "
                            "cuts the documents elsewhere; write to a new --out")
            done[key] = done.get(key, 0) | (1 << index)
    size = os.path.getsize(path)
    if good < size:
        with open(path, "r+b") as f:
            f.truncate(good)
        print(f"{path}: removed a partial last line ({size - good} bytes) left by an interrupted run", file=sys.stderr)
    return done


class JsonlWriter:
    """Appends whole JSON lines under a lock: each line goes to the OS in full before the lock is
    released, and is fsync'd at least once a second. After close(), writes are dropped."""

    def __init__(self, path):
        self.path, self.f, self.closed, self.synced = path, None, False, 0.0
        self.lock = threading.RLock()  # re-entrant: the Ctrl-C handler runs on the main thread

    def write(self, obj):
        data = memoryview((json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8"))
        with self.lock:
            if self.closed:
                return False
            if self.f is None:  # opened on first use: no empty failures file after a clean run
                os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
                self.f = open(self.path, "ab", buffering=0)
            while data:
                data = data[self.f.write(data):]
            if time.monotonic() - self.synced > 1.0:
                os.fsync(self.f.fileno())
                self.synced = time.monotonic()
            return True

    def close(self):
        with self.lock:
            self.closed = True
            if self.f is not None:
                os.fsync(self.f.fileno())
                self.f.close()
                self.f = None

# -----------------------------------------------------------------------------
# the sampler


class Sampler:
    def __init__(self, args, enc, prompt, api_key):
        self.args, self.enc, self.prompt, self.key = args, enc, prompt, api_key
        self.out, self.failures = JsonlWriter(args.out), JsonlWriter(args.failures)
        self.stop = threading.Event()
        self.local = threading.local()  # one requests.Session (keep-alive connections) per thread
        self.lock = threading.RLock()
        self.busy = [0] * len(args.endpoint)  # requests in flight per endpoint
        self.turn = 0
        self.stats = dict(done=0, failed=0, length=0, requests=0, retries=0, prompt_tokens=0, completion_tokens=0)
        self.api = "completions" if args.kind == "self-distill" else args.api
        self.start = time.time()

    def redact(self, s):
        return s.replace(self.key, "***") if self.key else s  # a server may echo the key in an error

    def count(self, **kw):
        with self.lock:
            for k, v in kw.items():
                self.stats[k] += v

    def pick_endpoint(self):
        # least requests in flight; ties go round robin so idle endpoints all get used
        with self.lock:
            n = len(self.busy)
            self.turn += 1
            i = min(range(n), key=lambda j: (self.busy[j], (j - self.turn) % n))
            self.busy[i] += 1
            return i

    def post(self, body):
        """POST one request, retrying 429/5xx/timeouts/dropped connections/malformed bodies with
        exponential backoff and jitter. Returns (list of (text, finish_reason), usage, tries)."""
        a = self.args
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        if not hasattr(self.local, "session"):
            self.local.session = requests.Session()
        for tries in range(1, a.max_tries + 1):
            i = self.pick_endpoint()
            url = a.endpoint[i].rstrip("/") + ("/chat/completions" if self.api == "chat" else "/completions")
            wait = None  # the server's Retry-After, if any
            try:
                r = self.local.session.post(url, json=body, headers=headers, timeout=a.timeout)
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                    requests.exceptions.ContentDecodingError) as e:
                error = f"{type(e).__name__}: {e}"
            else:
                if r.status_code == 200:
                    try:
                        return self.parse(r.json()) + (tries,)
                    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
                        error = f"malformed response body ({type(e).__name__}: {e}): {r.text[:200]!r}"
                elif r.status_code in (408, 429) or r.status_code >= 500:
                    error = f"HTTP {r.status_code}: {server_message(r)}"
                    wait = retry_after(r.headers.get("Retry-After"))
                else:  # any other 4xx is a configuration problem (wrong model name, bad key, ...)
                    raise Fatal(self.redact(f"{url} answered HTTP {r.status_code}: {server_message(r)}"))
            finally:
                with self.lock:
                    self.busy[i] -= 1
            if tries == a.max_tries:
                raise GiveUp(self.redact(error), tries)
            self.count(retries=1)
            delay = min(a.backoff_max, a.backoff_base * 2 ** (tries - 1)) * random.uniform(0.5, 1.0)
            if wait is not None:
                delay = max(delay, min(wait, 600.0))  # honour Retry-After (within reason)
            if self.stop.wait(delay):
                raise Abandoned()
        raise AssertionError("unreachable")

    def parse(self, data):
        choices = sorted(data["choices"], key=lambda c: c.get("index", 0))
        if not choices:
            raise ValueError("no choices")
        out = []
        for c in choices:
            text = c["message"]["content"] if self.api == "chat" else c["text"]
            if not isinstance(text, str):
                raise TypeError(f"choice text is {type(text).__name__}")
            out.append((text, str(c.get("finish_reason") or "unknown")))
        usage = data.get("usage") or {}
        usage = {k: usage[k] for k in ("prompt_tokens", "completion_tokens") if isinstance(usage.get(k), int)}
        return out, usage

    def run(self, task):
        """Do one task: `indices` generations of one document that share one request body."""
        a = self.args
        todo, per = list(task["indices"]), a.n_per_request
        while todo:
            if self.stop.is_set():
                return
            asked = min(per, len(todo))
            body = dict(task["body"], n=asked)
            if a.seed >= 0:
                body["seed"] = request_seed(a.seed, task["source_id"], a.kind, todo[0])
            try:
                choices, usage, tries = self.post(body)
            except GiveUp as e:
                for index in todo:
                    self.failures.write({"source_id": task["source_id"], "kind": a.kind, "index": index,
                                         "error": e.error, "tries": e.tries})
                self.count(failed=len(todo))
                return
            except Abandoned:
                return
            choices = choices[:asked]
            self.count(requests=1, prompt_tokens=usage.get("prompt_tokens", 0),
                       completion_tokens=usage.get("completion_tokens", 0))
            for (text, finish), index, used in zip(choices, todo, self.split_usage(usage, choices, task)):
                rec = {"id": f"{task['source_id']}/{a.kind}/{index}", "source_id": task["source_id"], "kind": a.kind,
                       "index": index, "text": task["prefix"] + text if a.kind == "self-distill" else text.strip(),
                       "model": a.model, "prompt": task["prompt_name"], "finish_reason": finish, "usage": used,
                       "temperature": float(a.temperature), **task["extra"]}
                if self.out.write(rec):
                    self.count(done=1, length=int(finish == "length"))
            todo = todo[len(choices):]
            if len(choices) < asked:
                per = 1  # the server gave fewer choices than asked: request the rest one by one

    def split_usage(self, usage, choices, task):
        """Per-generation token counts. The server reports one total per request: with several
        choices, a choice cut at the length limit used max_new_tokens, and the rest of the total is
        shared out in proportion to local token counts."""
        prompt = usage.get("prompt_tokens", task["local_prompt_tokens"])
        if len(choices) == 1 and "completion_tokens" in usage:
            return [{"prompt_tokens": prompt, "completion_tokens": usage["completion_tokens"]}]
        local = [len(self.enc.encode_ordinary(t)) for t, _ in choices]
        total = usage.get("completion_tokens", sum(local))
        counts = [self.args.max_new_tokens if f == "length" else None for _, f in choices]
        rest = total - sum(c or 0 for c in counts)
        if rest < 0:  # the server counts differently: share everything out
            counts, rest = [None] * len(choices), total
        free = [i for i, c in enumerate(counts) if c is None]
        share, weight = rest, max(1, sum(local[i] for i in free))
        for j, i in enumerate(free):
            counts[i] = rest if j == len(free) - 1 else round(share * local[i] / weight)
            rest -= counts[i]
        return [{"prompt_tokens": prompt, "completion_tokens": c} for c in counts]

    def tasks(self, docs, done):
        """Requests to make, document by document: (indices, request body, record extras)."""
        a, enc = self.args, self.enc
        mask = (1 << a.G) - 1
        for doc in docs:
            sid, text = doc["id"], doc["text"]
            missing = [i for i in range(a.G) if not done.get((sid, a.kind), 0) & mask & (1 << i)]
            if not missing or not text:
                continue
            tokens = enc.encode_ordinary(text)
            n = len(tokens)
            limit = a.max_source_tokens or 2 * n + 2  # source tokens in a prompt (0: no limit)
            base = dict(source_id=sid, extra={}, prefix="", prompt_name=self.prompt["name"] if self.prompt else "")
            if a.kind == "latent":
                bounds = token_bounds(enc, tokens)
                side, cuts = max(1, limit // 2), latent_cuts(text, bounds, a.G)  # side: tokens each side of the cut
                for i in missing:
                    k = cuts[i]
                    fields = dict(document=text, id=sid, prefix=span(text, bounds, max(0, k - side), k),
                                  suffix=span(text, bounds, k, min(n, k + side)))
                    yield dict(base, indices=[i], extra={"cut_char": bounds[k], "num_cuts": a.G}, **self.body(fields))
                continue
            if a.kind == "self-distill":
                k = min(n, a.prefix_tokens)
                prefix = span(text, token_bounds(enc, tokens[:k + 1]), 0, k)
                body = {"model": a.model, "prompt": prefix, "temperature": a.temperature, "max_tokens": a.max_new_tokens}
                base.update(prefix=prefix, prompt_name=f"prefix-{a.prefix_tokens}" if a.prefix_tokens else "unconditional",
                            body=body, local_prompt_tokens=len(enc.encode_ordinary(prefix)))
            else:
                source = text if n <= limit else span(text, token_bounds(enc, tokens[:limit + 1]), 0, limit)
                base.update(self.body(dict(document=source, id=sid, prefix=source, suffix="")))
            for j in range(0, len(missing), a.n_per_request):
                yield dict(base, indices=missing[j:j + a.n_per_request])

    def body(self, fields):
        a, p = self.args, self.prompt
        user = p["user"].format(**fields)
        if self.api == "chat":
            messages = ([{"role": "system", "content": p["system"]}] if p["system"] else []) + \
                [{"role": "user", "content": user}]
            body = {"model": a.model, "messages": messages}
        else:  # a base model behind /v1/completions: the prompt as plain text
            body = {"model": a.model, "prompt": (p["system"] + "\n\n" if p["system"] else "") + user + "\n\n"}
        body.update(temperature=a.temperature, max_tokens=a.max_new_tokens)
        return {"body": body, "local_prompt_tokens": len(self.enc.encode_ordinary(p["system"] + user))}

    def progress(self, total, final=False):
        s, dt = self.stats, max(1e-9, time.time() - self.start)
        finished = s["done"] + s["failed"]
        eta = f"{dt:.1f}s elapsed" if final else f"ETA {(total - finished) * dt / max(1, finished) / 60:.1f} min"
        print(f"[generate] {s['done']:,}/{total:,} done | {s['requests'] / dt:.1f} req/s | "
              f"{s['completion_tokens'] / dt:,.0f} tok/s | {eta} | retries {s['retries']:,} | failed {s['failed']:,}",
              file=sys.stderr, flush=True)


def server_message(r):
    """The message of an OpenAI-style error body {"error": {"message": ...}}, else the body's start."""
    try:
        err = r.json()["error"]
        return str(err.get("message", err) if isinstance(err, dict) else err)[:500]
    except (ValueError, KeyError, TypeError):
        return r.text[:500] or r.reason


def retry_after(value):
    """Seconds to wait from a Retry-After header (seconds or an HTTP date), or None."""
    try:
        return max(0.0, float(value))
    except (TypeError, ValueError):
        try:
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None

# -----------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="JSONL documents {id, text}")
    p.add_argument("--out", required=True, help="JSONL output, appended to (resume)")
    p.add_argument("--failures", help="JSONL of generations that ran out of tries (default: <out>.failures.jsonl)")
    p.add_argument("--endpoint", action="append", required=True, help="base URL like http://127.0.0.1:8000/v1 (repeatable)")
    p.add_argument("--model", required=True, help="model name as the server knows it")
    p.add_argument("--kind", choices=list(KINDS), default="rephrase")
    p.add_argument("--prompt-file", help='JSON {"name", "system" (optional), "user"} with {document}/{prefix}/{suffix}/{id}')
    p.add_argument("--api", choices=["chat", "completions"], default="chat",
                   help="chat: /chat/completions (instruct models); completions: /completions (base models)")
    p.add_argument("--G", type=int, default=4, help="generations per document")
    p.add_argument("--n-per-request", type=int, default=1, help="generations per request via the n parameter")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-new-tokens", "--max-tokens", dest="max_new_tokens", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0, help="base of the per-generation seeds; -1 sends no seed")
    p.add_argument("--max-source-tokens", type=int, default=2048,
                   help="truncate the source to this many tokens (latent: half before, half after the cut); 0 = no limit")
    p.add_argument("--prefix-tokens", type=int, default=32, help="self-distill: real prefix length; 0 = unconditional")
    p.add_argument("--tokenizer", default="gpt2", help="for truncation, cuts and prefixes (see tokenizer.load_tokenizer)")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    p.add_argument("--shard", default="0/1", help="i/n: only documents whose position modulo n is i")
    p.add_argument("--max-tries", type=int, default=8)
    p.add_argument("--backoff-base", type=float, default=1.0, help="first retry delay in seconds (doubles each try)")
    p.add_argument("--backoff-max", type=float, default=60.0)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    p.add_argument("--progress-every", type=float, default=5.0, help="seconds between progress lines")
    args = p.parse_args(argv)
    m = re.fullmatch(r"(\d+)/(\d+)", args.shard)
    if not m or not int(m[1]) < int(m[2]):
        p.error(f"--shard must be i/n with 0 <= i < n, got {args.shard!r}")
    args.shard = (int(m[1]), int(m[2]))
    for name in ("G", "n_per_request", "concurrency", "max_tries", "max_new_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.temperature < 0 or args.max_source_tokens < 0 or args.prefix_tokens < 0:
        p.error("--temperature, --max-source-tokens and --prefix-tokens must be >= 0")
    if args.kind == "latent":
        args.n_per_request = 1  # each latent thought has its own prompt
    args.failures = args.failures or re.sub(r"\.jsonl$", "", args.out) + ".failures.jsonl"
    return args


def main(argv=None):
    """Run the sampler; returns the final stats dict (exit codes: 2 on a fatal error, 130 on Ctrl-C)."""
    args = parse_args(argv)
    try:
        return run(args)
    except Fatal as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


def run(args):
    enc, _ = load_tokenizer(args.tokenizer)
    prompt = load_prompt(args)
    api_key = os.environ.get(args.api_key_env) or None
    done = scan_output(args.out, args.kind, args.G)

    # pass 1: validate every input line and count the work (the text is not kept: corpora are big)
    shard_i, shard_n = args.shard
    mask, ids, total, ndocs = (1 << args.G) - 1, set(), 0, 0
    for pos, (lineno, doc) in enumerate(read_docs(args.input)):
        if pos % shard_n != shard_i:
            continue
        if doc["id"] in ids:
            raise Fatal(f"{args.input}:{lineno}: duplicate document id {doc['id']!r}")
        ids.add(doc["id"])
        ndocs += 1
        if doc["text"]:
            total += args.G - bin(done.get((doc["id"], args.kind), 0) & mask).count("1")
    print(f"[generate] {args.kind}: {total:,} generations to write for {ndocs:,} documents "
          f"(shard {shard_i}/{shard_n}, G={args.G}); {args.G * ndocs - total:,} already in {args.out} or empty",
          file=sys.stderr, flush=True)
    del ids

    sampler = Sampler(args, enc, prompt, api_key)
    docs = (d for pos, (_, d) in enumerate(read_docs(args.input)) if pos % shard_n == shard_i)

    def on_sigint(signum, frame):
        if not sampler.stop.is_set():
            print("\n[generate] stopping: no new requests; waiting for those in flight (Ctrl-C again to quit now)",
                  file=sys.stderr, flush=True)
            sampler.stop.set()
            return
        # second Ctrl-C: close the files under their locks (no half line), report, and leave now
        sampler.out.close()
        sampler.failures.close()
        sampler.progress(total, final=True)
        os._exit(130)

    in_main = threading.current_thread() is threading.main_thread()
    old_handler = signal.signal(signal.SIGINT, on_sigint) if in_main else None
    pool = ThreadPoolExecutor(args.concurrency, thread_name_prefix="generate")
    slots = threading.Semaphore(2 * args.concurrency)  # tasks queued or running: the corpus is read lazily
    errors, last = [], [time.time()]

    def finished(future):
        if future.exception() is not None:  # Fatal (a 4xx) or a bug: stop the run
            errors.append(future.exception())
            sampler.stop.set()
        slots.release()

    def acquire_slot():  # and print progress every few seconds meanwhile
        while True:
            got = slots.acquire(timeout=0.2)
            if time.time() - last[0] >= args.progress_every:
                sampler.progress(total)
                last[0] = time.time()
            if got:
                return

    try:
        for task in sampler.tasks(docs, done):
            acquire_slot()
            if sampler.stop.is_set():
                slots.release()
                break
            pool.submit(sampler.run, task).add_done_callback(finished)
        for _ in range(2 * args.concurrency):  # wait for the tasks in flight (after a stop, they end quickly)
            acquire_slot()
    finally:
        pool.shutdown(wait=True)
        sampler.out.close()
        sampler.failures.close()
        if in_main:
            signal.signal(signal.SIGINT, old_handler)
    s = sampler.stats
    sampler.progress(total, final=True)
    print(f"[generate] summary: {s['done']:,} written ({s['length']:,} stopped at the length limit), "
          f"{s['failed']:,} failed, {s['requests']:,} requests, {s['retries']:,} retries; "
          f"tokens: {s['prompt_tokens']:,} prompt, {s['completion_tokens']:,} completion", file=sys.stderr, flush=True)
    if s["failed"]:
        print(f"[generate] {s['failed']:,} generations ran out of tries (see {args.failures}); "
              "rerun the same command to retry them", file=sys.stderr)
    if errors:
        raise errors[0]  # Fatal: main() prints it; anything else is a bug and shows its traceback
    if sampler.stop.is_set():
        print("[generate] interrupted; rerun the same command to resume", file=sys.stderr)
        raise SystemExit(130)
    return dict(s, total=total, elapsed=time.time() - sampler.start)


if __name__ == "__main__":
    main()
