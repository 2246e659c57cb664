"""Tests for generate.py against real HTTP servers on 127.0.0.1 (no mocking of requests): a
fault-injecting OpenAI-compatible server (429 + Retry-After, 500, slow replies, dropped connections,
length-truncated outputs, malformed JSON, a 400), servers that are down, answer HTML or lack
/models, resume after SIGKILL and Ctrl-C, truncated generations sampled again and replaced, the
failures file kept to what is still missing, shards and several endpoints, latent-thought cuts,
prompt files, the settings stored in every record and a resume under other settings refused, a plain
web server stopped at its first reply, one-line errors with exit codes, and that the API key never
leaks.
Run: python -m pytest -q tests/test_generate.py   (about half a minute on 2 CPU cores)"""

import collections
import functools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import generate  # noqa: E402
from serve import JSONHandler  # noqa: E402
from formats import GENERATION_SETTINGS  # noqa: E402
from support import assert_error  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

KEY = "sk-nanosynth-test-7Q4zX9-secret"
FAULT = re.compile(r"\[\[(\w+)\]\]")  # a document asks for a fault with a marker like [[e500]]


class FaultHandler(JSONHandler):
    def do_GET(self):
        if self.path.rstrip("/") == "/v1/models" and self.server.models:
            return self.reply(200, {"object": "list", "data": [{"id": "test-model", "object": "model"}]})
        self.error(404, f"no route GET {self.path}")

    def do_POST(self):
        srv = self.server
        body = self.read_json()
        chat = self.path.endswith("/chat/completions")
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        m = FAULT.search(prompt)
        fault = "ok" if not m or m[1] in srv.healed else m[1]
        key = (prompt, body.get("seed"))  # one generation (or group of n) of one document
        with srv.lock:
            srv.attempts[key] += 1
            attempt = srv.attempts[key]
            srv.requests_of[prompt] += 1
            first_of_document = srv.requests_of[prompt] == 1
            srv.log.append(dict(time=time.time(), fault=fault, attempt=attempt, body=body, path=self.path,
                                auth=self.headers.get("Authorization")))
        if srv.delay:
            time.sleep(srv.delay)
        try:
            if fault == "r429" and attempt == 1:
                return self.reply(429, {"error": {"message": "slow down"}}, headers=[("Retry-After", "1")])
            if fault in ("e500", "dead") and (attempt <= 2 or fault == "dead"):
                return self.reply(500 if fault == "e500" else 503, {"error": {"message": "server hiccup"}})
            if fault == "slow" and attempt == 1:
                time.sleep(1.0)  # past the client's --timeout
            if fault == "drop" and attempt == 1:  # promise 500 bytes, send 20, hang up
                self.send_response(200)
                self.send_header("Content-Length", "500")
                self.end_headers()
                self.wfile.write(b'{"id": "cmpl-1", "ch')
                self.close_connection = True
                return
            if fault == "reset" and attempt == 1:  # hang up without any reply
                self.close_connection = True
                return
            if fault == "malformed" and attempt == 1:
                return self.reply(200, raw=b'{"choices": [{"message": ')
            if fault == "bad400":  # a server that echoes the key: the client must not repeat it
                return self.reply(400, {"error": {"message": f"The model `nope` does not exist (key {KEY})."}})
            n = 1 if fault == "nshort" else body.get("n", 1)
            # length: every reply is cut at the length limit; length1: only the document's first request
            finish = "length" if fault == "length" or (fault == "length1" and first_of_document) else "stop"
            texts = [f"  generation {body.get('seed')}/{j} of {fault}  " for j in range(n)]
            choices = [dict(index=j, finish_reason=finish, **({"message": {"role": "assistant", "content": t}}
                                                               if chat else {"text": t})) for j, t in enumerate(texts)]
            self.reply(200, {"id": "x", "object": "chat.completion", "model": body["model"], "choices": choices,
                             "usage": {"prompt_tokens": 100, "completion_tokens": 7 * n, "total_tokens": 100 + 7 * n}})
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout) first


class HTMLHandler(JSONHandler):
    """A web server that is not an OpenAI server: an HTML page for everything (or 404 on GET)."""
    def do_GET(self):
        self.page(404 if self.server.models is False else 200)

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.log.append(self.path)
        self.page(200)

    def page(self, code):
        body = b"<!DOCTYPE html>\n<html><head><title>Welcome</title></head>\n<body>It works!</body></html>\n"
        self.send_response(code)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def server():
    """Start fault servers on ephemeral ports; yields a factory server(delay=0, models=True,
    handler=FaultHandler) -> (srv, base_url). models=False: no /models route (404). Faults named
    in srv.healed behave as "ok"."""
    started = []

    def start(delay=0.0, models=True, handler=FaultHandler):
        srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        srv.daemon_threads = True
        srv.lock, srv.attempts, srv.log, srv.delay = threading.Lock(), collections.Counter(), [], delay
        srv.requests_of, srv.models, srv.healed = collections.Counter(), models, set()
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        started.append(srv)
        return srv, f"http://127.0.0.1:{srv.server_address[1]}/v1"
    yield start
    for srv in started:
        srv.shutdown()
        srv.server_close()


def write_docs(path, docs):
    with open(path, "w") as f:
        for doc in docs:
            f.write(json.dumps(doc) + "\n")
    return str(path)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def run_main(monkeypatch, *argv):
    monkeypatch.setenv("NANOSYNTH_TEST_KEY", KEY)
    return generate.main(["--api_key_env", "NANOSYNTH_TEST_KEY", "--model", "test-model", "--backoff_base", "0.01",
                          "--progress_every", "0.5", *argv])


