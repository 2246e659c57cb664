"""Tests for model.py (CPU, a few seconds): masks, the two attention paths, information flow between
documents, backward, KV-cache sampling, preset parameter counts, config validation.
Run: python -m pytest -q tests/test_model.py"""

import os
import sys

import pytest
import torch
from torch.nn.attention.flex_attention import create_mask

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch.nn.functional as F  # noqa: E402

import model as model_module  # noqa: E402
from model import (GPT, GPTConfig, KVCache, MASK_KINDS, PRESETS, causal_attention, dense_mask, document_ids,  # noqa: E402
                   make_mask_mod, segment_attention, segment_spans)

# eager flex_attention on CPU warns that it is not compiled; that is expected here
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

BOS = 0
VOCAB = 101


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, mlp_hidden=176, block_size=256)
    return GPT(GPTConfig(**{**cfg, **overrides}))


def window(B, T, seed=0, doc_len=(20, 90), docs_per_group=2):
    """Random tokens with a BOS at each document start, its doc ids and megadoc group ids."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(1, VOCAB, (B, T), generator=g)
    for b in range(B):
        pos = int(torch.randint(0, doc_len[0], (1,), generator=g))  # first doc is a cut-off tail
        while pos < T:
            idx[b, pos] = BOS
            pos += int(torch.randint(doc_len[0], doc_len[1], (1,), generator=g))
    doc = document_ids(idx, BOS)
    return idx, doc, doc // docs_per_group


# ----------------------------------------------------------------------------- masks

DOC = [0, 0, 1, 1, 1, 2]
GROUP = [0, 0, 0, 0, 1, 1]
EXPECTED = {
    "causal": [[1, 0, 0, 0, 0, 0],
               [1, 1, 0, 0, 0, 0],
               [1, 1, 1, 0, 0, 0],
               [1, 1, 1, 1, 0, 0],
               [1, 1, 1, 1, 1, 0],
               [1, 1, 1, 1, 1, 1]],
    "document": [[1, 0, 0, 0, 0, 0],
                 [1, 1, 0, 0, 0, 0],
                 [0, 0, 1, 0, 0, 0],
                 [0, 0, 1, 1, 0, 0],
                 [0, 0, 1, 1, 1, 0],
                 [0, 0, 0, 0, 0, 1]],
    "megadoc": [[1, 0, 0, 0, 0, 0],
                [1, 1, 0, 0, 0, 0],
                [1, 1, 1, 0, 0, 0],
                [1, 1, 1, 1, 0, 0],
                [0, 0, 0, 0, 1, 0],
                [0, 0, 0, 0, 1, 1]],
}


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_masks_match_hand_written_matrices(kind):
    # row 0 has the ids above; row 1 is a single document and group, so every kind is causal there
    # (this also checks that the mask_mod indexes ids by batch row)
    doc_ids = torch.tensor([DOC, [0] * 6])
    group_ids = torch.tensor([GROUP, [7] * 6])
    mask_mod = make_mask_mod(kind, doc_ids, group_ids)
    expected = torch.tensor([EXPECTED[kind], EXPECTED["causal"]], dtype=torch.bool).unsqueeze(1)
    assert torch.equal(create_mask(mask_mod, 2, 1, 6, 6), expected)
    assert torch.equal(dense_mask(mask_mod, 2, 6), expected)


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_dense_mask_equals_create_mask(kind):
    _, doc, group = window(3, 200, seed=1, doc_len=(5, 40))
    mask_mod = make_mask_mod(kind, doc, group)
    fast = dense_mask(mask_mod, 3, 200)
    assert fast.shape == (3, 1, 200, 200)
    assert torch.equal(fast, create_mask(mask_mod, 3, 1, 200, 200))


def test_document_ids():
    idx = torch.tensor([[5, 0, 7, 8, 0, 0, 9], [0, 1, 2, 3, 4, 5, 6]])
    assert document_ids(idx, 0).tolist() == [[0, 1, 1, 1, 2, 3, 3], [1, 1, 1, 1, 1, 1, 1]]


# ----------------------------------------------------------------------------- attention paths

@pytest.mark.parametrize("T", [128, 256, 200])
def test_flex_equals_sdpa(T):
    model = tiny_model()
    idx, doc, group = window(2, T, seed=T)
    assert doc.max() >= 3  # several documents per window
    with torch.no_grad():  # flex_attention has no backward on CPU
        outs = {}
        for kind in MASK_KINDS:
            sdpa, _ = model(idx, doc_ids=doc, group_ids=group, mask_kind=kind, attn_impl="sdpa")
            flex, _ = model(idx, doc_ids=doc, group_ids=group, mask_kind=kind, attn_impl="flex")
            assert (sdpa - flex).abs().max().item() < 1e-5, kind
            outs[kind] = sdpa
    # the comparison above is meaningful only if the kinds really give different logits
    assert (outs["causal"] - outs["document"]).abs().max() > 1e-3
    assert (outs["document"] - outs["megadoc"]).abs().max() > 1e-3


@pytest.mark.parametrize("impl", ["sdpa", "flex"])
def test_information_flow_between_documents(impl):
    # doc A = [0, 10), doc B = [10, 20) share source group 0; doc C = [20, 30) is group 1
    model = tiny_model()
    T = 30
    idx = torch.randint(1, VOCAB, (1, T), generator=torch.Generator().manual_seed(3))
    idx[0, [0, 10, 20]] = BOS
    doc = document_ids(idx, BOS)
    group = torch.tensor([[0] * 20 + [1] * 10])
    changed = idx.clone()
    changed[0, 5] = (idx[0, 5] % (VOCAB - 1)) + 1  # a different non-BOS token inside doc A
    assert changed[0, 5] != idx[0, 5] and torch.equal(document_ids(changed, BOS), doc)

    def diff(kind):
        with torch.no_grad():
            a, _ = model(idx, doc_ids=doc, group_ids=group, mask_kind=kind, attn_impl=impl)
            b, _ = model(changed, doc_ids=doc, group_ids=group, mask_kind=kind, attn_impl=impl)
        return (a - b).abs()[0].amax(dim=-1)  # (T,) largest logit change at each position

    for kind in MASK_KINDS:
        d = diff(kind)
        assert torch.all(d[:5] == 0), kind  # the past never sees the future
        assert torch.all(d[5:10] > 0), kind  # the rest of doc A does see the change
        if kind == "causal":
            assert torch.all(d[10:] > 0)
        elif kind == "document":
            assert torch.all(d[10:] == 0)
        else:  # megadoc: B shares A's source, C does not
            assert torch.all(d[10:20] > 0)
            assert torch.all(d[20:] == 0)


def test_segment_spans():
    doc = torch.tensor([[0, 0, 1, 1, 1, 2], [3, 3, 3, 3, 3, 3]])
    assert segment_spans(doc) == [[(0, 2), (2, 5), (5, 6)], [(0, 6)]]
    # a source group that comes back after another one (a shuffled stream) has no spans
    assert segment_spans(torch.tensor([[0, 0, 1, 1, 0, 0]])) is None


def qkv(B, H, T, D, seed, H_kv=None):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, T, D, generator=g, requires_grad=True) for h in (H, H_kv or H, H_kv or H)]


def grads(out, tensors, seed=9):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad(out, tensors, g)


@pytest.mark.parametrize("T", [129, 200, 256, 1000])
@pytest.mark.parametrize("H_kv", [4, 2])
def test_blocked_causal_attention_equals_sdpa(T, H_kv):
    # the CPU's causal path splits the keys into blocks of ATTN_BLOCK and merges them by their
    # log-sum-exps: values and gradients equal one SDPA call, for block-aligned and ragged T, with GQA
    assert T > model_module.ATTN_BLOCK
    q, k, v = qkv(2, 4, T, 16, seed=T, H_kv=H_kv)
    blocked = causal_attention(q, k, v, enable_gqa=H_kv != 4)
    reference = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=H_kv != 4)
    assert (blocked - reference).abs().max() < 1e-5
    for a, b in zip(grads(blocked, (q, k, v)), grads(reference, (q, k, v))):
        assert (a - b).abs().max() < 1e-5


@pytest.mark.parametrize("kind", ["document", "megadoc"])
def test_segment_attention_equals_dense_mask(kind):
    _, doc, group = window(3, 300, seed=2, doc_len=(5, 200))
    ids = doc if kind == "document" else group
    spans = segment_spans(ids)
    assert spans is not None and any(e - s > model_module.ATTN_BLOCK for row in spans for s, e in row)
    q, k, v = qkv(3, 2, 300, 16, seed=3)
    mask = dense_mask(make_mask_mod(kind, doc, group), 3, 300)
    ours = segment_attention(q, k, v, spans)
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert (ours - reference).abs().max() < 1e-5
    for a, b in zip(grads(ours, (q, k, v)), grads(reference, (q, k, v))):
        assert (a - b).abs().max() < 1e-5


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_cpu_paths_equal_the_dense_reference_in_training(kind):
    # the whole model: loss and every gradient of the CPU path (blocked causal attention, segment
    # attention) equal those of SDPA with the dense boolean mask of the same predicate, which is
    # what flex_attention computes on CUDA (test_flex_equals_sdpa checks flex against it)
    model = tiny_model()
    idx, doc, group = window(2, 256, seed=11, doc_len=(20, 200))
    targets = torch.roll(idx, -1, dims=1)
    _, loss = model(idx, targets, doc_ids=doc, group_ids=group, mask_kind=kind)
    ours = torch.autograd.grad(loss, list(model.parameters()))
    mask = dense_mask(make_mask_mod(kind, doc, group), 2, 256)
    original = model_module.Attention.forward

    def with_dense_mask(self, x, cos, sin, _mask, cache=None):
        return original(self, x, cos, sin, mask, cache)
    model_module.Attention.forward = with_dense_mask
    try:
        _, dense_loss = model(idx, targets, doc_ids=doc, group_ids=group, mask_kind=kind)
        reference = torch.autograd.grad(dense_loss, list(model.parameters()))
    finally:
        model_module.Attention.forward = original
    assert abs(loss.item() - dense_loss.item()) < 1e-5
    assert max((a - b).abs().max().item() for a, b in zip(ours, reference)) < 1e-5


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_backward_on_cpu(kind):
    model = tiny_model()
    idx, doc, group = window(2, 64, seed=4, doc_len=(10, 30))
    targets = torch.roll(idx, -1, dims=1)
    _, loss = model(idx, targets, doc_ids=doc, group_ids=group, mask_kind=kind)  # auto -> sdpa on CPU
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_head_cross_entropy_in_pieces_equals_one_piece(reduction, monkeypatch):
    # the same loss and gradients when the logits are computed 7 rows at a time (a ragged last
    # piece), each piece checkpointed, as when they are computed whole
    model = tiny_model()
    idx, _, _ = window(2, 64, seed=8)
    targets = torch.roll(idx, -1, dims=1)
    targets[:, -3:] = -1
    results = []
    for elements in (model_module.CE_PIECE_ELEMENTS, 7 * VOCAB):
        monkeypatch.setattr(model_module, "CE_PIECE_ELEMENTS", elements)
        _, loss = model(idx, targets, reduction=reduction)
        results.append((loss.detach(), torch.autograd.grad(loss.sum(), list(model.parameters()))))
    (whole, whole_grads), (pieces, piece_grads) = results
    assert whole.shape == pieces.shape and torch.allclose(whole, pieces, rtol=1e-6, atol=1e-5)   # float sums
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(whole_grads, piece_grads))


def test_large_logits_are_computed_in_pieces_under_2_31_elements():
    # batch 8 x 4,096 with the 128,256-token vocabulary: 4.2e9 logits would be one tensor past
    # 2^31 elements; in pieces of CE_PIECE_ELEMENTS it is 8 pieces of at most 2^29
    rows, vocab = 8 * 4096, 128256
    per_piece = model_module.CE_PIECE_ELEMENTS // vocab
    assert rows * vocab > 2 ** 31 and per_piece * vocab <= 2 ** 29 and -(-rows // per_piece) == 8


def test_forward_returns_logits_only_when_asked():
    model = tiny_model()
    idx, _, _ = window(2, 32, seed=5)
    targets = torch.roll(idx, -1, dims=1)
    none, loss = model(idx, targets)
    logits, same = model(idx, targets, return_logits=True)
    assert none is None and logits.shape == (2, 32, VOCAB) and torch.equal(loss, same)
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(logits.view(-1, VOCAB), targets.view(-1)))


def test_compiled_flex_path_has_no_graph_break_and_compiles_once():
    # the CUDA path's structure, compiled on the CPU (forward only: flex has no CPU backward): no
    # graph break anywhere in the model, and new document masks (new BlockMasks and closures) of the
    # same shape reuse the one compiled graph
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    model = tiny_model().eval()
    compiled = torch.compile(model, dynamic=False)
    with torch.no_grad():
        for seed in range(3):
            idx, doc, group = window(2, 128, seed=seed)
            flex, _ = compiled(idx, doc_ids=doc, group_ids=group, mask_kind="document", attn_impl="flex")
            sdpa, _ = model(idx, doc_ids=doc, group_ids=group, mask_kind="document", attn_impl="sdpa")
            assert (flex - sdpa).abs().max() < 1e-5
    assert dict(counters["graph_break"]) == {} and counters["stats"]["unique_graphs"] == 1


def test_loss_reductions_and_ignore_index():
    model = tiny_model()
    idx, _, _ = window(2, 32, seed=5)
    targets = torch.roll(idx, -1, dims=1)
    targets[:, -1] = -1  # no next token for the last position
    logits, none = model(idx)
    assert none is None and logits.dtype == torch.float32 and logits.shape == (2, 32, VOCAB)
    _, mean = model(idx, targets)
    _, per_token = model(idx, targets, reduction="none")
    assert per_token.shape == (2, 32)
    assert torch.all(per_token[:, -1] == 0)
    assert torch.allclose(mean, per_token[:, :-1].mean(), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- sampling

def sharpened(model, scale=5.0):
    # At init (std 0.02) attention is nearly uniform, so greedy tokens barely depend on positions
    # and a KV-cache/RoPE offset bug can go unseen. Larger weights make attention position-sensitive.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(scale)
    return model


def test_kv_cache_step_logits_equal_full_forward():
    model = sharpened(tiny_model(seed=7))
    idx = torch.randint(1, VOCAB, (2, 24), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        full, _ = model(idx)
        cache = KVCache(model.config.n_layer, 24)
        steps = [model._step(idx[:, :8], cache)]  # prefill 8 tokens, then one at a time
        steps += [model._step(idx[:, t:t + 1], cache) for t in range(8, 24)]
    assert cache.pos == 24
    assert (torch.stack(steps, dim=1) - full[:, 7:]).abs().max().item() < 1e-5


def test_kv_cache_greedy_equals_no_cache():
    model = sharpened(tiny_model(seed=6))
    prompt = torch.randint(1, VOCAB, (3, 5), generator=torch.Generator().manual_seed(6))
    with_cache = model.generate(prompt, 40, temperature=0, use_cache=True)
    without = model.generate(prompt, 40, temperature=0, use_cache=False)
    assert with_cache.shape == (3, 45)
    assert torch.equal(with_cache[:, :5], prompt)
    assert torch.equal(with_cache, without)
    assert not torch.equal(with_cache[0], with_cache[1])  # rows really are different samples


def test_generate_from_bos_is_reproducible_and_bounded():
    model = tiny_model(block_size=16)
    bos = torch.full((4, 1), BOS)
    a = model.generate(bos, 15, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(0))
    b = model.generate(bos, 15, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(0))
    assert a.shape == (4, 16) and torch.equal(a, b)
    with pytest.raises(ValueError, match="exceeds block_size"):
        model.generate(bos, 16)


# ----------------------------------------------------------------------------- presets and config

@pytest.mark.parametrize("name,expected", [
    ("150M", 154_147_328), ("300M", 299_649_792), ("600M", 602_457_088), ("1.5B", 1_540_732_416)])
def test_paper_preset_parameter_counts(name, expected):
    cfg = GPTConfig.from_preset(name, vocab_size=128256)
    with torch.device("meta"):  # shapes only, no memory
        model = GPT(cfg)
    assert model.num_params() == expected
    assert model.num_params(exclude_embedding=True) == expected - 128256 * cfg.n_embd


def test_all_presets_build_valid_configs():
    for name, fields in PRESETS.items():
        cfg = GPTConfig.from_preset(name, vocab_size=512, block_size=64)
        assert (cfg.vocab_size, cfg.block_size) == (512, 64), name
        assert cfg.n_layer == fields["n_layer"], name


@pytest.mark.parametrize("overrides,message", [
    (dict(n_embd=66), "n_embd \\(66\\) must be divisible by n_head \\(4\\)"),
    (dict(n_kv_head=3), "n_kv_head \\(3\\) must divide n_head \\(4\\)"),
    (dict(n_embd=12, n_head=4, n_kv_head=4), "must be even for RoPE"),
    (dict(n_layer=0), "n_layer must be a positive int"),
    (dict(vocab_size=10.0), "vocab_size must be a positive int"),
    (dict(rope_theta=0.0), "rope_theta must be > 0"),
    (dict(norm_eps=-1.0), "norm_eps must be > 0"),
])
def test_config_validation(overrides, message):
    base = dict(vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, mlp_hidden=176, block_size=64)
    with pytest.raises(ValueError, match=message):
        GPTConfig(**{**base, **overrides})


def test_bad_forward_arguments():
    model = tiny_model(block_size=32)
    idx = torch.randint(1, VOCAB, (1, 16))
    with pytest.raises(ValueError, match="unknown mask kind"):
        model(idx, mask_kind="cross")
    with pytest.raises(ValueError, match="needs doc_ids"):
        model(idx, mask_kind="document")
    with pytest.raises(ValueError, match="needs group_ids"):
        model(idx, mask_kind="megadoc")
    with pytest.raises(ValueError, match="doc_ids must have shape"):
        model(idx, doc_ids=torch.zeros(1, 8, dtype=torch.long), mask_kind="document")
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(torch.randint(1, VOCAB, (1, 33)))
    with pytest.raises(ValueError, match="unknown preset"):
        GPTConfig.from_preset("7B")


def test_init_scales_residual_projections_with_depth():
    model = tiny_model(n_layer=8, n_embd=128, mlp_hidden=512)
    residual_std = 0.02 / (2 * 8) ** 0.5
    for name, p in model.named_parameters():
        if p.dim() == 1:
            assert torch.equal(p, torch.ones_like(p)), name  # RMSNorm weights
        else:
            want = residual_std if name.endswith(("attn.wo.weight", "mlp.down.weight")) else 0.02
            assert abs(p.std().item() - want) < 0.1 * want, name


def test_generate_never_samples_padding_ids():
    # the embedding is padded beyond the tokenizer: make the padded ids the most likely ones
    model = tiny_model()
    V = model.config.vocab_size
    with torch.no_grad():
        model.lm_head.weight[V - 8:] *= 50
    bos = torch.zeros(4, 1, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    free = model.generate(bos, 40, temperature=1.0, generator=g)
    assert (free >= V - 8).any()                       # without a limit they are sampled
    limited = model.generate(bos, 40, temperature=1.0, generator=g, vocab_size=V - 8)
    assert (limited < V - 8).all()
