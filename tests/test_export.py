"""export_hf.py: the export loads in transformers as a LlamaForCausalLM whose logits equal nanosynth's
(grouped-query attention, non-default RoPE theta and RMSNorm eps, the padded vocabulary), its
tokenizer gives tiktoken's ids with BOS first, lm_eval's own Hugging Face model scores it as
evaluate.py downstream scores the checkpoint, and bad arguments are one-line errors. Needs
transformers and safetensors; skips without them."""
import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed: export_hf.py is optional")
pytest.importorskip("safetensors", reason="safetensors is not installed: export_hf.py is optional")
import export_hf  # noqa: E402
from support import assert_error  # noqa: E402
from model import load_model  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = ["Hello world! The hacker's   kludge\n\n  was 1234567 times  ugly.", " leading space", "tabs\tand\r\nCRLF",
         "unicode: café, naïve, 東京, emoji 🙂", "", "x" * 300, "  \n\n   trailing   "]


def export(ckpt, tmp_path, name="hf"):
    out = str(tmp_path / name)
    export_hf.export(ckpt, out, log=lambda *a: None)
    return out


def test_logits_equal_in_transformers(tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint(rope_theta=500.0, norm_eps=1e-6, n_layer=3, n_head=4, n_kv_head=2, n_embd=64)
    out = export(ckpt, tmp_path)
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["architectures"] == ["LlamaForCausalLM"] and config["vocab_size"] == 576   # the padded rows
    assert config["tokenizer_vocab_size"] == 513 and config["bos_token_id"] == config["eos_token_id"] == 512
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    model, _ = load_model(ckpt)
    x = torch.randint(0, 576, (3, 32), generator=torch.Generator().manual_seed(0))   # the whole context
    with torch.no_grad():
        ours, theirs = model(x)[0], hf(x).logits
    assert ours.shape == theirs.shape == (3, 32, 576)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert ours.std() > 0.1 * ours.abs().max()   # not equal because both are ~0: the logits vary


@pytest.mark.parametrize("spec", ["gpt2:512", "gpt2"])
def test_tokenizer_ids_equal_tiktoken_with_bos_first(tiny_checkpoint, tmp_path, spec):
    enc, bos = load_tokenizer(spec)
    out = export(tiny_checkpoint(tokenizer=spec, vocab_size=-(-enc.n_vocab // 64) * 64), tmp_path)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    docs = [json.loads(line)["text"] for line in open(os.path.join(ROOT, "sample_data", "train.jsonl"))][:300]
    for text in TEXTS + docs:
        ids = tok(text)["input_ids"]
        assert ids == [bos] + enc.encode_ordinary(text), text[:80]
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.bos_token_id == tok.eos_token_id == bos


def test_lm_eval_hf_model_scores_the_export_as_downstream_scores_the_checkpoint(tiny_checkpoint, tmp_path):
    pytest.importorskip("accelerate", reason="accelerate is not installed: lm_eval's hf model needs lm-eval[hf]")
    import downstream
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    ckpt = tiny_checkpoint()
    out = export(ckpt, tmp_path)
    pairs = [("The hacker wrote", " a program"), ("", "Hello there"), ("Question: what is a kludge?\nAnswer:", " a fix")]
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)]
    theirs = HFLM(pretrained=out, add_bos_token=True, device="cpu", batch_size=2).loglikelihood(requests)
    ours = downstream.NanosynthLM([ckpt]).loglikelihood(requests)
    assert [l for l, _ in theirs] == pytest.approx([l for l, _ in ours], abs=1e-4)


def test_command_line(tiny_checkpoint, tmp_path, capsys):
    ckpt = tiny_checkpoint()
    r = subprocess.run([sys.executable, os.path.join(ROOT, "export_hf.py"), ckpt, tmp_path / "out"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "vocab_size 576 (padded" in r.stdout, r.stderr
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(tmp_path / "out"))
    for args, named in (([ckpt, tmp_path / "out"], tmp_path / "out"), ([tmp_path / "none.pt", tmp_path / "o2"], "none.pt"),
                        ([ckpt, tmp_path / "o2", "--dtype", "int8"], "--dtype")):
        with pytest.raises(SystemExit) as e:
            export_hf.main([str(a) for a in args])
        assert_error(e.value.code, capsys.readouterr().err, named)
    assert not os.path.exists(tmp_path / "o2")
    # a tokenizer whose ranks file is not on this machine: the model is exported, the tokenizer left out
    export_hf.main([tiny_checkpoint("far.pt", tokenizer=str(tmp_path / "elsewhere.model")), str(tmp_path / "o3")])
    assert "no tokenizer files" in capsys.readouterr().out
    assert "tokenizer.json" not in os.listdir(tmp_path / "o3")
    assert transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "o3")).config.vocab_size == 576


def test_a_failed_export_leaves_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    # the export is written into OUT_DIR.tmp and renamed when complete: an error half-way (here in
    # the tokenizer, after the weights are written) leaves neither folder
    def broken(enc, bos_id):
        raise RuntimeError("the tokenizer could not be converted")
    monkeypatch.setattr(export_hf, "hf_tokenizer", broken)
    (tmp_path / "empty").mkdir()
    for out in ("new", "empty"):
        with pytest.raises(RuntimeError):
            export_hf.export(tiny_checkpoint(), str(tmp_path / out), log=lambda *a: None)
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "empty"] and os.listdir(tmp_path / "empty") == []