def assert_no_key(*texts_or_paths):
    for t in texts_or_paths:
        if os.path.exists(t):
            t = open(t).read()
        assert KEY not in t


# ----------------------------------------------------------------------------- the fault matrix

FAULTS = ["ok", "r429", "e500", "slow", "drop", "reset", "length", "length1", "malformed", "dead", "nshort"]


def test_fault_matrix(tmp_path, server, monkeypatch, capfd):
    srv, url = server()
    docs = [{"id": f"d-{f}", "text": f"Document about {f}. [[{f}]] It has two sentences."} for f in FAULTS]
    inp, out = write_docs(tmp_path / "in.jsonl", docs), str(tmp_path / "out" / "synth.jsonl")
    with pytest.raises(SystemExit) as exit:  # some generations failed: exit status 1
        run_main(monkeypatch, "--input", inp, "--out_jsonl", out, "--endpoint", url, "--G", "2",
                 "--n_per_request", "2", "--max_tries", "3", "--timeout", "0.5", "--concurrency", "4")
    assert exit.value.code == 1
    recs = read_jsonl(out)
    count = collections.Counter((r["source_id"], r["index"]) for r in recs)
    expected = {(f"d-{f}", i) for f in FAULTS if f not in ("dead", "length") for i in range(2)}
    assert set(count) == expected and set(count.values()) == {1}  # every generation exactly once
    for r in recs:
        assert r["id"] == f"{r['source_id']}/rephrase/{r['index']}" and r["kind"] == "rephrase"
        assert r["model"] == "test-model" and r["prompt"] == "wikipedia" and r["temperature"] == 1.0
        assert r["finish_reason"] == "stop"  # cut replies were sampled again, or failed
        assert r["text"] == r["text"].strip() and r["text"].startswith("generation ")
        assert r["usage"]["prompt_tokens"] == 100
    # usage: the request's 14 completion tokens are split between its two generations
    assert sum(r["usage"]["completion_tokens"] for r in recs if r["source_id"] == "d-ok") == 14
    # the dead document ran out of tries, the always-cut one ran out of samples: both in the failures file
    fails = read_jsonl(str(tmp_path / "out" / "synth.failures.jsonl"))
    assert sorted((f["source_id"], f["kind"], f["index"], f["tries"], f["error"]) for f in fails) == \
        [("d-dead", "rephrase", i, 3, "HTTP 503: server hiccup") for i in range(2)] + \
        [("d-length", "rephrase", i, 3, "cut at the length limit (--max_new_tokens 1024) in all 3 samples")
         for i in range(2)]
    # server side: tries per fault, Retry-After honoured, key sent as a Bearer header
    tries = collections.Counter(e["fault"] for e in srv.log)
    assert tries == {"ok": 1, "r429": 2, "e500": 3, "slow": 2, "drop": 2, "reset": 2, "length": 5, "length1": 3,
                     "malformed": 2, "dead": 3, "nshort": 2}
    t429 = [e["time"] for e in srv.log if e["fault"] == "r429"]
    assert t429[1] - t429[0] >= 0.95
    assert {e["auth"] for e in srv.log} == {f"Bearer {KEY}"}
    # nshort: asked for n=2, got 1, then asked for the remaining one alone
    assert [e["body"]["n"] for e in srv.log if e["fault"] == "nshort"] == [2, 1]
    # a cut reply is sampled again alone, with the seed of (seed, source, kind, index, attempt)
    for fault, attempts in (("length1", 1), ("length", 2)):
        bodies = [e["body"] for e in srv.log if e["fault"] == fault]
        assert [(b["n"], b["seed"]) for b in bodies[:1]] == [(2, generate.request_seed(0, f"d-{fault}", "rephrase", 0))]
        assert sorted(b["seed"] for b in bodies[1:]) == sorted(
            generate.request_seed(0, f"d-{fault}", "rephrase", i, t) for i in range(2) for t in range(1, attempts + 1))
        assert all(b["n"] == 1 for b in bodies[1:]) and len({b["seed"] for b in bodies}) == len(bodies)
    cap = capfd.readouterr()
    assert "[generate] summary: 18 written, 4 failed, 17 requests, 9 retries, " \
        "8 replies cut at the length limit (6 sampled again)" in cap.err
    assert "4 generations are missing from" in cap.err
    assert_no_key(out, cap.out, cap.err)


def test_fewer_choices_than_asked_are_requested_one_by_one(tmp_path, server, monkeypatch):
    srv, url = server()  # this server ignores n and always answers with one choice
    inp = write_docs(tmp_path / "in.jsonl", [{"id": "s", "text": "Short. [[nshort]]"}])
    out = str(tmp_path / "o.jsonl")
    run_main(monkeypatch, "--input", inp, "--out_jsonl", out, "--endpoint", url, "--G", "3", "--n_per_request", "3")
    assert [e["body"]["n"] for e in srv.log] == [3, 1, 1]
    assert sorted(r["index"] for r in read_jsonl(out)) == [0, 1, 2]


def test_400_fails_fast_with_server_message(tmp_path, server, monkeypatch, capfd):
    srv, url = server()
    docs = [{"id": "a", "text": "Fine. [[bad400]]"}]
    inp, out = write_docs(tmp_path / "in.jsonl", docs), str(tmp_path / "out.jsonl")
    t0 = time.time()
    with pytest.raises(SystemExit) as e:
        run_main(monkeypatch, "--input", inp, "--out_jsonl", out, "--endpoint", url, "--G", "3")
    assert time.time() - t0 < 10
    err = capfd.readouterr().err
    assert_error(e.value.code, err, f"{url}/chat/completions", "HTTP 400", "The model `nope`", "(key ***)", alone=False)
    assert_no_key(err)
    assert len([e for e in srv.log if e["fault"] == "bad400"]) <= 3  # no retries: one try per generation at most


