r"""
export_hf.py: write a nanosynth checkpoint as a Hugging Face LlamaForCausalLM folder, which
transformers loads as is (AutoModelForCausalLM.from_pretrained(OUT_DIR)) and vLLM serves, so that
self-distillation data can be sampled at scale and any Hugging Face evaluation can run on it.
Optional: needs transformers and safetensors (pip install transformers safetensors).

    python export_hf.py out/runs/real/ckpt.pt out/hf/real
    vllm serve out/hf/real        # then: python generate.py --kind self-distill --api completions ...

Why it is a Llama: the nanosynth GPT is one (pre-norm RMSNorm blocks, grouped-query attention with
rotate-half RoPE, SwiGLU, untied embeddings, no biases), so the export renames the weights and
copies them unchanged: nothing is permuted or refitted. RMSNorm eps and RoPE theta come from the
checkpoint's GPTConfig.

The vocabulary: train.py pads the embedding to a multiple of 64 rows, so config.json's vocab_size
is the padded count (the checkpoint's rows) and the tokenizer has fewer ids; the rows above it were
never a target and are no tokens ("tokenizer_vocab_size" in config.json says where they start).

Writes OUT_DIR/config.json, generation_config.json, model.safetensors (float32 unless --dtype,
sharded when large), and the tokenizer (tokenizer.json, tokenizer_config.json: the checkpoint's
tiktoken vocabulary converted to a byte-level BPE with the same ids, BOS added at the start of
every text as training documents start) where the tokenizer's ranks file can be read here; else
a note says it was left out. BOS is also the end-of-text token, so generation stops at it.
OUT_DIR must not exist or be empty; the files are written into OUT_DIR.tmp and it becomes OUT_DIR
only when complete. Reads the checkpoint (weights_only=True) and, for the tokenizer, its ranks file.

Exit codes (cli.py): 0 written; 2 a one-line "error: ..." (a missing package, a checkpoint that
cannot be read, an OUT_DIR in use), and nothing written.
"""
import base64
import json
import os
import shutil
import tempfile

import torch

import cli
from model import load_model
from tokenizer import load_tokenizer

# nanosynth parameter name -> LlamaForCausalLM parameter name ({i}: the layer)
LLAMA_NAMES = {
    "wte.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
    "blocks.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blocks.{i}.attn.wq.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blocks.{i}.attn.wk.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blocks.{i}.attn.wv.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blocks.{i}.attn.wo.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blocks.{i}.mlp_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blocks.{i}.mlp.gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blocks.{i}.mlp.up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blocks.{i}.mlp.down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def llama_state_dict(model):
    """The model's weights under LlamaForCausalLM's names (the same tensors)."""
    names = {}
    for ours, theirs in LLAMA_NAMES.items():
        for i in range(model.config.n_layer) if "{i}" in ours else [None]:
            names[ours.format(i=i)] = theirs.format(i=i)
    state = model.state_dict()
    assert set(state) == set(names), f"parameters without a Llama name: {sorted(set(state) ^ set(names))}"
    return {names[k]: v for k, v in state.items()}


def llama_config(model, bos_id, n_vocab, dtype):
    """transformers.LlamaConfig of the same shape; the padded vocabulary as vocab_size."""
    from transformers import LlamaConfig
    c = model.config
    return LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.mlp_hidden,
                       num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head,
                       head_dim=c.head_dim, hidden_act="silu", max_position_embeddings=c.block_size,
                       rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, tie_word_embeddings=False,
                       attention_bias=False, mlp_bias=False, bos_token_id=bos_id, eos_token_id=bos_id,
                       dtype=dtype, architectures=["LlamaForCausalLM"], tokenizer_vocab_size=n_vocab)


