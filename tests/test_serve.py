"""Tests for serve.py, the self-distillation server: a tiny random GPT (GPT-2 vocabulary, 2 layers,
width 32) behind a real HTTP server on 127.0.0.1 (ephemeral ports), queried with requests, with raw
http.client / socket requests where requests would not send the malformation, end to end by
generate.py --kind self-distill, and as `python serve.py` subprocesses for the command line.
Run: python -m pytest -q tests/test_serve.py   (about 20 seconds on 2 CPU cores)"""

import dataclasses
import http.client
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from http.server import ThreadingHTTPServer

import pytest
import requests
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import generate  # noqa: E402
import serve  # noqa: E402
from support import assert_error  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

KEY = "sk-serve-test-secret-31337"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=50257, n_layer=2, n_head=2, n_kv_head=2, n_embd=32, mlp_hidden=64, block_size=128)
    path = str(tmp_path_factory.mktemp("ckpt") / "ckpt.pt")
    torch.save({"model": GPT(cfg).state_dict(), "model_config": dataclasses.asdict(cfg), "tokenizer": "gpt2"}, path)
    return path


def start(model, enc, bos, **kw):
    srv = serve.make_server(model, enc, bos, port=0, quiet=True, **kw)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}/v1"


def stop(srv):
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def loaded(ckpt):
    return serve.load_checkpoint(ckpt)


@pytest.fixture(scope="module")
def server(loaded):
    srv, url = start(*loaded)
    yield url
    stop(srv)


def post(url, **body):
    return requests.post(url + "/completions", json=body, timeout=30)


def test_models_and_completions(server):
    r = requests.get(server + "/models", timeout=10)
    assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == ["nanosynth"]
    r = post(server, model="nanosynth", prompt="Hello world", max_tokens=5, n=3, seed=1)
    assert r.status_code == 200
    out = r.json()
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    assert out["usage"]["prompt_tokens"] == 3  # BOS + "Hello" + " world"
    # a random model over 50k tokens does not emit BOS in 5 steps (seeded, so this is exact)
    assert [c["finish_reason"] for c in out["choices"]] == ["length"] * 3 and out["usage"]["completion_tokens"] == 15
    # the same seed gives the same samples; greedy gives n equal ones
    again = post(server, model="nanosynth", prompt="Hello world", max_tokens=5, n=3, seed=1).json()
    assert [c["text"] for c in again["choices"]] == [c["text"] for c in out["choices"]]
    greedy = post(server, prompt="Hello world", max_tokens=6, n=2, temperature=0).json()
    assert greedy["choices"][0]["text"] == greedy["choices"][1]["text"]
    bos_only = post(server, prompt="", max_tokens=4, top_k=10, seed=3).json()
    assert bos_only["usage"]["prompt_tokens"] == 1 and len(bos_only["choices"]) == 1


def test_errors(server):
    r = post(server, model="gpt-4", prompt="x")
    assert r.status_code == 404 and "The model `gpt-4` does not exist" in r.json()["error"]["message"]
    r = post(server, prompt="x", max_tokens=200)
    assert r.status_code == 400 and "exceeds the model's context of 128 tokens" in r.json()["error"]["message"]
    r = post(server, prompt="x", n=0)
    assert r.status_code == 400 and r.json()["error"]["message"] == "n must be an integer >= 1, got 0"
    r = requests.post(server + "/completions", data=b"{nope", timeout=10)
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("bad request")
    assert requests.post(server + "/chat/completions", json={}, timeout=10).status_code == 404


def raw(url, body=None, headers=()):
    """POST by http.client, which sends the body and headers exactly as given (requests would fix or
    refuse them). (status, error message or None, Connection header)."""
    conn = http.client.HTTPConnection("127.0.0.1", int(url.split(":")[2].split("/")[0]), timeout=10)
    try:
        conn.putrequest("POST", "/v1/completions")
        for k, v in headers:
            conn.putheader(k, v)
        conn.endheaders(body)
        r = conn.getresponse()
        return r.status, json.loads(r.read()).get("error", {}).get("message"), r.getheader("Connection")
    finally:
        conn.close()


