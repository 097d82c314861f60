"""Quality study: local vs pairwise vs 3-wise vs global on real text, several seeds, one token budget.

    python benchmarks/quality.py --data_dir DIR --out ~/ds_interlock_quality [--steps 300] [--seeds 0 1 2]
    python benchmarks/quality.py --debian_corpus ~/corpora/debian --out ...   # fetch + convert public-domain text

Every run is examples/train_lm.py in one process (--single_process: the same numbers as a launch, see
the README), on the same data, token budget and evaluation; only the "interlocking" block (k, combine,
aux_loss_weight) and the seed change. A run whose metrics file is complete is not run again, so an
interrupted study resumes. Also trains the *shallow* baseline: a model as deep as one stage, trained
with global backprop, which the deep global model must clearly beat for the corpus to tell the rules
apart.

Writes OUT/quality.json (every run's final held-out losses per head and per-word perplexity, and the
aggregate per rule: mean and std over seeds), OUT/quality.md (the table) and OUT/quality_*.png:
held-out perplexity against tokens seen, and against estimated pipeline time at S = 4 and 8 (the
schedule simulator replaying each rule's schedule; unit costs F = I = 1, W = 2 unless --costs gives
measured ones).

--debian_corpus DIR downloads Debian packages of public-domain English text with `apt-get download`,
unpacks them with `dpkg-deb -x` (no root, nothing installed) and converts the text with
`python -m ds_interlock.data.from_text`; the packages and files used are listed in DIR/SOURCES.json.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

RULES = {"local": 1, "pairwise": 2, "3wise": 3, "global": "global"}
# Debian packages of public-domain English running text (none is installed: each .deb is unpacked)
DEBIAN_PACKAGES = ("bible-kjv", "bible-kjv-text", "jargon-text", "fortunes")


# ---------------------------------------------------------------- corpus
def _kjv(tree: str, out: str) -> str:
    """The King James Bible, every verse (31,102) through the package's own reader, references removed."""
    text = subprocess.run([os.path.join(tree, "usr/bin/bible"), "-f", "-p", os.path.join(tree, "usr/lib"),
                           "-d", "bible.data", "-l", "100000", "Gen1:1-Rev22:21"],
                          check=True, capture_output=True, text=True).stdout
    verses = [line.split(" ", 1)[1] for line in text.splitlines() if ":" in line.split(" ", 1)[0] and " " in line]
    with open(out, "w") as f:
        f.write("\n\n".join(verses) + "\n")
    return out


def _jargon(tree: str, out: str) -> str:
    """The Jargon File, plain-text edition."""
    import gzip
    with gzip.open(os.path.join(tree, "usr/share/doc/jargon-text/jargon.txt.gz"), "rt", errors="replace") as f, \
            open(out, "w") as g:
        g.write(f.read())
    return out


def _fortunes(tree: str, out: str) -> str:
    """fortune's English collections (quotations, definitions, poems), one paragraph per fortune."""
    root = os.path.join(tree, "usr/share/games/fortunes")
    with open(out, "w") as g:
        for path in sorted(glob.glob(os.path.join(root, "*"))):
            if os.path.isfile(path) and not path.endswith((".dat", ".u8")) and not os.path.islink(path):
                with open(path, errors="replace") as f:
                    g.write("\n".join("" if line.strip() == "%" else line.rstrip("\n") for line in f) + "\n\n")
    return out


def fetch_debian_corpus(out_dir: str) -> str:
    """Download and unpack DEBIAN_PACKAGES, extract their text, convert it; returns the data dir."""
    from ds_interlock.data.from_text import convert
    debs, texts = os.path.join(out_dir, "debs"), os.path.join(out_dir, "text")
    os.makedirs(debs, exist_ok=True)
    os.makedirs(texts, exist_ok=True)
    tree = os.path.join(out_dir, "tree")
    used = []
    for package in DEBIAN_PACKAGES:
        if not glob.glob(os.path.join(debs, f"{package}_*.deb")):
            subprocess.run(["apt-get", "download", package], cwd=debs, check=True)
        deb = sorted(glob.glob(os.path.join(debs, f"{package}_*.deb")))[-1]
        subprocess.run(["dpkg-deb", "-x", deb, tree], check=True)
        used.append(os.path.basename(deb))
    files = [_kjv(tree, os.path.join(texts, "kjv.txt")), _jargon(tree, os.path.join(texts, "jargon.txt")),
             _fortunes(tree, os.path.join(texts, "fortunes.txt"))]
    data_dir = os.path.join(out_dir, "corpus")
    summary = None if os.path.isdir(data_dir) else convert(files, data_dir)
    with open(os.path.join(out_dir, "SOURCES.json"), "w") as f:
        json.dump({"packages": used, "texts": {os.path.basename(p): os.path.getsize(p) for p in files},
                   "extraction": "kjv: the bible-kjv reader over Gen1:1-Rev22:21, verse references removed; "
                                 "jargon: jargon.txt.gz; fortunes: every collection, '%' lines as paragraph breaks",
                   "converted": summary}, f, indent=1, default=str)
    return data_dir


