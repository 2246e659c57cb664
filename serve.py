r"""
serve.py: a small OpenAI-compatible HTTP server that samples from a nanosynth checkpoint, so that
generate.py --kind self-distill can draw synthetic documents from a model trained on real data.

Run
  python serve.py --ckpt out/real/ckpt.pt --port 8000
  python generate.py --kind self-distill --endpoint http://127.0.0.1:8000/v1 --model nanosynth \
      --input sample_data/train.jsonl --out_jsonl synth/self-distill.jsonl --G 4

API (the subset generate.py uses)
  GET  /v1/models        the one model, named by --model_name
  POST /v1/completions   {"model", "prompt": str ("" = BOS only), "max_tokens" (16), "temperature" (1.0),
                          "top_k" (none), "top_p" (1 only), "n" (1), "seed" (random)} -> {"choices":
                          [{"index", "text", "finish_reason"}], "usage": {"prompt_tokens",
                          "completion_tokens", "total_tokens"}}
  A choice stops ("stop") when the model emits the BOS/<|endoftext|> token, else at max_tokens ("length").
  Every prompt starts with BOS, as every training document does.
  temperature is 0 (greedy) or between 0.01 and 100; n is at most 128; prompt + max_tokens must fit
  in the model's context. Anything else gets a 4xx reply with an OpenAI-style error body:
  400 for a bad value or a body that is not strict JSON (NaN and Infinity are not JSON), 404 for
  another model name, 411/413 for a missing or too large Content-Length (limit 4 MB).
  A client that stalls for --timeout seconds mid-request (or idles that long on a kept-alive
  connection) is dropped, so it cannot hold a server thread.

Reads the checkpoint train.py writes (torch.save of {"model": state_dict, "model_config": GPTConfig
fields, "tokenizer": spec for tokenizer.load_tokenizer}); writes nothing. One request samples at a time
(the n choices of a request are one batch). A checkpoint that cannot be read, a port in use or a
device this machine does not have stop it at start with one "error: ..." line (exit code 2, as
every script's errors: cli.py).
"""
import json
import math
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

import cli
from tokenizer import load_tokenizer
from model import autocast, load_model

# temperature is 0 (greedy) or in this range. float32 logits / temperature only give NaN probabilities
# far outside it (below about 1e-40 or above float32's 3e38, e.g. 1e308), but below 0.01 sampling is
# greedy in all but name and above 100 it is uniform noise: such values are more likely mistakes.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 100.0


def load_checkpoint(path, device="cpu"):
    model, ckpt = load_model(path, device)
    enc, bos = load_tokenizer(ckpt.get("tokenizer", "gpt2"))
    return model, enc, bos


class BadRequest(ValueError):
    """A request the server refuses, answered with HTTP status `code` and `message`. A ValueError, so
    callers that caught read_json's ValueError still do."""
    def __init__(self, message, code=400):
        super().__init__(message)
        self.code = code


def sample(model, prompt, n, max_tokens, temperature, top_k, seed, bos, device, vocab_size=None):
    """n continuations of the token list prompt: a list of (tokens, finish_reason), each cut at
    (and including) its first BOS. One model.generate call with one KV cache for the whole sample,
    stopped as soon as every choice has its BOS; bfloat16 on CUDA. Only ids below vocab_size are
    sampled (the model's embedding is padded beyond the tokenizer's ids)."""
    g = torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([prompt] * n, dtype=torch.long, device=device)
    with autocast(device):
        idx = model.generate(idx, max_tokens, temperature=temperature, top_k=top_k, generator=g,
                             vocab_size=vocab_size, stop_id=bos)
    out = []
    for row in idx[:, len(prompt):].tolist():
        if bos in row:
            out.append((row[:row.index(bos) + 1], "stop"))
        else:
            out.append((row[:max_tokens], "length"))
    return out


