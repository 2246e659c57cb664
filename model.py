"""
model.py: the nanosynth GPT, a small Llama-style decoder written out in one file.

What it is
    Token embedding -> n_layer pre-norm blocks (RMSNorm, grouped-query attention with RoPE,
    RMSNorm, SwiGLU MLP) -> final RMSNorm -> untied linear head. No biases anywhere.
    PRESETS holds the paper's four shapes (150M, 300M, 600M, 1.5B with the 128,256-token
    Llama-3 vocabulary) and two small CPU shapes.

Attention masks (one predicate, three kinds, see make_mask_mod)
    causal    q sees k iff k <= q                          (attention crosses documents: "CDA")
    document  ... and doc[q] == doc[k]                     (block at every document boundary)
    megadoc   ... and group[q] == group[k]                 (block between source groups only)
    doc_ids come from document_ids(idx, bos_id) = cumsum(idx == BOS); group_ids are per-token
    source-group ids that the caller rebuilds from pack.py's side index. The mask is built once per
    forward pass and shared by every layer.

Two attention paths, one meaning (attn_impl: "flex" or "sdpa"; "auto" picks flex on CUDA, SDPA
elsewhere)
    causal     SDPA's fused causal kernel on either path (on the CPU, past 128 tokens, computed by
               blocks of keys: causal_attention).
    flex:      the document and megadoc masks as a BlockMask for flex_attention, compiled (see _flex).
    sdpa:      on the CPU, one causal attention per segment (segment_attention), because in torch
               2.13 flex_attention has no backward on CPU; elsewhere, or when a megadoc is split
               by another source, SDPA with a dense boolean (B, 1, T, T) mask.

Usage
    from model import GPT, GPTConfig, document_ids, load_model
    cfg = GPTConfig.from_preset("cpu-4x256", vocab_size=50304)
    model = GPT(cfg)
    _, loss = model(idx, targets, doc_ids=document_ids(idx, bos_id=50256), mask_kind="document")
    logits, _ = model(idx)                     # logits without targets (or with return_logits=True)
    out = model.generate(bos_prompt, max_new_tokens=256, temperature=1.0, top_k=None)

    model, ckpt = load_model("out/runs/real/ckpt.pt")   # a checkpoint written by train.py

Reads checkpoints (load_model); writing them is train.py's job.
"""

import math
import os
import pickle
from contextlib import nullcontext
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

MASK_KINDS = ("causal", "document", "megadoc")
ATTN_IMPLS = ("auto", "flex", "sdpa")

# -----------------------------------------------------------------------------
# config and presets


