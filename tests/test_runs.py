"""runs/: the replication as shell scripts, one per stage. Each is valid bash, and every flag it
passes to one of the project's scripts is a flag that script takes (a renamed flag breaks this)."""
import dataclasses
import glob
import os
import re
import subprocess

import pytest

from train import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "runs", "*.sh")))


def takes(script, flag):
    if script == "train.py":
        return flag in {f.name for f in dataclasses.fields(TrainConfig)} | {"config"}
    return f'"--{flag}"' in open(os.path.join(ROOT, script)).read()


def commands(path):
    """(script, flags) of every `python SCRIPT.py ...` command line (continuations joined); a
    sweep's flags after -- are train.py's."""
    text = open(path).read().replace("\\\n", " ")
    for script, rest in re.findall(r"python ((?:bench/)?\w+\.py)([^\n]*)", text):
        before, _, after = rest.partition(" -- ")
        yield script, re.findall(r"--(\w+)", before)
        if after:
            yield "train.py", re.findall(r"--(\w+)", after)


def test_there_is_a_script_per_stage():
    assert [os.path.basename(p) for p in SCRIPTS] == ["0_check.sh", "1_data.sh", "2_generate.sh", "3_pack.sh",
                                                      "4_train.sh", "5_sweep.sh", "6_evaluate.sh",
                                                      "7_self_distill.sh"]


@pytest.mark.parametrize("path", SCRIPTS, ids=os.path.basename)
def test_scripts_are_bash_and_pass_only_flags_the_scripts_take(path):
    assert subprocess.run(["bash", "-n", path]).returncode == 0
    assert os.access(path, os.X_OK)
    found = list(commands(path))
    assert found or os.path.basename(path) == "1_data.sh"
    for script, flags in found:
        assert os.path.exists(os.path.join(ROOT, script)), script
        assert [f for f in flags if not takes(script, f)] == [], (path, script)
    assert "cost" in open(path).read().split("set -euo")[0]   # its header says what it costs
