"""
Benchmark pack.py: throughput against raw tiktoken, and peak memory as the input grows.

    python bench/bench_pack.py                 # ~50 MB and ~200 MB inputs, all cores
    python bench/bench_pack.py --sizes 10 40 --threads 2

Builds inputs by repeating sample_data/train.jsonl with fresh ids (in a temporary folder), then
  1. throughput: pack.py (real mode, one process) against encode_ordinary_batch on the same texts
     (already in memory) with the same thread count, alternating, best of --trials; goal >= 0.8x;
  2. peak memory: pack.py in a fresh subprocess per input size (ru_maxrss); goal: under 1.3x
     growth for 4x input.
Prints a table; writes nothing outside the temporary folder.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import cli  # noqa: E402
import pack  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402


def make_input(path, megabytes):
    rows = [json.loads(l) for l in open(os.path.join(ROOT, "sample_data", "train.jsonl"))]
    written, copy = 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < megabytes * 1e6:
            for r in rows:
                line = json.dumps({"id": f"{r['id']}#{copy}", "text": r["text"]}, ensure_ascii=False) + "\n"
                f.write(line)
                written += len(line.encode())
            copy += 1
    return written


def peak_rss_mb(real, out, threads):
    code = (f"import sys; sys.path.insert(0, {ROOT!r}); import pack, resource; "
            f"pack.pack({real!r}, {out!r}, threads={threads}, log=lambda *a: None); "
            f"print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    out_text = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return int(out_text.split()[-1]) / 1024


def main():
    ap = cli.ArgumentParser(__doc__, __file__)
    ap.add_argument("--sizes", type=float, nargs=2, default=[50, 200], help="input sizes in MB")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--trials", type=int, default=3, help="alternating timed runs of each; the best counts")
    args = ap.parse_args()
    enc, _ = load_tokenizer("gpt2")
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for mb in args.sizes:
            paths[mb] = os.path.join(tmp, f"in{mb:g}.jsonl")
            make_input(paths[mb], mb)

        # 1. throughput on the smaller input: raw tiktoken on texts already in memory, then pack.py
        small = paths[args.sizes[0]]
        texts = [json.loads(l)["text"] for l in open(small, encoding="utf-8")]
        n_bytes = sum(len(t.encode()) for t in texts)
        enc.encode_ordinary_batch(texts[:1000], num_threads=args.threads)   # warm up both the same way
        pack.pack(small, os.path.join(tmp, "warm"), threads=args.threads, log=lambda *a: None)
        raw_times, pack_times = [], []
        for _ in range(args.trials):   # alternate, and keep each one's best: this machine is noisy
            batch, chars, n_tokens = [], 0, 0
            t0 = time.perf_counter()
            for t in texts:   # the same 4M-character batches as pack.py's SegmentStore
                batch.append(t)
                chars += len(t)
                if chars >= 1 << 22:
                    n_tokens += sum(map(len, enc.encode_ordinary_batch(batch, num_threads=args.threads)))
                    batch, chars = [], 0
            n_tokens += sum(map(len, enc.encode_ordinary_batch(batch, num_threads=args.threads)))
            raw_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            summary = pack.pack(small, os.path.join(tmp, "out"), threads=args.threads, log=lambda *a: None)
            pack_times.append(time.perf_counter() - t0)
        raw, packed = min(raw_times), min(pack_times)
        assert summary["tokens"] == n_tokens + summary["documents"]   # + one BOS per document
        print(f"throughput on {n_bytes / 1e6:.0f} MB ({summary['documents']:,} documents, {n_tokens:,} tokens), "
              f"{args.threads} threads")
        print(f"  raw encode_ordinary_batch  {raw:7.2f} s  {n_bytes / raw / 1e6:6.2f} MB/s   (runs: "
              f"{', '.join(f'{t:.2f}' for t in raw_times)})")
        print(f"  pack.py (real mode)        {packed:7.2f} s  {n_bytes / packed / 1e6:6.2f} MB/s   (runs: "
              f"{', '.join(f'{t:.2f}' for t in pack_times)})")
        print(f"  ratio pack / raw: {raw / packed:.2f}x   (goal >= 0.8x)")

        # 2. peak memory, a fresh process per size
        peaks = {mb: peak_rss_mb(paths[mb], os.path.join(tmp, f"mem{mb:g}"), args.threads) for mb in args.sizes}
        print("peak memory of pack.py (ru_maxrss)")
        for mb, peak in peaks.items():
            print(f"  {os.path.getsize(paths[mb]) / 1e6:6.0f} MB input: {peak:7.1f} MB")
        a, b = args.sizes
        print(f"  growth for {b / a:g}x input: {peaks[b] / peaks[a]:.2f}x   (goal < 1.3x)")


if __name__ == "__main__":
    main()
