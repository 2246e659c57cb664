"""evaluate.py downstream (downstream.py): the lm_eval model's log-likelihoods and greedy flags equal
a direct model.forward computation (BOS first, left truncation, padding ids never greedy, ensembles
averaging probabilities), and a complete lm_eval evaluation of a multiple-choice task written here
as local files, from the command line, without network. Needs lm-eval; skips without it."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed: evaluate.py downstream is optional")
import downstream  # noqa: E402
import evaluate  # noqa: E402
from model import load_model  # noqa: E402
from support import assert_error  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENC, BOS = load_tokenizer("gpt2:512")   # the tiny checkpoints' tokenizer: 513 ids, 576 embedding rows


def direct_logprobs(ckpts, tokens):
    """log of the members' averaged next-token probabilities at every position of one token list,
    straight from model.forward: (len(tokens) - 1, vocab rows) for predicting tokens[1:]."""
    probs = 0
    for path in ckpts:
        model, _ = load_model(path)
        with torch.no_grad():
            probs = probs + F.softmax(model(torch.tensor([tokens[:-1]]))[0][0].double(), dim=-1)
    return (probs / len(ckpts)).log()


def direct_score(ckpts, context, continuation, block_size):
    """(sum log p(continuation), greedy over the 513 real ids) for BOS + context + continuation,
    cut from the left with BOS kept first."""
    body = (context + continuation)[-block_size:]
    logp = direct_logprobs(ckpts, [BOS] + body)[-len(continuation):]
    cont = torch.tensor(continuation)
    return logp.gather(1, cont[:, None]).sum().item(), bool((logp[:, :ENC.n_vocab].argmax(-1) == cont).all())


def padding_wins(path, context, steps):
    """Make the checkpoint's padding rows the overall argmax at each of `steps` greedy positions
    after BOS + context, leaving the greedy real ids as they were; returns those real ids."""
    model, ckpt = load_model(path)
    tokens = model.generate(torch.tensor([[BOS] + context]), steps, temperature=0, vocab_size=ENC.n_vocab)[0].tolist()
    greedy = tokens[len(context) + 1:]
    with torch.no_grad():
        for k, g in enumerate(greedy):   # the head is the last layer: nothing else changes
            ckpt["model"]["lm_head.weight"][ENC.n_vocab + k] = 3 * ckpt["model"]["lm_head.weight"][g]
    torch.save(ckpt, path)
    logits = model.__class__(model.config)
    logits.load_state_dict(ckpt["model"])
    with torch.no_grad():
        full = logits(torch.tensor([tokens[:-1]]))[0][0][-steps:]
    assert (full.argmax(-1) >= ENC.n_vocab).all()    # a padding id is the overall argmax everywhere
    return greedy


def test_loglikelihoods_equal_model_forward(tiny_checkpoint):
    a, b = tiny_checkpoint("a.pt", seed=1), tiny_checkpoint("b.pt", seed=2)
    context = ENC.encode_ordinary("The hacker wrote a program")
    greedy = padding_wins(a, context, 3)
    long_context = ENC.encode_ordinary(" ".join(f"word{i}" for i in range(40)))   # > 32 tokens: cut from the left
    requests = [(context, greedy), (context, greedy[:1]), ([BOS], ENC.encode_ordinary("Hello there")),
                (context, ENC.encode_ordinary(" a mess")), (long_context, ENC.encode_ordinary(" end")),
                (long_context[:20], long_context[20:40])]
    assert len(long_context) > 32
    lm_requests = [(("ctx", "cont"), list(c), list(k)) for c, k in requests]
    for ckpts in ([a], [a, b]):
        lm = downstream.NanosynthLM(ckpts, batch_size=4)   # 6 requests: two batches of mixed lengths
        got = lm._loglikelihood_tokens(lm_requests)
        for (context_ids, cont), (logprob, is_greedy) in zip(requests, got):
            ref_logprob, ref_greedy = direct_score(ckpts, [t for t in context_ids if t != BOS], cont, 32)
            assert logprob == pytest.approx(ref_logprob, abs=1e-4)
            assert is_greedy == ref_greedy
        if ckpts == [a]:
            assert [g for _, g in got[:2]] == [True, True]   # greedy over the real ids, padding rows ahead
    # a continuation longer than the context cannot be scored whole: refused, not cut
    with pytest.raises(ValueError, match="continuation of 33 tokens"):
        downstream.NanosynthLM([a])._loglikelihood_tokens([(("", ""), context, long_context[:33])])


QUESTIONS = [("The first hacker", ["wrote code", "ate lunch", "slept"], 0),
             ("A kludge is", ["elegant", "a clumsy fix"], 1),
             ("Unix was written at", ["Bell Labs", "a bakery", "the beach", "MIT"], 0),
             ("The program crashed because", ["of a bug", "it rained"], 0),
             ("Real programmers use", ["FORTRAN", "crayons", "a typewriter"], 2),
             ("A daemon runs", ["in the background", "for office"], 0)]


def write_task(folder):
    """A multiple-choice lm_eval task read from a local JSONL file (zero-shot, acc)."""
    data = folder / "questions.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    (folder / "toy.yaml").write_text(f"""task: nanosynth_toy_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")


