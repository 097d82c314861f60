"""examples/train_lm.py end to end (a real 4-process launch, and the same job in one process,
resumed) and examples/plot_metrics.py."""
import contextlib
import importlib.util
import io
import json
import math
import os

import pytest

from launch import ROOT, deepspeed_launch

SCRIPT = os.path.join(ROOT, "examples", "train_lm.py")
CONFIG = os.path.join(ROOT, "ds_configs", "3wise.json")
S = 4


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def train_lines(lines):
    return [r for r in lines if "loss" in r]


def eval_lines(lines):
    return [r for r in lines if "eval_loss" in r]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from ds_interlock.data.sample import write_sample_corpus
    root = tmp_path_factory.mktemp("corpus")
    return str(write_sample_corpus(root, num_train_shards=1, sentences_per_shard=2000))


def job_args(tmp_path, corpus, max_steps, save_dir, metrics):
    return ["--deepspeed_config", CONFIG, "--data_dir", corpus, "--cache_dir", str(tmp_path / "cache"),
            "--num_stages", str(S), "--model", "tiny", "--vocab_size", "300", "--seq_len", "32",
            "--max_steps", str(max_steps), "--eval_interval", "3", "--eval_batches", "4",
            "--save_dir", str(save_dir), "--save_interval", "2", "--metrics_file", str(metrics)]


def launch(tmp_path, corpus, max_steps, save_dir, metrics):
    code, log = deepspeed_launch(S, SCRIPT, job_args(tmp_path, corpus, max_steps, save_dir, metrics), timeout=300)
    assert code == 0, log[-6000:]
    return log


def test_train_resume_and_metrics(tmp_path, corpus):
    save_dir, metrics = tmp_path / "ckpt", tmp_path / "metrics.jsonl"
    log = launch(tmp_path, corpus, 5, save_dir, metrics)
    assert "data: raw corpus at" in log and "skipped=0" in log   # rank 0 printed data.summary()

    first = read_lines(metrics)
    train, evals = train_lines(first), eval_lines(first)
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5]
    for r in train:
        assert set(r) >= {"step", "loss", "aux_losses", "lr", "tokens_per_s"}
        assert len(r["aux_losses"]) == S - 1
        assert all(math.isfinite(v) for v in [r["loss"], *r["aux_losses"]])
        assert r["lr"] > 0 and r["tokens_per_s"] > 0
    assert [r["step"] for r in evals] == [3, 5]
    for r in evals:
        assert set(r) >= {"step", "eval_loss", "eval_stage_loss", "eval_word_ppl"}
        assert len(r["eval_stage_loss"]) == S
        assert r["eval_stage_loss"][-1] == pytest.approx(r["eval_loss"])
        assert all(math.isfinite(v) for v in r["eval_stage_loss"])
        assert r["eval_word_ppl"] > 1
    assert (save_dir / "latest").read_text().strip() == "global_step5"
    assert (save_dir / "global_step2").is_dir() and (save_dir / "global_step4").is_dir()
    assert len(list((save_dir / "global_step4").glob("aux_head_0*"))) == S - 1, "aux heads missing from the checkpoint"

    # The same job in one plain process gives the same numbers (every stage, one device)
    single = tmp_path / "single.jsonl"
    train_lm = load_example("train_lm")
    train_lm.main(job_args(tmp_path, corpus, 5, tmp_path / "single_ckpt", single) + ["--single_process"])
    one = read_lines(single)
    for a, b in zip(train_lines(one), train):
        assert a["step"] == b["step"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["aux_losses"] == pytest.approx(b["aux_losses"], rel=1e-4)
    assert [r["eval_stage_loss"] for r in eval_lines(one)] == [pytest.approx(r["eval_stage_loss"], rel=1e-4)
                                                               for r in evals]
    # Resume from step 2 (not the latest) with a larger budget: steps 3-5 must repeat the
    # first run exactly (same data, optimizer and schedule state), then 6 follows. Done in one
    # process here; resuming a pipeline checkpoint in new processes is test_engine.py's.
    single_ckpt = tmp_path / "single_ckpt"
    assert (single_ckpt / "latest").read_text().strip() == "global_step5"
    (single_ckpt / "latest").write_text("global_step2")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        train_lm.main(job_args(tmp_path, corpus, 6, single_ckpt, single) + ["--single_process"])
    assert "resumed from" in out.getvalue() and "at step 2" in out.getvalue()
    second = read_lines(single)
    train2 = train_lines(second)
    assert [r["step"] for r in train2] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in eval_lines(second)] == [3, 6]
    for a, b in zip(train_lines(one)[2:5], train2[2:5]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
        assert b["aux_losses"] == pytest.approx(a["aux_losses"], rel=1e-6)
        assert b["lr"] == pytest.approx(a["lr"])
    assert eval_lines(second)[0]["eval_loss"] == pytest.approx(eval_lines(one)[0]["eval_loss"], rel=1e-6)
    assert (single_ckpt / "latest").read_text().strip() == "global_step6"
    # a checkpoint of the other kind is refused with its path, not a DeepSpeed traceback
    with pytest.raises(SystemExit, match="written by a multi-process pipeline launch"):
        train_lm.main(job_args(tmp_path, corpus, 6, save_dir, single) + ["--single_process"])


def test_missing_data_dir_names_the_path(tmp_path, capsys):
    train_lm = load_example("train_lm")
    missing = str(tmp_path / "no_such_corpus")
    with pytest.raises(SystemExit) as exc:
        train_lm.parse_args(["--deepspeed_config", CONFIG, "--data_dir", missing])
    assert exc.value.code != 0
    assert missing in capsys.readouterr().err


def test_configs_differ_only_in_interlocking():
    blocks = {}
    base = None
    for k in ("local", "pairwise", "3wise", "global"):
        with open(os.path.join(ROOT, "ds_configs", f"{k}.json")) as f:
            cfg = json.load(f)
        blocks[k] = cfg.pop("interlocking")
        assert base is None or cfg == base
        base = cfg
        # "sum" where it matters (the quality study: "furthest" is far worse for pairwise and 3-wise);
        # local's combine is the same math, and global must stay "furthest" (plain backprop)
        assert blocks[k]["k"] == k and blocks[k]["combine"] == ("sum" if k in ("pairwise", "3wise") else "furthest")
    assert base["optimizer"]["params"]["betas"] == [0.9, 0.98]
    assert base["scheduler"]["params"]["warmup_num_steps"] == 4000


def test_warmup_keeps_peak_rate():
    train_lm = load_example("train_lm")
    from ds_interlock.lr_schedules import inverse_sqrt_lr
    cfg = {"scheduler": {"type": "InverseSqrtWarmup", "params": {"warmup_num_steps": 4000}}}
    train_lm.set_warmup(cfg, "auto", 300)
    p = cfg["scheduler"]["params"]
    assert p["warmup_num_steps"] == 30
    peak = inverse_sqrt_lr(30, p["warmup_num_steps"], p["d_model"], p["scale"])
    assert peak == pytest.approx(inverse_sqrt_lr(4000))
    cfg = {"scheduler": {"type": "InverseSqrtWarmup", "params": {"warmup_num_steps": 4000}}}
    train_lm.set_warmup(cfg, "auto", 10 ** 6, peak_lr=1e-3)   # a long run keeps the paper's warm-up
    p = cfg["scheduler"]["params"]
    assert p["warmup_num_steps"] == 4000
    assert inverse_sqrt_lr(4000, 4000, p["d_model"], p["scale"]) == pytest.approx(1e-3)


def synthetic_metrics(path, steps, S, drop):
    with open(path, "w") as f:
        for step in range(1, steps + 1):
            loss = 8.0 - drop * math.log(step)
            f.write(json.dumps({"step": step, "loss": loss, "aux_losses": [loss + 0.1 * (S - 1 - s) for s in range(S - 1)],
                                "lr": 1e-4, "tokens_per_s": 1000.0}) + "\n")
            if step % 5 == 0:
                f.write(json.dumps({"step": step, "eval_loss": loss, "eval_stage_loss": [loss + 0.1] * (S - 1) + [loss],
                                    "eval_word_ppl": math.exp(1.5 * loss)}) + "\n")


def test_plot_metrics(tmp_path):
    plot = load_example("plot_metrics")
    files = []
    for name, drop in (("local", 0.2), ("3wise", 0.4)):
        files.append(str(tmp_path / f"{name}.jsonl"))
        synthetic_metrics(files[-1], 20, 4, drop)
    out = tmp_path / "plots"
    written = plot.main(files + ["--out", str(out)])
    names = sorted(os.path.basename(p) for p in written)
    assert names == ["lm_compare.png", "lm_stage_losses_3wise.png", "lm_stage_losses_local.png"]
    for p in written:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="no CUDA device")