def complete(srv, req):
    """The response to a /v1/completions request body (a dict)."""
    if not isinstance(req, dict):
        raise BadRequest("request body must be a JSON object")
    if req.get("model", srv.name) != srv.name:
        raise BadRequest(f"The model `{req['model']}` does not exist; this server serves `{srv.name}`.", 404)
    if req.get("stream"):
        raise BadRequest("stream is not supported")
    prompt = req.get("prompt", "")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise BadRequest("prompt must be a string")
    max_tokens, n, top_k, seed = req.get("max_tokens", 16), req.get("n", 1), req.get("top_k"), req.get("seed")
    temperature, top_p = req.get("temperature", 1.0), req.get("top_p", 1)
    for name, v, lo in (("max_tokens", max_tokens, 1), ("n", n, 1), ("top_k", top_k, 1), ("seed", seed, 0)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < lo):
            raise BadRequest(f"{name} must be an integer >= {lo}, got {v!r}")
    if n > 128:
        raise BadRequest("n must be <= 128")
    if seed is not None and seed >= 2**64:
        raise BadRequest(f"seed must be < 2**64, got {seed}")  # torch.Generator's range
    # not a number (a string, a bool) or out of range: NaN fails both comparisons, and an overflowing
    # literal such as 1e400 (which json reads as inf) fails the upper one
    is_number = isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
    if not is_number or not (temperature == 0 or MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE):
        raise BadRequest(f"temperature must be 0 (greedy) or a number between {MIN_TEMPERATURE} and "
                         f"{MAX_TEMPERATURE}, got {temperature!r}")
    # nucleus sampling is not implemented: accept only the value that means "off" rather than ignore it
    if type(top_p) not in (int, float) or top_p != 1:
        raise BadRequest(f"top_p must be 1 (this server has no nucleus sampling; use top_k), got {top_p!r}")
    ids = [srv.bos] + srv.enc.encode_ordinary(prompt)
    block = srv.model.config.block_size
    if len(ids) + max_tokens > block:
        raise BadRequest(f"prompt ({len(ids)} tokens with BOS) + max_tokens ({max_tokens}) exceeds the "
                         f"model's context of {block} tokens")
    seed = seed if seed is not None else int.from_bytes(uuid.uuid4().bytes[:4], "little")
    with srv.lock:  # one batch at a time: the CPU (or GPU) is shared anyway
        outs = sample(srv.model, ids, n, max_tokens, float(temperature), top_k, seed, srv.bos, srv.device,
                      srv.enc.n_vocab)
    choices = [{"index": i, "text": srv.enc.decode([t for t in toks if t != srv.bos]), "finish_reason": reason,
                "logprobs": None} for i, (toks, reason) in enumerate(outs)]
    used = sum(len(toks) for toks, _ in outs)
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": srv.name, "choices": choices,
            "usage": {"prompt_tokens": len(ids), "completion_tokens": used, "total_tokens": len(ids) + used}}


def no_constant(name):
    raise ValueError(f"{name} is not a JSON number")  # Python's json would read NaN, Infinity, -Infinity


class JSONHandler(BaseHTTPRequestHandler):
    """The HTTP side of an OpenAI-style server: JSON request bodies in, JSON replies out, HTTP/1.1
    keep-alive as real servers do. This server's Handler, sample_data/replay.py and the test and
    benchmark servers are all built on it. Requests are logged unless the server's `quiet` is set.
    A body read_json refuses is answered with its 4xx here, whether or not do_POST catches it; a
    client that stalls for `timeout` seconds, or hangs up, is dropped without a traceback."""
    protocol_version = "HTTP/1.1"   # keep-alive: clients reuse their connections
    disable_nagle_algorithm = True  # else headers and body go out in two packets: +40 ms (delayed ACK)
    timeout = 30.0                  # seconds a client may stall or idle; a server's client_timeout overrides it
    max_body = 4 << 20              # bytes; a prompt is a few KB, a chat request with a whole document tens of KB

    def setup(self):
        # not server.timeout: socketserver already uses that name for handle_request's wait
        self.timeout = getattr(self.server, "client_timeout", self.timeout)
        super().setup()  # puts the timeout on the socket: a read or write that stalls raises TimeoutError

    def handle_one_request(self):
        try:
            try:
                super().handle_one_request()  # ends the connection itself on TimeoutError
            except BadRequest as e:  # from read_json, in a do_POST that lets it through
                self.error(e.code, str(e))
        except ConnectionError as e:  # the client hung up, maybe before our answer: not the server's error
            self.log_error("client went away: %r", e)
            self.close_connection = True

    def log_message(self, fmt, *args):
        if not getattr(self.server, "quiet", True):
            super().log_message(fmt, *args)

    def read_json(self):
        """The request body parsed as strict JSON. Raises BadRequest (a ValueError) for a body that is
        not JSON, holds NaN or Infinity, or nests too deeply, and for a missing, malformed or too large
        Content-Length; TimeoutError (which drops the connection) if the body takes longer than
        `timeout` seconds to arrive, even if it comes a byte at a time."""
        # until the whole body is in, we cannot tell where a next request on this connection would start
        was_closing, self.close_connection = self.close_connection, True
        length = self.headers.get("Content-Length")
        if length is None:
            raise BadRequest("bad request: a Content-Length header is required", 411)
        if not (length.isascii() and length.isdigit()):  # int() would also take "-5", " 5", "5_0"
            raise BadRequest(f"bad request: Content-Length {length!r} is not a byte count")
        if len(length) > 18 or int(length) > self.max_body:  # int() refuses strings of over 4300 digits
            raise BadRequest(f"bad request: a body of {length} bytes is over the limit of {self.max_body}", 413)
        length = int(length)
        # the socket timeout bounds each read; this deadline bounds them all, so dribbling does not pay
        deadline = time.monotonic() + (self.timeout if self.timeout is not None else math.inf)
        body = bytearray()
        while len(body) < length:
            if time.monotonic() > deadline:
                raise TimeoutError(f"request body not received within {self.timeout} s")
            chunk = self.rfile.read1(length - len(body))
            if not chunk:
                raise BadRequest(f"bad request: the body ended after {len(body)} of {length} bytes")
            body += chunk
        self.close_connection = was_closing
        try:
            return json.loads(body, parse_constant=no_constant)
        except RecursionError:  # json.loads recurses once per level of [ or {
            raise BadRequest("bad request: body is not valid JSON: nested too deeply") from None
        except ValueError as e:  # JSONDecodeError, NaN/Infinity, bytes that are not UTF-8
            raise BadRequest(f"bad request: body is not valid JSON: {e}") from None

    def reply(self, code, obj=None, raw=None, headers=()):
        """Send `obj` as JSON (or the bytes `raw` as they are) with status `code`."""
        body = raw if raw is not None else json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def error(self, code, message):
        """An OpenAI-style error body; tells the client when this connection is about to close."""
        self.reply(code, {"error": {"message": message, "type": "invalid_request_error", "code": code}},
                   headers=[("Connection", "close")] if self.close_connection else ())


