"""bench/gpu_check.py at tiny shapes on the CPU (--cpu): every stage of the GPU check runs and passes,
one line each, and its JSON report holds their figures."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.py")
STAGES = ["env", "train", "masks", "large_ce", "sampling", "torchrun", "step_150M", "step_300M"]


def test_every_stage_passes_on_the_cpu(tmp_path):
    r = subprocess.run([sys.executable, SCRIPT, "--cpu", "--work_dir", str(tmp_path)], capture_output=True, text=True,
                       cwd=ROOT, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert [line.split()[:2] for line in lines[1:-1]] == [[name, "ok"] for name in STAGES]
    assert lines[-1].endswith("every stage ok")
    report = json.load(open(tmp_path / "gpu_check.json"))
    stages = report["stages"]
    assert report["device"] == "cpu" and list(stages) == STAGES and all(s["status"] == "ok" for s in stages.values())
    assert stages["env"]["compile"] == "ok"
    assert stages["train"]["loss_step_10"] < stages["train"]["loss_step_1"]      # 10 steps on one batch's windows
    assert sorted(stages["masks"]) == ["causal", "document", "megadoc", "seconds", "status"]
    assert stages["large_ce"]["loss"] == pytest.approx(stages["large_ce"]["reference"], rel=1e-6)
    for name in ("step_150M", "step_300M"):
        assert stages[name]["tokens_per_s"] > 0 and stages[name]["estimated_peak_memory_gib"] > 0
        assert stages[name]["mfu"] is None                                       # no peak known on the CPU
    assert stages["sampling"]["cached_equals_recomputed"] is True
    assert stages["torchrun"]["backend"] == "gloo" and stages["torchrun"]["steps"] == 4


def test_stages_past_the_budget_are_skipped_and_fail_the_check(tmp_path, capsys):
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import gpu_check
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--cpu", "--work_dir", str(tmp_path), "--stages", "env", "--budget_s", "0"])
    assert e.value.code == 1
    out = capsys.readouterr().out.splitlines()
    assert out[1].split()[:2] == ["env", "skipped"] and out[-1].endswith("not ok: env")
    assert json.load(open(tmp_path / "gpu_check.json"))["stages"]["env"]["status"] == "skipped"