@dataclass
class GPTConfig:
    vocab_size: int
    n_layer: int
    n_head: int
    n_kv_head: int  # key/value heads for grouped-query attention; must divide n_head
    n_embd: int
    mlp_hidden: int  # SwiGLU hidden size (the paper uses 3.5 x n_embd)
    block_size: int  # maximum context length
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self):
        for name in ("vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "mlp_hidden", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(f"n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head})")
        if (self.n_embd // self.n_head) % 2 != 0:
            raise ValueError(f"head dimension n_embd/n_head = {self.n_embd // self.n_head} must be even for RoPE")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps!r}")

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @classmethod
    def from_preset(cls, name, **overrides):
        """GPTConfig from PRESETS[name]; usually you override vocab_size and/or block_size."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        known = {f.name for f in fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(f"unknown GPTConfig field(s) {sorted(unknown)}")
        return cls(**{**PRESETS[name], **overrides})


LLAMA3_VOCAB = 128256
GPT2_VOCAB_PADDED = 50304  # GPT-2's 50,257 tokens padded up to a multiple of 64

# The paper's shapes: head dim = width / heads, SwiGLU hidden = 3.5 x width.
# Parameter counts with the 128,256 vocabulary: 154,147,328 / 299,649,792 / 602,457,088 / 1,540,732,416.
PRESETS = {
    "150M": dict(vocab_size=LLAMA3_VOCAB, n_layer=6, n_head=8, n_kv_head=8, n_embd=512, mlp_hidden=1792, block_size=4096),
    "300M": dict(vocab_size=LLAMA3_VOCAB, n_layer=12, n_head=12, n_kv_head=12, n_embd=768, mlp_hidden=2688, block_size=4096),
    "600M": dict(vocab_size=LLAMA3_VOCAB, n_layer=24, n_head=16, n_kv_head=8, n_embd=1024, mlp_hidden=3584, block_size=4096),
    "1.5B": dict(vocab_size=LLAMA3_VOCAB, n_layer=36, n_head=16, n_kv_head=8, n_embd=1536, mlp_hidden=5376, block_size=4096),
    # small shapes for CPU runs, named layers x width (SwiGLU hidden ~ 8/3 x width, a multiple of 16).
    # cpu-2x64 is the CPU demo's model as is (configs/cpu_demo.json): GPT-2's first 1,024 ranks + BOS,
    # padded to 1,088. Its context of 1,024 is a little shorter than a megadoc of that vocabulary
    # (1,290 tokens at the median, docs/demo_design.md): most of one fits in a window.
    "cpu-2x64": dict(vocab_size=1088, n_layer=2, n_head=2, n_kv_head=2, n_embd=64, mlp_hidden=176, block_size=1024),
    "cpu-4x256": dict(vocab_size=GPT2_VOCAB_PADDED, n_layer=4, n_head=4, n_kv_head=4, n_embd=256, mlp_hidden=688, block_size=512),
}

# -----------------------------------------------------------------------------
# masks: ONE predicate (make_mask_mod); the dense mask and the BlockMask both come from it


def document_ids(idx, bos_id):
    """(B, T) document ids inside each window: cumsum(idx == bos_id). Tokens before the first BOS
    (the tail of a document cut by the previous window) get id 0."""
    return torch.cumsum(idx == bos_id, dim=1)


def make_mask_mod(kind, doc_ids=None, group_ids=None):
    """Flex-style mask_mod(b, h, q_idx, kv_idx) -> bool (True = may attend) for one mask kind.
    doc_ids / group_ids are (B, T) integer tensors; only the one the kind needs is required."""
    if kind == "causal":
        def mask_mod(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx
    elif kind == "document":
        if doc_ids is None:
            raise ValueError("mask_kind='document' needs doc_ids (B, T); see document_ids()")
        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])
    elif kind == "megadoc":
        if group_ids is None:
            raise ValueError("mask_kind='megadoc' needs group_ids (B, T), the per-token source-group ids")
        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (group_ids[b, q_idx] == group_ids[b, kv_idx])
    else:
        raise ValueError(f"unknown mask kind {kind!r}; choose from {MASK_KINDS}")
    return mask_mod


def dense_mask(mask_mod, B, T, device=None):
    """The (B, 1, T, T) boolean mask of a mask_mod, by calling it once on broadcastable index
    tensors. Same values as flex's create_mask(mask_mod, B, 1, T, T) (a test checks this), without
    create_mask's vmap over every (b, q, kv) triple."""
    b = torch.arange(B, device=device).view(B, 1, 1, 1)
    h = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)
    q = torch.arange(T, device=device).view(1, 1, T, 1)
    kv = torch.arange(T, device=device).view(1, 1, 1, T)
    return mask_mod(b, h, q, kv).expand(B, 1, T, T)


# On CUDA outside a compiled model, flex_attention and create_block_mask run through these
# module-level compiled versions (uncompiled, flex_attention materializes the T x T scores). Inside a
# model compiled with torch.compile they are called plainly: the outer compile captures and fuses
# them, with no graph break and no second compile (a compiled function called from compiled code,
# or create_block_mask(_compile=True), which torch 2.13 deprecates with a warning, would break the
# graph). A new BlockMask and mask closure on every batch do not recompile; a new shape does.
_compiled_flex_attention = torch.compile(flex_attention, dynamic=False)
_compiled_create_block_mask = torch.compile(create_block_mask)


def _flex(q, k, v, block_mask, enable_gqa):
    if q.device.type == "cuda" and not torch.compiler.is_compiling():
        return _compiled_flex_attention(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)
    return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


def _block_mask(mask_mod, B, T, device):
    make = create_block_mask if device.type != "cuda" or torch.compiler.is_compiling() else _compiled_create_block_mask
    return make(mask_mod, B, None, T, T, device=device)