def test_single_process_on_a_gpu_in_bf16(tmp_path, corpus):
    """The recipe on one GPU (bf16, every stage on it): it learns, its first loss matches the CPU
    float32 job within bf16 rounding, and a resume on the GPU repeats the steps it replays."""
    train_lm = load_example("train_lm")
    cpu, gpu = tmp_path / "cpu.jsonl", tmp_path / "gpu.jsonl"
    train_lm.main(job_args(tmp_path, corpus, 1, tmp_path / "cpu_ckpt", cpu) + ["--single_process", "--device", "cpu"])
    gpu_args = job_args(tmp_path, corpus, 12, tmp_path / "gpu_ckpt", gpu) + ["--single_process", "--device", "cuda",
                                                                             "--bf16", "on"]
    train_lm.main(gpu_args)
    first, one = train_lines(read_lines(gpu)), train_lines(read_lines(cpu))
    assert [r["step"] for r in first] == list(range(1, 13))
    assert first[0]["loss"] == pytest.approx(one[0]["loss"], rel=3e-2)
    assert first[0]["aux_losses"] == pytest.approx(one[0]["aux_losses"], rel=3e-2)
    assert first[-1]["loss"] < first[0]["loss"] - 0.1, "no learning on the GPU"
    assert all(math.isfinite(r["eval_loss"]) for r in eval_lines(read_lines(gpu)))
    (tmp_path / "gpu_ckpt" / "latest").write_text("global_step10")
    train_lm.main(gpu_args)
    again = train_lines(read_lines(gpu))
    for a, b in zip(first[10:12], again[10:12]):
        assert b["step"] == a["step"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-2)


def test_bf16_auto_follows_the_device(monkeypatch):
    """On a GPU machine, --bf16 auto is on for the GPU and off for a --device cpu job (DeepSpeed's bf16
    optimizer would put its copies on the GPU and fail)."""
    import torch
    train_lm = load_example("train_lm")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert train_lm.bf16_wanted("auto", "auto") and train_lm.bf16_wanted("auto", "cuda:0")
    assert not train_lm.bf16_wanted("auto", "cpu")
    assert train_lm.bf16_wanted("on", "cpu") and not train_lm.bf16_wanted("off", "cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not train_lm.bf16_wanted("auto", "auto")
