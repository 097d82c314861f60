"""Generate text with a model trained by examples/train_lm.py, through any of its heads.

    # from a train_lm checkpoint (either layout), every head, greedy:
    python examples/generate.py --checkpoint runs/ckpt --tokenizer <cache_dir>/tokenizer/spm-....model \\
        --prompt "The company said" --head all
    # sampling, from a directory written by `python -m ds_interlock.export`:
    python examples/generate.py --model_dir runs/hf_model --prompt_file prompts.txt \\
        --temperature 0.8 --top_p 0.9 --seed 1 --max_new_tokens 40
    # each head's held-out per-word perplexity and generation speed:
    python examples/generate.py --checkpoint runs/ckpt --eval_data /data/1b --vocab_size 32000

Heads: a checkpoint of S stages has heads 0..S-1; head S-1 is the final one, head s < S-1 is the
LM made of stages 0..s and aux head s (what `ds_interlock.export --head s` writes). An exported
directory holds the one head it was exported with.

Model flags (--model, --arch, --num_layers, --vocab_size, --seq_len, --tie_embeddings,
--num_stages) are train_lm's and must match the training run; left out, they are read from the
checkpoint (see ds_interlock/export.py). Pass --seq_len for Llama models trained with a sequence
length other than the preset's: the checkpoint cannot tell it.

Prompts: --prompt, or --prompt_file with one prompt per line. train_lm's token stream separates
sentences with </s> and has no <s>, so every prompt is preceded by </s> (a sentence start), and
generation stops at the next </s> unless --ignore_eos. The context is the model's sequence
length: a longer prompt keeps its last tokens, and --max_new_tokens is cut to fit.

--eval_data DIR (train_lm's --data_dir; 'sample' = the synthetic corpus train_lm uses without
one) with --cache_dir and the run's --vocab_size prepares the held-out shard as train_lm does
and reports per head the mean token NLL and the per-word perplexity
exp(NLL * tokens/word) (data.word_perplexity, as train_lm's evaluation), and tokens/s of the
generation.
"""

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:   # run as a script from a checkout
    sys.path.insert(0, ROOT)