def segment_spans(ids):
    """For the SDPA path on the CPU: the (start, end) of each run of equal ids in every row of a
    (B, T) id tensor, as B lists, so that the document and megadoc masks become one causal
    attention per run (segment_attention). None if some row has an id that comes back after
    another id (a megadoc split by a document of another source, as in a shuffled stream): a run
    would not be the whole segment, and the caller uses the dense mask instead."""
    B, T = ids.shape
    rows = [[0] for _ in range(B)]
    for b, t in (torch.nonzero(ids[:, 1:] != ids[:, :-1]) + torch.tensor([0, 1])).tolist():
        rows[b].append(t)
    spans = [list(zip(starts, starts[1:] + [T])) for starts in rows]
    if any(len(row) != len(torch.unique(ids[b])) for b, row in enumerate(spans)):
        return None
    return spans


# The CPU kernel of F.scaled_dot_product_attention in torch 2.13 skips the masked upper triangle of
# causal attention only in blocks of 512 keys: at the demo's context of 1,024 it computes 3/4 of the
# T x T scores where causal attention needs 1/2, and a dense boolean mask costs another 1.4x. The
# CPU path therefore splits the work itself: causal attention by blocks of ATTN_BLOCK keys, the
# document and megadoc masks by segment (a segment attends only to itself). Measured with
# bench/bench_model.py at the demo's shape (head dim 32, context 1,024): 128 is the fastest block.
ATTN_BLOCK = 128


class _BlockedCausalAttention(torch.autograd.Function):
    """Causal attention as a sum over blocks of keys (CPU). Block j (keys j .. j + c - 1) is seen
    only by queries j .. T - 1, and for them its mask is SDPA's top-left causal mask of a
    (T - j) x c problem: one flash-attention call per block, whose partial outputs are merged by
    their log-sum-exps. The backward runs the kernel's backward once per block with the merged
    output and log-sum-exp, which makes each block's gradient exact (its attention weights are
    exp(score - merged lse), the global softmax). Same values as one SDPA call to ~1e-6."""

    @staticmethod
    def forward(ctx, q, k, v):
        T, c = q.size(2), ATTN_BLOCK
        parts = [torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q[:, :, j:], k[:, :, j:j + c],
                                                                           v[:, :, j:j + c], 0.0, True)
                 for j in range(0, T, c)]
        lse = torch.full(q.shape[:3], float("-inf"), dtype=torch.float32)
        for j, (_, part_lse) in zip(range(0, T, c), parts):
            lse[:, :, j:] = torch.logaddexp(lse[:, :, j:], part_lse)
        out = torch.zeros(q.shape, dtype=torch.float32)
        for j, (part, part_lse) in zip(range(0, T, c), parts):
            out[:, :, j:] += part * torch.exp(part_lse - lse[:, :, j:]).unsqueeze(-1)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        T, c, grad = q.size(2), ATTN_BLOCK, grad.contiguous()
        dq, dk, dv = torch.zeros_like(q), torch.empty_like(k), torch.empty_like(v)
        for j in range(0, T, c):
            dq_part, dk[:, :, j:j + c], dv[:, :, j:j + c] = \
                torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                    grad[:, :, j:], q[:, :, j:], k[:, :, j:j + c], v[:, :, j:j + c], out[:, :, j:], lse[:, :, j:],
                    0.0, True)
            dq[:, :, j:] += dq_part
        return dq, dk, dv


