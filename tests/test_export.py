"""ds_interlock.export: train_lm checkpoints (both layouts) to transformers models that compute what the
pipeline computes, through every head; tokenizer; clear errors for flags that do not fit.

The checkpoints are trained here by examples/train_lm.py's main() in this process (--single_process,
2 steps); the multi-process pipeline layout is written from the same tensors under DeepSpeed's file
names (PipelineModule.ckpt_layer_path, InterlockingPipelineModule._aux_ckpt_path), not launched.
"""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ds_interlock.export import ExportError, ModelFlags, export_checkpoint, load_checkpoint, main as export_main
from ds_interlock.launching import ROOT

CONFIG = os.path.join(ROOT, "ds_configs", "3wise.json")
SEQ_LEN, VOCAB = 32, 300
EVAL_BATCHES = 4   # train_lm's --eval_batches: the first 4 micro-batches of 8 held-out sequences
# name -> (train_lm flags, stages, decoder layers in front of each head)
RUNS = {
    "gpt2": (["--num_stages", "2"], 2, [2, 4]),
    "gpt2_tied": (["--num_stages", "2", "--tie_embeddings"], 2, [2, 4]),
    "llama": (["--arch", "llama", "--num_stages", "3"], 3, [2, 3, 4]),
    "gpt2_lowrank": (["--num_stages", "2", "--aux_head_rank", "8"], 2, [2, 4]),   # cheap aux heads, folded on export
}


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Runs:
    """Tiny train_lm runs on one small sample corpus, trained on first use (shared by the test files)."""

    def __init__(self, base: Path) -> None:
        from ds_interlock.data.sample import write_sample_corpus

        self.base = base
        self.corpus = str(write_sample_corpus(base / "corpus", num_train_shards=1, sentences_per_shard=2000))
        self.cache_dir = base / "cache"
        self.trained: dict = {}

    def checkpoint(self, name: str) -> Path:
        if name not in self.trained:
            save_dir = self.base / name
            load_example("train_lm").main([
                "--deepspeed_config", CONFIG, "--single_process", "--device", "cpu", "--data_dir", self.corpus,
                "--cache_dir", str(self.cache_dir), "--model", "tiny", "--vocab_size", str(VOCAB),
                "--seq_len", str(SEQ_LEN), "--max_steps", "2", "--save_dir", str(save_dir),
                "--eval_interval", "2", "--eval_batches", str(EVAL_BATCHES), "--metrics_file", str(self.metrics(name)),
                *RUNS[name][0]])
            self.trained[name] = save_dir
        return self.trained[name]

    def metrics(self, name: str) -> Path:
        return self.base / f"{name}.metrics.jsonl"

    def eval_record(self, name: str) -> dict:
        """train_lm's evaluation at the end of the run (the checkpoint's weights)."""
        self.checkpoint(name)
        with open(self.metrics(name)) as f:
            return [r for r in map(json.loads, f) if "eval_loss" in r][-1]

    @property
    def tokenizer(self) -> Path:
        self.checkpoint("gpt2")
        (path,) = glob.glob(str(self.cache_dir / "tokenizer" / "*.model"))
        return Path(path)

    def heldout_lines(self) -> list:
        (path,) = glob.glob(os.path.join(self.corpus, "heldout-*", "*"))
        with open(path, encoding="utf-8") as f:
            return f.read().splitlines()


_SHARED: dict = {}


def get_runs(tmp_path_factory) -> Runs:
    if "runs" not in _SHARED:
        _SHARED["runs"] = Runs(tmp_path_factory.mktemp("lm_runs"))
    return _SHARED["runs"]


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> Runs:
    return get_runs(tmp_path_factory)


def flags_for(name: str) -> ModelFlags:
    """The training run's flags (Llama's sequence length is not in its tensors)."""
    return ModelFlags(seq_len=SEQ_LEN) if name == "llama" else ModelFlags()


def pipeline_reference(name: str, save_dir: Path, ids: torch.Tensor, labels: torch.Tensor) -> tuple[list, list]:
    """Every head's logits from the checkpoint's own stage modules and heads (InProcessPipeline, reloaded
    as train_lm resumes), and the pipeline's eval losses of (ids, labels)."""
    from ds_interlock import InProcessPipeline
    from ds_interlock.models import build_lm

    train_flags, S, _ = RUNS[name]
    rank = int(train_flags[train_flags.index("--aux_head_rank") + 1]) if "--aux_head_rank" in train_flags else None
    parts = build_lm("tiny", arch="llama" if "llama" in train_flags else "gpt2", vocab_size=VOCAB, seq_len=SEQ_LEN,
                     tie_embeddings="--tie_embeddings" in train_flags, aux_head_rank=rank)
    pipe = InProcessPipeline(layers=parts.layers, num_stages=S, loss_fn=parts.loss_fn, aux_head=parts.aux_head,
                             partition_method=parts.partition_method, config=CONFIG, devices="cpu")
    path, _ = pipe.load_checkpoint(str(save_dir))
    assert path is not None
    pipe.model.eval()
    logits = []
    with torch.no_grad():
        x = ids
        for s in range(S):
            x = pipe.model.stages[s](x)
            logits.append(pipe.model.aux_heads[str(s)](x) if s < S - 1 else x)
    pipe.eval_batch(iter([(ids, labels)]), num_micro_batches=1)
    return logits, pipe.eval_stage_losses