# ---------------------------------------------------------------- runs
def run_name(rule, combine, weight, seed, shallow=False):
    return "shallow_global" + f"_s{seed}" if shallow else f"{rule}_{combine}_w{weight}_s{seed}"


def config_for(rule, combine, weight, out, base_config):
    with open(base_config) as f:
        cfg = json.load(f)
    cfg["interlocking"] = {**cfg.get("interlocking", {}), "k": RULES[rule], "combine": combine,
                           "aux_loss_weight": weight}
    path = os.path.join(out, "configs", f"{rule}_{combine}_w{weight}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(cfg, f, indent=1)
    return path


def records(path):
    out = []
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if isinstance(r, dict) and r.get("event") == "run_start" and not r.get("resume_step"):
                out = []           # a fresh run starts over
            elif isinstance(r, dict) and "step" in r:
                out.append(r)
    return out


def complete(path, steps):
    return any("eval_loss" in r and r["step"] == steps for r in records(path))


def train(args, name, config, seed, num_layers, num_stages):
    metrics = os.path.join(args.out, "runs", f"{name}.jsonl")
    if complete(metrics, args.steps):
        return metrics
    os.makedirs(os.path.dirname(metrics), exist_ok=True)
    if os.path.exists(metrics):
        os.remove(metrics)         # an interrupted run starts over: no checkpoints are kept for the study
    import importlib.util
    spec = importlib.util.spec_from_file_location("train_lm", os.path.join(ROOT, "examples", "train_lm.py"))
    train_lm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_lm)
    argv = ["--deepspeed_config", config, "--single_process", "--device", args.device, "--data_dir", args.data_dir,
            "--model", args.model, "--num_layers", str(num_layers), "--num_stages", str(num_stages),
            "--vocab_size", str(args.vocab_size), "--seq_len", str(args.seq_len), "--max_steps", str(args.steps),
            "--eval_interval", str(args.eval_interval), "--eval_batches", str(args.eval_batches),
            "--seed", str(seed), "--metrics_file", metrics, "--log_interval", str(args.eval_interval)]
    if args.cache_dir:
        argv += ["--cache_dir", args.cache_dir]
    if args.aux_head_rank:
        argv += ["--aux_head_rank", str(args.aux_head_rank)]
    start = time.time()
    print(f"[quality] {name}: training {args.steps} steps", flush=True)
    train_lm.main(argv)
    print(f"[quality] {name}: {time.time() - start:.0f} s", flush=True)
    return metrics


# ---------------------------------------------------------------- results
def step_time(rule, combine, S, M, costs=None):
    """Simulated step time of the rule's schedule (stage-local step), relative to global 1F1B."""
    from ds_interlock.replay import unit_cost
    from ds_interlock.routing import Routing
    from ds_interlock.schedule import interlocked, one_f_one_b
    from ds_interlock.simulate import cost_from_json, simulate
    cost = cost_from_json(costs) if costs else unit_cost
    k = S if RULES[rule] == "global" else RULES[rule]
    base = simulate(one_f_one_b(Routing(S, S, "furthest"), M), cost=cost, flush=True).step_time
    if rule == "global":
        return 1.0
    return simulate(interlocked(Routing(S, k, combine), M), cost=cost, flush=False).step_time / base


def summarize(args, runs):
    rows, per_rule = [], {}
    for (label, seed), path in runs.items():
        recs = records(path)
        final = [r for r in recs if "eval_loss" in r and r["step"] == args.steps]
        if not final:
            continue
        f = final[-1]
        row = {"rule": label, "seed": seed, "word_ppl": f["eval_word_ppl"], "stage_loss": f["eval_stage_loss"],
               "curve": [(r["step"], r["eval_word_ppl"]) for r in recs if "eval_loss" in r]}
        rows.append(row)
        per_rule.setdefault(label, []).append(row)
    agg = {}
    for label, rs in per_rule.items():
        ppl = [r["word_ppl"] for r in rs]
        heads = list(zip(*[r["stage_loss"] for r in rs]))
        agg[label] = {"seeds": len(rs), "word_ppl_mean": statistics.mean(ppl),
                      "word_ppl_std": statistics.stdev(ppl) if len(ppl) > 1 else 0.0,
                      "head_loss_mean": [statistics.mean(h) for h in heads]}
    return rows, agg


def markdown(args, agg, tokens):
    lines = [f"Held-out per-word perplexity after {args.steps} steps ({tokens:,} training tokens), mean +- std "
             f"over seeds; loss of every head (stage 0 .. last) averaged over seeds.", "",
             "| rule | seeds | word ppl | head losses |", "|---|---|---|---|"]
    for label in sorted(agg, key=lambda k: agg[k]["word_ppl_mean"]):
        a = agg[label]
        heads = " / ".join(f"{v:.3f}" for v in a["head_loss_mean"])
        lines.append(f"| {label} | {a['seeds']} | {a['word_ppl_mean']:.1f} +- {a['word_ppl_std']:.1f} | {heads} |")
    return "\n".join(lines) + "\n"


