"""examples/generate.py: text through every head of a train_lm checkpoint or an exported directory, greedy and
seeded sampling, and the held-out per-word perplexity report (checkpoints trained as in test_export.py)."""
from __future__ import annotations

import math

import pytest
import torch

from ds_interlock.export import export_checkpoint
from test_export import EVAL_BATCHES, RUNS, SEQ_LEN, flags_for, get_runs, load_example

generate = load_example("generate")


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    return get_runs(tmp_path_factory)


def gen(runs, name: str, *extra: str) -> dict:
    args = ["--checkpoint", str(runs.checkpoint(name)), "--tokenizer", str(runs.tokenizer), "--device", "cpu"]
    if name == "llama":
        args += ["--seq_len", str(SEQ_LEN)]
    return generate.main(args + list(extra))


def new_ids(result: dict) -> list:
    return [[o["new_ids"] for o in h["outputs"]] for h in result["heads"]]


@pytest.mark.parametrize("name", ["gpt2_tied", "llama"])
def test_greedy_and_seeded_sampling_through_every_head(runs, name, capsys):
    S = RUNS[name][1]
    greedy = gen(runs, name, "--head", "all", "--prompt", "The company said", "--max_new_tokens", "8", "--ignore_eos")
    assert [h["head"] for h in greedy["heads"]] == list(range(S))
    assert [h["final"] for h in greedy["heads"]] == [False] * (S - 1) + [True]
    assert [h["layers"] for h in greedy["heads"]] == RUNS[name][2]
    for h in greedy["heads"]:
        (out,) = h["outputs"]
        assert out["new_tokens"] == 8 and out["text"].startswith("The company said") and h["tokens_per_s"] > 0
    printed = capsys.readouterr().out
    assert all(f"head {s} (" in printed for s in range(S)) and "output: The company said" in printed
    assert new_ids(gen(runs, name, "--head", "all", "--prompt", "The company said", "--max_new_tokens", "8",
                       "--ignore_eos")) == new_ids(greedy)
    # top_p this small keeps only the most likely token: greedy again
    assert new_ids(gen(runs, name, "--head", "all", "--prompt", "The company said", "--max_new_tokens", "8",
                       "--ignore_eos", "--temperature", "1", "--top_p", "1e-6")) == new_ids(greedy)

    def sample(seed: int) -> list:
        return new_ids(gen(runs, name, "--head", "all", "--prompt", "The company said", "--max_new_tokens", "8",
                           "--ignore_eos", "--temperature", "1.0", "--top_p", "0.95", "--seed", str(seed)))
    first = sample(1)
    assert sample(1) == first
    assert sample(2) != first


def test_cached_generation_equals_recomputing_the_whole_context(runs, tmp_path):
    ckpt = runs.checkpoint("llama")
    from ds_interlock.export import load_checkpoint
    model = load_checkpoint(ckpt, flags=flags_for("llama")).hf_model(1)
    ids = [2, 40, 41, 42]
    got = generate.generate_ids(model, ids, 10)
    seq = list(ids)
    with torch.no_grad():
        for _ in range(10):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    assert got == seq[len(ids):]


def test_exported_directory_generates_what_the_checkpoint_does(runs, tmp_path):
    ckpt = runs.checkpoint("gpt2")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The company said\n\nIn 1984 ,\n")
    for head in (0, 1):
        out = tmp_path / f"head{head}"
        export_checkpoint(ckpt, out, head=head, tokenizer=runs.tokenizer)
        from_dir = generate.main(["--model_dir", str(out), "--prompt_file", str(prompts), "--max_new_tokens", "6",
                                  "--device", "cpu"])
        (h,) = from_dir["heads"]
        assert h["head"] == head and h["final"] == (head == 1) and len(h["outputs"]) == 2
        assert new_ids(from_dir) == new_ids(gen(runs, "gpt2", "--head", str(head), "--prompt_file", str(prompts),
                                                "--max_new_tokens", "6"))
    with pytest.raises(SystemExit, match=r"--head 1: this model has heads \[0\]"):
        generate.main(["--model_dir", str(tmp_path / "head0"), "--head", "1"])
    with pytest.raises(SystemExit, match=r"--head 5: this model has heads \[0, 1\]"):
        gen(runs, "gpt2", "--head", "5")
    with pytest.raises(SystemExit, match="--num_layers 3, but the checkpoint has 4 decoder layers"):
        gen(runs, "gpt2", "--num_layers", "3")


def test_eval_reports_each_heads_word_perplexity_as_train_lm(runs, capsys):
    result = gen(runs, "llama", "--eval_data", runs.corpus, "--cache_dir", str(runs.cache_dir), "--eval_batches",
                 str(EVAL_BATCHES), "--max_new_tokens", "4")
    heads = result["heads"]
    assert [h["head"] for h in heads] == [0, 1, 2]       # every head by default when evaluating
    # train_lm evaluated the same held-out sequences (its first EVAL_BATCHES micro-batches of 8) at the end
    record = runs.eval_record("llama")
    for h in heads:
        assert h["eval_tokens"] == EVAL_BATCHES * 8 * SEQ_LEN
        assert h["eval_token_nll"] == pytest.approx(record["eval_stage_loss"][h["head"]], abs=1e-5)
        assert math.isfinite(h["eval_word_ppl"]) and h["eval_word_ppl"] > 1 and h["tokens_per_s"] > 0
    assert heads[-1]["eval_word_ppl"] == pytest.approx(record["eval_word_ppl"], rel=1e-4)
    printed = capsys.readouterr().out
    assert "word ppl" in printed and "gen tokens/s" in printed
    for h in heads:
        assert f"{h['eval_word_ppl']:.2f}" in printed