def random_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (2, SEQ_LEN), generator=g), torch.randint(0, VOCAB, (2, SEQ_LEN), generator=g)


def hf_load(out: Path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()


@pytest.mark.parametrize("name", list(RUNS))
def test_export_matches_the_pipeline_through_every_head(runs, tmp_path, name):
    save_dir = runs.checkpoint(name)
    ids, labels = random_batch(seed=len(name))
    reference, eval_losses = pipeline_reference(name, save_dir, ids, labels)
    _, S, layers = RUNS[name]
    for head in range(S):
        result = export_checkpoint(save_dir, tmp_path / f"head{head}", flags=flags_for(name), head=head)
        model = hf_load(result.out_dir)
        assert type(model).__name__ == ("LlamaForCausalLM" if name == "llama" else "GPT2LMHeadModel")
        assert model.config.num_hidden_layers == layers[head] == result.num_layers
        with torch.no_grad():
            logits = model(ids).logits
        err = (logits - reference[head]).abs().max().item()
        assert err < 1e-5, f"{name} head {head}: max |logit diff| {err:.2e}"
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten()).item()
        assert loss == pytest.approx(eval_losses[head], abs=1e-5)
        final = head == S - 1
        tied = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
        assert tied == (final and name == "gpt2_tied") == result.tied   # aux heads own their projection
        assert (result.out_dir / "model.safetensors").is_file()