def raw_json(url, text):
    return raw(url, text.encode(), [("Content-Type", "application/json"), ("Content-Length", str(len(text)))])


def test_non_finite_and_out_of_range_values(server):
    body = '{"prompt": "x", "max_tokens": 2, "temperature": %s}'
    # NaN and Infinity are not JSON, though Python's json reads them
    for lit in ("NaN", "Infinity", "-Infinity"):
        status, msg, _ = raw_json(server, body % lit)
        assert status == 400 and msg == f"bad request: body is not valid JSON: {lit} is not a JSON number"
    # 1e400 is JSON, but Python reads it as inf; 1e308 and 1e-45 are finite but make NaN probabilities
    for lit in ("1e400", "1e308", "1e-45", "-1", "101", '"hot"', "true"):
        status, msg, _ = raw_json(server, body % lit)
        assert status == 400 and msg.startswith("temperature must be 0 (greedy) or a number between 0.01 and 100"), lit
    status, msg, _ = raw_json(server, '{"prompt": "x", "top_p": 1e400}')
    assert status == 400 and msg == "top_p must be 1 (this server has no nucleus sampling; use top_k), got inf"
    for bad, want in [(dict(top_p=0.9), "top_p must be 1"), (dict(top_p=True), "top_p must be 1"),
                      (dict(seed=2**64), "seed must be < 2**64"), (dict(n=129), "n must be <= 128"),
                      (dict(max_tokens=0), "max_tokens must be an integer >= 1"),
                      (dict(max_tokens=2.5), "max_tokens must be an integer >= 1"), (dict(top_k=0), "top_k must be")]:
        r = post(server, prompt="x", **{"max_tokens": 2, **bad})
        assert r.status_code == 400 and r.json()["error"]["message"].startswith(want), bad
    # the limits themselves are allowed, and the server still samples after all of the above
    for ok in (dict(temperature=100), dict(temperature=0.01, top_p=1), dict(temperature=0, seed=2**64 - 1)):
        r = post(server, prompt="x", max_tokens=2, **ok)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, ok


class EchoHandler(serve.JSONHandler):
    """A server built on JSONHandler that, like replay.py's and the test servers, does not catch
    read_json's errors itself."""
    def do_POST(self):
        self.reply(200, {"type": type(self.read_json()).__name__})


def test_deeply_nested_json(server):
    deep = b"[" * 100_000  # json.loads raises RecursionError on it
    r = requests.post(server + "/completions", data=deep, timeout=10)
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "bad request: body is not valid JSON: nested too deeply"
    echo = ThreadingHTTPServer(("127.0.0.1", 0), EchoHandler)
    threading.Thread(target=echo.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    url = f"http://127.0.0.1:{echo.server_address[1]}/v1"
    try:
        assert requests.post(url + "/x", data=b"[[1]]", timeout=10).json() == {"type": "list"}
        r = requests.post(url + "/x", data=deep, timeout=10)
        assert r.status_code == 400 and "nested too deeply" in r.json()["error"]["message"]
        assert raw_json(url, '{"t": NaN}')[:2] == (400, "bad request: body is not valid JSON: NaN is not a JSON number")
    finally:
        stop(echo)


def test_bad_content_length(server):
    # each is answered at once (the server's timeout is 30 s, the client's 10 s) and closes the
    # connection, since the server cannot tell where the body would end
    for length, code, want in [("abc", 400, "Content-Length 'abc' is not a byte count"),
                               ("-5", 400, "Content-Length '-5' is not a byte count"),
                               ("1_0", 400, "Content-Length '1_0' is not a byte count"),
                               ("99999999999999", 413, "a body of 99999999999999 bytes is over the limit of 4194304"),
                               ("9" * 5000, 413, "over the limit of 4194304")]:
        t0 = time.time()
        status, msg, connection = raw(server, headers=[("Content-Length", length)])
        assert (status, connection) == (code, "close") and want in msg and time.time() - t0 < 5, length
    status, msg, connection = raw(server)  # no Content-Length at all
    assert (status, msg, connection) == (411, "bad request: a Content-Length header is required", "close")
    # a body shorter than promised, the client then done sending
    with socket.create_connection(("127.0.0.1", int(server.split(":")[2].split("/")[0])), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"prompt\": ")
        s.shutdown(socket.SHUT_WR)
        reply = read_all(s)
    assert reply.startswith(b"HTTP/1.1 400 ") and b"the body ended after 11 of 100 bytes" in reply


def test_client_hangs_up_mid_body(server, capfd):
    """A client gone before the server could answer is no error of the server's: no traceback."""
    before = handler_threads()
    for reset in (False, True):
        s = socket.create_connection(("127.0.0.1", int(server.split(":")[2].split("/")[0])), timeout=10)
        if reset:  # close with a RST, so the server's read fails rather than ends
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"prompt\": ")
        time.sleep(0.1)  # the server is reading the body
        s.close()
    time.sleep(0.1)
    for t in handler_threads() - before:
        t.join(timeout=5)
    assert "Traceback" not in capfd.readouterr().err
    assert post(server, prompt="x", max_tokens=2).status_code == 200