# ----------------------------------------------------------------------------- resume after crashes


def spawn(inp, out, url, *extra):
    env = dict(os.environ, NANOSYNTH_TEST_KEY=KEY)
    cmd = [sys.executable, os.path.join(ROOT, "generate.py"), "--input", inp, "--out_jsonl", out, "--endpoint", url,
           "--model", "m", "--api_key_env", "NANOSYNTH_TEST_KEY", "--G", "2", "--concurrency", "4",
           "--progress_every", "0.5", *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_lines(path, n, proc, timeout=30):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if os.path.exists(path) and open(path, "rb").read().count(b"\n") >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError(f"{path} did not reach {n} lines")


def check_complete(out, ids, G=2):
    recs = read_jsonl(out)
    count = collections.Counter((r["source_id"], r["index"]) for r in recs)
    assert set(count) == {(i, g) for i in ids for g in range(G)}, "a gap"
    assert set(count.values()) == {1}, "a duplicate"


def test_sigkill_twice_then_resume(tmp_path, server):
    srv, url = server(delay=0.1)
    ids = [f"doc{i}" for i in range(40)]
    inp = write_docs(tmp_path / "in.jsonl", [{"id": i, "text": f"Text of {i}. More text."} for i in ids])
    out = str(tmp_path / "out.jsonl")
    partial = b'{"id": "doc39/rephrase/1", "source_id": "doc3'
    repaired = f"{out}: removed a partial last line ({len(partial)} bytes) left by an interrupted run"
    for run, target in enumerate((10, 30)):
        proc = spawn(inp, out, url)
        wait_lines(out, target, proc)
        proc.kill()  # SIGKILL: no cleanup at all
        stdout, stderr = proc.communicate()
        assert open(out, "rb").read().count(b"\n") < 80  # killed mid-run
        assert (repaired in stderr) == (run == 1)
        with open(out, "ab") as f:  # as if it died in the middle of a line
            f.write(partial)
    proc = spawn(inp, out, url)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert repaired in stderr
    check_complete(out, ids)
    assert_no_key(out, stdout, stderr)
    assert {e["auth"] for e in srv.log} == {f"Bearer {KEY}"}


def test_ctrl_c_stops_cleanly_and_resumes(tmp_path, server):
    _, url = server(delay=0.1)
    ids = [f"doc{i}" for i in range(40)]
    inp = write_docs(tmp_path / "in.jsonl", [{"id": i, "text": f"Text of {i}."} for i in ids])
    out = str(tmp_path / "out.jsonl")
    proc = spawn(inp, out, url)
    wait_lines(out, 8, proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert "stopping: no new requests" in stderr and "[generate] summary:" in stderr and "interrupted" in stderr
    data = open(out, "rb").read()
    assert data.endswith(b"\n") and data.count(b"\n") < 80
    n_before = len(read_jsonl(out))  # every line whole
    proc = spawn(inp, out, url)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0 and f"{80 - n_before} generations to write" in stderr
    # periodic progress lines, then a final one
    assert re.search(rf"\[generate\] \d+/{80 - n_before} done \| [\d.]+ req/s \| [\d,]+ tok/s \| ETA [\d.]+ min \| "
                     r"retries 0 \| failed 0\n", stderr), stderr
    assert re.search(rf"\[generate\] {80 - n_before}/{80 - n_before} done \| .* \| [\d.]+s elapsed \| ", stderr)
    check_complete(out, ids)


def test_second_ctrl_c_quits_at_once(tmp_path, server):
    srv, url = server(delay=3.0)  # requests that would take 3 s
    inp = write_docs(tmp_path / "in.jsonl", [{"id": f"d{i}", "text": "Text."} for i in range(20)])
    out = str(tmp_path / "out.jsonl")
    proc = spawn(inp, out, url)
    t0 = time.time()
    while len(srv.log) < 4 and time.time() - t0 < 20:  # all four workers are waiting on the server
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    t1 = time.time()
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130 and time.time() - t1 < 2.0, stderr
    assert "Ctrl-C again to quit now" in stderr and "0/40 done" in stderr
    assert not os.path.exists(out)  # nothing finished, nothing written
    assert len(srv.log) == 4  # no request was sent after the first Ctrl-C


# ----------------------------------------------------------------------------- throughput features


def test_shards_split_the_corpus_and_endpoints_share_load(tmp_path, server, monkeypatch):
    (s1, u1), (s2, u2) = server(), server()
    ids = [f"d{i}" for i in range(10)]
    inp = write_docs(tmp_path / "in.jsonl", [{"id": i, "text": f"About {i}."} for i in ids])
    for shard in ("0/3", "1/3", "2/3"):
        run_main(monkeypatch, "--input", inp, "--out_jsonl", str(tmp_path / f"out{shard[0]}.jsonl"), "--endpoint", u1,
                 "--endpoint", u2, "--G", "2", "--shard", shard, "--concurrency", "4")
    for s in range(3):
        got = {r["source_id"] for r in read_jsonl(str(tmp_path / f"out{s}.jsonl"))}
        assert got == {f"d{i}" for i in range(10) if i % 3 == s}
    assert len(s1.log) + len(s2.log) == 20 and len(s1.log) >= 5 and len(s2.log) >= 5


def test_parquet_input_with_named_text_column_and_made_ids(tmp_path, server, monkeypatch, capfd):
    pa = pytest.importorskip("pyarrow", reason="pyarrow is not installed: Parquet input is optional")
    import pyarrow.parquet as pq
    srv, url = server()
    inp = str(tmp_path / "part-0.parquet")
    pq.write_table(pa.table({"body": [f"About {i}." for i in range(3)]}), inp)
    run_main(monkeypatch, "--input", inp, "--text_field", "body", "--out_jsonl", str(tmp_path / "o.jsonl"),
             "--endpoint", url, "--G", "1")
    records = list(read_jsonl(str(tmp_path / "o.jsonl")))
    assert sorted(r["source_id"] for r in records) == ["part-0.parquet/0", "part-0.parquet/1", "part-0.parquet/2"]
    assert {(r["text_field"], r["id_field"]) for r in records} == {("body", None)}   # stored with the settings
    prompts = sorted(e["body"]["messages"][-1]["content"] for e in srv.log)
    assert [p.split("Document:\n", 1)[1] for p in prompts] == [f"About {i}." for i in range(3)]
    pq.write_table(pa.table({"id": ["a", "b", "a"], "text": ["x", "y", "z"]}), inp)
    capfd.readouterr()
    with pytest.raises(SystemExit) as e:
        run_main(monkeypatch, "--input", inp, "--out_jsonl", str(tmp_path / "p.jsonl"), "--endpoint", url)
    assert_error(e.value.code, capfd.readouterr().err, f"{inp}:row 2", "'a'")


def test_request_body_seeds_n_and_truncation(tmp_path, server, monkeypatch):
    srv, url = server()
    enc, _ = load_tokenizer("gpt2")
    text = " ".join(f"word{i}" for i in range(300))
    inp = write_docs(tmp_path / "in.jsonl", [{"id": "x", "text": text}])
    run_main(monkeypatch, "--input", inp, "--out_jsonl", str(tmp_path / "o.jsonl"), "--endpoint", url, "--G", "3",
             "--max_source_tokens", "50", "--temperature", "0.7", "--max_new_tokens", "99", "--seed", "5")
    bodies = [e["body"] for e in srv.log]
    assert len(bodies) == 3 and all(b["n"] == 1 and b["temperature"] == 0.7 and b["max_tokens"] == 99 for b in bodies)
    assert sorted(b["seed"] for b in bodies) == sorted(generate.request_seed(5, "x", "rephrase", i) for i in range(3))
    assert len({b["seed"] for b in bodies}) == 3
    msgs = bodies[0]["messages"]
    assert msgs[0] == {"role": "system", "content": generate.SYSTEM}
    doc = msgs[1]["content"].split("Document:\n", 1)[1]
    assert msgs[1]["content"] == generate.PROMPTS["wikipedia"]["user"].format(document=doc)
    assert text.startswith(doc) and len(enc.encode_ordinary(doc)) == 50
    recs = read_jsonl(str(tmp_path / "o.jsonl"))
    assert {r["temperature"] for r in recs} == {0.7}


# ----------------------------------------------------------------------------- latent thoughts and prompts

LATENT_DOC = ("The quick brown fox jumps. It lands on a log. The log rolls downhill! Then a river appears. "
              "Fish swim by the log. Everyone is surprised. The end comes quickly. \u00e9t\u00e9 \u4e2d\u6587 ok.")


def test_latent_cuts_and_prompts(tmp_path, server, monkeypatch):
    srv, url = server()
    inp = write_docs(tmp_path / "in.jsonl", [{"id": "fox", "text": LATENT_DOC}])
    cuts = []
    for run in ("a", "b"):
        out = str(tmp_path / f"{run}.jsonl")
        run_main(monkeypatch, "--input", inp, "--out_jsonl", out, "--endpoint", url, "--kind", "latent", "--G", "3")
        recs = sorted(read_jsonl(out), key=lambda r: r["index"])
        assert [(r["kind"], r["index"], r["cut_rule"], r["prompt"]) for r in recs] == \
            [("latent", i, "nested", "latent") for i in range(3)]
        cuts.append([r["cut_char"] for r in recs])
    assert cuts[0] == cuts[1]  # the same cuts on every run
    c = cuts[0]
    assert c[1] < c[0] < c[2] < len(LATENT_DOC)   # ranks 0, 1, 2 near 1/2, 1/4, 3/4 of the document
    assert all(LATENT_DOC[x - 1] in ".!" and LATENT_DOC[x] == " " for x in c)  # at sentence ends
    # each prompt holds exactly the text before and after its cut (short document: no bounding)
    users = {e["body"]["messages"][1]["content"] for e in srv.log}
    assert users == {generate.PROMPTS["latent"]["user"].format(prefix=LATENT_DOC[:x], suffix=LATENT_DOC[x:])
                     for x in c}
    # a larger G adds only the new ranks and keeps the old thoughts where they are; a smaller G has nothing to do
    asked = len(srv.log)
    run_main(monkeypatch, "--input", inp, "--out_jsonl", out, "--endpoint", url, "--kind", "latent", "--G", "5")
    recs = sorted(read_jsonl(out), key=lambda r: r["index"])
    assert len(srv.log) == asked + 2 and [r["cut_char"] for r in recs[:3]] == c and [r["index"] for r in recs] == [0, 1, 2, 3, 4]
    bounds = generate.token_bounds(ENC, ENC.encode_ordinary(LATENT_DOC))
    assert [r["cut_char"] for r in recs] == [bounds[k] for k in generate.latent_cuts(LATENT_DOC, bounds, 5)]
    run_main(monkeypatch, "--input", inp, "--out_jsonl", out, "--endpoint", url, "--kind", "latent", "--G", "2")
    assert len(srv.log) == asked + 2


def test_old_rule_thoughts_refused(tmp_path, server, monkeypatch, capfd):
    srv, url = server()
    inp = write_docs(tmp_path / "in.jsonl", [{"id": "fox", "text": LATENT_DOC}])
    out = tmp_path / "old.jsonl"
    out.write_text(json.dumps({"id": "fox/latent/0", "source_id": "fox", "kind": "latent", "index": 0, "text": "T.",
                               "cut_char": 27, "num_cuts": 2}) + "\n")
    with pytest.raises(SystemExit) as e:
        run_main(monkeypatch, "--input", inp, "--out_jsonl", str(out), "--endpoint", url, "--kind", "latent", "--G", "3")
    err = capfd.readouterr().err
    assert_error(e.value.code, err, f"{out}:1")
    assert not srv.log


ENC = load_tokenizer("gpt2")[0]


def test_latent_cut_positions_exact():
    # LATENT_DOC is 46 GPT-2 tokens. Cut r looks for a sentence end within n / (4 x denominator) of
    # its fraction: ranks 0-5 find one (after "appears.", "log.", "surprised.", "jumps.", "log.",
    # "downhill!"); rank 6 (7/8 = token 40.25, reach 1.4) finds none and takes the nearest boundary
    bounds = generate.token_bounds(ENC, ENC.encode_ordinary(LATENT_DOC))
    assert len(bounds) - 1 == 46
    ks = generate.latent_cuts(LATENT_DOC, bounds, 7)
    assert ks == [22, 12, 32, 6, 28, 17, 40]
    assert [bounds[k] for k in ks] == [91, 45, 136, 26, 113, 69, 163]
    assert [generate.cut_fraction(r) for r in range(8)] == [(1, 2), (1, 4), (3, 4), (1, 8), (5, 8), (3, 8), (7, 8), (1, 16)]


def test_latent_cuts_nest():
    texts = [LATENT_DOC, open(os.path.join(ROOT, "sample_data", "train.jsonl")).readline(), "word " * 300,
             "\u4e2d\u6587\u5b57" * 40]
    for text in texts:
        bounds = generate.token_bounds(ENC, ENC.encode_ordinary(text))
        n = len(bounds) - 1
        previous = []
        for G in range(1, 18):
            ks = generate.latent_cuts(text, bounds, G)
            assert ks[:len(previous)] == previous and len(ks) == min(G, sum(b is not None for b in bounds[1:n]))
            assert len(set(ks)) == len(ks) and all(0 < k < n and bounds[k] is not None for k in ks)
            previous = ks
        # every cut is within a quarter of its level's spacing of its fraction: any prefix is spread
        for rank, k in enumerate(generate.latent_cuts(text, bounds, 15)):
            numerator, denominator = generate.cut_fraction(rank)
            assert abs(k - n * numerator / denominator) <= n / (4 * denominator) + 1


def test_latent_cut_function():
    enc = ENC
    for text, G in [(LATENT_DOC, 1), (LATENT_DOC, 7), ("\u4e2d\u6587\u5b57" * 5, 3), ("Hi.", 4), ("x", 2)]:
        bounds = generate.token_bounds(enc, enc.encode_ordinary(text))
        assert bounds[0] == 0 and bounds[-1] == len(text) and len(bounds) == len(enc.encode_ordinary(text)) + 1
        ks = generate.latent_cuts(text, bounds, G)
        interior = sum(b is not None for b in bounds[1:-1])
        assert len(ks) == min(G, interior) and all(bounds[k] is not None for k in ks)
        assert ks == generate.latent_cuts(text, generate.token_bounds(enc, enc.encode_ordinary(text)), G)
        assert all(enc.decode(enc.encode_ordinary(text)[:k]) == text[:bounds[k]] for k in ks)


def test_too_short_for_G_cuts(tmp_path, server, monkeypatch, capfd):
    srv, url = server()
    inp = write_docs(tmp_path / "in.jsonl", [{"id": "hi", "text": "Hi."}, {"id": "fox", "text": LATENT_DOC}])
    out = str(tmp_path / "o.jsonl")
    stats = run_main(monkeypatch, "--input", inp, "--out_jsonl", out, "--endpoint", url, "--kind", "latent", "--G", "3")
    recs = read_jsonl(out)
    assert sorted((r["source_id"], r["index"]) for r in recs) == [("fox", 0), ("fox", 1), ("fox", 2), ("hi", 0)]
    assert stats["failed"] == 0 and "2 thoughts not asked for" in capfd.readouterr().err


def test_prompt_file(tmp_path, server, monkeypatch, capfd):
    srv, url = server()
    inp = write_docs(tmp_path / "in.jsonl", [{"id": "p1", "text": "Some text."}])
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"name": "qa", "user": "Q&A about {id}: {document}"}))
    out = str(tmp_path / "o.jsonl")
    run_main(monkeypatch, "--input", inp, "--out_jsonl", out, "--endpoint", url, "--G", "1", "--prompt_file", str(good))
    assert srv.log[0]["body"]["messages"] == [{"role": "user", "content": "Q&A about p1: Some text."}]
    assert read_jsonl(out)[0]["prompt"] == "qa"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "x", "user": "{document} and {title}"}))
    capfd.readouterr()
    with pytest.raises(SystemExit) as e:
        run_main(monkeypatch, "--input", inp, "--out_jsonl", out, "--endpoint", url, "--prompt_file", str(bad))
    assert_error(e.value.code, capfd.readouterr().err, f"--prompt_file {bad}", "{title}")


