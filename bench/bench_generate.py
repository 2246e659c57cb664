"""
bench_generate.py: how close generate.py comes to the ideal request rate of its concurrency.

A local OpenAI-compatible server (a separate process, so that it does not compete with the client
for the GIL) answers every request after a fixed 100 ms. With --concurrency 32 the ideal is
32 / 0.1 s = 320 requests/s; we print the achieved rate and its share of the ideal (goal >= 0.9).

Run
  python bench/bench_generate.py                 # 1600 requests, concurrency 32
  python bench/bench_generate.py --requests 3200 --concurrency 64

Reads nothing; writes its input and output JSONL to a temporary directory that is then removed.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from http.server import ThreadingHTTPServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import cli  # noqa: E402
from serve import JSONHandler  # noqa: E402


class SlowHandler(JSONHandler):
    def do_POST(self):
        req = self.read_json()
        time.sleep(self.server.latency)
        n = req.get("n", 1)
        self.reply(200, {"choices": [{"index": i, "message": {"role": "assistant", "content": "A short article."},
                                      "finish_reason": "stop"} for i in range(n)],
                         "usage": {"prompt_tokens": 50, "completion_tokens": 4 * n}})


def serve(latency):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), SlowHandler)
    srv.daemon_threads = True
    srv.request_queue_size = 128  # the default 5 drops connections under a burst of 32+
    srv.latency = latency
    print(srv.server_address[1], flush=True)
    srv.serve_forever()


def main():
    p = cli.ArgumentParser(__doc__.split("\n\n")[1], __file__)
    p.add_argument("--requests", type=int, default=1600)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--latency", type=float, default=0.1, help="seconds the server takes per request")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the server process
    args = p.parse_args()
    if args.serve:
        return serve(args.latency)

    import generate
    server = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", "--latency", str(args.latency)],
                              stdout=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{int(server.stdout.readline())}/v1"
        with tempfile.TemporaryDirectory() as tmp:
            inp = os.path.join(tmp, "docs.jsonl")
            with open(inp, "w") as f:
                for i in range(args.requests):
                    f.write(json.dumps({"id": f"doc{i}", "text": f"Document {i}. It is short but it is real text."}) + "\n")
            stats = generate.main(["--input", inp, "--out_jsonl", os.path.join(tmp, "out.jsonl"), "--endpoint", url,
                                   "--model", "bench", "--G", "1", "--concurrency", str(args.concurrency),
                                   "--progress_every", "2"])
    finally:
        server.terminate()
        server.wait()
    assert stats["done"] == args.requests, stats
    ideal = args.concurrency / args.latency
    achieved = stats["requests"] / stats["elapsed"]
    print(f"requests: {stats['requests']}, concurrency {args.concurrency}, server latency {args.latency * 1000:.0f} ms")
    print(f"achieved: {achieved:.1f} requests/s; ideal: {ideal:.1f} requests/s; ratio: {achieved / ideal:.3f} "
          f"(goal >= 0.9)")


if __name__ == "__main__":
    main()
