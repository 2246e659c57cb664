"""
tokenizer.py: tiktoken encodings built from local ranks files only, so nothing is downloaded.

    from tokenizer import load_tokenizer
    enc, bos_id = load_tokenizer("gpt2")          # GPT-2, ids identical to tiktoken's gpt2 / r50k_base
    enc, bos_id = load_tokenizer("gpt2:8192")     # GPT-2's first 8,192 ranks: small, real, for CPU runs
    enc, bos_id = load_tokenizer("llama3/tokenizer.model")   # any tiktoken ranks file (Llama 3's is one)

Reads assets/gpt2.tiktoken (the GPT-2 ranks file, MIT license, from the openai-whisper sdist; see
assets/LICENSE-gpt2-tiktoken.txt) or the ranks file given. Writes nothing.
"""
import base64
import os

import tiktoken

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")

# The GPT-2 (r50k_base) pre-tokenization regex and the Llama-3 one. With the same ranks these give
# ids identical to tiktoken's own encodings.
PATTERNS = {
    "gpt2": r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s""",
    "llama3": r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
}


def llama3_special_tokens(n_ranks):
    """The 256 special tokens that follow Llama 3's 128,000 ranks."""
    named = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 4: "<|finetune_right_pad_id|>",
             6: "<|start_header_id|>", 7: "<|end_header_id|>", 8: "<|eom_id|>", 9: "<|eot_id|>",
             10: "<|python_tag|>"}
    specials, reserved = {}, 0
    for i in range(256):
        if i in named:
            name = named[i]
        else:
            name = f"<|reserved_special_token_{reserved}|>"
            reserved += 1
        specials[name] = n_ranks + i
    return specials


def read_ranks(path):
    """Read a tiktoken ranks file: one 'base64-token rank' pair per line."""
    ranks = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: not a tiktoken ranks line ({e})") from None
    return ranks


def load_tokenizer(spec="gpt2", pattern=None, bos_token=None):
    """Return (tiktoken.Encoding, bos_id), built from local files only (no download).

    spec: "gpt2" (the GPT-2 vocabulary shipped in assets/); "gpt2:N", GPT-2's first N ranks (a small
    real vocabulary for CPU runs and tests: <|endoftext|> becomes id N); or a path to any tiktoken
    ranks file (Llama 3's tokenizer.model is one). pattern: a key of PATTERNS or a regex; by default "gpt2",
    or "llama3" for a 128,000-rank file. The special tokens: Llama 3's set for a 128,000-rank file,
    otherwise a single <|endoftext|> after the last rank. bos_token: the special token that starts
    every document; by default <|endoftext|>, or <|begin_of_text|> for Llama 3.
    """
    gpt2, _, keep = spec.partition(":")
    path = os.path.join(ASSETS, "gpt2.tiktoken") if gpt2 == "gpt2" else spec
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer ranks file not found: {path}")
    ranks = read_ranks(path)
    if gpt2 == "gpt2" and keep:
        # GPT-2's first N ranks: a smaller but real BPE vocabulary (ids < N are GPT-2's own ids)
        if not keep.isdigit() or not 256 <= int(keep) <= len(ranks):
            raise ValueError(f"tokenizer {spec!r}: expected gpt2:N with 256 <= N <= {len(ranks)}")
        ranks = {token: rank for token, rank in ranks.items() if rank < int(keep)}
    n = max(ranks.values()) + 1
    is_llama3 = n == 128000
    if is_llama3:
        specials = llama3_special_tokens(n)
    else:
        specials = {"<|endoftext|>": n}
    pattern = pattern or ("llama3" if is_llama3 else "gpt2")
    pat_str = PATTERNS.get(pattern, pattern)
    name = spec if gpt2 == "gpt2" else os.path.basename(spec)
    enc = tiktoken.Encoding(name, pat_str=pat_str, mergeable_ranks=ranks, special_tokens=specials)
    bos_token = bos_token or ("<|begin_of_text|>" if is_llama3 else "<|endoftext|>")
    if bos_token not in specials:
        raise ValueError(f"BOS token {bos_token!r} is not a special token of {name}")
    return enc, specials[bos_token]
