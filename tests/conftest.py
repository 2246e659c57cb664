# The scripts live at the repository root: make them importable however pytest is started
# (python -m pytest tests, pytest tests/test_pack.py, or from inside tests/).
import dataclasses
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A factory: tiny_checkpoint(name, seed=0, tokenizer="gpt2:512", **GPTConfig fields) writes a
    randomly initialized model as train.py writes checkpoints (the fields load_model and the
    scripts read) and returns its path. The default vocabulary is gpt2:512 + BOS, padded to 576
    rows as train.py pads it; grouped-query attention (2 heads, 1 key/value head)."""
    from model import GPT, GPTConfig

    def make(name="ckpt.pt", seed=0, tokenizer="gpt2:512", **fields):
        config = GPTConfig(**{**dict(vocab_size=576, n_layer=2, n_head=2, n_kv_head=1, n_embd=32, mlp_hidden=64,
                                     block_size=32), **fields})
        torch.manual_seed(seed)
        model = GPT(config)
        path = str(tmp_path / name)
        torch.save({"model": model.state_dict(), "model_config": dataclasses.asdict(config), "tokenizer": tokenizer,
                    "config": {"block_size": config.block_size, "mask": "causal"}, "step": 0}, path)
        return path
    return make