def causal_attention(q, k, v, enable_gqa=False):
    """Causal attention of (B, H, T, D) queries and (B, H_kv, T, D) keys and values: SDPA's fused
    causal kernel, or on the CPU, past one block, _BlockedCausalAttention."""
    if q.device.type == "cpu" and q.size(2) > ATTN_BLOCK:
        if enable_gqa:   # the blocked kernel wants every head's keys
            k, v = (t.repeat_interleave(q.size(1) // k.size(1), dim=1) for t in (k, v))
        return _BlockedCausalAttention.apply(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=enable_gqa)


def segment_attention(q, k, v, spans, enable_gqa=False):
    """The document or megadoc mask on the CPU: every segment of every row (spans from
    segment_spans) is one causal attention of its own, so no score outside a segment is computed."""
    return torch.cat([torch.cat([causal_attention(q[b:b + 1, :, s:e], k[b:b + 1, :, s:e], v[b:b + 1, :, s:e],
                                                  enable_gqa) for s, e in row], dim=2)
                      for b, row in enumerate(spans)], dim=0)

# -----------------------------------------------------------------------------
# the loss: the output head and cross-entropy, a slice of rows at a time when the logits are large

# Logits are computed (in float32) at most this many elements at a time: a quarter of 2^31, far
# from the 2^31-element kernels of CUDA's cross-entropy, and 1 GiB per piece. The CPU demo's 4,096 x
# 1,088 logits are one piece; batch 8 x 4,096 with the 128,256-token vocabulary is 8 pieces.
CE_PIECE_ELEMENTS = 1 << 29


def _rows_cross_entropy(rows, weight, targets, reduction="none"):
    # float32 logits: the softmax over 128k classes is where low precision hurts the loss
    return F.cross_entropy(F.linear(rows, weight).float(), targets, ignore_index=-1, reduction=reduction)


def head_cross_entropy(rows, weight, targets, reduction="mean"):
    """Cross-entropy of the output head on (N, C) final hidden states, without holding the (N, V)
    logits whole when they exceed CE_PIECE_ELEMENTS: each slice of rows computes its logits and its
    per-token losses, and under autograd the slice is checkpointed (its logits are recomputed in
    the backward instead of kept), so the peak is one slice's logits. One slice (the usual case on
    small models) is exactly F.cross_entropy of the whole logits. Targets of -1 are ignored."""
    rows_per_piece = max(1, CE_PIECE_ELEMENTS // weight.size(0))
    if rows.size(0) <= rows_per_piece:
        return _rows_cross_entropy(rows, weight, targets, reduction)
    pieces = []
    for i in range(0, rows.size(0), rows_per_piece):
        args = (rows[i:i + rows_per_piece], weight, targets[i:i + rows_per_piece])
        pieces.append(torch.utils.checkpoint.checkpoint(_rows_cross_entropy, *args, use_reentrant=False)
                      if torch.is_grad_enabled() else _rows_cross_entropy(*args))
    losses = torch.cat(pieces)
    if reduction == "none":
        return losses
    return losses.sum() if reduction == "sum" else losses.sum() / (targets != -1).sum()

# -----------------------------------------------------------------------------
# the model


def rope_tables(head_dim, start, T, theta, device):
    """cos, sin of shape (T, head_dim/2) for positions start..start+T-1, in float32. Cheap enough
    to recompute once per forward, which avoids buffers that break on meta / to_empty()."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    pos = torch.arange(start, start + T, device=device, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq)
    return freqs.cos(), freqs.sin()


def apply_rope(x, cos, sin):
    # x: (B, H, T, D). Rotate the pair (x[i], x[i + D/2]) by angle pos * inv_freq[i].
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm forward and a hand-written backward; see RMSNorm for why."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        xhat = x * rstd
        ctx.save_for_backward(xhat, rstd, weight)
        return xhat * weight

    @staticmethod
    def backward(ctx, grad):
        xhat, rstd, weight = ctx.saved_tensors
        grad_weight = (grad * xhat).flatten(0, -2).sum(0)
        g = grad * weight
        # xhat does not change when x is scaled, so its Jacobian removes the component of g along
        # xhat before dividing by the rms: dx = (g - xhat * mean(g * xhat)) * rstd
        grad_x = (g - xhat * (g * xhat).mean(-1, keepdim=True)) * rstd
        return grad_x, grad_weight, None


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight over the last dimension: nn.RMSNorm's math and parameter
    (the same state dict). In torch 2.13 nn.RMSNorm has a fused kernel on CUDA, used there; on CPU
    it is composite: autograd runs nine full-size elementwise ops in its backward and keeps two
    full-size tensors for it, where the hand-written backward runs six and keeps one (counted with
    torch.profiler). In the profiled CPU training step that was the largest cost that nanoGPT, with
    its fused LayerNorm kernel, does not pay."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if x.device.type == "cuda":
            return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)
        return _RMSNormFunction.apply(x, self.weight, self.eps)


class KVCache:
    """Keys and values of every layer for batched sampling, preallocated to max_len positions
    (allocated on first use, so dtype/device follow the model and any autocast)."""

    def __init__(self, n_layer, max_len):
        self.k = [None] * n_layer
        self.v = [None] * n_layer
        self.max_len = max_len
        self.pos = 0  # number of positions already stored; GPT advances it after all layers ran

    def update(self, layer, k, v):
        B, H, T, D = k.shape
        if self.pos + T > self.max_len:
            raise ValueError(f"KV cache is full ({self.pos} + {T} > {self.max_len})")
        if self.k[layer] is None:
            self.k[layer] = k.new_zeros(B, H, self.max_len, D)
            self.v[layer] = v.new_zeros(B, H, self.max_len, D)
        self.k[layer][:, :, self.pos:self.pos + T] = k
        self.v[layer][:, :, self.pos:self.pos + T] = v
        return self.k[layer][:, :, :self.pos + T], self.v[layer][:, :, :self.pos + T]


class Attention(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.wq = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.wk = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x, cos, sin, mask, cache=None):
        # mask: a BlockMask (flex path), a bool (B, 1, T, T) tensor (SDPA with a dense mask), per-row
        # segment spans (the CPU's SDPA path, see segment_spans), or None meaning plain causal
        # (with a cache and one new token, nothing to mask).
        B, T, C = x.shape
        q = self.wq(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        gqa = self.n_kv_head != self.n_head
        if isinstance(mask, BlockMask):
            y = _flex(q, k, v, mask, gqa)
        elif cache is not None or isinstance(mask, torch.Tensor):
            # is_causal aligns the triangle top-left, which is only right when q and k start at
            # the same position: a prefill into an empty cache, or no cache at all.
            assert mask is not None or T == 1 or k.size(2) == T, "causal prefill needs an empty cache"
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=(mask is None and T > 1),
                                               enable_gqa=gqa)
        elif mask is None:
            y = causal_attention(q, k, v, gqa)
        else:
            y = segment_attention(q, k, v, mask, gqa)
        return self.wo(y.transpose(1, 2).reshape(B, T, C))


class SwiGLU(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=False)
        self.up = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=False)
        self.down = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.attn = Attention(cfg, layer_idx)
        self.mlp_norm = RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, cos, sin, mask, cache=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.norm = RMSNorm(config.n_embd, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)  # untied from wte
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """N(0, 0.02) for embeddings and matrices; the two projections that write into the
        residual stream (attention out, MLP down) get 0.02 / sqrt(2 * n_layer) so the residual's
        variance does not grow with depth. Norm weights are 1. Also call after to_empty()."""
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith(("attn.wo.weight", "mlp.down.weight")):
                nn.init.normal_(p, mean=0.0, std=residual_std)
            else:
                nn.init.normal_(p, mean=0.0, std=0.02)

    def num_params(self, exclude_embedding=False):
        """All parameters (the paper's count includes both untied embeddings). With
        exclude_embedding=True the input embedding is left out (a lookup, not a matmul: use this N
        for 6*N FLOPs per token)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wte.weight.numel() if exclude_embedding else n

    def build_mask(self, mask_kind, doc_ids, group_ids, B, T, device, attn_impl):
        """The attention mask for one batch, built once and shared by all layers."""
        mask_mod = make_mask_mod(mask_kind, doc_ids, group_ids)
        for name, ids in (("doc_ids", doc_ids), ("group_ids", group_ids)):
            if ids is not None and tuple(ids.shape) != (B, T):
                raise ValueError(f"{name} must have shape {(B, T)}, got {tuple(ids.shape)}")
        if mask_kind == "causal":
            return None  # causal_attention: SDPA's fused causal kernel (or the CPU's blocked one) for either impl
        if attn_impl == "flex":
            return _block_mask(mask_mod, B, T, device)
        if device.type == "cpu":
            spans = segment_spans(doc_ids if mask_kind == "document" else group_ids)
            if spans is not None:
                return spans
        return dense_mask(mask_mod, B, T, device)

    def forward(self, idx, targets=None, doc_ids=None, group_ids=None, mask_kind="causal", reduction="mean",
                attn_impl="auto", return_logits=False):
        """idx (B, T) token ids -> (logits, loss).
        Without targets: logits (B, T, vocab) float32 and loss None. With targets: the loss, and the
        logits only if return_logits (they are the largest tensor of a step: 15.7 GiB at batch
        8 x 4,096 with the 128,256-token vocabulary; head_cross_entropy never holds them whole).
        reduction="mean" gives a scalar, "none" the per-token losses (B, T) (0 where the target is
        -1, the ignore index), "sum" their sum. attn_impl: "auto" (flex on CUDA, SDPA elsewhere),
        "flex" or "sdpa"."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"unknown attn_impl {attn_impl!r}; choose from {ATTN_IMPLS}")
        if attn_impl == "auto":
            attn_impl = "flex" if idx.device.type == "cuda" else "sdpa"
        mask = self.build_mask(mask_kind, doc_ids, group_ids, B, T, idx.device, attn_impl)
        cos, sin = rope_tables(self.config.head_dim, 0, T, self.config.rope_theta, idx.device)

        x = self.wte(idx)
        for block in self.blocks:
            x = block(x, cos, sin, mask)
        x = self.norm(x)
        if targets is None:
            return self.lm_head(x).float(), None
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        loss = head_cross_entropy(x.view(B * T, -1), self.lm_head.weight, targets.reshape(B * T), reduction)
        logits = self.lm_head(x).float() if return_logits else None
        return logits, (loss.view(B, T) if reduction == "none" else loss)

    def _step(self, idx, cache):
        """Logits of the last position, running only the new tokens idx through the model and
        appending their keys/values to the cache. Causal attention only."""
        T = idx.size(1)
        cos, sin = rope_tables(self.config.head_dim, cache.pos, T, self.config.rope_theta, idx.device)
        x = self.wte(idx)
        for block in self.blocks:
            x = block(x, cos, sin, None, cache)
        cache.pos += T
        return self.lm_head(self.norm(x[:, -1])).float()

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None, use_cache=True,
                 vocab_size=None, stop_id=None):
        """Sample max_new_tokens after each of the B equal-length prompts in idx (B, T0), e.g. a
        (B, 1) tensor of BOS tokens for unconditional samples. Returns (B, T0 + max_new_tokens), or
        fewer columns when stop_id is given and every row has sampled it (rows keep sampling after
        their own stop_id until all have one: cut each row at its first). One KV cache holds the
        whole sample: the prompt is prefilled once, then one token a step.
        temperature 0 is greedy; top_k keeps the k most likely tokens. Causal attention only.
        vocab_size: sample only ids below it (the tokenizer's size: the embedding may be padded).
        The whole output must fit in block_size: longer requests raise ValueError rather than
        cropping the context (cropping would silently change what the model conditions on)."""
        B, T0 = idx.shape
        if T0 + max_new_tokens > self.config.block_size:
            raise ValueError(f"prompt length {T0} + max_new_tokens {max_new_tokens} exceeds "
                             f"block_size {self.config.block_size}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        cache = KVCache(self.config.n_layer, T0 + max_new_tokens) if use_cache else None
        new, ended = idx, torch.zeros(B, dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            if use_cache:
                logits = self._step(new, cache)  # prefill the whole prompt once, then one token a step
            else:
                logits = self(idx, attn_impl="sdpa")[0][:, -1]  # recompute everything (reference)
            if vocab_size is not None:
                logits[:, vocab_size:] = float("-inf")   # padding ids are no tokens
            if temperature == 0:
                new = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                new = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            idx = torch.cat([idx, new], dim=1)
            if stop_id is not None:
                ended |= new[:, 0] == stop_id
                if ended.all():
                    break
        return idx


def autocast(device):
    """The precision nanosynth runs in on `device`: bfloat16 autocast on CUDA (matmuls and attention
    in bfloat16, the residual stream, norms and the loss in float32), float32 elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if str(device).startswith("cuda") else nullcontext()


def read_checkpoint(path, device="cpu"):
    """The dict of a checkpoint written by train.py, loaded with weights_only=True: a checkpoint
    holds tensors and plain values, never code to run. A file that is not one is a ValueError
    naming it (torch's own message is not passed on whole: it suggests weights_only=False, which
    would run whatever code the file holds)."""
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a directory, not a checkpoint (a run's checkpoint is "
                         f"{os.path.join(path, 'ckpt.pt')})")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError:   # not a torch.save file, or one holding objects other than tensors
        raise ValueError(f"{path}: not a nanosynth checkpoint (not a file of tensors and plain values "
                         "that torch.load reads)") from None
    except Exception as e:   # a truncated or corrupt file: the first sentence of torch's reason
        reason = str(e).split(". ")[0].splitlines()[0][:200] if str(e) else ""
        raise ValueError(f"{path}: not a nanosynth checkpoint ({type(e).__name__}: {reason})") from None


def load_model(path, device="cpu"):
    """(model in eval mode, the checkpoint dict) from a checkpoint written by train.py
    (read_checkpoint)."""
    ckpt = read_checkpoint(path, device)
    try:
        model = GPT(GPTConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
    except Exception as e:   # another program's checkpoint, or a state dict that does not fit
        raise ValueError(f"{path}: not a nanosynth checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    return model.to(device).eval(), ckpt