def read_all(s):
    """Everything the server sends until it closes the connection."""
    out = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            return out
        if not chunk:
            return out
        out += chunk


def handler_threads():
    return {t for t in threading.enumerate() if "process_request_thread" in t.name}


def test_stalled_clients_are_dropped(loaded):
    srv, url = start(*loaded, timeout=0.5)
    port = srv.server_address[1]
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    dropped = {}

    def stall(kind):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        t0 = time.time()
        try:
            if kind == "headers then nothing":
                s.sendall(head)
            if kind == "dribbled body":  # a byte every 0.1 s: each read is quick, the whole would take 100 s
                s.sendall(head)
                s.settimeout(0.1)
                for _ in range(100):
                    try:
                        s.sendall(b" ")
                        if s.recv(1) == b"":
                            break  # closed by the server
                    except TimeoutError:
                        pass
                    except OSError:
                        break  # reset by the server
            s.settimeout(10)
            read_all(s)  # returns when the server closes the connection
            dropped[kind] = time.time() - t0
        finally:
            s.close()
    before = handler_threads()
    kinds = ["connect and nothing", "headers then nothing", "dribbled body"]
    clients = [threading.Thread(target=stall, args=(k,)) for k in kinds]
    try:
        for c in clients:
            c.start()
        time.sleep(0.2)
        stalled = handler_threads() - before
        assert len(stalled) == 3
        # meanwhile the server answers others
        r = post(url, prompt="Hi", max_tokens=3, seed=0)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        for c in clients:
            c.join(timeout=10)
        assert sorted(dropped) == sorted(kinds) and all(0.4 < t < 3 for t in dropped.values()), dropped
        for t in stalled:
            t.join(timeout=5)
            assert not t.is_alive()  # the handler threads ended, not just the sockets
        r = post(url, prompt="Hi", max_tokens=3, seed=0)
        assert r.status_code == 200
    finally:
        stop(srv)


def test_keep_alive(loaded):
    srv, url = start(*loaded)
    accepted = []
    accept = srv.get_request
    srv.get_request = lambda: accepted.append(1) or accept()  # count the connections the server takes
    try:
        # generate.py's client: a requests.Session reuses one connection for all its requests
        with requests.Session() as s:
            for seed in range(3):
                r = s.post(url + "/completions", json={"prompt": "Hi", "max_tokens": 2, "seed": seed}, timeout=10)
                assert r.status_code == 200 and r.headers.get("Connection") != "close"
            assert s.post(url + "/completions", data=b"{nope", timeout=10).status_code == 400  # body read whole: kept
            assert s.get(url + "/models", timeout=10).status_code == 200
        assert len(accepted) == 1
        # a bad Content-Length closes it: the rest of the stream cannot be read as a next request
        conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=10)
        conn.request("GET", "/v1/models")
        assert conn.getresponse().read() and conn.sock is not None
        sock = conn.sock
        conn.request("POST", "/v1/completions", body=b'{"prompt": "Hi", "max_tokens": 2}')
        r = conn.getresponse()
        assert r.status == 200 and json.loads(r.read())["usage"]["completion_tokens"] == 2 and conn.sock is sock
        conn.request("POST", "/v1/completions", headers={"Content-Length": "x"})
        r = conn.getresponse()
        assert (r.status, r.getheader("Connection")) == (400, "close")
        r.read()
        assert conn.sock is None  # http.client closed it, as the server asked
        conn.close()
        assert len(accepted) == 2
    finally:
        stop(srv)