def test_malformed_input_line_names_file_and_line(tmp_path, server, monkeypatch, capfd):
    _, url = server()
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": "a", "text": "x"}\n\n{"id": "b", "text": "y"\n')
    with pytest.raises(SystemExit) as e:
        run_main(monkeypatch, "--input", str(inp), "--out_jsonl", str(tmp_path / "o.jsonl"), "--endpoint", url)
    assert_error(e.value.code, capfd.readouterr().err, f"{inp}:3:", "JSON")
    inp.write_text('{"id": 1, "text": "x"}\n')
    with pytest.raises(SystemExit) as e:
        run_main(monkeypatch, "--input", str(inp), "--out_jsonl", str(tmp_path / "o.jsonl"), "--endpoint", url)
    assert_error(e.value.code, capfd.readouterr().err, f"{inp}:1:", "'id'")


# ----------------------------------------------------------------------------- failing loudly, exit codes

def cli(*argv, env=None, key=KEY, timeout=60):
    """Run generate.py as a subprocess; returns (returncode, stdout, stderr)."""
    env = dict(os.environ, NANOSYNTH_TEST_KEY=key, **(env or {}))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), "--model", "test-model",
                           "--api_key_env", "NANOSYNTH_TEST_KEY", "--backoff_base", "0.01", *argv],
                          env=env, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def free_port():
    with socket.socket() as s:  # bound to an ephemeral port, then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_endpoint_down_or_not_openai_fails_at_start(tmp_path, server):
    inp = write_docs(tmp_path / "in.jsonl", [{"id": "a", "text": "Some text."}])
    out = str(tmp_path / "o.jsonl")
    down = f"http://127.0.0.1:{free_port()}/v1"
    html, html_url = server(handler=HTMLHandler)
    for url, named in ((down, "Connection refused"), (html_url, f"GET {html_url}/models")):
        t0 = time.time()
        rc, _, err = cli("--input", inp, "--out_jsonl", out, "--endpoint", url, "--timeout", "600")
        assert_error(rc, err, f"--endpoint {url}", named)
        assert time.time() - t0 < 10  # not a request timeout, nor retries with backoff
    assert html.log == [] and not os.path.exists(out)  # no request was sent