def expected_accuracy(ckpts):
    """Each question's answer chosen by the direct computation: the choice of highest log-likelihood
    of " " + choice after the prompt (the harness's target delimiter), tokenized as the harness does
    (the whole string, split at the context's length)."""
    correct = []
    for q, choices, answer in QUESTIONS:
        prompt = f"Question: {q}\nAnswer:"
        ctx = ENC.encode_ordinary(prompt)
        scores = [direct_score(ckpts, ctx, ENC.encode_ordinary(prompt + " " + c)[len(ctx):], 32)[0] for c in choices]
        correct.append(float(max(range(len(choices)), key=scores.__getitem__) == answer))
    mean = sum(correct) / len(correct)
    se = math.sqrt(sum((c - mean) ** 2 for c in correct) / (len(correct) - 1) / len(correct))
    return mean, se


def offline_env(tmp_path):
    return dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                TOKENIZERS_PARALLELISM="false")


def test_complete_lm_eval_run_of_a_local_task_from_the_command_line(tiny_checkpoint, tmp_path):
    a, b = tiny_checkpoint("a.pt", seed=1), tiny_checkpoint("b.pt", seed=2)
    (tmp_path / "tasks").mkdir()
    write_task(tmp_path / "tasks")
    out = tmp_path / "acc.json"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "downstream", "--include_path",
                        tmp_path / "tasks", "--tasks", "nanosynth_toy_mc", "--device", "cpu", "--out_json", out, a, b],
                       capture_output=True, text=True, env=offline_env(tmp_path), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(out.read_text())
    acc, se = expected_accuracy([a, b])   # the ensemble of the two
    task = results["tasks"]["nanosynth_toy_mc"]
    assert task["n"] == len(QUESTIONS)
    assert task["acc"] == pytest.approx(acc, abs=1e-12) and task["acc_stderr"] == pytest.approx(se, abs=1e-12)
    assert results["mean_acc"] == pytest.approx(acc) and results["average_benchmark_error"] == pytest.approx(1 - acc)
    assert results["checkpoints"] == [a, b]
    assert f"| nanosynth_toy_mc | {len(QUESTIONS)}" in r.stdout and f"{1 - acc:.4f}" in r.stdout


def test_in_process_evaluation_of_one_member_and_mean_over_tasks(tiny_checkpoint, tmp_path, monkeypatch):
    a = tiny_checkpoint("a.pt", seed=1)
    write_task(tmp_path)
    (tmp_path / "toy2.yaml").write_text((tmp_path / "toy.yaml").read_text().replace("nanosynth_toy_mc", "toy_two")
                                        + "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n")
    for key, value in offline_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    results = downstream.evaluate_tasks([a], ["nanosynth_toy_mc", "toy_two"], str(tmp_path), batch_size=3,
                                        include_defaults=False)
    acc, se = expected_accuracy([a])
    assert [t["acc"] for t in results["tasks"].values()] == [pytest.approx(acc, abs=1e-12)] * 2
    assert results["mean_acc_stderr"] == pytest.approx(math.sqrt(2 * se ** 2) / 2)
    assert "acc_norm" in results["tasks"]["toy_two"] and "acc_norm" not in results["tasks"]["nanosynth_toy_mc"]
    assert "| toy_two " in downstream.results_table(results)
    with pytest.raises(ValueError, match="--tasks: unknown task"):
        downstream.evaluate_tasks([a], ["no_such_task"], str(tmp_path), include_defaults=False)


def test_command_line_errors(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    a = tiny_checkpoint("a.pt")
    b = tiny_checkpoint("b.pt", tokenizer="gpt2:256")
    write_task(tmp_path)

    def error(*args, named):
        with pytest.raises(SystemExit) as e:
            evaluate.main(["downstream", *map(str, args)])
        assert_error(e.value.code, capsys.readouterr().err, named)
    for args, named in ((["--tasks", "x", tmp_path / "none.pt"], "none.pt"),
                        (["--tasks", "x", "--include_path", tmp_path / "nope", a], "--include_path"),
                        (["--tasks", "x", "--device", "nodevice", a], "--device"),
                        (["--tasks", ",", a], "--tasks"),
                        (["--tasks", "x", "--batch_size", 0, a], "--batch_size"),
                        (["--tasks", "x", "--limit", 0, a], "--limit"),
                        (["--tasks", "x", "--num_fewshot", -1, a], "--num_fewshot"),
                        (["--tasks", "x", "--out_json", tmp_path / "no" / "r.json", a], "--out_json"),
                        (["--include_path", tmp_path, "--tasks", "nanosynth_toy_mc", a, b], "b.pt")):   # another tokenizer
        error(*args, named=named)
    monkeypatch.delitem(sys.modules, "downstream")
    for name in [m for m in sys.modules if m.split(".")[0] == "lm_eval"]:   # as if lm-eval were not installed
        monkeypatch.setitem(sys.modules, name, None)
    error("--tasks", "arc_easy", a, named="pip install")