def test_tokenizer_and_model_load_with_auto_classes(runs, tmp_path):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    out = tmp_path / "hf"
    export_checkpoint(runs.checkpoint("gpt2_tied"), out, tokenizer=runs.tokenizer)
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    sp = spm.SentencePieceProcessor(model_file=str(runs.tokenizer))
    assert len(tok) == sp.get_piece_size() == VOCAB and tok.eos_token_id == sp.eos_id()
    lines = runs.heldout_lines()[:200] + ["  two  spaces ", "Ünïcödé ﬁ", "tab\there", ""]
    for line in lines:
        ids = sp.encode(line)
        assert tok.encode(line, add_special_tokens=False) == ids, line
        if sp.unk_id() not in ids:
            assert tok.decode(ids) == sp.decode(ids)
    model = hf_load(out)
    assert model.config.eos_token_id == sp.eos_id() and model.config.tie_word_embeddings
    # nothing of ds_interlock is needed to load and run it
    ids = torch.tensor([tok.encode("The company said", add_special_tokens=False)])
    with torch.no_grad():
        expected = model(ids).logits
    torch.save({"ids": ids, "logits": expected}, tmp_path / "expected.pt")
    code = (
        "import sys; sys.modules['ds_interlock'] = None\n"
        "import torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"out, ref = {str(out)!r}, torch.load({str(tmp_path / 'expected.pt')!r})\n"
        "tok = AutoTokenizer.from_pretrained(out, local_files_only=True)\n"
        "model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()\n"
        "ids = torch.tensor([tok.encode('The company said', add_special_tokens=False)])\n"
        "assert torch.equal(ids, ref['ids'])\n"
        "with torch.no_grad():\n"
        "    assert (model(ids).logits - ref['logits']).abs().max() < 1e-6\n"
        "print('standalone ok')\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "standalone ok" in proc.stdout, proc.stderr[-3000:]


def write_pipeline_layout(single_dir: Path, out: Path) -> Path:
    """The checkpoint a multi-process launch of the same run writes: DeepSpeed's layer_XX-model_states.pt
    per layer holding a state dict (a tied projection, run through forward_fn, has none: DeepSpeed saves
    the tied module once, from its first owner), aux_head_XX-model_states.pt per stage head, and an
    engine file without the module."""
    tag = (single_dir / "latest").read_text().strip()
    module = torch.load(single_dir / tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    files: dict = {}
    for key, value in module.items():
        m = re.match(r"stages\.(\d+)\.(\d+|tied_modules\.embed)\.(.+)$", key)
        h = re.match(r"aux_heads\.(\d+)\.(.+)$", key)
        if m and m.group(2) == "tied_modules.embed":
            if m.group(1) == "0":          # the embedding layer owns it; the last stage's copy is not saved
                files.setdefault("layer_00-model_states.pt", {})[m.group(3)] = value.clone()
        elif m:
            files.setdefault(f"layer_{int(m.group(2)):02d}-model_states.pt", {})[m.group(3)] = value.clone()
        else:
            files.setdefault(f"aux_head_{int(h.group(1)):02d}-model_states.pt", {})[h.group(2)] = value.clone()
    (out / tag).mkdir(parents=True)
    for fname, state in files.items():
        torch.save(state, out / tag / fname)
    torch.save({"module": None, "global_steps": 2}, out / tag / "mp_rank_00_model_states.pt")
    (out / "latest").write_text(tag)
    return out / tag


@pytest.mark.parametrize("name", ["gpt2_tied", "llama"])
def test_pipeline_layout_exports_the_same_model(runs, tmp_path, name):
    from safetensors.torch import load_file

    single = runs.checkpoint(name)
    tag_dir = write_pipeline_layout(single, tmp_path / "pipe")
    layer_files = sorted(p.name for p in tag_dir.glob("layer_*"))
    # gpt2_tied: embedding, positions, 4 decoders, norm (the tied projection has no file); llama: no
    # positions, but its own projection
    assert layer_files == [f"layer_{i:02d}-model_states.pt" for i in range(7)], layer_files
    ckpt = load_checkpoint(tmp_path / "pipe", flags=flags_for(name))
    assert ckpt.raw.layout == "pipeline" and ckpt.num_stages == RUNS[name][1]
    assert load_checkpoint(single, flags=flags_for(name)).parts == ckpt.parts
    for head in range(ckpt.num_stages):
        a = export_checkpoint(single, tmp_path / f"a{head}", flags=flags_for(name), head=head)
        b = export_checkpoint(tmp_path / "pipe", tmp_path / f"b{head}", flags=flags_for(name), head=head)
        wa, wb = load_file(a.out_dir / "model.safetensors"), load_file(b.out_dir / "model.safetensors")
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_cli_and_mismatched_flags(runs, tmp_path, capsys):
    ckpt = runs.checkpoint("gpt2")
    tag_dir = str(ckpt / "global_step2")
    out = tmp_path / "out"
    result = export_main(["--checkpoint", str(ckpt), "--out", str(out), "--model", "tiny", "--arch", "gpt2",
                          "--num_layers", "4", "--vocab_size", str(VOCAB), "--seq_len", str(SEQ_LEN), "--num_stages",
                          "2", "--head", "0", "--tokenizer", str(runs.tokenizer)])
    assert result.head == 0 and result.num_layers == 2 and result.tokenizer
    assert "exported aux head 0 of 2 as GPT2LMHeadModel" in capsys.readouterr().out
    for flags, expected in [
        (["--num_layers", "3"], "--num_layers 3, but the checkpoint has 4 decoder layers"),
        (["--arch", "llama"], "--arch llama, but the checkpoint has a gpt2 model"),
        (["--num_stages", "4"], "--num_stages 4, but the checkpoint has 2 stages"),
        (["--model", "small"], "--model small has d_model 256, but the checkpoint's is 64"),
        (["--tie_embeddings"], "--tie_embeddings is on, but the checkpoint's output projection is a separate layer"),
        (["--seq_len", "64"], "--seq_len 64, but the checkpoint has 32 positions"),
        (["--vocab_size", "200"], "--vocab_size 200, but the checkpoint's vocabulary has 300 entries"),
    ]:
        with pytest.raises(SystemExit) as info:
            export_main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "bad"), *flags])
        message = str(info.value)
        assert expected in message and tag_dir in message and "flags of the training run" in message, message
    assert not (tmp_path / "bad").exists()
    with pytest.raises(SystemExit, match=r"head 2 out of range: this checkpoint has heads 0\.\.1"):
        export_main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "bad"), "--head", "2"])
    with pytest.raises(SystemExit, match="no 'latest' file; pass --tag"):
        export_main(["--checkpoint", str(tmp_path), "--out", str(tmp_path / "bad")])
    other = tmp_path / "other.model"
    other.write_bytes(b"not a sentencepiece model")
    with pytest.raises(SystemExit, match="not a sentencepiece model"):
        export_main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "bad"), "--tokenizer", str(other)])


def test_shapes_that_do_not_fit_name_the_file(runs, tmp_path):
    tag_dir = write_pipeline_layout(runs.checkpoint("gpt2"), tmp_path / "pipe")
    bad = tag_dir / "layer_03-model_states.pt"
    state = torch.load(bad)
    state["block.attn.c_attn.weight"] = state["block.attn.c_attn.weight"][:, :96].clone()
    torch.save(state, bad)
    with pytest.raises(ExportError) as info:
        export_checkpoint(tmp_path / "pipe", tmp_path / "out")
    message = str(info.value)
    assert str(bad) in message and "block.attn.c_attn.weight: checkpoint (64, 96), model (64, 192)" in message, message
    bad.unlink()
    with pytest.raises(ExportError, match=r"pipeline layers \[3\] missing"):
        export_checkpoint(tmp_path / "pipe", tmp_path / "out")