class StubModel:
    """Row 0 emits BOS as its third new token; row 1 never does. Checks the stop logic exactly."""
    config = GPTConfig(vocab_size=50257, n_layer=1, n_head=1, n_kv_head=1, n_embd=2, mlp_hidden=2, block_size=256)

    def __init__(self, bos):
        self.bos, self.calls = bos, 0

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None, vocab_size=None,
                 stop_id=None):
        self.calls += 1
        for _ in range(max_new_tokens):
            T = idx.size(1)
            new = torch.tensor([[self.bos if T == 3 else 100 + T], [200 + T]])[:idx.size(0)]
            idx = torch.cat([idx, new], dim=1)
            if stop_id is not None and (idx[:, 1:] == stop_id).any(dim=1).all():
                break
        return idx


def test_stop_at_bos():
    enc, bos = load_tokenizer("gpt2")
    stub = StubModel(bos)
    outs = serve.sample(stub, [bos], 2, 10, 1.0, None, 0, bos, "cpu")
    assert outs == [([101, 102, bos], "stop"), ([201 + i for i in range(10)], "length")]
    srv, url = start(stub, enc, bos)
    try:
        out = post(url, prompt="", max_tokens=5, n=2).json()
        assert [c["finish_reason"] for c in out["choices"]] == ["stop", "length"]
        assert out["choices"][0]["text"] == enc.decode([101, 102])
        assert out["usage"]["completion_tokens"] == 3 + 5
        # one generate call for the whole sample, told to stop at BOS
        stub2 = StubModel(bos)
        assert serve.sample(stub2, [bos], 1, 1000, 1.0, None, 0, bos, "cpu") == [([101, 102, bos], "stop")]
        assert stub2.calls == 1
    finally:
        srv.shutdown()
        srv.server_close()


def test_self_distill_end_to_end(server, tmp_path, monkeypatch, capfd):
    enc, _ = load_tokenizer("gpt2")
    docs = [{"id": f"s{i}", "text": f"Document number {i} talks about foxes, rivers and logs at some length."}
            for i in range(3)]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(d) + "\n" for d in docs))
    monkeypatch.setenv("SERVE_TEST_KEY", KEY)
    common = ["--input", str(inp), "--endpoint", server, "--model", "nanosynth", "--kind", "self-distill",
              "--api_key_env", "SERVE_TEST_KEY", "--G", "3", "--max_new_tokens", "8", "--concurrency", "2",
              "--keep_truncated"]  # 8 tokens: most samples stop at the length limit; keep them as they are
    out = tmp_path / "sd.jsonl"
    stats = generate.main(common + ["--out_jsonl", str(out), "--prefix_tokens", "4", "--n_per_request", "2"])
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert stats["done"] == 9 and stats["requests"] == 6  # per document: n=2 then n=1
    assert sorted((r["source_id"], r["index"]) for r in recs) == [(d["id"], i) for d in docs for i in range(3)]
    by_id = {d["id"]: d["text"] for d in docs}
    for r in recs:
        prefix = enc.decode(enc.encode_ordinary(by_id[r["source_id"]])[:4])
        assert r["kind"] == "self-distill" and r["prompt"] == "prefix-4" and r["model"] == "nanosynth"
        assert r["text"].startswith(prefix) and len(r["text"]) > len(prefix)
        assert r["usage"]["prompt_tokens"] == 5 and 1 <= r["usage"]["completion_tokens"] <= 8
        assert r["finish_reason"] in ("length", "stop")
    # unconditional: BOS only, the text is the continuation alone
    out0 = tmp_path / "sd0.jsonl"
    generate.main(common + ["--out_jsonl", str(out0), "--prefix_tokens", "0", "--G", "1"])
    recs0 = [json.loads(line) for line in out0.read_text().splitlines()]
    assert len(recs0) == 3 and all(r["prompt"] == "unconditional" and r["usage"]["prompt_tokens"] == 1 for r in recs0)
    cap = capfd.readouterr()
    assert KEY not in cap.err + cap.out + out.read_text() + out0.read_text()