class Handler(JSONHandler):
    def do_GET(self):
        if self.path.rstrip("/") == "/v1/models":
            return self.reply(200, {"object": "list", "data": [{"id": self.server.name, "object": "model",
                                    "owned_by": "nanosynth", "max_model_len": self.server.model.config.block_size}]})
        self.error(404, f"no route GET {self.path}")

    def do_POST(self):
        body = self.read_json()  # a bad body raises BadRequest, which JSONHandler answers (4xx)
        if self.path.rstrip("/") != "/v1/completions":
            return self.error(404, f"no route POST {self.path} (this server has /v1/completions only)")
        try:
            out = complete(self.server, body)
        except BadRequest as e:
            return self.error(e.code, str(e))
        except ValueError as e:  # a value the sampler refuses
            return self.error(400, f"bad request: {e}")
        except Exception as e:  # report, and keep serving
            return self.error(500, f"{type(e).__name__}: {e}")
        self.reply(200, out)


def make_server(model, enc, bos, host="127.0.0.1", port=8000, name="nanosynth", device="cpu", quiet=False,
                timeout=JSONHandler.timeout):
    """A ThreadingHTTPServer (not yet serving: call serve_forever) for one model. timeout: seconds a
    client may stall mid-request or idle between requests before its connection is dropped."""
    srv = ThreadingHTTPServer((host, port), Handler)
    srv.daemon_threads = True
    srv.model, srv.enc, srv.bos, srv.name, srv.device, srv.quiet = model, enc, bos, name, device, quiet
    srv.client_timeout = timeout
    srv.lock = threading.Lock()
    return srv


def main(argv=None):
    p = cli.ArgumentParser(__doc__, __file__)
    p.add_argument("--ckpt", required=True, help="checkpoint written by train.py")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 = every interface)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on; 0 = any free port")
    p.add_argument("--model_name", default="nanosynth", help="the name clients pass as model")
    p.add_argument("--device", default="auto", help="torch device to sample on: auto (cuda if available, else cpu), "
                                                   "cpu, cuda, cuda:N, mps, ...")
    p.add_argument("--timeout", type=float, default=JSONHandler.timeout,
                   help="seconds a client may stall mid-request or idle between requests before it is dropped")
    p.add_argument("--quiet", action="store_true", help="do not log every request")
    args = p.parse_args(argv)
    if not args.timeout > 0:
        p.error(f"--timeout must be > 0, got {args.timeout:g}")
    try:   # the device first: a checkpoint loaded onto a device this machine lacks would blame the checkpoint
        device = cli.pick_device(args.device)
        model, enc, bos = load_checkpoint(args.ckpt, device)
    except (OSError, ValueError) as e:  # a bad --device; a missing, unreadable or foreign checkpoint
        cli.fail(e)
    try:
        srv = make_server(model, enc, bos, args.host, args.port, args.model_name, device, args.quiet,
                          args.timeout)
    except (OSError, OverflowError) as e:  # port in use or not allowed, unknown host; port > 65535
        cli.fail(f"cannot listen on {args.host}:{args.port}: {getattr(e, 'strerror', None) or e}")
    print(f"serving {args.ckpt} as model {args.model_name!r} on http://{args.host}:{srv.server_address[1]}/v1 "
          f"(context {model.config.block_size} tokens, {device})", flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    srv.server_close()


if __name__ == "__main__":
    main()
