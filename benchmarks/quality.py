"""Quality study: local vs pairwise vs 3-wise vs global on real text, several seeds, one token budget.

    python benchmarks/quality.py --data_dir DIR --out ~/ds_interlock_quality [--steps 300] [--seeds 0 1 2]
    python benchmarks/quality.py --debian_corpus ~/corpora/debian --out ...   # fetch + convert public-domain text
    python benchmarks/quality.py ... --device cuda --bf16 on --jobs 8         # one GPU, 8 runs at a time

Every run is examples/train_lm.py in one process (--single_process: the same numbers as a launch, see
the README), on the same data, token budget and evaluation; only the "interlocking" block (k, combine,
aux_loss_weight) and the seed change. A run whose metrics file is complete is not run again, so an
interrupted study resumes. ``--jobs N`` runs N of them at once, each in its own process (a GPU
is far from busy with one small model; on CPU keep 1). Also trains the *shallow* baseline: a model as deep as one stage, trained
with global backprop, which the deep global model must clearly beat for the corpus to tell the rules
apart. ``--rank_arm R`` adds, per rule, runs whose aux heads are the low-rank d -> R -> V head.

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
import dataclasses
import functools
import glob
import json
import re
import os
import statistics
import subprocess
import sys
import time
from typing import Optional

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
@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of the study."""
    label: str            # the rule's row in the table (seeds aggregate under it)
    seed: int
    config: str           # the DeepSpeed config file
    num_layers: int
    num_stages: int
    rank: Optional[int]   # low-rank aux heads, or None for full ones

    @property
    def name(self) -> str:
        return f"{self.label}_s{self.seed}"


def label_of(rule, combine, weight, rank=None):
    return f"{rule}_{combine}_w{weight}" + (f"_r{rank}" if rank else "")


def base_config(args):
    with open(args.config) as f:
        cfg = json.load(f)
    if args.micro_batch:
        cfg["train_micro_batch_size_per_gpu"] = args.micro_batch
    if args.grad_accum:
        cfg["gradient_accumulation_steps"] = args.grad_accum
    cfg.pop("train_batch_size", None)
    return cfg


def config_for(rule, combine, weight, out, args):
    cfg = base_config(args)
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