def test_server_without_models_route(tmp_path, server, monkeypatch, capfd):
    # an OpenAI server without /models (404): accepted, and the run completes
    srv, url = server(models=False)
    inp = write_docs(tmp_path / "in.jsonl", [{"id": f"d{i}", "text": f"Text {i}."} for i in range(3)])
    stats = run_main(monkeypatch, "--input", inp, "--out_jsonl", str(tmp_path / "a.jsonl"), "--endpoint", url,
                     "--G", "2")
    assert stats["done"] == 6 and len(srv.log) == 6
    # a web server without /models whose replies are HTML pages: stopped at its first reply
    html, html_url = server(models=False, handler=HTMLHandler)
    t0 = time.time()
    rc, _, err = cli("--input", inp, "--out_jsonl", str(tmp_path / "b.jsonl"), "--endpoint", html_url,
                     "--concurrency", "2")
    assert_error(rc, err, f"--endpoint {html_url}", "'<!DOCTYPE html>", alone=False)
    assert time.time() - t0 < 10 and 1 <= len(html.log) <= 2  # no retries: at most one request per worker
    assert not os.path.exists(tmp_path / "b.jsonl") and not os.path.exists(tmp_path / "b.failures.jsonl")


def test_failures_file_lists_only_what_is_missing(tmp_path, server):
    srv, url = server()
    ids = ["ok", "e500", "dead"]  # e500 fails twice per generation, then works; dead fails until healed
    inp = write_docs(tmp_path / "in.jsonl", [{"id": i, "text": f"About {i}. [[{i}]]"} for i in ids])
    out, failures = str(tmp_path / "o.jsonl"), str(tmp_path / "o.failures.jsonl")
    args = ("--input", inp, "--out_jsonl", out, "--endpoint", url, "--G", "2", "--max_tries", "2")
    rc, _, err = cli(*args)
    assert rc == 1 and "4 generations are missing" in err, err
    assert sorted((f["source_id"], f["index"]) for f in read_jsonl(failures)) == \
        [("dead", 0), ("dead", 1), ("e500", 0), ("e500", 1)]
    partial = b'{"source_id": "dead", "kind": "reph'
    with open(failures, "ab") as f:  # as if the run had died writing a failure
        f.write(partial)
    rc, _, err = cli(*args)  # e500 now succeeds: its old failures go; dead's are listed once each
    assert rc == 1 and f"{failures}: removed a partial last line ({len(partial)} bytes)" in err, err
    fails = read_jsonl(failures)
    assert sorted((f["source_id"], f["index"]) for f in fails) == [("dead", 0), ("dead", 1)]
    assert {f["error"] for f in fails} == {"HTTP 503: server hiccup"}
    srv.healed.add("dead")
    rc, _, err = cli(*args)
    assert rc == 0 and "2 generations to write" in err and "missing" not in err, err
    assert not os.path.exists(failures)  # nothing missing: no failures file
    check_complete(out, ids)