def test_cli_serves_a_checkpoint(ckpt):
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), "--ckpt", ckpt, "--port", "0", "--quiet",
                             "--model_name", "tiny"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith(f"serving {ckpt} as model 'tiny' on http://127.0.0.1:"), proc.stderr.read()
        url = line.split(" on ")[1].split()[0]
        assert requests.get(url + "/models", timeout=10).json()["data"][0]["id"] == "tiny"
        r = post(url, model="tiny", prompt="Hi", max_tokens=3, seed=0)
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 2
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "serve.py"), *args], capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("case", ["missing checkpoint", "a directory", "corrupt checkpoint", "port in use",
                                  "device not here", "not a device"])
def test_cli_errors_are_one_line(case, ckpt, tmp_path):
    missing, corrupt = tmp_path / "nope.pt", tmp_path / "corrupt.pt"
    corrupt.write_bytes(open(ckpt, "rb").read()[:5000])  # a checkpoint cut short, as by a full disk
    with socket.socket() as busy:  # a port in use: bound and listening here
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        args, named = {
            "missing checkpoint": (["--ckpt", str(missing)], [missing]),
            "a directory": (["--ckpt", str(tmp_path)], [f"{tmp_path}: is a directory"]),
            "corrupt checkpoint": (["--ckpt", str(corrupt)], [corrupt]),
            "port in use": (["--ckpt", ckpt, "--port", str(port)], [f"127.0.0.1:{port}", "Address already in use"]),
            # cuda:7 is missing on this CPU-only machine and on most GPU machines
            "device not here": (["--ckpt", ckpt, "--device", "cuda:7"], ["--device 'cuda:7'"]),
            "not a device": (["--ckpt", ckpt, "--device", "gpu"], ["--device 'gpu'"]),
        }[case]
        r = run_cli(*args) if case == "port in use" else run_cli(*args, "--port", "0")
    assert_error(r.returncode, r.stderr, *named)
    assert r.stdout == ""


def test_cached_and_uncached_sampling_give_identical_tokens():
    # serve.py samples through one KV cache for the whole sample; recomputing every position from
    # scratch at every step (no cache) must draw the very same tokens from the same seed
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=101, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, mlp_hidden=176,
                          block_size=128)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)   # sharper distributions: a position error would change the draws
    prompt = torch.tensor([[0, 5, 17, 3]] * 3)
    draws = [model.generate(prompt, 60, temperature=1.0, generator=torch.Generator().manual_seed(7), use_cache=cache)
             for cache in (True, False)]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0][0], draws[0][1])


def test_generate_stops_when_every_row_has_its_stop_id():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=101, n_layer=1, n_head=2, n_kv_head=2, n_embd=32, mlp_hidden=64,
                          block_size=64)).eval()
    with torch.no_grad():
        model.lm_head.weight.zero_()   # every logit 0: greedy sampling picks id 0 in every row
    out = model.generate(torch.tensor([[1, 2], [3, 4]]), 50, temperature=0, stop_id=0)
    assert out.tolist() == [[1, 2, 0], [3, 4, 0]]
    assert model.generate(torch.tensor([[1, 2]]), 5, temperature=0).shape == (1, 7)   # no stop_id: all 5
