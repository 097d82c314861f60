"""The LM recipe's metrics file: appended with a run marker per launch, never truncated; a line cut
short by a kill blocks neither a resume nor a plot (examples/train_lm.py Metrics, plot_metrics.py)."""
import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def train_lm():
    return load_example("train_lm")


@pytest.fixture(scope="module")
def plot():
    return load_example("plot_metrics")


def train(step, loss=None):
    return {"step": step, "loss": 5.0 - 0.1 * step if loss is None else loss, "aux_losses": [6.0, 5.5], "lr": 1e-4,
            "tokens_per_s": 100.0}


def evaluation(step):
    return {"step": step, "eval_loss": 4.0, "eval_stage_loss": [5.0, 4.5, 4.0], "eval_word_ppl": 90.0}


def records_tail(path, n):
    with open(path) as f:
        return [json.loads(line) for line in f.read().splitlines()[-n:]]


def run(train_lm, path, resume_step, steps, argv=("--demo",), evals=()):
    m = train_lm.Metrics(str(path), 0, resume_step, argv=list(argv))
    for s in steps:
        m.write(train(s))
        if s in evals:
            m.write(evaluation(s))
    m.f.close()


def records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_fresh_run_appends_after_a_marker(train_lm, tmp_path):
    path = tmp_path / "m.jsonl"
    run(train_lm, path, 0, range(1, 21), evals=(10, 20))        # 1 marker + 20 + 2 = 23 lines
    assert len(records(path)) == 23
    run(train_lm, path, 0, [1], argv=["--seed", "2"])
    lines = records(path)
    assert len(lines) == 25, "the earlier run was truncated"
    marker = lines[23]
    assert marker["event"] == "run_start" and marker["resume_step"] == 0 and marker["argv"] == ["--seed", "2"]
    assert isinstance(marker["time"], str) and lines[24] == train(1)
    assert lines[:23] == [lines[0]] + [r for s in range(1, 21) for r in [train(s)] + ([evaluation(s)] if s in (10, 20) else [])]


def test_resume_drops_only_its_runs_records_beyond_the_checkpoint(train_lm, tmp_path):
    path = tmp_path / "m.jsonl"
    run(train_lm, path, 0, range(1, 9), evals=(4, 8))           # an earlier run, kept whole
    run(train_lm, path, 0, range(1, 7), evals=(3, 6))           # this run, checkpoint at 4
    run(train_lm, path, 4, range(5, 8), evals=(6,))
    lines = records(path)
    markers = [i for i, r in enumerate(lines) if r.get("event") == "run_start"]
    assert len(markers) == 3 and lines[markers[2]]["resume_step"] == 4
    first, second = lines[markers[0] + 1:markers[1]], lines[markers[1] + 1:]
    assert [r["step"] for r in first if "loss" in r] == list(range(1, 9))
    assert [r["step"] for r in second if "loss" in r] == [1, 2, 3, 4, 5, 6, 7]
    assert [r["step"] for r in second if "eval_loss" in r] == [3, 6]


def test_half_written_last_line_blocks_neither_resume_nor_plot(train_lm, plot, tmp_path, capsys):
    path = tmp_path / "m.jsonl"
    run(train_lm, path, 0, range(1, 6), evals=(5,))
    with open(path, "a") as f:
        f.write('{"step": 6, "loss": 4.')            # killed mid-write: no newline
    run(train_lm, path, 4, [5, 6, 7])                # resumed from step 4: no exception
    with open(path) as f:
        raw = f.read().splitlines()
    assert '{"step": 6, "loss": 4.' in raw             # kept on a line of its own, not glued to the next
    assert all(json.loads(line) for line in raw if line != '{"step": 6, "loss": 4.')
    t, e = plot.read_metrics(str(path))
    assert [r["step"] for r in t] == [1, 2, 3, 4, 5, 6, 7] and e == []
    assert "skipped 1 line(s) that are not JSON records" in capsys.readouterr().err
    # a fresh run on a file whose last line is cut also starts on a new line
    with open(path, "a") as f:
        f.write('{"step": 8, "lo')
    run(train_lm, path, 0, [1])
    assert records_tail(path, 2)[0]["event"] == "run_start"


def test_plot_uses_the_last_run_and_says_so(train_lm, plot, tmp_path, capsys):
    path = tmp_path / "runs.jsonl"
    with open(path, "w") as f:                     # a file from before run markers: its first run
        for s in range(1, 4):
            f.write(json.dumps(train(s, loss=9.0)) + "\n")
    run(train_lm, path, 0, range(1, 6), evals=(5,))
    t, e = plot.read_metrics(str(path))
    assert [r["loss"] for r in t] == [train(s)["loss"] for s in range(1, 6)] and [r["step"] for r in e] == [5]
    assert "2 runs (run_start records); plotting run 2" in capsys.readouterr().err
    t, _ = plot.read_metrics(str(path), run=0)
    assert [r["loss"] for r in t] == [9.0] * 3
    out = tmp_path / "plots"
    written = plot.main([str(path), "--out", str(out), "--run", "1"])
    assert len(written) == 2 and all(os.path.getsize(p) > 0 for p in written)
    with pytest.raises(SystemExit, match="holds 2 run"):
        plot.main([str(path), "--out", str(out), "--run", "3"])


def test_other_ranks_and_no_file_write_nothing(train_lm, tmp_path):
    path = tmp_path / "m.jsonl"
    train_lm.Metrics(str(path), 1, 0).write(train(1))
    train_lm.Metrics(None, 0, 0).write(train(1))
    assert not path.exists()