def test_truncated_generations_are_kept_or_sampled_again(tmp_path, server, monkeypatch, capfd):
    srv, url = server()
    ids = ["a", "b", "c"]
    inp = write_docs(tmp_path / "in.jsonl", [{"id": "a", "text": "Fine."}] +
                     [{"id": i, "text": f"Long {i}. [[length]]"} for i in ("b", "c")])
    out = str(tmp_path / "o.jsonl")
    args = ("--input", inp, "--out_jsonl", out, "--endpoint", url, "--G", "2")
    stats = run_main(monkeypatch, *args, "--keep_truncated")
    recs = read_jsonl(out)
    assert stats["done"] == 6 and len(srv.log) == 6  # kept at once: no second samples
    assert sorted(r["source_id"] for r in recs if r["finish_reason"] == "length") == ["b", "b", "c", "c"]
    stats = run_main(monkeypatch, *args, "--keep_truncated")  # kept records count as done
    assert stats["total"] == 0 and len(srv.log) == 6
    # a cut record of a document this run does not sample (not in --input) is left alone
    orphan = json.dumps(dict(recs[0], id="zz/rephrase/0", source_id="zz", index=0, finish_reason="length")) + "\n"
    with open(out, "a") as f:
        f.write(orphan)
    kept = [line for line in open(out) if '"source_id": "a"' in line]
    capfd.readouterr()
    srv.healed.add("length")
    stats = run_main(monkeypatch, *args)  # by default, cut records are not done: sampled again and replaced
    err = capfd.readouterr().err
    assert any("removed 4 generations" in line and out in line for line in err.splitlines()), err
    assert stats["total"] == 4 and stats["done"] == 4 and len(srv.log) == 10
    lines = open(out).readlines()
    assert lines[:3] == kept + [orphan]  # the other lines as they were, in their order
    recs = read_jsonl(out)
    assert {r["finish_reason"] for r in recs if r["source_id"] != "zz"} == {"stop"}
    count = collections.Counter((r["source_id"], r["kind"], r["index"]) for r in recs)
    assert set(count.values()) == {1}  # no duplicate that pack.py would refuse
    assert set(count) == {(i, "rephrase", g) for i in ids for g in range(2)} | {("zz", "rephrase", 0)}


