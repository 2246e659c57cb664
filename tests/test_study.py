"""evaluate.py and sweep.py: fits, data efficiency, ensembles, statistics over seeds, one-line errors;
a tiny pack -> train -> sweep -> evaluate pipeline, whose sweep passes on exactly what it does not
sweep."""
import glob
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import evaluate
import pack
from support import assert_error
import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNTH = os.path.join(ROOT, "sample_data", "synthetic")
TINY = ["--model", "cpu-2x64", "--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--mlp_hidden", "64",
        "--block_size", "64", "--batch_size", "4", "--log_interval", "5", "--eval_batch_size", "8"]


@pytest.mark.parametrize("A,B,C", [(2.0, 0.5, 3.0), (40.0, 0.3, 3.45), (0.7, 1.2, 1.0)])
def test_fit_recovers_noiseless_power_law(A, B, C):
    x = np.array([1e3, 3e3, 1e4, 3e4, 1e5])
    fit = evaluate.fit_power_law(x, evaluate.power_law(x, A, B, C))
    assert fit == pytest.approx((A, B, C), rel=1e-4)


def test_data_efficiency_round_trip():
    law = (50.0, 0.4, 3.2)
    for real_tokens in (1e4, 2e5):
        for k in (1.0, 1.5, 3.0):
            loss = evaluate.power_law(k * real_tokens, *law)
            assert evaluate.data_efficiency(loss, law, real_tokens) == pytest.approx(k, rel=1e-9)
    assert evaluate.data_efficiency(3.1, law, 1e4) == math.inf   # below the asymptote


def test_markdown_table():
    assert evaluate.markdown_table(["a", "bb"], [[1, 2.5]]) == "| a | bb  |\n|---|-----|\n| 1 | 2.5 |"


def test_local_optimum():
    grid = {"epochs": [1, 2, 4], "mix": [0.5, 0.75], "weight_decay": [0.1], "lr": [3e-3]}
    losses = {sweep.run_name(dict(epochs=e, mix=m, weight_decay=0.1, lr=3e-3)): l
              for (e, m), l in {(1, 0.5): 4.0, (2, 0.5): 3.9, (4, 0.5): 3.95, (1, 0.75): 3.8, (2, 0.75): 3.7,
                                (4, 0.75): 3.75}.items()}
    best = dict(epochs=2, mix=0.75, weight_decay=0.1, lr=3e-3)
    ok, reasons = sweep.local_optimum(best, losses, grid)
    assert not ok and reasons == ["mix = 0.75 is on the edge of the grid"]
    grid["mix"] = [0.5, 0.75, 0.9]
    losses[sweep.run_name(dict(best, mix=0.9))] = 3.71
    assert sweep.local_optimum(best, losses, grid) == (True, [])
    losses[sweep.run_name(dict(best, epochs=4))] = 3.7
    assert sweep.local_optimum(best, losses, grid)[0] is False