def build_parser() -> argparse.ArgumentParser:
    from ds_interlock.export import add_model_flags

    p = argparse.ArgumentParser(description="Generate text from a train_lm checkpoint or an exported model.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="train_lm's --save_dir (or one tag directory in it)")
    src.add_argument("--model_dir", help="a directory written by `python -m ds_interlock.export`")
    p.add_argument("--tag", default=None, help="--checkpoint: tag to load; default its 'latest'")
    p.add_argument("--tokenizer", default=None,
                   help="train_lm's sentencepiece .model; default: the --model_dir's tokenizer, or --eval_data's")
    p.add_argument("--head", default=None,
                   help="'all', 'final', or head numbers (comma-separated; -1 = final); default: final, or all "
                        "with --eval_data")
    g = p.add_argument_group("generation")
    g.add_argument("--prompt", default=None, help="prompt text")
    g.add_argument("--prompt_file", default=None, help="one prompt per line")
    g.add_argument("--max_new_tokens", type=int, default=40)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    g.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling: keep the smallest set of tokens "
                                                            "with this much probability")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (each head and prompt starts from it)")
    g.add_argument("--ignore_eos", action="store_true", help="go on past the end of a sentence")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1; auto = cuda when available")
    e = p.add_argument_group("evaluation")
    e.add_argument("--eval_data", default=None,
                   help="train_lm's --data_dir ('sample' = its synthetic corpus): report each head's held-out "
                        "per-word perplexity")
    e.add_argument("--cache_dir", default=None, help="train_lm's --cache_dir (default: ds_interlock's cache)")
    e.add_argument("--eval_batches", type=int, default=None, help="evaluate this many batches (default: all)")
    e.add_argument("--eval_batch_size", type=int, default=8)
    add_model_flags(p)
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.prompt is not None and args.prompt_file is not None:
        parser.error("give --prompt or --prompt_file, not both")
    if args.max_new_tokens < 1 or args.eval_batch_size < 1 or (args.eval_batches is not None and args.eval_batches < 1):
        parser.error("--max_new_tokens, --eval_batch_size and --eval_batches must be >= 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        parser.error("--temperature must be >= 0 and --top_p in (0, 1]")
    if args.model_dir is not None:
        given = [n for n in ("tag", "model", "arch", "num_layers", "seq_len", "tie_embeddings", "num_stages")
                 if getattr(args, n) is not None]
        if given:
            parser.error(f"--{', --'.join(given)}: checkpoint options; an exported --model_dir carries its config")
    return args


# ----------------------------------------------------------------------------- models and heads

@dataclass
class Head:
    index: int
    final: bool
    num_layers: int
    load: Callable[[], Any]     # -> a transformers causal LM (eval mode, fp32)


@dataclass
class Source:
    description: str
    heads: list                 # every Head the source has
    context: int                # tokens the model was trained on (positions)
    vocab_size: int
    tokenizer: Any = None       # from the model directory, if it has one


def open_checkpoint(args: argparse.Namespace) -> Source:
    from ds_interlock.export import flags_from_args, load_checkpoint

    ckpt = load_checkpoint(args.checkpoint, args.tag, flags_from_args(args))
    heads = [Head(h, h == ckpt.final_head, ckpt.decoder_layers(h), lambda h=h: ckpt.hf_model(h))
             for h in range(ckpt.num_stages)]
    return Source(ckpt.describe(), heads, ckpt.flags.seq_len, ckpt.flags.vocab_size)


def open_model_dir(args: argparse.Namespace) -> Source:
    import json

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(args.model_dir).expanduser()
    if not (path / "config.json").is_file():
        raise SystemExit(f"error: {path} is not a model directory (no config.json)")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    info_path = path / "ds_interlock_export.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    head = info.get("head", 0)
    final = head == info.get("num_stages", head + 1) - 1
    tokenizer = None
    if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)

    def load() -> Any:
        return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()

    context = getattr(config, "n_positions", None) or config.max_position_embeddings
    desc = f"{path}: {config.architectures[0] if config.architectures else config.model_type}, " \
           f"{config.num_hidden_layers} decoder layers, vocab {config.vocab_size}, context {context}" + \
           (f" (head {head} of {info['num_stages']} of {info['source']})" if info else "")
    return Source(desc, [Head(head, final, config.num_hidden_layers, load)], context, config.vocab_size, tokenizer)


def select_heads(spec: Optional[str], heads: list, evaluating: bool) -> list:
    if spec is None:
        spec = "all" if evaluating else "final"
    if spec == "all":
        return heads
    if spec == "final":
        return [h for h in heads if h.final] or heads[-1:]
    by_index = {h.index: h for h in heads}
    chosen = []
    for item in spec.split(","):
        try:
            i = int(item)
        except ValueError:
            raise SystemExit(f"error: --head {spec!r}: expected 'all', 'final' or head numbers") from None
        head = next((h for h in heads if h.final), None) if i == -1 else by_index.get(i)
        if head is None:
            raise SystemExit(f"error: --head {item}: this model has heads {sorted(by_index)}"
                             + ("" if any(h.final for h in heads) else " (none of them the final one)"))
        chosen.append(head)
    return chosen


# ----------------------------------------------------------------------------- generation

def pick_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """Greedy for temperature 0; else a sample from the temperature-scaled nucleus of mass top_p."""
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p     # the first token is always kept
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


