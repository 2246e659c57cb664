"""
generate.py: the synthetic-data sampler. Calls any OpenAI-compatible server (vLLM, SGLang,
llama.cpp's server, tokasaurus, OpenAI, or serve.py) to write, for every source document, G
generations of one kind:

  rephrase      G Wikipedia-style rewrites of the document (chat API, prompt "wikipedia")
  latent        G latent thoughts: thought i is written from the text before and after cut i,
                where cut i is the i-th of one fixed order of places, 1/2, 1/4, 3/4, 1/8, ... of
                the document (latent_cuts), so the cuts of a smaller G are among those of a larger
                one (chat API, prompt "latent")
  self-distill  G continuations of a short real prefix of the document, sampled from a model
                trained on the real data only (completions API, e.g. python serve.py)

Run
  python generate.py --input sample_data/train.jsonl --out_jsonl synth/rephrase.jsonl \\
      --endpoint http://127.0.0.1:8000/v1 --model meta-llama/Llama-3.1-8B-Instruct \\
      --kind rephrase --G 4 --concurrency 64
  python generate.py --input sample_data/train.jsonl --out_jsonl synth/self-distill.jsonl \\
      --endpoint http://127.0.0.1:8011/v1 --model nanosynth --kind self-distill --max_new_tokens 180
  (repeat --endpoint to share the load between servers; --shard i/n to split a corpus between
  machines; the API key is read from $OPENAI_API_KEY, or the variable named by --api_key_env)

Reads   --input: JSONL, one {"id": str, "text": str, ...} per line (UTF-8, at least one document),
          or gzipped JSONL (.jsonl.gz), or Parquet (.parquet); --text_field and --id_field name the
          fields (formats.read_documents).
Writes  --out_jsonl: JSONL, one line per generation, appended to:
          {"id": "<source_id>/<kind>/<index>", "source_id", "kind", "index", "text", "model",
           "prompt", "finish_reason", "usage": {"prompt_tokens", "completion_tokens"},
           "temperature", "api", "max_new_tokens", "seed", "tokenizer", "text_field", "id_field"},
          for rephrases and thoughts also "max_source_tokens" and "prompt_sha256" (the first 16 hex
          digits of the SHA-256 of the prompt's system and user templates), and for latent thoughts
          "cut_char" (where cut `index` is in the text) and "cut_rule" ("nested"; files cut under
          the older rule are refused). "text_field" and "id_field" are --text_field and
          --id_field as given (null: the default).
        --failures (default <out_jsonl without .jsonl>.failures.jsonl): the generations still
          missing, {"source_id", "kind", "index", "error", "tries"}: they ran out of tries, or
          were cut at the length limit on every sample. At the end of every run it is rewritten
          to list only generations still missing from --out_jsonl (once each), or removed.

The code reads in three parts: what we ask the model (prompts, cuts, request bodies and records:
pure functions), one request with its whole retry policy (make_generations), and the resumable
files and the run around them.

Before any work, GET {endpoint}/models is asked once per endpoint (within --timeout, and 10 s at most): no connection,
an HTML page, or anything but an OpenAI model list {"data": [...]} stops the run at once. Some
servers have no /models: one answering 404, 405 or 501 there is accepted, but until it has given
one OpenAI reply, any reply of it that is not an OpenAI JSON body stops the run (instead of
retrying it as a glitch). What is retried and what is not: make_generations.

Length limit: a reply cut at --max_new_tokens (finish_reason "length") is sampled again, with a
fresh seed, up to --length_retries times; if every sample is cut, the generation goes to the
failures file. With --keep_truncated such replies are written as they are (pack.py drops them
unless told to keep them).

Rerunning the same command resumes: every (source_id, kind, index) already in --out_jsonl is
skipped (so a rerun with a larger --G writes only the new indices, for thoughts as for rephrases), except those cut at the length limit (unless --keep_truncated): their lines are removed
from --out_jsonl and they are sampled again, so one record per generation remains. A partial last
line left by a crash is cut off. A rerun whose settings (the fields above from "model" on: --model,
--api, --prompt_file, --temperature, --max_new_tokens, --seed, --max_source_tokens, --prefix_tokens,
--tokenizer, --text_field, --id_field) differ from those of the records of its kind already in --out_jsonl is refused, naming
each difference: one file holds one setting of each. Ctrl-C stops cleanly (twice: at once).

Exit status (cli.py): 0 every generation written; 1 some went to the failures file (rerun to retry
them), or a bug (with its traceback); 2 a configuration, input or server error, printed as one line
"error: ..."; 130 interrupted. The API key never appears in any message (it is replaced by ***).
"""
from concurrent.futures import ThreadPoolExecutor
import email.utils
import hashlib
import json
import os
import random
import re
import signal
import string
import sys
import threading
import time
import traceback
from urllib.parse import urlparse

import requests

import cli
from formats import CUT_RULE, DataError, atomic_open, cut_partial_line, place, read_documents, require_nested_cuts
from tokenizer import load_tokenizer


class Fatal(Exception):
    """A configuration problem (bad flags or input, a 4xx from the server, no server, a server that
    is not an OpenAI server): stop the whole run with a one-line message."""

# -----------------------------------------------------------------------------
# 1. what we ask the model: prompts, cut points, request bodies and records (pure functions)

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