@functools.lru_cache(maxsize=1)
def _train_lm():
    """examples/train_lm.py, loaded once for every run of the study."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("train_lm", os.path.join(ROOT, "examples", "train_lm.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def metrics_path(args, run):
    return os.path.join(args.out, "runs", f"{run.name}.jsonl")


def train_argv(args, run):
    argv = ["--deepspeed_config", run.config, "--single_process", "--device", args.device,
            "--data_dir", args.data_dir, "--model", args.model, "--num_layers", str(run.num_layers),
            "--num_stages", str(run.num_stages), "--vocab_size", str(args.vocab_size), "--seq_len", str(args.seq_len),
            "--max_steps", str(args.steps), "--eval_interval", str(args.eval_interval),
            "--eval_batches", str(args.eval_batches), "--seed", str(run.seed), "--metrics_file", metrics_path(args, run),
            "--log_interval", str(args.eval_interval), "--bf16", args.bf16, "--warmup_steps", str(args.warmup_steps)]
    if args.cache_dir:
        argv += ["--cache_dir", args.cache_dir]
    if args.peak_lr:
        argv += ["--peak_lr", str(args.peak_lr)]
    if run.rank:
        argv += ["--aux_head_rank", str(run.rank)]
    return argv


def fresh(args, run):
    """True when the run still has to train; an interrupted run's metrics are removed (it starts over:
    the study keeps no checkpoints)."""
    path = metrics_path(args, run)
    if complete(path, args.steps):
        return False
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.exists(path):
        os.remove(path)
    return True


def train_all(args, runs, deadline):
    """Train every run not yet complete: in this process (--jobs 1) or N processes at a time.
    No run is started after the deadline; the ones running finish."""
    todo = [r for r in runs if fresh(args, r)]
    print(f"[quality] {len(runs) - len(todo)} of {len(runs)} runs already complete; {len(todo)} to train", flush=True)
    if args.jobs == 1:
        for run in todo:
            if time.time() > deadline:
                print(f"[quality] deadline reached: {run.name} and later runs not started", flush=True)
                break
            start = time.time()
            print(f"[quality] {run.name}: training {args.steps} steps", flush=True)
            _train_lm().main(train_argv(args, run))
            print(f"[quality] {run.name}: {time.time() - start:.0f} s", flush=True)
        return
    if todo:   # the tokenizer and token caches are built once, before the processes share them
        from ds_interlock.data import prepare_lm_data
        prepare_lm_data(args.data_dir, args.cache_dir, vocab_size=args.vocab_size, seq_len=args.seq_len, progress=True)
    logs = os.path.join(args.out, "logs")
    os.makedirs(logs, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    running, failed, longest = {}, [], 0.0
    queue = list(todo)
    while queue or running:
        # a run starts only if, judged by the longest run finished so far, it ends by the deadline
        while queue and len(running) < args.jobs and time.time() + 1.05 * longest <= deadline:
            run = queue.pop(0)
            log = open(os.path.join(logs, f"{run.name}.log"), "w")
            cmd = [sys.executable, os.path.join(ROOT, "examples", "train_lm.py"), *train_argv(args, run)]
            running[run] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log, time.time())
            print(f"[quality] started {run.name}", flush=True)
        if queue and not running and time.time() + 1.05 * longest > deadline:
            print(f"[quality] deadline: {len(queue)} runs not started", flush=True)
            break
        time.sleep(2)
        for run, (proc, log, start) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                del running[run]
                ok = proc.returncode == 0 and complete(metrics_path(args, run), args.steps)
                longest = max(longest, time.time() - start)
                if not ok:
                    failed.append(run.name)
                print(f"[quality] {run.name}: {'done' if ok else f'FAILED (exit {proc.returncode})'} in "
                      f"{time.time() - start:.0f} s ({len(queue)} queued, {len(running)} running)", flush=True)
    if failed:
        print(f"[quality] failed runs (logs in {logs}): {', '.join(failed)}", flush=True)


# ---------------------------------------------------------------- results
def step_time(rule, combine, S, M, costs=None, head="full"):
    """Simulated step time of the rule's schedule (stage-local step), relative to global 1F1B.
    ``costs``: a measured cost file; "{S}" and "{head}" in its name pick the profile of S stages and
    of the aux head ("full" or the low rank)."""
    from ds_interlock.replay import unit_cost
    from ds_interlock.routing import Routing
    from ds_interlock.schedule import interlocked, one_f_one_b
    from ds_interlock.simulate import cost_from_json, simulate
    cost = cost_from_json(costs.format(S=S, head=head)) if costs else unit_cost
    k = S if RULES[rule] == "global" else RULES[rule]
    base = simulate(one_f_one_b(Routing(S, S, "furthest"), M), cost=cost, flush=True).step_time
    if rule == "global":
        return 1.0
    return simulate(interlocked(Routing(S, k, combine), M), cost=cost, flush=False).step_time / base


def summarize(args, runs):
    rows, per_rule = [], {}
    for run in runs:
        label, seed = run.label, run.seed
        recs = records(metrics_path(args, run))
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


RULE_COLORS = {"local": "tab:green", "pairwise": "tab:red", "3wise": "tab:blue", "global": "tab:orange",
               "shallow": "tab:gray"}


def line_style(label):
    """Colour by rule; dashed for combine "sum", square markers for the second weight, dotted for low rank."""
    rule = label.split("_")[0]
    style = {"color": RULE_COLORS.get(rule, "black"), "marker": "o", "ms": 3, "linestyle": "-"}
    if "_sum_" in label:
        style["linestyle"] = "--"
    if re.search(r"_w(?!1\.0)", label):
        style["marker"] = "s"
    if re.search(r"_r\d+$", label):
        style["linestyle"] = ":"
    return style


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
                rank = re.search(r"_r(\d+)$", label)
                head = rank.group(1) if rank else "full"
                rel = step_time(rule, combine, S, args.time_micro_batches, args.costs, head)
                x = [s * rel for s in steps]
            ax.plot(x, ppl, label=label, **line_style(label))
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


def plan(args):
    """Every run of the study, in training order: a study cut short then has whole comparisons. First
    the baselines and every rule at the first combine mode and weight, for all seeds; then the low-rank
    arm of local; then the other modes and weights; last, local's other combine modes (at k = 1 the
    combine mode changes nothing: the same math)."""
    runs, tier = [], {}
    for seed in args.seeds:
        for rule in args.rules:
            for combine in (["furthest"] if rule == "global" else args.combine):
                for w in ([1.0] if rule == "global" else args.weights):
                    config = config_for(rule, combine, w, args.out, args)
                    runs.append(Run(label_of(rule, combine, w), seed, config, args.num_layers, args.num_stages, None))
                    first = rule == "global" or (combine, w) == (args.combine[0], args.weights[0])
                    tier[runs[-1]] = 0 if first else 4 if rule == "local" and combine != args.combine[0] else 2
        for rank in args.rank_arm:
            for rule in (r for r in args.rules if r != "global"):   # global's heads are probes: rank is moot
                combine, w = args.combine[0], args.weights[0]
                config = config_for(rule, combine, w, args.out, args)
                runs.append(Run(label_of(rule, combine, w, rank), seed, config, args.num_layers, args.num_stages, rank))
                tier[runs[-1]] = 1 if rule == "local" else 3
        if not args.no_shallow:
            layers = max(1, args.num_layers // args.num_stages)
            config = config_for("global", "furthest", 1.0, args.out, args)
            runs.append(Run("shallow_global", seed, config, layers, min(2, layers) if layers > 1 else 1, None))
            tier[runs[-1]] = 0
    return sorted(runs, key=lambda r: (tier[r], r.seed))


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
    p.add_argument("--rank_arm", nargs="*", type=int, default=[],
                   help="also train every rule (first combine and weight) with low-rank aux heads of these ranks")
    p.add_argument("--micro_batch", type=int, default=None, help="override the config's micro-batch size")
    p.add_argument("--grad_accum", type=int, default=None, help="override the config's micro-batches per step")
    p.add_argument("--peak_lr", type=float, default=None, help="train_lm.py --peak_lr (None: the config's)")
    p.add_argument("--warmup_steps", default="auto", help="train_lm.py --warmup_steps")
    p.add_argument("--bf16", default="off", choices=("auto", "on", "off"), help="train_lm.py --bf16")
    p.add_argument("--jobs", type=int, default=1, help="runs at once, each in its own process")
    p.add_argument("--deadline_s", type=float, default=None,
                   help="finish within this many seconds: start no run that, judged by the runs finished so far, "
                        "would end later (the table then has what is complete)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--config", default=os.path.join(ROOT, "ds_configs", "global.json"))
    p.add_argument("--costs", default=None,
                   help="measured per-action costs (benchmarks/stage_costs.py); '{S}' and '{head}' in the name "
                        "are replaced by the stage count and the aux head ('full' or its rank)")
    p.add_argument("--time_stages", nargs="*", type=int, default=[4, 8])
    p.add_argument("--time_micro_batches", type=int, default=8)
    p.add_argument("--no_shallow", action="store_true")
    p.add_argument("--report_only", action="store_true",
                   help="train nothing: the table and plots of the runs complete in --out (e.g. copied from a GPU)")
    args = p.parse_args(argv)
    if not args.data_dir and not args.debian_corpus:
        p.error("give --data_dir or --debian_corpus")
    if args.debian_corpus:
        args.data_dir = fetch_debian_corpus(args.debian_corpus)
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    os.makedirs(args.out, exist_ok=True)
    start = time.time()
    runs = plan(args)
    if not args.report_only:
        train_all(args, runs, start + args.deadline_s if args.deadline_s else float("inf"))
    base = base_config(args)
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
