r"""
sample.py: print samples from a checkpoint, as nanoGPT's sample.py does, on any device.

    python sample.py --ckpt out/runs/real/ckpt.pt --prompt "HACKER" --num_samples 3 --max_new_tokens 100
    python sample.py --ckpt out/runs/real/ckpt.pt --prompt "" --temperature 0.8 --top_k 50   # unconditional

The model reads BOS + the prompt, as every training document starts, and each sample runs until the
model ends its document (it emits BOS) or for --max_new_tokens tokens; only the tokenizer's ids are
sampled, never the padding rows of the embedding. Each sample is printed as the prompt followed by
its continuation, then a line of dashes. --seed makes the samples the same on every run on one
device (0 by default); --temperature 0 is greedy. The sampler is serve.py's, so a sample here is what
the server would answer. Device: --device (cli.pick_device: auto is cuda if there is one, else
cpu; mps, cuda:N, ... by name).

Reads the checkpoint written by train.py (weights_only=True) and its tokenizer; writes nothing.
Exit codes (cli.py): 0 printed; 2 a one-line "error: ..." naming the flag or the checkpoint.
"""
import cli
from serve import load_checkpoint, sample


def main(argv=None):
    ap = cli.ArgumentParser(__doc__, __file__)
    ap.add_argument("--ckpt", required=True, help="checkpoint written by train.py")
    ap.add_argument("--prompt", default="", help="text the samples continue ('' = unconditional, BOS only)")
    ap.add_argument("--num_samples", type=int, default=1, help="samples to print (one batch)")
    ap.add_argument("--max_new_tokens", type=int, default=256, help="tokens per sample at most")
    ap.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    ap.add_argument("--top_k", type=int, default=None, help="sample only among the k most likely tokens")
    ap.add_argument("--seed", type=int, default=0, help="seed of the sampler")
    ap.add_argument("--device", default="auto",
                    help="auto (cuda if there is one, else cpu), cpu, cuda, cuda:N, mps, ...")
    args = ap.parse_args(argv)
    for name in ("num_samples", "max_new_tokens", "top_k"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("temperature", "seed"):
        if not getattr(args, name) >= 0:   # (not >= rather than <: NaN is refused too)
            ap.error(f"--{name} must be >= 0, got {getattr(args, name)}")
    try:   # the device first: a checkpoint loaded onto a device this machine lacks would blame the checkpoint
        device = cli.pick_device(args.device)
        model, enc, bos = load_checkpoint(args.ckpt, device)
    except (OSError, ValueError) as e:
        cli.fail(e)
    prompt = [bos] + enc.encode_ordinary(args.prompt)
    if len(prompt) + args.max_new_tokens > model.config.block_size:
        cli.fail(f"--prompt ({len(prompt)} tokens with BOS) + --max_new_tokens {args.max_new_tokens} exceed "
                 f"the model's context of {model.config.block_size} tokens")
    outs = sample(model, prompt, args.num_samples, args.max_new_tokens, args.temperature, args.top_k, args.seed, bos,
                  device, enc.n_vocab)
    for tokens, _ in outs:
        print(args.prompt + enc.decode([t for t in tokens if t != bos]))
        print("---------------")


if __name__ == "__main__":
    main()