@torch.no_grad()
def generate_ids(model: Any, ids: list, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, eos_id: Optional[int] = None, device: Any = "cpu") -> list:
    """New token ids after `ids`, one step at a time with the model's key/value cache."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.tensor([ids], device=device)
    past, new = None, []
    for _ in range(max_new_tokens):
        out = model(input_ids=x, past_key_values=past, use_cache=True)
        past = out.past_key_values
        token = pick_token(out.logits[0, -1], temperature, top_p, generator)
        new.append(token)
        if token == eos_id:
            break
        x = torch.tensor([[token]], device=device)
    return new


def fit_context(prompt_ids: list, max_new_tokens: int, context: int) -> tuple[list, int, str]:
    """Keep prompt + new tokens within the model's positions: the prompt's last context-1 tokens at
    most, then as many new tokens as still fit. Returns (prompt ids, new tokens, a note or '')."""
    keep = prompt_ids[-(context - 1):]
    new = min(max_new_tokens, context - len(keep))
    notes = ([f"prompt cut to its last {len(keep)} tokens"] if len(keep) < len(prompt_ids) else []) + \
            ([f"max_new_tokens cut to {new}"] if new < max_new_tokens else [])
    return keep, new, f"{', '.join(notes)} to fit the context of {context}" if notes else ""


def run_prompt(model: Any, tokenizer: Any, prompt: str, args: argparse.Namespace, context: int,
               device: Any) -> dict:
    eos = tokenizer.eos_token_id
    ids = ([eos] if eos is not None else []) + tokenizer.encode(prompt, add_special_tokens=False)
    ids, max_new, note = fit_context(ids, args.max_new_tokens, context)
    start = time.perf_counter()
    new = generate_ids(model, ids, max_new, args.temperature, args.top_p, args.seed,
                       None if args.ignore_eos else eos, device)
    seconds = time.perf_counter() - start
    text_ids = [i for i in ids + new if i != eos]
    return {"prompt": prompt, "new_ids": new, "text": tokenizer.decode(text_ids, skip_special_tokens=True),
            "continuation": tokenizer.decode([i for i in new if i != eos], skip_special_tokens=True),
            "ended": bool(new) and new[-1] == eos, "new_tokens": len(new), "seconds": seconds,
            "tokens_per_s": len(new) / max(seconds, 1e-9), "note": note}


# ----------------------------------------------------------------------------- evaluation

def prepare_eval_data(args: argparse.Namespace, source: Source) -> Any:
    from ds_interlock.data import prepare_lm_data

    if args.cache_dir is None:
        from ds_interlock.paths import default_cache_dir
        args.cache_dir = str(default_cache_dir())
    data_dir = None if args.eval_data == "sample" else args.eval_data
    if data_dir is not None and not os.path.exists(os.path.expanduser(data_dir)):
        raise SystemExit(f"error: --eval_data not found: {data_dir}")
    data = prepare_lm_data(data_dir, args.cache_dir, vocab_size=args.vocab_size or source.vocab_size,
                           seq_len=source.context, progress=sys.stdout.isatty())
    if data.vocab_size != source.vocab_size:
        raise SystemExit(f"error: the tokenizer for --eval_data ({data.tokenizer_path}) has {data.vocab_size} pieces, "
                         f"the model {source.vocab_size}: pass the --vocab_size (and --cache_dir) of the training run")
    return data


@torch.no_grad()
def heldout_nll(model: Any, dataset: Any, batch_size: int, max_batches: Optional[int], device: Any) -> tuple[float, int]:
    """Mean token NLL (nats) over the held-out sequences (all, or the first max_batches batches)."""
    n = len(dataset) if max_batches is None else min(len(dataset), max_batches * batch_size)
    total, count = 0.0, 0
    for start in range(0, n, batch_size):
        ids, labels = dataset.get_batch(range(start, min(start + batch_size, n)))
        logits = model(input_ids=ids.to(device)).logits
        total += F.cross_entropy(logits.float().flatten(0, 1), labels.to(device).flatten(), reduction="sum").item()
        count += labels.numel()
    return total / count, count


# ----------------------------------------------------------------------------- main

def read_prompts(args: argparse.Namespace) -> list:
    if args.prompt_file is not None:
        with open(args.prompt_file, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
        if not prompts:
            raise SystemExit(f"error: no prompts in {args.prompt_file}")
        return prompts
    return [args.prompt if args.prompt is not None else ""]


def resolve_tokenizer(args: argparse.Namespace, source: Source, data: Any) -> Any:
    from ds_interlock.export import build_hf_tokenizer

    if args.tokenizer is not None:
        tok = build_hf_tokenizer(args.tokenizer)
    elif source.tokenizer is not None:
        tok = source.tokenizer
    elif data is not None:
        tok = build_hf_tokenizer(data.tokenizer_path)
    else:
        raise SystemExit("error: no tokenizer: pass --tokenizer (the sentencepiece .model train_lm printed, in "
                         "<cache_dir>/tokenizer/), or --eval_data")
    if len(tok) != source.vocab_size:
        raise SystemExit(f"error: the tokenizer has {len(tok)} pieces, the model's vocabulary {source.vocab_size}: "
                         "not the tokenizer of this training run")
    return tok


def print_outputs(head: Head, results: list) -> None:
    kind = "final" if head.final else "aux"
    print(f"head {head.index} ({kind}, {head.num_layers} decoder layers)", flush=True)
    for r in results:
        end = " </s>" if r["ended"] else ""
        note = f" ({r['note']})" if r["note"] else ""
        print(f"  prompt: {r['prompt']!r}{note}\n  output: {r['text']}{end}\n"
              f"  {r['new_tokens']} new tokens, {r['tokens_per_s']:,.0f} tokens/s", flush=True)


def print_eval(data: Any, report: list) -> None:
    c = data.heldout_counts
    print(f"held-out: {data.data_dir} ({c.sentences} sentences, {c.tokens_per_word:.3f} tokens/word), "
          f"{report[0]['eval_tokens']} tokens in sequences of {data.heldout.seq_len}", flush=True)
    print(f"  {'head':>4}  {'layers':>6}  {'token NLL':>9}  {'word ppl':>10}  {'gen tokens/s':>12}")
    for r in report:
        name = f"{r['head']}{'*' if r['final'] else ''}"
        print(f"  {name:>4}  {r['layers']:>6}  {r['eval_token_nll']:>9.4f}  {r['eval_word_ppl']:>10.2f}  "
              f"{r['tokens_per_s']:>12,.0f}", flush=True)
    print("  (* = final head)", flush=True)


def check_same_tokenizer(tokenizer: Any, data: Any) -> None:
    """The held-out tokens must come from the model's tokenizer: compare the vocabularies."""
    sp = data.tokenizer
    ours = tokenizer.convert_ids_to_tokens(list(range(sp.get_piece_size())))
    if ours != [sp.id_to_piece(i) for i in range(sp.get_piece_size())]:
        raise SystemExit(f"error: the tokenizer prepared for --eval_data ({data.tokenizer_path}) is not the model's: "
                         "pass the --cache_dir and --vocab_size of the training run")


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Returns {"model": description, "heads": [per head: head, final, layers, outputs, tokens_per_s, and
    with --eval_data eval_token_nll, eval_word_ppl, eval_tokens]}."""
    from ds_interlock.export import ExportError

    args = parse_args(argv)
    try:
        return run(args)
    except ExportError as exc:
        raise SystemExit(f"error: {exc}") from None


def run(args: argparse.Namespace) -> dict:
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    source = open_checkpoint(args) if args.checkpoint is not None else open_model_dir(args)
    print(f"model: {source.description}", flush=True)
    heads = select_heads(args.head, source.heads, args.eval_data is not None)
    data = prepare_eval_data(args, source) if args.eval_data is not None else None
    tokenizer = resolve_tokenizer(args, source, data)
    if data is not None:
        check_same_tokenizer(tokenizer, data)
    prompts = read_prompts(args)
    mode = "greedy" if args.temperature == 0 else \
        f"sampling (temperature {args.temperature}, top_p {args.top_p}, seed {args.seed})"
    print(f"generation: {mode}, up to {args.max_new_tokens} new tokens", flush=True)

    report = []
    for head in heads:
        model = head.load().to(device)
        outputs = [run_prompt(model, tokenizer, p, args, source.context, device) for p in prompts]
        print_outputs(head, outputs)
        seconds = sum(o["seconds"] for o in outputs)
        entry = {"head": head.index, "final": head.final, "layers": head.num_layers, "outputs": outputs,
                 "tokens_per_s": sum(o["new_tokens"] for o in outputs) / max(seconds, 1e-9)}
        if data is not None:
            nll, tokens = heldout_nll(model, data.heldout, args.eval_batch_size, args.eval_batches, device)
            entry.update(eval_token_nll=nll, eval_word_ppl=data.word_perplexity(nll), eval_tokens=tokens)
            if not math.isfinite(entry["eval_word_ppl"]):
                print(f"  warning: head {head.index}'s perplexity is not finite", flush=True)
        report.append(entry)
        del model
    if data is not None:
        print_eval(data, report)
    return {"model": source.description, "heads": report}


if __name__ == "__main__":
    main()
