"""The README's migration example: before.py (stock DeepSpeed) and after.py (ds_interlock) are
complete jobs that run, differ only in the lines the README shows, and the README lists after.py
as it is."""
import difflib
import os
import re

import pytest

from ds_interlock.launching import ROOT, deepspeed_launch

HERE = os.path.join(ROOT, "examples", "migration")


def read(name):
    with open(os.path.join(HERE, name)) as f:
        return f.read()


def code_lines(text):
    body = text.split('"""', 2)[2]          # the docstring says which file it is
    return [line for line in body.splitlines() if line.strip()]


def test_readme_shows_the_whole_job_and_the_real_diff():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    assert read("after.py") in readme
    changed = [d for d in difflib.unified_diff(code_lines(read("before.py")), code_lines(read("after.py")), lineterm="")
               if d[:1] in "+-" and not d.startswith(("+++", "---"))]
    diff_block = re.search(r"```diff\n(.*?)```", readme, re.S).group(1)
    shown = [line for line in diff_block.splitlines() if line[:1] in "+-"]
    assert sorted(changed) == sorted(shown)
    assert len([c for c in changed if c.startswith("+")]) == 6


@pytest.mark.parametrize("script,expect", [
    ("after.py", "ds_interlock: 3 stages, k=2 (pairwise), combine=furthest, schedule=interlocked, "
                 "aux heads on stages 0-1"),
    ("before.py", None)])
def test_example_job_runs(script, expect):
    code, log = deepspeed_launch(3, os.path.join(HERE, script),
                                 ["--deepspeed_config", os.path.join(HERE, "ds_config.json"), "--steps", "20"])
    assert code == 0, log[-4000:]
    losses = [float(m) for m in re.findall(r"steps: \d+ loss: ([\d.]+)", log)]
    if expect:
        assert expect in log
        stage = re.findall(r"stage_losses: \[([\d. ]+)\]", log)
        assert len(stage) == 2 and all(len(s.split()) == 3 for s in stage)
    else:   # DeepSpeed's own log line
        losses = [float(m) for m in re.findall(r"steps: \d+ loss: ([\d.]+)", log)] or \
            [float(m) for m in re.findall(r"loss: ([\d.]+)", log)]
    assert len(losses) >= 2 and losses[-1] < losses[0], log[-3000:]