def test_tiny_pipeline_pack_train_sweep_evaluate(tmp_path):
    """pack real + sorted megadocs -> a sweep over m of two train.py runs, which sets m and passes
    every other setting on as given (lr from a --config file, weight decay and epochs as flags) ->
    ensemble evaluation."""
    train_rows = [json.loads(l) for l in open(os.path.join(ROOT, "sample_data", "train.jsonl"))]
    synth = [json.loads(l) for l in open(os.path.join(SYNTH, "rephrase.jsonl"))]
    sources = sorted({r["source_id"] for r in synth})[:30]
    (tmp_path / "real.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train_rows if r["id"] in sources))
    val = open(os.path.join(ROOT, "sample_data", "val.jsonl")).readlines()[:8]
    (tmp_path / "val.jsonl").write_text("".join(val))
    quiet = lambda *a: None
    d = str(tmp_path)
    pack.pack(f"{d}/real.jsonl", f"{d}/real", tokenizer="gpt2:512", log=quiet)
    pack.pack(f"{d}/val.jsonl", f"{d}/val", tokenizer="gpt2:512", log=quiet)
    s = pack.pack(f"{d}/real.jsonl", f"{d}/sorted", "sorted", [os.path.join(SYNTH, "rephrase.jsonl")], G=2,
                  tokenizer="gpt2:512", log=quiet)
    assert s["per_kind"]["rephrase"]["documents"] == 60 and s["per_kind"]["real"]["documents"] == 30

    (tmp_path / "config.json").write_text(json.dumps({"lr": 0.002}))
    argv = ["--out_dir", f"{d}/sweep", "--mix", "0", "0.5", "--", *TINY, "--config", f"{d}/config.json",
            "--epochs", "1", "--weight_decay", "0.3", "--real", f"{d}/real", "--synthetic", f"{d}/sorted",
            "--val", f"{d}/val"]
    sweep.main(argv)
    table = open(f"{d}/sweep/sweep.md").read()
    assert "best: " in table and "mix = " in table   # a 2-point grid: the best is on its edge
    assert f"code: {json.load(open(f'{d}/sweep/mix0/summary.json'))['code']['commit']}" in table
    # found by what they ran, not by name: each run has its m, and everything else as given
    summaries = {s["config"]["mix"]: s for s in map(json.load, map(open, glob.glob(f"{d}/sweep/*/summary.json")))}
    assert {m: (s["config"]["lr"], s["config"]["weight_decay"], s["config"]["epochs"], s["config"]["synthetic"])
            for m, s in summaries.items()} == {0: (0.002, 0.3, 1.0, ""), 0.5: (0.002, 0.3, 1.0, f"{d}/sorted")}
    assert sorted(os.listdir(f"{d}/sweep")) == ["mix0", "mix0.5", "sweep.md"]   # named by what was swept
    windows = summaries[0]["real_windows"]
    assert (summaries[0]["steps"], summaries[0.5]["steps"]) == (windows // 4, windows // 2)  # 4 vs 2 real per batch
    assert summaries[0.5]["synthetic_sequences_seen"] == summaries[0.5]["real_sequences_seen"]
    mtime = os.path.getmtime(f"{d}/sweep/mix0/summary.json")
    sweep.main(argv)                                                      # finished runs are skipped
    assert os.path.getmtime(f"{d}/sweep/mix0/summary.json") == mtime

    # an ensemble of K copies of one model is that model
    run = f"{d}/sweep/mix0.5"
    single = summaries[0.5]["val_loss"]
    assert evaluate.ensemble_loss([f"{run}/ckpt.pt"] * 3, f"{d}/val") == pytest.approx(single, abs=1e-6)
    other = f"{d}/sweep/mix0/ckpt.pt"
    pair = evaluate.ensemble_loss([f"{run}/ckpt.pt", other], f"{d}/val")
    assert pair < (single + summaries[0]["val_loss"]) / 2      # mixing probabilities beats the mean loss (Jensen)
    # one pass per member and a running log-sum-exp of the targets' log-probabilities give what
    # averaging the members' whole next-token distributions gives, for every prefix K
    import torch
    from formats import TokenFile
    from model import document_ids, load_model
    members = [load_model(path)[0] for path in (f"{run}/ckpt.pt", other)]
    tf = TokenFile(f"{d}/val")
    total, count = 0.0, 0
    for tokens, groups, valid in evaluate.eval_batches(tf, members[0].config.block_size, 16):
        x, y = tokens[:, :-1], tokens[:, 1:]
        with torch.no_grad():
            logp = torch.stack([torch.log_softmax(m(x, doc_ids=document_ids(x, tf.bos_id), group_ids=groups)[0], -1)
                                for m in members])
        mixture = torch.logsumexp(logp, 0) - math.log(2)
        total -= mixture.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)[valid].double().sum().item()
        count += int(valid.sum())
    assert evaluate.ensemble_losses([f"{run}/ckpt.pt", other], f"{d}/val") == \
        pytest.approx([single, total / count], abs=1e-6)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny trained checkpoint and the held-out token file it was evaluated on."""
    d = tmp_path_factory.mktemp("tiny")
    lines = open(os.path.join(ROOT, "sample_data", "train.jsonl")).readlines()
    (d / "train.jsonl").write_text("".join(lines[:30]))
    (d / "val.jsonl").write_text("".join(open(os.path.join(ROOT, "sample_data", "val.jsonl")).readlines()[:8]))
    quiet = lambda *a: None
    pack.pack(str(d / "train.jsonl"), str(d / "real"), tokenizer="gpt2:512", log=quiet)
    pack.pack(str(d / "val.jsonl"), str(d / "val"), tokenizer="gpt2:512", log=quiet)
    pack.pack(str(d / "val.jsonl"), str(d / "val_gpt2"), tokenizer="gpt2", log=quiet)
    import train
    train.main(TINY + ["--real", str(d / "real"), "--val", str(d / "val"), "--epochs", "1", "--out_dir", str(d / "run")])
    return d


def run_script(script, *args):
    r = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], capture_output=True, text=True,
                       cwd=ROOT, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return r.returncode, r.stdout, r.stderr


def main_error(capfd, main, *argv):
    """A script's main(argv) run to its error, in this process: (exit code, stderr)."""
    capfd.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    return e.value.code, capfd.readouterr().err


def test_evaluate_cli_one_line_errors(tiny_run, tmp_path, capfd):
    d = tiny_run
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    for args, named in [   # the arguments, and what the error line must name
            (["ensemble", "--val", d / "val", tmp_path / "missing.pt"], [tmp_path / "missing.pt"]),
            (["ensemble", "--val", d / "val", d / "run"], [f"{d / 'run'}: is a directory"]),
            (["ensemble", "--val", d / "val", tmp_path / "garbage.pt"], [tmp_path / "garbage.pt"]),
            (["ensemble", "--val", d / "val_gpt2", d / "run" / "ckpt.pt"], [d / "val_gpt2.bin", d / "run" / "ckpt.pt"]),
            (["ensemble", "--val", d / "nowhere", d / "run" / "ckpt.pt"], [d / "nowhere.bin"]),
            (["ensemble", "--val", d / "val", "--device", "tpu9", d / "run" / "ckpt.pt"], ["--device 'tpu9'"]),
            (["fit", "1", "2", "--loss", "3.0", "2.9"], ["3 points", "2"]),
            (["fit", "1", "2", "3", "--loss", "3.0", "2.9"], ["--loss"])]:
        code, err = main_error(capfd, evaluate.main, *args)
        assert_error(code, err, *named)
        assert "weights_only" not in err
    code, out, err = run_script("evaluate.py", "ensemble", "--val", d / "val", d / "run" / "ckpt.pt")
    assert code == 0 and out.startswith("K = 1: ensemble loss ")
    assert float(out.split()[-1]) == pytest.approx(json.load(open(d / "run" / "summary.json"))["val_loss"], abs=1e-4)


SHARDED_EVALUATION = """
import json, os, sys
import torch.distributed as dist
sys.path.insert(0, sys.argv[1])
import evaluate
from formats import TokenFile
from model import load_model
dist.init_process_group("gloo")
model, _ = load_model(sys.argv[2])
val = TokenFile(sys.argv[3])
metrics = evaluate.evaluate_model(model, val, long=val, batch_size=4,
                                  shard=(dist.get_rank(), dist.get_world_size()))
if dist.get_rank() == 0:
    print(json.dumps(metrics))
dist.destroy_process_group()
"""


def test_evaluation_sharded_over_two_processes_is_one_process_evaluation(tiny_run, tmp_path):
    # 2 gloo processes, each evaluating every other batch (an odd count: one process has one more),
    # all-reduced: the very same losses, by position too, as one process
    from socket import socket
    from formats import TokenFile
    from model import load_model
    d = tiny_run
    model, _ = load_model(d / "run" / "ckpt.pt")
    val = TokenFile(str(d / "val"))
    one = evaluate.evaluate_model(model, val, long=val, batch_size=4)
    windows = len(range(0, len(val) - 1, model.config.block_size))
    assert -(-windows // 4) % 2 == 1 and windows % 4 and one["long_loss_by_position"]   # a short last batch
    (tmp_path / "shard.py").write_text(SHARDED_EVALUATION)
    with socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                        "127.0.0.1", "--master_port", str(port), str(tmp_path / "shard.py"), ROOT,
                        str(d / "run" / "ckpt.pt"), str(d / "val")], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == one
    # the last batch padded to a fixed shape (for a compiled model): the same losses to float rounding
    padded = evaluate.evaluate_model(model, val, long=val, batch_size=4, fixed_shape=True)
    assert padded["val_loss"] == pytest.approx(one["val_loss"], abs=1e-6)
    assert padded["long_loss_by_position"] == pytest.approx(one["long_loss_by_position"], abs=1e-6)


def test_compiled_evaluation_with_a_fixed_shape_compiles_once(tiny_run):
    # train.py evaluates through the compiled model: with the last batch padded to the others' shape
    # the whole evaluation is one graph; without, the short batch is another
    import torch
    from torch._dynamo.utils import counters
    from formats import TokenFile
    from model import load_model
    model, _ = load_model(tiny_run / "run" / "ckpt.pt")
    val = TokenFile(str(tiny_run / "val"))
    expected = evaluate.evaluate_model(model, val, batch_size=16)   # 66 windows: 4 batches of 16 and one of 2
    graphs = []
    for fixed_shape in (True, False):
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(model, backend="eager", dynamic=False)
        metrics = evaluate.evaluate_model(compiled, val, batch_size=16, fixed_shape=fixed_shape)
        assert metrics["val_loss"] == pytest.approx(expected["val_loss"], abs=1e-6)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs == [1, 2]


def test_fit_warns_when_a_parameter_is_on_the_edge_of_its_search():
    warnings = []
    x = np.array([1e4, 2e4, 4e4, 8e4])
    evaluate.fit_power_law(x, 7.0 - 0.3 * np.log(x), warn=warnings.append)   # a straight line in log x
    assert any("on the edge of its search range" in w for w in warnings)
    assert any("below zero" in w for w in warnings)
    warnings.clear()
    evaluate.fit_power_law(x, evaluate.power_law(x, 40.0, 0.3, 3.45), warn=warnings.append)
    assert warnings == []


def test_interpolated_budget():
    budgets, losses = [10, 20, 40, 80], [5.0, 4.6, 4.4, 4.3]
    assert evaluate.interpolated_budget(4.6, budgets, losses) == (pytest.approx(20.0), "=")
    assert evaluate.interpolated_budget(4.5, budgets, losses) == (pytest.approx(20 * 2 ** 0.5), "=")   # halfway in log D
    assert evaluate.interpolated_budget(4.2, budgets, losses) == (80, ">")
    assert evaluate.interpolated_budget(5.5, budgets, losses) == (10, "<")
    # a larger budget that measured worse (under-tuned) does not count: the envelope is non-increasing
    assert evaluate.interpolated_budget(4.45, [10, 20, 40, 80], [5.0, 4.4, 4.3, 4.9]) == \
        (pytest.approx(10 * 2 ** (0.55 / 0.6)), "=")
    assert evaluate.interpolated_budget(4.3, [10, 20, 40, 80], [5.0, 4.4, 4.3, 4.9]) == (pytest.approx(40), "=")


def test_sweep_reports_a_failed_run_and_bad_flags(tiny_run, tmp_path, capfd):
    d = tiny_run
    for flags, named in ((["--jobs", "0"], ["--jobs"]), ([], ["--epochs", "--mix"]), (["--lr", "0.001"], ["--lr"])):
        code, err = main_error(capfd, sweep.main, "--out_dir", tmp_path / "s", *flags, "--", *TINY, "--lr", "0.002")
        assert_error(code, err, *named)
    code, out, err = run_script("sweep.py", "--out_dir", tmp_path / "s", "--epochs", "-1", "--", *TINY,
                                "--real", d / "real", "--val", d / "val")
    assert_error(code, err, tmp_path / "s" / "epochs-1", alone=False)   # train.py's error (exit 2), its log above
    assert "epochs must be a number > 0, got -1.0" in err


def test_run_all_progress_and_resume(tiny_run, tmp_path):
    """run_all prints [k/N], the elapsed time since `started` (the demo's start, across its phases)
    and an ETA from this call's own pace; a second call finds every run finished."""
    import re
    import time
    d = tiny_run
    runs = {str(tmp_path / f"r{e}"): TINY + ["--real", str(d / "real"), "--val", str(d / "val"), "--epochs", str(e)]
            for e in (1, 2)}
    lines = []
    started = time.time() - 600   # as if an earlier phase had taken 10 minutes
    summaries = sweep.run_all(runs, jobs=2, threads=1, cost={k: 1 for k in runs}, later=2.0, log=lines.append,
                              started=started)
    assert lines[0].startswith("2 of 2 runs to do (0 already finished")
    progress = [re.fullmatch(r"  \[(\d)/2\] .*: val loss [\d.]+ \| elapsed ([\d.]+) min \| ETA ([\d.]+) min", line)
                for line in lines[1:]]
    assert all(progress) and [int(m[1]) for m in progress] == [1, 2]
    assert all(float(m[2]) >= 10.0 for m in progress)         # counted from `started`, not from this call
    assert all(float(m[3]) < 5.0 for m in progress)           # the ETA uses this call's pace only
    assert set(summaries) == set(runs) and all(s["steps"] > 0 for s in summaries.values())
    lines.clear()
    assert sweep.run_all(runs, jobs=2, log=lines.append) == summaries and lines[0].startswith("0 of 2 runs to do")
    # a folder that holds a finished run of other settings is not taken for this one
    other = {str(tmp_path / "r1"): runs[str(tmp_path / "r1")][:-1] + ["3"]}
    with pytest.raises(sweep.RunFailed) as e:
        sweep.run_all(other, jobs=1, log=lines.append)
    assert e.value.status == 2 and "epochs 1.0 -> 3.0" in e.value.last_lines


# ----------------------------------------------------------------------------- statistics over seeds

@pytest.mark.parametrize("df,q975", [(1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (9, 2.2622),
                                     (30, 2.0423), (1e6, 1.9600)])
def test_t_quantiles_match_the_table(df, q975):
    assert evaluate.t_quantile(0.975, df) == pytest.approx(q975, abs=1e-4)
    assert evaluate.t_quantile(0.025, df) == pytest.approx(-q975, abs=1e-4)


def test_intervals():
    mean, half = evaluate.mean_interval([1.0, 2.0, 3.0])
    assert (mean, half) == pytest.approx((2.0, 4.3027 * 1.0 / math.sqrt(3)), abs=1e-4)
    # paired: the differences 0.2, 0.25, 0.3 (the seeds' common offsets cancel)
    a, b = [5.1, 3.2, 4.3], [4.9, 2.95, 4.0]
    assert evaluate.paired_difference(a, b) == pytest.approx((0.25, 4.3027 * 0.05 / math.sqrt(3)), abs=1e-4)
    assert evaluate.resolved(*evaluate.paired_difference(a, b))
    # unpaired (Welch), the same numbers: the seeds' spread now counts, and the interval covers zero
    diff, half = evaluate.welch_difference(a, b)
    assert diff == pytest.approx(0.25) and half > 2 and not evaluate.resolved(diff, half)
    # Welch's degrees of freedom for equal variances and sizes are 2n - 2: the pooled t interval
    x, y = [1.0, 2.0, 3.0, 4.0], [2.0, 3.0, 4.0, 5.0]
    assert evaluate.welch_difference(x, y)[1] == pytest.approx(evaluate.t_quantile(0.975, 6) *
                                                               math.sqrt(2 * np.var(x, ddof=1) / 4), rel=1e-9)
    # a slope per seed: exactly 0.5 and 1.5 per unit of x, so mean 1.0 with the t interval of {0.5, 1.5}
    slope, half = evaluate.slope_interval([0, 1, 2], [[0, 0.5, 1.0], [3, 4.5, 6.0]])
    assert (slope, half) == pytest.approx((1.0, 12.7062 * math.sqrt(0.5) / math.sqrt(2)), abs=1e-4)
    assert evaluate.format_interval(-0.01234, 0.005) == "-0.0123 ± 0.0050"


def test_seed_bootstrap_resamples_seeds_jointly():
    # 3 seeds: all 27 resamples; resampling both inputs with the same indices keeps their pairing,
    # so a difference that is the same for every seed has a zero-width interval
    a, b = [1.0, 2.0, 6.0], [0.5, 1.5, 5.5]
    assert evaluate.seed_bootstrap(lambda x, y: x - y, a, b) == pytest.approx((0.5, 0.5))
    # the mean of one input: the 27 resampled means run from 1.0 (seed 0 three times) to 6.0; the
    # 2.5% and 97.5% quantiles fall between the two lowest (1.0, 4/3) and the two highest (14/3, 6.0)
    low, high = evaluate.seed_bootstrap(lambda x: x, a)
    assert 1.0 < low < 4 / 3 and 14 / 3 < high < 6.0