def test_api_key_whitespace_is_stripped_and_bad_keys_never_leak(tmp_path, server):
    srv, url = server()
    inp = write_docs(tmp_path / "in.jsonl", [{"id": "a", "text": "Text."}])
    out = str(tmp_path / "o.jsonl")
    rc, stdout, stderr = cli("--input", inp, "--out_jsonl", out, "--endpoint", url, "--G", "1", key=KEY + "\n")
    assert rc == 0, stderr
    assert {e["auth"] for e in srv.log} == {f"Bearer {KEY}"}  # read from a file: the newline is dropped
    for bad in (KEY[:10] + "\x01" + KEY[10:], KEY[:10] + "\n" + KEY[10:], KEY[:10] + "\u00e9" + KEY[10:]):
        out = str(tmp_path / "bad.jsonl")
        rc, stdout, stderr = cli("--input", inp, "--out_jsonl", out, "--endpoint", url, "--G", "1", key=bad)
        assert_error(rc, stderr, "$NANOSYNTH_TEST_KEY", "position 10")
        for part in (KEY[:10], KEY[10:]):
            assert part not in stdout + stderr
        assert not os.path.exists(out)
    assert len(srv.log) == 1  # nothing was sent with a bad key


def test_one_line_errors(tmp_path, server):
    _, url = server()
    good = write_docs(tmp_path / "good.jsonl", [{"id": "a", "text": "Text."}])
    bad_utf8 = tmp_path / "latin1.jsonl"  # a long first line: text mode decodes in blocks of 8 KiB
    bad_utf8.write_bytes(json.dumps({"id": "a", "text": "x" * 20000}).encode() + b"\n\n" +
                         '{"id": "b", "text": "caf\u00e9"}\n'.encode("latin-1") + b'{"id": "c", "text": "d"}\n')
    empty, blank = tmp_path / "empty.jsonl", tmp_path / "blank.jsonl"
    empty.write_text("")
    blank.write_text("\n  \n")
    out = str(tmp_path / "o.jsonl")
    io = ("--input", good, "--out_jsonl", out)
    cases = [   # the arguments, and what the error line must name
        (("--input", str(tmp_path / "nope.jsonl"), "--out_jsonl", out, "--endpoint", url),
         [f"--input {tmp_path / 'nope.jsonl'}", "No such file"]),
        (("--input", str(tmp_path), "--out_jsonl", out, "--endpoint", url), [f"--input {tmp_path}", "directory"]),
        (("--input", str(bad_utf8), "--out_jsonl", out, "--endpoint", url), [f"{bad_utf8}:3:", "UTF-8", "0xe9"]),
        (("--input", str(empty), "--out_jsonl", out, "--endpoint", url), [str(empty)]),
        (("--input", str(blank), "--out_jsonl", out, "--endpoint", url), [str(blank)]),
        ((*io, "--endpoint", url, "--timeout", "0"), ["--timeout"]),
        ((*io, "--endpoint", url, "--timeout", "-5"), ["--timeout", "-5"]),
        ((*io, "--endpoint", "127.0.0.1:8000/v1"), ["--endpoint '127.0.0.1:8000/v1'"]),
        ((*io, "--endpoint", "ftp://127.0.0.1/v1"), ["--endpoint 'ftp://127.0.0.1/v1'"]),
        ((*io, "--endpoint", url, "--tokenizer", str(tmp_path / "no.tiktoken")),
         [f"--tokenizer {tmp_path / 'no.tiktoken'}"]),
        ((*io, "--endpoint", url, "--G", "0"), ["--G"]),
        ((*io, "--endpoint", url, "--shard", "3/3"), ["--shard", "3/3"]),
    ]
    env = dict(os.environ, NANOSYNTH_TEST_KEY=KEY)
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "generate.py"), "--model", "m", "--api_key_env",
                               "NANOSYNTH_TEST_KEY", *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for argv, _ in cases]  # all at once: each spends most of its time starting
    for proc, (argv, named) in zip(procs, cases):
        stdout, stderr = proc.communicate(timeout=60)
        assert_error(proc.returncode, stderr, *named)
        assert stdout == ""
    assert not os.path.exists(out)