def hf_tokenizer(enc, bos_id):
    """A transformers PreTrainedTokenizerFast with the ids of the tiktoken encoding `enc`: its ranks
    become a byte-level BPE (transformers' TikTokenConverter), its special tokens keep their ids,
    and every encoded text starts with BOS."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter
    with tempfile.TemporaryDirectory() as tmp:   # the converter reads a ranks file
        ranks = os.path.join(tmp, "ranks.tiktoken")
        with open(ranks, "w") as f:
            for token, rank in sorted(enc._mergeable_ranks.items(), key=lambda kv: kv[1]):
                f.write(f"{base64.b64encode(token).decode()} {rank}\n")
        specials = dict(sorted(enc._special_tokens.items(), key=lambda kv: kv[1]))
        tok = TikTokenConverter(vocab_file=ranks, pattern=enc._pat_str, extra_special_tokens=specials).converted()
    for name, i in specials.items():
        if tok.token_to_id(name) != i:
            raise ValueError(f"the converted tokenizer gives {name} id {tok.token_to_id(name)}, not {i}")
    bos = enc.decode([bos_id])
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=bos)


def export(ckpt_path, out_dir, dtype="float32", log=print):
    """Write the checkpoint as a LlamaForCausalLM folder; returns the folder. It is written as
    OUT_DIR.tmp and renamed when complete: an error or a crash leaves no half export at out_dir."""
    from transformers import LlamaForCausalLM
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise ValueError(f"{out_dir}: exists and is not an empty folder; export into a new one")
    model, ckpt = load_model(ckpt_path)
    spec = ckpt.get("tokenizer", "gpt2")
    try:
        enc, bos_id = load_tokenizer(spec)
    except (OSError, ValueError) as e:
        enc, bos_id = None, None
        note = f"note: tokenizer {spec!r} cannot be read here ({e}): the export has no tokenizer files"
    config = llama_config(model, bos_id, enc.n_vocab if enc else None, DTYPES[dtype])
    with torch.device("meta"):
        hf = LlamaForCausalLM(config)
    hf.load_state_dict({k: v.to(DTYPES[dtype]) for k, v in llama_state_dict(model).items()}, assign=True)
    hf.generation_config.bos_token_id = hf.generation_config.eos_token_id = bos_id
    tmp = os.path.normpath(out_dir) + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)   # left by an export that crashed
    try:
        hf.save_pretrained(tmp, safe_serialization=True)
        # RoPE theta also at the top level, where transformers 4 (and what reads its configs) looks for it
        path = os.path.join(tmp, "config.json")
        with open(path) as f:
            saved = json.load(f)
        saved.setdefault("rope_theta", model.config.rope_theta)
        with open(path, "w") as f:
            json.dump(saved, f, indent=2)
        if enc is not None:
            hf_tokenizer(enc, bos_id).save_pretrained(tmp)
        os.replace(tmp, out_dir)   # (onto an empty folder too)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if enc is None:
        log(note)
    log(f"wrote {out_dir}: LlamaForCausalLM, {model.num_params():,} parameters ({dtype}), {model.config.n_layer} "
        f"layers, context {model.config.block_size}, vocab_size {model.config.vocab_size} (padded; tokenizer "
        f"{spec!r}: {enc.n_vocab if enc else '?'} ids, BOS {bos_id})")
    return out_dir


def main(argv=None):
    ap = cli.ArgumentParser(__doc__, __file__)
    ap.add_argument("ckpt", help="checkpoint written by train.py")
    ap.add_argument("out_dir", help="the folder to write (new, or empty)")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weights' dtype in the export")
    args = ap.parse_args(argv)
    try:
        import safetensors  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        cli.fail(f"export_hf.py needs transformers and safetensors (pip install transformers safetensors): {e}")
    try:
        export(args.ckpt, args.out_dir, args.dtype)
    except (ValueError, FileNotFoundError) as e:
        cli.fail(e)
    except OSError as e:   # an OUT_DIR that cannot be written (a read-only folder, a full disk)
        cli.fail(f"{e.filename}: {e.strerror}" if e.filename and e.strerror else e)


if __name__ == "__main__":
    main()