def plots(args, rows, tokens_per_step, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    curves = {}
    for r in rows:
        curves.setdefault(r["rule"], []).append(dict(r["curve"]))
    paths = []
    for scale in ["tokens"] + [f"time_S{S}" for S in args.time_stages]:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, cs in sorted(curves.items()):
            steps = sorted(set.intersection(*[set(c) for c in cs]))
            ppl = [statistics.mean(c[s] for c in cs) for s in steps]
            if scale == "tokens":
                x = [s * tokens_per_step for s in steps]
            else:
                if label.startswith("shallow"):
                    continue
                S = int(scale.split("S")[1])
                rule, combine = label.split("_")[0], label.split("_")[1]
                rel = step_time(rule, combine, S, args.time_micro_batches, args.costs)
                x = [s * rel for s in steps]
            ax.plot(x, ppl, marker="o", ms=3, label=label)
        ax.set_yscale("log")
        ax.set_ylabel("held-out word perplexity (mean over seeds)")
        ax.set_xlabel("training tokens" if scale == "tokens" else
                      f"estimated pipeline time at S={scale.split('S')[1]} (global 1F1B steps)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        path = os.path.join(out, f"quality_{scale}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default=None, help="a corpus in the One Billion Word raw layout")
    p.add_argument("--debian_corpus", default=None, help="fetch and convert Debian's public-domain text here")
    p.add_argument("--out", required=True)
    p.add_argument("--cache_dir", default=None)
    p.add_argument("--rules", nargs="*", default=list(RULES), choices=list(RULES))
    p.add_argument("--combine", nargs="*", default=["furthest", "sum"])
    p.add_argument("--weights", nargs="*", type=float, default=[1.0, 0.5])
    p.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval_interval", type=int, default=50)
    p.add_argument("--eval_batches", type=int, default=20)
    p.add_argument("--model", default="small")
    p.add_argument("--num_layers", type=int, default=8)
    p.add_argument("--num_stages", type=int, default=4)
    p.add_argument("--vocab_size", type=int, default=8000)
    p.add_argument("--seq_len", type=int, default=64)
    p.add_argument("--aux_head_rank", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--config", default=os.path.join(ROOT, "ds_configs", "global.json"))
    p.add_argument("--costs", default=None, help="measured per-action costs (benchmarks/throughput.py --costs_out)")
    p.add_argument("--time_stages", nargs="*", type=int, default=[4, 8])
    p.add_argument("--time_micro_batches", type=int, default=8)
    p.add_argument("--no_shallow", action="store_true")
    args = p.parse_args(argv)
    if not args.data_dir and not args.debian_corpus:
        p.error("give --data_dir or --debian_corpus")
    if args.debian_corpus:
        args.data_dir = fetch_debian_corpus(args.debian_corpus)
    os.makedirs(args.out, exist_ok=True)
    start = time.time()
    runs = {}
    for seed in args.seeds:
        for rule in args.rules:
            combines = ["furthest"] if rule == "global" else args.combine
            for combine in combines:
                weights = [1.0] if rule == "global" else args.weights
                for w in weights:
                    config = config_for(rule, combine, w, args.out, args.config)
                    label = f"{rule}_{combine}_w{w}"
                    runs[(label, seed)] = train(args, run_name(rule, combine, w, seed), config, seed,
                                                args.num_layers, args.num_stages)
        if not args.no_shallow:
            shallow_layers = max(1, args.num_layers // args.num_stages)
            config = config_for("global", "furthest", 1.0, args.out, args.config)
            runs[("shallow_global", seed)] = train(args, run_name("global", "", 0, seed, shallow=True), config, seed,
                                                   shallow_layers, min(2, shallow_layers) if shallow_layers > 1 else 1)
    with open(args.config) as f:
        base = json.load(f)
    tokens_per_step = base["train_micro_batch_size_per_gpu"] * base.get("gradient_accumulation_steps", 1) * args.seq_len
    rows, agg = summarize(args, runs)
    table = markdown(args, agg, tokens_per_step * args.steps)
    print(table)
    with open(os.path.join(args.out, "quality.md"), "w") as f:
        f.write(table)
    pngs = plots(args, rows, tokens_per_step, args.out)
    with open(os.path.join(args.out, "quality.json"), "w") as f:
        json.dump({"args": vars(args), "tokens_per_step": tokens_per_step, "runs": rows, "aggregate": agg,
                   "plots": pngs, "wall_s_this_call": round(time.time() - start, 1)}, f, indent=1)
    if "global_furthest_w1.0" in agg and "shallow_global" in agg:
        d, s = agg["global_furthest_w1.0"], agg["shallow_global"]
        deep, shallow = d["word_ppl_mean"], s["word_ppl_mean"]
        clear = deep < 0.9 * shallow and deep + d["word_ppl_std"] < shallow - s["word_ppl_std"]
        verdict = "depth matters" if clear else "depth does NOT clearly matter on this corpus/budget"
        print(f"global (deep) {deep:.1f} vs one-stage-deep {shallow:.1f} word ppl: {verdict}")
    print(f"wrote {args.out}/quality.json, quality.md, {', '.join(os.path.basename(p) for p in pngs)}")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