# ----------------------------------------------------------------------------- settings, and servers that are not OpenAI's

def test_resume_under_other_settings_is_refused(tmp_path, server, monkeypatch, capfd):
    srv, url = server()
    inp = write_docs(tmp_path / "in.jsonl", [{"id": "a", "text": "Alpha text."}, {"id": "b", "text": "Bravo text."}])
    out = str(tmp_path / "o.jsonl")
    args = ("--input", inp, "--out_jsonl", out, "--endpoint", url)
    run_main(monkeypatch, *args, "--G", "2")
    same_name = tmp_path / "prompt.json"   # the default prompt's name, another template
    same_name.write_text(json.dumps({"name": "wikipedia", "user": "Rewrite: {document}"}))
    before, asked = open(out).read(), len(srv.log)
    for change, named in [(("--model", "other"), ["model 'test-model' -> 'other'"]),
                          (("--temperature", "0.5"), ["temperature 1.0 -> 0.5"]),
                          (("--prompt_file", str(same_name)), ["prompt_sha256"]),
                          (("--max_new_tokens", "99"), ["max_new_tokens 1024 -> 99"]),
                          (("--seed", "3"), ["seed 0 -> 3"]),
                          (("--max_source_tokens", "50"), ["max_source_tokens 2048 -> 50"]),
                          (("--api", "completions"), ["api 'chat' -> 'completions'"]),
                          (("--tokenizer", "gpt2:1024"), ["tokenizer 'gpt2' -> 'gpt2:1024'"]),
                          (("--text_field", "body"), ["text_field 'text' -> 'body'"]),
                          (("--id_field", ""), ["id_field None -> ''"]),
                          (("--model", "other", "--seed", "3"), ["model 'test-model' -> 'other'", "seed 0 -> 3"])]:
        capfd.readouterr()
        with pytest.raises(SystemExit) as e:
            run_main(monkeypatch, *args, "--G", "3", *change)
        assert_error(e.value.code, capfd.readouterr().err, out, *named)
    assert open(out).read() == before and len(srv.log) == asked   # nothing written, nothing asked
    # every record says how it was made
    settings = {(r["model"], r["api"], r["prompt"], r["temperature"], r["max_new_tokens"], r["seed"],
                 r["max_source_tokens"], r["tokenizer"], len(r["prompt_sha256"]), r["text_field"], r["id_field"])
                for r in read_jsonl(out)}
    assert settings == {("test-model", "chat", "wikipedia", 1.0, 1024, 0, 2048, "gpt2", 16, "text", None)}
    assert {k for r in read_jsonl(out) for k in r} >= set(GENERATION_SETTINGS)   # the fields pack.py compares
    # the same settings: a larger G adds only the new indices
    stats = run_main(monkeypatch, *args, "--G", "3")
    assert stats["done"] == 2 and sorted((r["source_id"], r["index"]) for r in read_jsonl(out)) == \
        [(s, i) for s in "ab" for i in range(3)]
    # records from before the settings were stored: said so, and the run goes on
    old = [{k: v for k, v in r.items() if k in ("id", "source_id", "kind", "index", "text", "model", "prompt",
                                                "finish_reason", "usage", "temperature")} for r in read_jsonl(out)]
    write_docs(out, old)
    capfd.readouterr()
    assert run_main(monkeypatch, *args, "--G", "4")["done"] == 2
    notes = [line for line in capfd.readouterr().err.splitlines() if "note:" in line]
    assert len(notes) == 1 and out in notes[0] and "seed" in notes[0]


class PlainWebServer(SimpleHTTPRequestHandler):
    """python -m http.server as it is, with its requests counted instead of logged."""
    def log_request(self, code="-", size="-"):
        self.server.requests.append(self.command)

    def log_message(self, fmt, *args):
        pass


def test_a_plain_web_server_stops_the_run_at_once(tmp_path):
    # GET /v1/models answers 404 (accepted: some OpenAI servers have no /models), every POST 501 with
    # an HTML page: not an OpenAI server, so the run stops at its first reply instead of retrying
    (tmp_path / "www").mkdir()
    srv = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(PlainWebServer, directory=str(tmp_path / "www")))
    srv.daemon_threads, srv.requests = True, []
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
    inp = write_docs(tmp_path / "in.jsonl", [{"id": f"d{i}", "text": f"Text {i}."} for i in range(20)])
    out = str(tmp_path / "o.jsonl")
    try:
        t0 = time.time()
        rc, _, err = cli("--input", inp, "--out_jsonl", out, "--endpoint", url, "--concurrency", "2",
                         "--max_tries", "8", "--timeout", "30")
    finally:
        srv.shutdown()
        srv.server_close()
    assert_error(rc, err, f"--endpoint {url}", "501", alone=False)
    assert time.time() - t0 < 10 and srv.requests.count("GET") == 1 and 1 <= srv.requests.count("POST") <= 2
    assert not os.path.exists(out) and not os.path.exists(tmp_path / "o.failures.jsonl")