def load_prompt(args):
    if args.kind == "self-distill":
        if args.prompt_file:
            raise Fatal("--prompt_file does not apply to --kind self-distill (it samples from a real prefix)")
        return None
    if not args.prompt_file:
        return PROMPTS[KINDS[args.kind]]
    try:
        with open(args.prompt_file, encoding="utf-8") as f:
            p = json.load(f)
    except (OSError, ValueError) as e:
        raise Fatal(f"--prompt_file {args.prompt_file}: {e}") from None
    if not isinstance(p, dict) or not isinstance(p.get("name"), str) or not isinstance(p.get("user"), str) \
            or not isinstance(p.get("system", ""), str):
        raise Fatal(f'--prompt_file {args.prompt_file}: expected {{"name": str, "system": str (optional), "user": str}}')
    try:  # collect the {fields} of the template; attribute or index access counts as unknown
        used = {name for _, name, _, _ in string.Formatter().parse(p["user"]) if name is not None}
    except ValueError as e:
        raise Fatal(f"--prompt_file {args.prompt_file}: bad template ({e}); write literal braces as {{{{ and }}}}") from None
    unknown = sorted(used - set(FIELDS))
    if unknown:
        raise Fatal(f"--prompt_file {args.prompt_file}: unknown field(s) {', '.join('{%s}' % u for u in unknown)} in "
                    f"the user template; allowed: {', '.join('{%s}' % f for f in FIELDS)}")
    needed = {"rephrase": {"document"}, "latent": {"prefix", "suffix"}}[args.kind]
    if not needed <= used:
        raise Fatal(f"--prompt_file {args.prompt_file}: --kind {args.kind} needs "
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


def cut_fraction(rank):
    """Where cut `rank` goes, as a fraction (numerator, denominator) of the document: the base-2
    van der Corput order 1/2, 1/4, 3/4, 1/8, 5/8, 3/8, 7/8, 1/16, ... Every prefix of the order is
    spread over the whole document, and the cuts of G = k are the first k of those of any larger G."""
    n, numerator, denominator = rank + 1, 0, 1
    while n:
        numerator, denominator, n = 2 * numerator + (n & 1), 2 * denominator, n >> 1
    return numerator, denominator


def latent_cuts(text, bounds, G):
    """The token boundaries of cuts 0 .. G-1 (in rank order, not document order): cut r goes to the
    best place (cut_rank) within a quarter of its level's spacing (1/(4 x denominator) of the
    document) of its fraction cut_fraction(r), nearest first, never where an earlier cut is.
    Cut r depends only on the text and on cuts 0 .. r-1, so the cuts nest: those of G = k are the
    first k of those of G = k + 1, and one generation at the largest G serves every smaller G.
    A document with fewer than G interior places to cut gets fewer cuts. Deterministic: resume and
    the sample-data checks rely on it."""
    n = len(bounds) - 1
    free = [k for k in range(1, n) if bounds[k] is not None]   # interior boundaries on whole characters
    cuts = []
    for rank in range(G):
        if not free:
            break
        numerator, denominator = cut_fraction(rank)
        ideal, reach = n * numerator / denominator, n / (4 * denominator)
        near = [k for k in free if abs(k - ideal) <= reach]
        k = min(near, key=lambda k: (cut_rank(text, bounds[k]), abs(k - ideal), k)) if near else \
            min(free, key=lambda k: (abs(k - ideal), k))
        cuts.append(k)
        free.remove(k)
    return cuts


def request_seed(seed, source_id, kind, index, attempt=0):
    # one seed per generation, so that the G samples of a document differ but a rerun repeats them;
    # a sample cut at the length limit is drawn again with the seed of its next attempt
    name = f"{seed}/{source_id}/{kind}/{index}" + (f"/{attempt}" if attempt else "")
    h = hashlib.sha256(name.encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF  # int32: some servers reject larger seeds


def generation_settings(args, prompt, api):
    """Everything that shapes a generation besides its document and index, as stored in each of
    its records (fields of formats.GENERATION_SETTINGS): a resume must use the same (scan_output
    refuses another), and pack.py warns when the records it packs differ in them."""
    settings = {"model": args.model, "temperature": float(args.temperature), "api": api,
                "max_new_tokens": args.max_new_tokens, "seed": args.seed, "tokenizer": args.tokenizer,
                # which field of --input the text and the id were read from (as given: None is the default)
                "text_field": args.text_field, "id_field": args.id_field}
    if prompt is None:   # self-distill: a real prefix, no template
        settings["prompt"] = f"prefix-{args.prefix_tokens}" if args.prefix_tokens else "unconditional"
    else:
        template = (prompt["system"] + "\0" + prompt["user"]).encode()
        settings.update(prompt=prompt["name"], prompt_sha256=hashlib.sha256(template).hexdigest()[:16],
                        max_source_tokens=args.max_source_tokens)
    return settings


def request_body(args, api, prompt, fields, enc):
    """The body of a request for one prompt template filled with `fields`, and its prompt's token
    count by our tokenizer (used when the server reports no usage)."""
    user = prompt["user"].format(**fields)
    if api == "chat":
        messages = ([{"role": "system", "content": prompt["system"]}] if prompt["system"] else []) + \
            [{"role": "user", "content": user}]
        body = {"model": args.model, "messages": messages}
    else:  # a base model behind /v1/completions: the prompt as plain text
        body = {"model": args.model, "prompt": (prompt["system"] + "\n\n" if prompt["system"] else "") + user + "\n\n"}
    body.update(temperature=args.temperature, max_tokens=args.max_new_tokens)
    return {"body": body, "local_prompt_tokens": len(enc.encode_ordinary(prompt["system"] + user))}


def requests_for(doc, missing, args, api, prompt, enc):
    """The requests that make the generations `missing` (indices) of one document: a list of tasks
    {"source_id", "indices", "body", "local_prompt_tokens", "prefix", "extra"}, and how many of
    the missing thoughts cannot be asked for (the document has fewer places to cut than --G)."""
    sid, text = doc["id"], doc["text"]
    tokens = enc.encode_ordinary(text)
    n = len(tokens)
    limit = args.max_source_tokens or 2 * n + 2  # source tokens in a prompt (0: no limit)
    base = dict(source_id=sid, extra={}, prefix="")
    if args.kind == "latent":   # one request per thought: each has its own prompt
        bounds = token_bounds(enc, tokens)
        side, cuts = max(1, limit // 2), latent_cuts(text, bounds, args.G)  # side: tokens each side of the cut
        tasks = []
        for i in (i for i in missing if i < len(cuts)):
            k = cuts[i]
            fields = dict(document=text, id=sid, prefix=span(text, bounds, max(0, k - side), k),
                          suffix=span(text, bounds, k, min(n, k + side)))
            tasks.append(dict(base, indices=[i], extra={"cut_char": bounds[k], "cut_rule": CUT_RULE},
                              **request_body(args, api, prompt, fields, enc)))
        return tasks, sum(1 for i in missing if i >= len(cuts))
    if args.kind == "self-distill":
        k = min(n, args.prefix_tokens)
        prefix = span(text, token_bounds(enc, tokens[:k + 1]), 0, k)
        body = {"model": args.model, "prompt": prefix, "temperature": args.temperature, "max_tokens": args.max_new_tokens}
        base.update(prefix=prefix, body=body, local_prompt_tokens=len(enc.encode_ordinary(prefix)))
    else:
        source = text if n <= limit else span(text, token_bounds(enc, tokens[:limit + 1]), 0, limit)
        base.update(request_body(args, api, prompt, dict(document=source, id=sid, prefix=source, suffix=""), enc))
    return [dict(base, indices=missing[j:j + args.n_per_request]) for j in range(0, len(missing), args.n_per_request)], 0


def parse_reply(data, api):
    """(list of (text, finish_reason), usage) of an OpenAI reply body; an error (ValueError,
    KeyError, TypeError, ...) for anything else."""
    choices = sorted(data["choices"], key=lambda c: c.get("index", 0))
    if not choices:
        raise ValueError("no choices")
    out = []
    for c in choices:
        text = c["message"]["content"] if api == "chat" else c["text"]
        if not isinstance(text, str):
            raise TypeError(f"choice text is {type(text).__name__}")
        out.append((text, str(c.get("finish_reason") or "unknown")))
    usage = data.get("usage") or {}
    usage = {k: usage[k] for k in ("prompt_tokens", "completion_tokens") if isinstance(usage.get(k), int)}
    return out, usage


def split_usage(usage, choices, task, enc, max_new_tokens):
    """Per-generation token counts. The server reports one total per request: with several
    choices, a choice cut at the length limit used max_new_tokens, and the rest of the total is
    shared out in proportion to local token counts."""
    prompt = usage.get("prompt_tokens", task["local_prompt_tokens"])
    if len(choices) == 1 and "completion_tokens" in usage:
        return [{"prompt_tokens": prompt, "completion_tokens": usage["completion_tokens"]}]
    local = [len(enc.encode_ordinary(t)) for t, _ in choices]
    total = usage.get("completion_tokens", sum(local))
    counts = [max_new_tokens if f == "length" else None for _, f in choices]
    rest = total - sum(c or 0 for c in counts)
    if rest < 0:  # the server counts differently: share everything out
        counts, rest = [None] * len(choices), total
    free = [i for i, c in enumerate(counts) if c is None]
    share, weight = rest, max(1, sum(local[i] for i in free))
    for j, i in enumerate(free):
        counts[i] = rest if j == len(free) - 1 else round(share * local[i] / weight)
        rest -= counts[i]
    return [{"prompt_tokens": prompt, "completion_tokens": c} for c in counts]


def make_record(task, index, text, finish, usage, kind, settings):
    """The output line of one generation."""
    sid = task["source_id"]
    return {"id": f"{sid}/{kind}/{index}", "source_id": sid, "kind": kind, "index": index,
            "text": task["prefix"] + text if kind == "self-distill" else text.strip(), "model": settings["model"],
            "prompt": settings["prompt"], "finish_reason": finish, "usage": usage,
            "temperature": settings["temperature"], **settings, **task["extra"]}

# -----------------------------------------------------------------------------
# 2. one request and its whole retry policy


def server_message(r):
    """The message of an OpenAI-style error body {"error": {"message": ...}}, else the body's start
    (on one line: it goes into one-line errors and the failures file)."""
    try:
        err = r.json()["error"]
        message = str(err.get("message", err) if isinstance(err, dict) else err)
    except (ValueError, KeyError, TypeError, AttributeError):
        message = r.text or r.reason or ""
    return " ".join(message.split())[:500]


def retry_after(value):
    """Seconds to wait from a Retry-After header (seconds or an HTTP date), or None."""
    try:
        return max(0.0, float(value))
    except (TypeError, ValueError):
        try:
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def backoff(tries, args, retry_after_s):
    """Seconds to wait before try `tries` + 1: base x 2^(tries - 1), at most --backoff_max, times a
    random 0.5-1 (so that workers that failed together do not retry together), and at least the
    server's Retry-After (within reason: 600 s)."""
    delay = min(args.backoff_max, args.backoff_base * 2 ** (tries - 1)) * random.uniform(0.5, 1.0)
    return delay if retry_after_s is None else max(delay, min(retry_after_s, 600.0))


def is_json_object(r):
    try:
        return isinstance(r.json(), dict)
    except ValueError:
        return False


def auth_headers(key):
    return {"Authorization": f"Bearer {key}"} if key else {}


def redact(text, key):
    """The text with the API key replaced by *** (a server may echo the key in an error)."""
    return text.replace(key, "***") if key else text


def check_endpoint(url, key, timeout):
    """Ask GET {url}/models once, so that a wrong URL or a server that is down or is not an OpenAI
    server stops the run at start-up. Returns True if the server listed its models, False if it
    has no /models route (then Sampler.post checks its first reply instead)."""
    try:
        r = requests.get(url.rstrip("/") + "/models", headers=auth_headers(key), timeout=timeout)
    except requests.Timeout:
        raise Fatal(f"--endpoint {url}: no answer to GET {url}/models within {timeout:g} s") from None
    except requests.RequestException as e:
        # the innermost reason ("Connection refused", "Name or service not known"), not urllib3's story
        m = re.search(r"\[Errno -?\d+\] ([^'\")]+)", str(e))
        reason = m[1] if m else f"{type(e).__name__}: {e}"
        raise Fatal(redact(f"--endpoint {url}: cannot connect ({reason}); is the server running, "
                           "and is this its base URL (like http://127.0.0.1:8000/v1)?", key)) from None
    if r.status_code in (404, 405, 501):
        return False  # up, but without a /models route (some OpenAI-compatible servers lack it)
    if r.status_code != 200:
        raise Fatal(redact(f"--endpoint {url}: GET {url}/models answered HTTP {r.status_code}: {server_message(r)}", key))
    try:
        listed = isinstance(r.json()["data"], list)
    except (ValueError, KeyError, TypeError):
        listed = False
    if not listed:
        what = "an HTML page" if r.text.lstrip()[:1] == "<" else "something other than a model list"
        raise Fatal(redact(f"--endpoint {url}: not an OpenAI-compatible server: GET {url}/models answered {what} "
                           f"({r.text[:100]!r}); is this the base URL (like http://127.0.0.1:8000/v1)?", key))
    return True


class Endpoints:
    """The servers of a run: which one a request goes to (the one with the fewest requests in
    flight, ties round robin), which have answered like OpenAI servers (their /models listed models
    at start-up, or they gave an OpenAI reply since), and one HTTP session per thread."""

    def __init__(self, urls, api, has_models):
        route = "/chat/completions" if api == "chat" else "/completions"
        self.urls, self.posts = urls, [url.rstrip("/") + route for url in urls]
        self.busy, self.turn, self.verified = [0] * len(urls), 0, list(has_models)
        self.lock, self.local = threading.Lock(), threading.local()

    def post(self, body, key, timeout):
        """POST one request to the least busy endpoint: (endpoint number, the reply or the
        requests exception raised)."""
        with self.lock:
            n = len(self.busy)
            self.turn += 1
            i = min(range(n), key=lambda j: (self.busy[j], (j - self.turn) % n))
            self.busy[i] += 1
        if not hasattr(self.local, "session"):
            self.local.session = requests.Session()  # keep-alive connections, one pool per thread
        try:
            return i, self.local.session.post(self.posts[i], json=body, headers=auth_headers(key), timeout=timeout)
        except requests.RequestException as e:
            return i, e
        finally:
            with self.lock:
                self.busy[i] -= 1


RETRIED = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
           requests.exceptions.ContentDecodingError)   # the network's glitches


def make_generations(task, args, api, endpoints, run):
    """Make the generations `task["indices"]` of one document, which share one request body, and
    write them (run.write) or their failure (run.fail). The retry policy, all of it:

      * retried, after backoff() seconds, up to --max_tries tries of one request: a timeout, a
        dropped connection, HTTP 408, 429 and 5xx (but 501), and a malformed 200 body from a server
        that has given an OpenAI reply before; then every generation still to make has failed;
      * sampled again, alone, with the seed of its next attempt, up to --length_retries times: a
        choice cut at the length limit (unless --keep_truncated); then that generation has failed;
      * asked again one by one: the choices a server left out of a reply with fewer than n;
      * the run stops (Fatal), as no retry can help: any other 4xx (a wrong model name, a bad key),
        a 501, another error of the HTTP client, or, from a server that has not given an OpenAI
        reply yet, any reply that is not an OpenAI JSON body (an HTML page, plain text)."""
    a, sid, key = args, task["source_id"], args.api_key
    todo, per, tries = [(index, 0) for index in task["indices"]], a.n_per_request, 0  # (index, attempt)
    while todo and not run.stop.is_set():
        index, attempt = todo[0]
        # first samples go n at a time (one shared seed); samples again go one by one, each with its own seed
        asked = 1 if attempt else min(per, sum(1 for _, t in todo if t == 0))
        body = dict(task["body"], n=asked)
        if a.seed >= 0:
            body["seed"] = request_seed(a.seed, sid, a.kind, index, attempt)
        tries += 1
        i, r = endpoints.post(body, key, a.timeout)
        url, error, wait = endpoints.posts[i], None, None
        if isinstance(r, RETRIED):
            error = f"{type(r).__name__}: {r}"
        elif isinstance(r, Exception):  # anything else (a bad header, ...) will not get better
            raise Fatal(redact(f"{url}: {type(r).__name__}: {r}", key))
        elif r.status_code == 200:
            try:
                choices, usage = parse_reply(r.json(), api)
            except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
                if not endpoints.verified[i]:
                    raise Fatal(redact(f"--endpoint {endpoints.urls[i]}: not an OpenAI-compatible server: it has no "
                                       f"/models and its first reply is not an OpenAI JSON body ({r.text[:100]!r})",
                                       key)) from None
                error = f"malformed response body ({type(e).__name__}: {e}): {r.text[:200]!r}"
            else:
                endpoints.verified[i] = True
        elif r.status_code == 501 or not (endpoints.verified[i] or is_json_object(r)):
            what = "an HTML page" if r.text.lstrip()[:1] == "<" else "a body that is not OpenAI JSON"
            raise Fatal(redact(f"--endpoint {endpoints.urls[i]}: not an OpenAI-compatible server: POST {url} answered "
                               f"HTTP {r.status_code} with {what} ({r.text[:100]!r})", key))
        elif r.status_code in (408, 429) or r.status_code >= 500:
            error, wait = f"HTTP {r.status_code}: {server_message(r)}", retry_after(r.headers.get("Retry-After"))
        else:  # any other 4xx is a configuration problem (wrong model name, bad key, ...)
            raise Fatal(redact(f"{url} answered HTTP {r.status_code}: {server_message(r)}", key))

        if error is not None:
            if tries == a.max_tries:
                for index, _ in todo:
                    run.fail(sid, index, redact(error, key), tries)
                return
            run.count(retries=1)
            run.stop.wait(backoff(tries, a, wait))
            continue
        tries = 0
        choices = choices[:asked]
        run.count(requests=1, prompt_tokens=usage.get("prompt_tokens", 0),
                  completion_tokens=usage.get("completion_tokens", 0))
        again = []
        for (text, finish), (index, attempt), used in zip(choices, todo,
                                                          split_usage(usage, choices, task, run.enc, a.max_new_tokens)):
            if finish == "length":
                run.count(length=1)
            if finish == "length" and not a.keep_truncated:
                if attempt < a.length_retries:
                    again.append((index, attempt + 1))
                    run.count(resampled=1)
                else:
                    run.fail(sid, index, f"cut at the length limit (--max_new_tokens {a.max_new_tokens}) "
                             f"in all {attempt + 1} samples", attempt + 1)
                continue
            run.write(make_record(task, index, text, finish, used, a.kind, run.settings))
        todo = todo[len(choices):] + again
        if len(choices) < asked:
            per = 1  # the server gave fewer choices than asked: request the rest one by one

# -----------------------------------------------------------------------------
# 3. the resumable files, and the run


class Indices:
    """A set of generations (source_id, kind, index), kept as one integer per (source_id, kind)
    whose bit i stands for index i: a corpus of 164k documents x 32 generations takes a few MB,
    where Python sets of ints would take hundreds."""

    def __init__(self):
        self.bits = {}

    def add(self, source_id, kind, index):
        self.bits[source_id, kind] = self.bits.get((source_id, kind), 0) | 1 << index

    def __contains__(self, generation):
        source_id, kind, index = generation
        return self.bits.get((source_id, kind), 0) >> index & 1 == 1

    def missing(self, source_id, kind, G):
        """The indices below G not in the set, in order."""
        return [i for i in range(G) if (source_id, kind, i) not in self]


def read_docs(path, text_field="text", id_field=None):
    """Yield (line or row number, document) of a document file; a bad line stops the run naming file
    and line (formats.read_documents, so generate.py and pack.py accept exactly the same input)."""
    try:
        yield from read_documents(path, text_field, id_field)
    except DataError as e:   # also a line that is not UTF-8: the reader names it
        raise Fatal(str(e)) from None


def read_records(path, what):
    """Yield (line number, raw line, record) for the records of a JSONL file this script writes
    (the output or the failures file). A partial last line (a crash mid-write) is cut off first,
    so that appending continues on a line boundary."""
    removed = cut_partial_line(path)
    if removed:
        print(f"{path}: removed a partial last line ({removed} bytes) left by an interrupted run", file=sys.stderr)
    if not os.path.exists(path):
        return
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                ok = isinstance(r["source_id"], str) and isinstance(r["kind"], str) and \
                    isinstance(r["index"], int) and r["index"] >= 0
            except (ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                raise Fatal(f"{path}:{lineno}: not a {what} written by generate.py; fix or remove that line")
            yield lineno, line, r


def scan_output(path, kind, keep_truncated, settings):
    """What earlier runs wrote: the Indices done, and for this kind {source_id: {index: line
    number}} of the records cut at the length limit, which are not done (they are sampled again)
    unless keep_truncated. Records of this kind written under other settings are a Fatal naming
    each difference; records from before settings were stored get a note."""
    done, truncated, other, unrecorded = Indices(), {}, {}, {}
    for lineno, _, r in read_records(path, "record"):
        if r["kind"] == "latent":
            try:
                require_nested_cuts(r, f"{path}:{lineno}")
            except DataError as e:
                raise Fatal(str(e)) from None
        if r["kind"] == kind:
            for name, value in settings.items():
                if name not in r:
                    unrecorded[name] = unrecorded.get(name, 0) + 1
                elif r[name] != value and name not in other:
                    other[name] = (r[name], lineno)
        if r.get("finish_reason") == "length" and r["kind"] == kind and not keep_truncated:
            truncated.setdefault(r["source_id"], {})[r["index"]] = lineno
            continue
        done.add(r["source_id"], r["kind"], r["index"])
    if other:
        raise Fatal(f"{path} holds {kind} generations made with other settings (" +
                    "; ".join(f"{name} {old!r} -> {settings[name]!r} (line {lineno})"
                              for name, (old, lineno) in other.items()) +
                    "); use another --out_jsonl, or the same settings to resume it")
    if unrecorded:
        print(f"[generate] note: {max(unrecorded.values()):,} {kind} records in {path} do not record "
              f"{', '.join(sorted(unrecorded))} (an older generate.py wrote them): they cannot be checked against "
              "this run's settings", file=sys.stderr)
    return done, truncated


def drop_lines(path, linenos):
    """Rewrite a file without the given lines, atomically (a crash leaves the old file or the new)."""
    with open(path, "rb") as src, atomic_open(path) as dst:
        for lineno, line in enumerate(src, 1):
            if lineno not in linenos:
                dst.write(line)


def tidy_failures(path, done):
    """Rewrite the failures file to list only the generations still missing from the output, each
    once (its latest failure), or remove it if none is. Returns how many it lists."""
    latest = {}
    for _, line, r in read_records(path, "failure record"):
        key = (r["source_id"], r["kind"], r["index"])
        latest.pop(key, None)  # an older failure of the same generation
        if key not in done:
            latest[key] = line
    if latest:
        with atomic_open(path) as f:
            f.writelines(latest.values())
    elif os.path.exists(path):
        os.remove(path)
    return len(latest)


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


class Run:
    """What the requests of one run share: the output and failures files, the generations done,
    the counters, the stop flag (Ctrl-C, or a task's error), and the worker pool whose queue is
    bounded by slots (the corpus is read lazily)."""

    def __init__(self, args, enc, settings, done, total):
        self.args, self.enc, self.settings, self.done, self.total = args, enc, settings, done, total
        self.out, self.failures = JsonlWriter(args.out_jsonl), JsonlWriter(args.failures)
        self.stop = threading.Event()
        self.lock = threading.RLock()
        self.stats = dict(done=0, failed=0, requests=0, retries=0, length=0, resampled=0, prompt_tokens=0,
                          completion_tokens=0, too_short=0)
        self.slots = threading.Semaphore(2 * args.concurrency)  # tasks queued or running
        self.errors = []  # exceptions of the tasks: Fatal (a 4xx) or a bug
        self.start = self.last_progress = time.time()

    def count(self, **kw):
        with self.lock:
            for k, v in kw.items():
                self.stats[k] += v

    def write(self, rec):
        if self.out.write(rec):
            with self.lock:
                self.done.add(rec["source_id"], rec["kind"], rec["index"])
                self.stats["done"] += 1

    def fail(self, source_id, index, error, tries):
        rec = {"source_id": source_id, "kind": self.args.kind, "index": index, "error": error, "tries": tries}
        if self.failures.write(rec):
            self.count(failed=1)

    def sample(self, tasks, work):
        """Run work(task) for every task, --concurrency at a time, until all are done or the run
        stops (Ctrl-C, or a task's error); the files are closed when it returns."""
        in_main = threading.current_thread() is threading.main_thread()
        old_handler = signal.signal(signal.SIGINT, self.on_sigint) if in_main else None
        pool = ThreadPoolExecutor(self.args.concurrency, thread_name_prefix="generate")
        try:
            for task in tasks:
                self.acquire_slot()
                if self.stop.is_set():
                    self.slots.release()
                    break
                pool.submit(work, task).add_done_callback(self.task_finished)
            for _ in range(2 * self.args.concurrency):  # wait for the tasks in flight (after a stop, they end quickly)
                self.acquire_slot()
        finally:
            pool.shutdown(wait=True)
            self.out.close()
            self.failures.close()
            if in_main:
                signal.signal(signal.SIGINT, old_handler)

    def on_sigint(self, signum, frame):
        if not self.stop.is_set():
            print("\n[generate] stopping: no new requests; waiting for those in flight (Ctrl-C again to quit now)",
                  file=sys.stderr, flush=True)
            self.stop.set()
            return
        # second Ctrl-C: close the files under their locks (no half line), report, and leave now
        self.out.close()
        self.failures.close()
        self.progress(final=True)
        os._exit(cli.INTERRUPTED)

    def acquire_slot(self):
        """Wait for a free slot, printing progress every few seconds meanwhile."""
        while True:
            got = self.slots.acquire(timeout=0.2)
            if time.time() - self.last_progress >= self.args.progress_every:
                self.progress()
                self.last_progress = time.time()
            if got:
                return

    def task_finished(self, future):
        if future.exception() is not None:  # Fatal (a 4xx) or a bug: stop the run
            self.errors.append(future.exception())
            self.stop.set()
        self.slots.release()

    def progress(self, final=False):
        s, dt = self.stats, max(1e-9, time.time() - self.start)
        finished = s["done"] + s["failed"]
        eta = f"{dt:.1f}s elapsed" if final else f"ETA {(self.total - finished) * dt / max(1, finished) / 60:.1f} min"
        print(f"[generate] {s['done']:,}/{self.total:,} done | {s['requests'] / dt:.1f} req/s | "
              f"{s['completion_tokens'] / dt:,.0f} tok/s | {eta} | retries {s['retries']:,} | failed {s['failed']:,}",
              file=sys.stderr, flush=True)

# -----------------------------------------------------------------------------
# the command line


def arg_parser():
    p = cli.ArgumentParser(__doc__, __file__)
    p.add_argument("--input", required=True, help="documents: .jsonl {id, text}, .jsonl.gz or .parquet")
    p.add_argument("--text_field", default="text", help="--input: the field (column) holding each document's text")
    p.add_argument("--id_field", default=None,
                   help="--input: the field (column) holding each document's id (default: id; a Parquet file "
                        "without one gets ids NAME/ROW); '' makes the ids from file name and line or row")
    p.add_argument("--out_jsonl", required=True, help="JSONL output, one line per generation, appended to (resume)")
    p.add_argument("--failures", help="JSONL of the generations still missing (default: <out_jsonl>.failures.jsonl)")
    p.add_argument("--endpoint", action="append", required=True, help="base URL like http://127.0.0.1:8000/v1 (repeatable)")
    p.add_argument("--model", required=True, help="model name as the server knows it")
    p.add_argument("--kind", choices=list(KINDS), default="rephrase", help="what to generate (see above)")
    p.add_argument("--prompt_file", help='JSON {"name", "system" (optional), "user"} with {document}/{prefix}/{suffix}/{id}')
    p.add_argument("--api", choices=["chat", "completions"], default="chat",
                   help="chat: /chat/completions (instruct models); completions: /completions (base models)")
    p.add_argument("--G", type=int, default=4, help="generations per document")
    p.add_argument("--n_per_request", type=int, default=1, help="generations per request via the n parameter")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--max_new_tokens", type=int, default=1024, help="tokens per generation at most (max_tokens)")
    p.add_argument("--length_retries", type=int, default=2,
                   help="times a generation cut at --max_new_tokens is sampled again before it counts as failed")
    p.add_argument("--keep_truncated", action="store_true",
                   help="write generations cut at --max_new_tokens as they are (finish_reason 'length')")
    p.add_argument("--seed", type=int, default=0, help="base of the per-generation seeds; -1 sends no seed")
    p.add_argument("--max_source_tokens", type=int, default=2048,
                   help="truncate the source to this many tokens (latent: half before, half after the cut); 0 = no limit")
    p.add_argument("--prefix_tokens", type=int, default=32, help="self-distill: real prefix length; 0 = unconditional")
    p.add_argument("--tokenizer", default="gpt2", help="for truncation, cuts and prefixes (see tokenizer.load_tokenizer)")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    p.add_argument("--shard", default="0/1", help="i/n: only documents whose position modulo n is i")
    p.add_argument("--max_tries", type=int, default=8, help="tries per request (429, 5xx, timeouts, ...)")
    p.add_argument("--backoff_base", type=float, default=1.0, help="first retry delay in seconds (doubles each try)")
    p.add_argument("--backoff_max", type=float, default=60.0, help="longest retry delay in seconds")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--api_key_env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    p.add_argument("--progress_every", type=float, default=5.0, help="seconds between progress lines")
    return p


def parse_args(argv):
    p = arg_parser()
    args = p.parse_args(argv)
    m = re.fullmatch(r"(\d+)/(\d+)", args.shard)
    if not m or not int(m[1]) < int(m[2]):
        p.error(f"--shard must be i/n with 0 <= i < n, got {args.shard!r}")
    args.shard = (int(m[1]), int(m[2]))
    for name in ("G", "n_per_request", "concurrency", "max_tries", "max_new_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    for name in ("temperature", "max_source_tokens", "prefix_tokens", "length_retries", "backoff_base",
                 "backoff_max", "progress_every"):
        if not getattr(args, name) >= 0:  # (not >= rather than <: NaN is refused too)
            p.error(f"--{name} must be >= 0")
    if not args.timeout > 0:
        p.error(f"--timeout must be > 0 seconds, got {args.timeout:g}")
    for url in args.endpoint:
        u = urlparse(url)
        if u.scheme not in ("http", "https") or not u.netloc:
            p.error(f"--endpoint {url!r}: expected an http:// or https:// URL like http://127.0.0.1:8000/v1")
    if args.kind == "latent":
        args.n_per_request = 1  # each latent thought has its own prompt
    args.failures = args.failures or re.sub(r"\.jsonl$", "", args.out_jsonl) + ".failures.jsonl"
    # a key read from a file often ends in a newline; any other character that an HTTP header
    # cannot carry would make requests raise an error that quotes the header, key and all
    args.api_key = os.environ.get(args.api_key_env, "").strip() or None
    bad = [i for i, c in enumerate(args.api_key or "") if not "!" <= c <= "~"]
    if bad:
        p.error(f"the API key in ${args.api_key_env} has a character that an HTTP header cannot carry "
                f"(whitespace, a control or a non-ASCII character) at position {bad[0]}")
    return args


def main(argv=None):
    """Run the sampler; returns the final stats dict. Exit codes (cli.py): 1 if some generations
    failed, 2 on a fatal error (one line "error: ..."), 130 on Ctrl-C."""
    key = None
    try:
        args = parse_args(argv)
        key = args.api_key
        stats = run(args)
    except Fatal as e:
        cli.fail(redact(str(e), key))
    except KeyboardInterrupt:  # before the sampling started: nothing to stop cleanly
        print("[generate] interrupted", file=sys.stderr)
        raise SystemExit(cli.INTERRUPTED)
    except Exception:  # a bug: its traceback, but never the key (an exception may quote a request header)
        print(redact(traceback.format_exc(), key), file=sys.stderr, end="")
        raise SystemExit(cli.INCOMPLETE)
    if stats["failed"]:
        raise SystemExit(cli.INCOMPLETE)
    return stats


def run(args):
    """Check the setup, read what is done and what is to do, then sample; returns the stats."""
    try:
        open(args.input, "rb").close()
    except OSError as e:
        raise Fatal(f"--input {args.input}: {e.strerror}") from None
    try:
        enc, _ = load_tokenizer(args.tokenizer)
    except (OSError, ValueError) as e:
        raise Fatal(f"--tokenizer {args.tokenizer}: {e}") from None
    prompt = load_prompt(args)
    api = "completions" if args.kind == "self-distill" else args.api
    settings = generation_settings(args, prompt, api)
    has_models = [check_endpoint(url, args.api_key, min(args.timeout, 10.0)) for url in args.endpoint]
    done, truncated = scan_output(args.out_jsonl, args.kind, args.keep_truncated, settings)
    tidy_failures(args.failures, done)  # repairs a partial last line before we append to it

    # pass 1: validate every input line and count the work (the text is not kept: corpora are big)
    shard_i, shard_n = args.shard
    ids, total, ndocs, redo = set(), 0, 0, set()
    for pos, (lineno, doc) in enumerate(read_docs(args.input, args.text_field, args.id_field)):
        ndocs += 1  # in every shard
        if pos % shard_n != shard_i:
            continue
        if doc["id"] in ids:
            raise Fatal(f"{place(args.input, lineno)}: duplicate document id {doc['id']!r}")
        ids.add(doc["id"])
        if doc["text"]:
            total += len(done.missing(doc["id"], args.kind, args.G))
            redo.update(line for i, line in truncated.get(doc["id"], {}).items() if i < args.G)
    if not ndocs:
        raise Fatal(f"{args.input}: no documents")
    if redo:  # this run samples them again: remove them now, so that one record per generation remains
        drop_lines(args.out_jsonl, redo)
        print(f"[generate] removed {len(redo):,} generations cut at the length limit from {args.out_jsonl}: "
              "this run samples them again", file=sys.stderr)
    print(f"[generate] {args.kind}: {total:,} generations to write for {len(ids):,} documents "
          f"(shard {shard_i}/{shard_n}, G={args.G}); {args.G * len(ids) - total:,} already in {args.out_jsonl} or empty",
          file=sys.stderr, flush=True)
    del ids

    state = Run(args, enc, settings, done, total)
    endpoints = Endpoints(args.endpoint, api, has_models)

    def tasks():
        for pos, (_, doc) in enumerate(read_docs(args.input, args.text_field, args.id_field)):
            missing = done.missing(doc["id"], args.kind, args.G) if pos % shard_n == shard_i and doc["text"] else []
            if missing:
                doc_tasks, unaskable = requests_for(doc, missing, args, api, prompt, enc)
                if unaskable:   # too few places to cut: those thoughts cannot exist
                    state.count(too_short=unaskable)
                    state.total -= unaskable
                yield from doc_tasks
    state.sample(tasks(), lambda task: make_generations(task, args, api, endpoints, state))
    missing = tidy_failures(args.failures, state.done)

    s = state.stats
    state.progress(final=True)
    length = "" if not s["length"] else f", {s['length']:,} replies cut at the length limit (" + \
        ("kept" if args.keep_truncated else f"{s['resampled']:,} sampled again") + ")"
    print(f"[generate] summary: {s['done']:,} written, {s['failed']:,} failed, {s['requests']:,} requests, "
          f"{s['retries']:,} retries{length}; tokens: {s['prompt_tokens']:,} prompt, "
          f"{s['completion_tokens']:,} completion", file=sys.stderr, flush=True)
    if s["too_short"]:
        print(f"[generate] {s['too_short']:,} thoughts not asked for: their documents have fewer than "
              f"--G {args.G} places to cut", file=sys.stderr)
    if missing:
        print(f"[generate] {missing:,} generations are missing from {args.out_jsonl}, listed in {args.failures}; "
              "rerun the same command to retry them", file=sys.stderr)
    if state.errors:
        raise state.errors[0]  # Fatal: main() prints it; anything else is a bug and shows its traceback
    if state.stop.is_set():
        print("[generate] interrupted; rerun the same command to resume", file=sys.stderr)
        raise SystemExit(cli.INTERRUPTED)
    return dict(s, total=total, elapsed=time.time() - state.start)


if __name__ == "__main__":
    main()
