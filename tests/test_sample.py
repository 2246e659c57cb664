"""sample.py: greedy samples equal the model's own greedy continuation over the real ids (padding rows
that would win are never sampled), BOS first, stop at BOS; seeded samples repeat; bad flags are
one-line errors."""
import os
import subprocess
import sys

import pytest
import torch

import sample
from model import load_model
from support import assert_error
from tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENC, BOS = load_tokenizer("gpt2:512")
SEP = "---------------"


def samples(capsys, *args):
    sample.main(["--device", "cpu", *map(str, args)])
    out = capsys.readouterr().out
    assert out.endswith(SEP + "\n")
    return out.split(SEP + "\n")[:-1]


def test_greedy_sample_is_the_models_greedy_continuation_over_real_ids(tiny_checkpoint, capsys):
    path = tiny_checkpoint()
    model, ckpt = load_model(path)
    prompt = "The hacker"
    ids = [BOS] + ENC.encode_ordinary(prompt)
    with torch.no_grad():   # the padding rows copy the head's row of token 7, times 3: they outscore every id
        ckpt["model"]["lm_head.weight"][ENC.n_vocab:] = 3 * ckpt["model"]["lm_head.weight"][7]
        ckpt["model"]["lm_head.weight"][7] *= -1
    torch.save(ckpt, path)
    model.load_state_dict(ckpt["model"])
    greedy = model.generate(torch.tensor([ids]), 20, temperature=0, use_cache=False, vocab_size=ENC.n_vocab)[0]
    assert (model(greedy[None, :-1])[0][0, len(ids) - 1:].argmax(-1) >= ENC.n_vocab).any()   # padding would win
    new = greedy[len(ids):].tolist()
    new = new[:new.index(BOS)] if BOS in new else new
    out = samples(capsys, "--ckpt", path, "--prompt", prompt, "--temperature", 0, "--max_new_tokens", 20,
                  "--num_samples", 2)
    assert out == [prompt + ENC.decode(new) + "\n"] * 2


def test_seeded_samples_repeat_and_differ_by_seed(tiny_checkpoint, capsys):
    path = tiny_checkpoint()
    args = ["--ckpt", path, "--num_samples", 3, "--max_new_tokens", 12]
    first = samples(capsys, *args)
    assert len(first) == 3 and len(set(first)) == 3
    assert samples(capsys, *args) == first
    assert samples(capsys, *args, "--seed", 1) != first


def test_errors_name_the_flag(tiny_checkpoint, tmp_path, capsys):
    path = tiny_checkpoint()
    for args, named in ((["--ckpt", tmp_path / "none.pt"], "none.pt"),
                        (["--ckpt", path, "--max_new_tokens", 40], "--max_new_tokens"),   # past the context of 32
                        (["--ckpt", path, "--num_samples", 0], "--num_samples"),
                        (["--ckpt", path, "--temperature", "nan"], "--temperature"),
                        (["--ckpt", path, "--device", "nodevice"], "--device")):
        with pytest.raises(SystemExit) as e:
            sample.main([str(a) for a in args])
        assert_error(e.value.code, capsys.readouterr().err, named)


def test_command_line(tiny_checkpoint):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--ckpt", tiny_checkpoint(), "--prompt",
                        "Unix", "--num_samples", "2", "--max_new_tokens", "8"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(SEP) == 2 and r.stdout.startswith("Unix")
