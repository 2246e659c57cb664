"""train.py: exact mixing counts, schedule, weight-decay groups, resume (also after a crash that left
a partial log line), DDP, the code recorded in summary.json, --wandb_project (a resumed run continues
its wandb run), and one-line errors."""
import glob
import json
import os
import platform
import socket
import subprocess
import sys
from collections import Counter

import pytest
import torch

import numpy as np

import pack
from formats import DataError, TokenWriter
from support import assert_error
import train
from train import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "cpu-2x64", "--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--mlp_hidden", "64",
        "--block_size", "64", "--batch_size", "4", "--log_interval", "1", "--ckpt_interval", "100",
        "--eval_batch_size", "8"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Real sample documents packed with a small real vocabulary (GPT-2's first 512 ranks)."""
    d = tmp_path_factory.mktemp("data")
    lines = {name: open(os.path.join(ROOT, "sample_data", f"{name}.jsonl")).readlines() for name in ("train", "val")}
    (d / "train.jsonl").write_text("".join(lines["train"][:40]))
    (d / "val.jsonl").write_text("".join(lines["val"][:10]))
    quiet = lambda *a: None
    pack.pack(str(d / "train.jsonl"), str(d / "real"), tokenizer="gpt2:512", log=quiet)
    pack.pack(str(d / "val.jsonl"), str(d / "val"), tokenizer="gpt2:512", log=quiet)
    return d


def run_train(data, out, *extra):
    train.main(TINY + ["--real", str(data / "real"), "--val", str(data / "val"), "--out_dir", str(out), *extra])
    with open(out / "log.jsonl") as f:
        return [json.loads(l) for l in f]


class FakeFile:   # only its length matters to Windows
    def __init__(self, n):
        self.n, self.bin_path = n, "fake"

    def __len__(self):
        return self.n


def mixture(epochs=1.0, mix=0.0, batch_size=4, grad_accum=1, world_size=1, real_windows=12, syn_windows=10):
    cfg = TrainConfig(mix=mix, epochs=epochs, batch_size=batch_size, grad_accum=grad_accum, block_size=16)
    return train.Mixture(cfg, FakeFile(real_windows * 16 + 1), FakeFile(syn_windows * 16 + 1), world_size)


@pytest.mark.parametrize("epochs,mix,batch,expect_steps,expect_real,expect_syn", [
    (2, 0.0, 4, 6, 24, 0),      # 12 real windows, 4 real per batch
    (2, 0.5, 4, 12, 24, 24),    # m = 0.5 doubles the steps: 2 real + 2 synthetic per batch
    (1, 0.75, 4, 12, 12, 36),   # m = 0.75: 1 real + 3 synthetic, steps x 4
    (3, 0.75, 8, 18, 36, 108),
])
def test_exact_mixing_counts(epochs, mix, batch, expect_steps, expect_real, expect_syn):
    mix = mixture(epochs, mix, batch)   # 12 real windows, 10 synthetic ones
    assert mix.micro_steps == 1 and mix.steps == expect_steps
    seen_real, seen_syn = Counter(), Counter()
    for step in range(mix.steps):
        batch = mix.global_batch(step)
        assert [stream for stream, _ in batch] == [mix.syn] * mix.n_syn + [mix.real] * mix.n_real
        seen_real.update(w for stream, w in batch if stream is mix.real)
        seen_syn.update(w for stream, w in batch if stream is mix.syn)
    assert sum(seen_real.values()) == expect_real and sum(seen_syn.values()) == expect_syn
    assert seen_real == Counter({w: epochs for w in range(12)})      # every real window `epochs` times
    full, rest = divmod(expect_syn, 10)                               # the synthetic stream repeats
    expected = sorted([full + 1] * rest + [full] * (10 - rest)) if expect_syn else []
    assert sorted(seen_syn.values()) == expected


def test_window_order_reshuffled_each_pass_and_seeded():
    w = train.Windows(FakeFile(100 * 8 + 1), 8, seed=3, stream=0)
    assert sorted(w.pick(0, 100)) == list(range(100)) and w.pick(0, 100) != w.pick(100, 100)
    assert w.pick(0, 100) == train.Windows(FakeFile(801), 8, seed=3, stream=0).pick(0, 100)
    assert w.pick(0, 100) != train.Windows(FakeFile(801), 8, seed=4, stream=0).pick(0, 100)


def test_mix_must_give_whole_sequences():
    with pytest.raises(ValueError, match="mix 0.3"):
        mixture(mix=0.3)


def test_global_batch_is_the_same_on_any_number_of_processes():
    # a global batch of 8: 2 real + 6 synthetic, whatever the processes; they share the 4 micro-steps
    for world_size, micro_steps in ((1, 4), (2, 2), (4, 1)):
        mix = mixture(mix=0.75, batch_size=2, grad_accum=4, world_size=world_size)
        assert (mix.n_real, mix.n_syn, mix.micro_steps) == (2, 6, micro_steps)
    with pytest.raises(ValueError, match="grad_accum 4"):
        mixture(mix=0.75, batch_size=2, grad_accum=4, world_size=3)


def test_step_batch_is_the_global_batch_shared_by_processes_and_micro_steps(data):
    # each process builds its whole step at once: micro-step m of rank r is the slice of the global
    # batch at (m x world + r) x batch_size, so all of them together are the global batch, once
    from formats import TokenFile
    real = TokenFile(str(data / "real"))
    cfg = TrainConfig(mix=0.0, epochs=3.0, batch_size=2, grad_accum=4, block_size=16)
    for world in (1, 2, 4):
        mix = train.Mixture(cfg, real, None, world)
        for step in (0, 5):
            expected = np.stack([stream.window(w)[0] for stream, w in mix.global_batch(step)]).astype(np.int64)
            got = np.zeros_like(expected)
            for rank in range(world):
                tokens, groups = mix.step_batch(step, rank)
                assert tokens.shape == (4 // world, 2, 17) and groups.shape == (4 // world, 2, 16)
                for micro in range(4 // world):
                    lo = (micro * world + rank) * 2
                    got[lo: lo + 2] = tokens[micro]
            assert np.array_equal(got, expected)


class StepClock:
    """time.time for train.py: the first step of a run takes 10 s (as if it compiled), every later one 1 s."""
    def __init__(self):
        self.now, self.calls = 0.0, 0

    def time(self):
        self.calls += 1
        if self.calls % 2 == 0:   # train.py reads the clock twice a step: at its start and at its end
            self.now += 10.0 if self.calls == 2 else 1.0
        return self.now


def test_log_rate_is_timed_after_the_first_step_with_mfu_from_the_peak(data, tmp_path, monkeypatch):
    from evaluate import training_flops
    monkeypatch.setattr(train, "time", StepClock())
    log = run_train(data, tmp_path / "run", "--epochs", "1", "--peak_tflops", "2")
    summary = json.load(open(tmp_path / "run" / "summary.json"))
    tokens_per_step = 4 * 64
    rates = [(r["step"], r["tokens_per_s"], r["mfu"]) for r in log if "loss" in r]
    assert rates[0][:2] == (1, tokens_per_step / 10.0)                  # only the first step timed so far
    assert all(rate == tokens_per_step / 1.0 for step, rate, _ in rates[1:])   # from the second step on
    flops = training_flops(summary["model_config"], 1)
    assert all(mfu == pytest.approx(rate * flops / 2e12, rel=1e-12) for _, rate, mfu in rates)
    steps = summary["steps"]
    assert summary["tokens_per_s"] == pytest.approx(steps * tokens_per_step / (10.0 + steps - 1))   # everything
    monkeypatch.setattr(train, "time", StepClock())
    log = run_train(data, tmp_path / "cpu", "--epochs", "1")
    assert not any("mfu" in r for r in log)                              # no peak known on the CPU


def test_schedule_values():
    cfg = TrainConfig(lr=1e-3, warmup_frac=0.1, min_lr_frac=0.1)
    assert train.lr_at(0, 100, cfg) == pytest.approx(1e-4)         # warmup: 10 steps
    assert train.lr_at(9, 100, cfg) == pytest.approx(1e-3)
    assert train.lr_at(10, 100, cfg) == pytest.approx(1e-3)         # cosine starts at the peak
    assert train.lr_at(55, 100, cfg) == pytest.approx(0.55e-3)      # halfway: (peak + floor) / 2
    assert train.lr_at(100, 100, cfg) == pytest.approx(1e-4)        # the floor
    assert train.lr_at(99, 100, TrainConfig(lr=1e-3, warmup_frac=0.01)) < 1e-6


def test_weight_decay_groups():
    from model import GPT, GPTConfig
    model = GPT(GPTConfig.from_preset("cpu-2x64", n_layer=1))
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = train.param_groups(model, TrainConfig(weight_decay=1.6))
    assert decay["weight_decay"] == 1.6 and no_decay["weight_decay"] == 0.0
    decayed = sorted(names[id(p)] for p in decay["params"])
    assert "lm_head.weight" in decayed and "wte.weight" not in decayed
    assert all("norm" not in n for n in decayed) and len(decayed) == 8   # q, k, v, o, 3 MLP, head
    with_emb = train.param_groups(model, TrainConfig(decay_embedding=True))[0]
    assert "wte.weight" in {names[id(p)] for p in with_emb["params"]}


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
@pytest.mark.parametrize("keep", [False, True])
def test_keep_freed_memory_stops_the_page_faults_of_a_step(keep):
    # in a fresh process (mallopt's setting is the whole process's), a working set of four 16 MiB
    # tensors (16,384 pages) allocated and freed 20 times, as training steps do with activations.
    # Under glibc's initial thresholds (128 KiB, held fixed) every tensor is mapped and unmapped, so
    # its pages fault in every time; under keep_freed_memory they stay in the heap and fault in
    # during the first steps only
    setting = ("train.keep_freed_memory()" if keep else
               "[ctypes.CDLL('libc.so.6').mallopt(m, 128 << 10) for m in (train.M_MMAP_THRESHOLD, train.M_TRIM_THRESHOLD)]")
    code = ("import ctypes, resource, torch, train\n"
            f"print({setting})\n"
            "step = lambda: [torch.ones(4 << 20) for _ in range(4)]\n"
            "step()\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "for _ in range(20): step()\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    result, faults = out.stdout.split("\n")[:2]
    if keep:
        assert result == "True" and int(faults) < 2 * 16384, out.stdout
    else:
        assert result == "[1, 1]" and int(faults) >= 20 * 16384, out.stdout


def test_resume_is_bit_exact(data, tmp_path):
    full = run_train(data, tmp_path / "full", "--epochs", "2")
    steps = max(r["step"] for r in full)
    assert steps >= 6
    first = run_train(data, tmp_path / "cut", "--epochs", "2", "--halt_at", str(steps // 2))
    assert max(r["step"] for r in first if "loss" in r) == steps // 2
    resumed = run_train(data, tmp_path / "cut", "--epochs", "2")
    losses = lambda log: [(r["step"], r["loss"]) for r in log if "loss" in r]
    assert losses(resumed) == losses(full)                            # loss for loss, bit-exact
    a = torch.load(tmp_path / "full" / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    summary = json.load(open(tmp_path / "cut" / "summary.json"))
    assert summary["val_loss"] == json.load(open(tmp_path / "full" / "summary.json"))["val_loss"]
    # the code that ran: this checkout's commit, and whether its tracked files differ from it
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True)
    head, status = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    expected = {"commit": head.stdout.strip(), "modified": bool(status.stdout.strip())} if head.returncode == 0 \
        else {"commit": None, "modified": None}
    assert summary["code"] == expected and "code_of_earlier_segments" not in summary


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_matches_single_process(data, tmp_path):
    """The same command on 1 and on 2 processes: the same global batch (2 x 2 sequences), so the
    same losses and weights."""
    common = TINY + ["--real", str(data / "real"), "--val", str(data / "val"), "--epochs", "1",
                     "--batch_size", "2", "--grad_accum", "2"]
    single = run_train(data, tmp_path / "one", *common[len(TINY) + 4:])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(free_port()), os.path.join(ROOT, "train.py"), *common]
    subprocess.run(torchrun + ["--out_dir", str(tmp_path / "two")], check=True, env=env, cwd=ROOT,
                   capture_output=True, timeout=300)
    torchrun[torchrun.index("--master_port") + 1] = str(free_port())
    again = subprocess.run(torchrun + ["--out_dir", str(tmp_path / "two")], env=env, cwd=ROOT, capture_output=True,
                           text=True, timeout=300)   # finished: said so, without starting a process group
    assert again.returncode == 0 and "already finished" in again.stdout, again.stderr
    assert "destroy_process_group" not in again.stderr, again.stderr
    two = [json.loads(l) for l in open(tmp_path / "two" / "log.jsonl")]
    a = [r["loss"] for r in single if "loss" in r]
    b = [r["loss"] for r in two if "loss" in r]
    assert len(a) == len(b) >= 3
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5
    wa = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "two" / "ckpt.pt", weights_only=True)["model"]
    # summing gradients over processes rounds differently from one batch's mean; AdamW divides by
    # the gradients' running RMS, so after 50 steps the weights agree to ~1e-5, not to the last bit
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4
    # both processes evaluated half of the val batches each: the loss of weights that agree to ~1e-5
    val = [json.load(open(tmp_path / run / "summary.json"))["val_loss"] for run in ("one", "two")]
    assert val[0] == pytest.approx(val[1], abs=1e-4)
    # a global batch that 2 processes cannot share is refused, in one line
    torchrun[torchrun.index("--master_port") + 1] = str(free_port())
    odd = subprocess.run(torchrun + ["--grad_accum", "1", "--out_dir", str(tmp_path / "odd")], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    # one error line from each process that got that far (torchrun may stop the other one first)
    errors = [line for line in odd.stderr.splitlines() if line.startswith("error: ")]
    assert odd.returncode != 0 and errors and all("grad_accum 1" in line for line in errors), odd.stderr


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_finished_run_without_summary_finishes_or_says_it_is_done(data, tmp_path):
    full = run_train(data, tmp_path / "run", "--epochs", "1")
    summary = json.load(open(tmp_path / "run" / "summary.json"))
    os.remove(tmp_path / "run" / "summary.json")     # killed between the last checkpoint and the summary
    again = run_train(data, tmp_path / "run", "--epochs", "1")
    assert json.load(open(tmp_path / "run" / "summary.json"))["val_loss"] == summary["val_loss"]
    assert again == full                              # nothing was trained or logged twice
    done = run_cli(*TINY, "--real", str(data / "real"), "--val", str(data / "val"), "--epochs", "1",
                   "--out_dir", str(tmp_path / "run"))
    assert done.returncode == 0 and "already finished" in done.stdout


def main_error(capfd, *argv):
    """train.main(argv) run to its error: (exit code, stderr)."""
    capfd.readouterr()
    with pytest.raises(SystemExit) as e:
        train.main(TINY + list(argv))
    return e.value.code, capfd.readouterr().err


def test_resume_refuses_other_settings(data, tmp_path, capfd):
    run_train(data, tmp_path / "run", "--epochs", "2", "--halt_at", "3")
    for change, named in ((["--lr", "1e-3"], "lr 0.003 -> 0.001"), (["--epochs", "3"], "epochs 2.0 -> 3.0"),
                          (["--n_embd", "64"], "n_embd 32 -> 64"), (["--real", str(data / "val")], "real")):
        code, err = main_error(capfd, "--real", str(data / "real"), "--val", str(data / "val"), "--epochs", "2",
                               "--out_dir", str(tmp_path / "run"), *change)
        assert_error(code, err, tmp_path / "run" / "ckpt.pt", named)
    # evaluation files and intervals may change
    log = run_train(data, tmp_path / "run", "--epochs", "2", "--log_interval", "2")
    assert log[-1]["step"] == max(r["step"] for r in log)


def test_resume_after_a_crash_repairs_the_log(data, tmp_path):
    """Killed after logging steps the checkpoint does not hold, in the middle of a line (a full disk,
    a power cut): the resumed run cuts the partial line, drops the later steps, and its log is the
    uninterrupted run's, loss for loss."""
    full = run_train(data, tmp_path / "full", "--epochs", "2")
    run_train(data, tmp_path / "cut", "--epochs", "2", "--halt_at", "4")
    with open(tmp_path / "cut" / "log.jsonl", "a") as f:   # step 5 logged, no checkpoint, then the crash
        f.write(json.dumps({"step": 5, "loss": 9.0, "lr": 0.0, "tokens_per_s": 1.0}) + "\n" + '{"step": 6, "lo')
    resumed = run_train(data, tmp_path / "cut", "--epochs", "2")
    steps = [r["step"] for r in resumed if "loss" in r]
    assert steps == sorted(set(steps)) == [r["step"] for r in full if "loss" in r]
    assert [r["loss"] for r in resumed if "loss" in r] == [r["loss"] for r in full if "loss" in r]


@pytest.mark.parametrize("args,named", [
    (["--config", "nowhere.json"], ["--config nowhere.json"]),
    (["--config", "README"], ["--config README"]),
    (["--config", "CONFIG_WRONG_TYPE"], ["wrong.json", "lr"]),
    (["--epochs", "inf"], ["epochs"]),
    (["--block_size", "100000"], ["block_size 100000"]),
    (["--device", "cuda:7"], ["--device 'cuda:7'"]),
    (["--device", "tpu9"], ["--device 'tpu9'"]),
    (["--mix", "0.3", "--synthetic", "REAL"], ["mix 0.3"]),
    (["--compile", "Treu"], ["--compile", "Treu"]),
    (["--mask", "sliding"], ["mask", "sliding"]),
])
def test_one_line_errors(data, tmp_path, capfd, args, named):
    (tmp_path / "wrong.json").write_text(json.dumps({"lr": "fast"}))
    files = {"CONFIG_WRONG_TYPE": tmp_path / "wrong.json", "REAL": data / "real", "README": os.path.join(ROOT, "README.md")}
    args = [str(files.get(a, a)) for a in args]
    named = [n.replace("README", os.path.join(ROOT, "README.md")) for n in named]
    code, err = main_error(capfd, "--real", str(data / "real"), "--val", str(data / "val"), "--out_dir",
                           str(tmp_path / "o"), *args)
    assert_error(code, err, *named)
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.parametrize("change,named", [
    (dict(mix=1.0), "mix"),
    (dict(epochs=0), "epochs"),
    (dict(mask="sliding"), "mask"),
    (dict(mix=0.5), "--synthetic"),
    (dict(vocab_size=256), "vocab_size 256"),
    (dict(real="nowhere/real"), "nowhere/real.bin"),
    (dict(model="7B"), "7B"),
])
def test_bad_config_errors(data, change, named):
    cfg = dict(real=str(data / "real"), val=str(data / "val"), model="cpu-2x64")
    cfg.update(change)
    with pytest.raises((ValueError, DataError)) as e:
        train.setup(TrainConfig(**cfg))
    assert named in str(e.value)


def test_corrupt_token_file_error(data, tmp_path, capfd):
    for ext in ("bin", "idx", "json"):
        (tmp_path / f"real.{ext}").write_bytes((data / f"real.{ext}").read_bytes()[:-10] if ext == "bin"
                                               else (data / f"real.{ext}").read_bytes())
    assert_error(*main_error(capfd, "--real", str(tmp_path / "real"), "--val", str(data / "val")),
                 tmp_path / "real.bin")


def test_token_ids_outside_the_vocabulary(data, tmp_path, capfd):
    # a token file whose header says 513 ids but which holds id 600: refused when opened, naming the
    # file, before any run folder (log, checkpoint) is made
    with TokenWriter(str(tmp_path / "bad"), vocab_size=513, bos_id=512) as w:
        w.add(0, 0, [np.arange(300) % 512])
        w.add(0, 1, [np.array([3, 600, 5] * 40)])
    out = tmp_path / "run"
    assert_error(*main_error(capfd, "--real", str(tmp_path / "bad"), "--val", str(data / "val"), "--out_dir", str(out)),
                 tmp_path / "bad.bin", "600")
    assert not os.path.exists(out)


def test_corrupt_checkpoint_error(data, tmp_path, capfd):
    # a checkpoint that is no torch file: named, and no advice to load it with weights_only=False
    # (that would run whatever code the file holds)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "ckpt.pt").write_bytes(b"not a checkpoint")
    code, err = main_error(capfd, "--real", str(data / "real"), "--val", str(data / "val"),
                           "--out_dir", str(tmp_path / "run"))
    assert_error(code, err, tmp_path / "run" / "ckpt.pt")
    assert "weights_only" not in err


def wandb_runs(wandb_dir):
    """[(run id, [history record, ...]) for each offline run segment under wandb_dir, oldest first],
    read back from the .wandb files wandb writes: LevelDB-style log blocks of 32 KiB holding
    protobuf Records (header: CRC32, length, type; types 1 full, 2 first, 3 middle, 4 last)."""
    import struct
    from wandb.proto import wandb_internal_pb2 as pb
    runs = []
    for path in sorted(glob.glob(os.path.join(wandb_dir, "wandb", "offline-run-*", "run-*.wandb")), key=os.path.getmtime):
        data, pos, chunk, history, run_id = open(path, "rb").read(), 7, b"", [], None   # 7: the file header
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if left < 7 or (kind == 0 and length == 0):   # the padded end of a block
                pos += left
                continue
            chunk, pos = chunk + data[pos + 7:pos + 7 + length], pos + 7 + length
            if kind in (1, 4):
                record, chunk = pb.Record.FromString(chunk), b""
                if record.WhichOneof("record_type") == "run":
                    run_id = record.run.run_id
                elif record.WhichOneof("record_type") == "history":
                    items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item}
                    history.append({"step": items.pop("_step"), **{k: v for k, v in items.items() if k[0] != "_"}})
        runs.append((run_id, history))
    return runs


def test_wandb_mirrors_the_log_and_a_resumed_run_continues_it(data, tmp_path):
    pytest.importorskip("wandb", reason="wandb is not installed: --wandb_project is optional")
    env = dict(os.environ, WANDB_MODE="offline", WANDB_DIR=str(tmp_path), WANDB_SILENT="true", OMP_NUM_THREADS="1")
    args = [sys.executable, os.path.join(ROOT, "train.py"), *TINY, "--real", str(data / "real"), "--val",
            str(data / "val"), "--epochs", "2", "--out_dir", str(tmp_path / "run"), "--wandb_project", "nanosynth-test"]
    for extra in (["--halt_at", "3"], []):   # preempted at step 3, then resumed to the end
        r = subprocess.run(args + extra, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
    log = [json.loads(l) for l in open(tmp_path / "run" / "log.jsonl")]
    run_id = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["wandb_run_id"]
    runs = wandb_runs(tmp_path)
    assert [rid for rid, _ in runs] == [run_id, run_id]            # one run, continued after the restart
    assert [h["step"] for h in runs[0][1]] == [1, 2, 3]
    by_step = {}   # wandb keeps one row per step: a step's log line and its evaluation are one row
    for record in log:
        by_step.setdefault(record["step"], {}).update(record)
    assert runs[0][1] + runs[1][1] == list(by_step.values())      # every record of log.jsonl, value for value
    assert any("val_loss" in h for h in runs[1][1])


def test_wandb_project_without_wandb_is_a_one_line_error(data, tmp_path, monkeypatch, capfd):
    monkeypatch.setitem(sys.modules, "wandb", None)   # as if wandb were not installed
    assert_error(*main_error(capfd, "--real", str(data / "real"), "--val", str(data / "val"), "--out_dir",
                             str(tmp_path / "r"), "--wandb_project", "p"), "--wandb_project", "pip install wandb")
    assert not os.path.exists(tmp_path / "r")
