"""Plot metrics files written by examples/train_lm.py (--metrics_file).

    python examples/plot_metrics.py runs/*.jsonl --out docs/

writes, into --out:
    lm_stage_losses_<label>.png  one per file: every head's loss over steps (aux heads and the
                                 true loss; lines = train, markers = held-out evaluations)
    lm_compare.png               all files side by side: true train loss vs step, and held-out
                                 per-word perplexity vs step
Labels are the file names without extension, or --labels a,b,c.

A metrics file may hold several runs: train_lm.py appends, and writes a run_start record at
every launch. One with resume_step 0 starts a new run; a resumed launch continues its run
and replaces the records beyond the step it resumed from. The last run of each file is
plotted (--run picks another), and a file with several runs says so. Lines that are not JSON
(a write cut short when a run was killed) are skipped, with a note naming them.
"""
import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")   # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402


def read_runs(path):
    """The runs of one JSON-lines file: a list of (first line number, train records, eval records)."""
    runs, bad = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                r = None
            if not isinstance(r, dict) or ("event" not in r and not isinstance(r.get("step"), (int, float))):
                bad.append(n)
                continue
            if r.get("event") == "run_start":
                resume = r.get("resume_step") or 0
                if not resume or not runs:
                    runs.append((n, [], []))
                else:   # a resumed launch: what the run logged beyond the checkpoint is replaced
                    for records in runs[-1][1:]:
                        records[:] = [x for x in records if x["step"] <= resume]
                continue
            if not runs:            # records before any marker (an older file) form the first run
                runs.append((n, [], []))
            if "eval_loss" in r:
                runs[-1][2].append(r)
            elif "loss" in r:
                runs[-1][1].append(r)
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
        print(f"{path}: skipped {len(bad)} line(s) that are not JSON records (line {shown})", file=sys.stderr)
    return runs


def read_metrics(path, run=-1):
    """(train records, eval records) of one run of a JSON-lines file (default: the last), each sorted
    by step; a step logged twice keeps its last record."""
    runs = read_runs(path)
    if not runs:
        return [], []
    if not -len(runs) <= run < len(runs):
        raise SystemExit(f"{path} holds {len(runs)} run(s); there is no run {run + 1 if run >= 0 else run}")
    if len(runs) > 1:
        which = run + 1 if run >= 0 else len(runs) + run + 1
        print(f"{path}: {len(runs)} runs (run_start records); plotting run {which}, from line {runs[run][0]}",
              file=sys.stderr)
    _, train, evals = runs[run]

    def by_step(records):
        return sorted({r["step"]: r for r in records}.values(), key=lambda r: r["step"])

    return by_step(train), by_step(evals)


def smooth(values, window):
    """Trailing moving average (window <= 1: unchanged)."""
    if window <= 1:
        return list(values)
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_stages(train, evals, label, path, window=1):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    num_stages = (len(train[0]["aux_losses"]) + 1) if train else len(evals[0]["eval_stage_loss"])
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    steps = [r["step"] for r in train]
    for s in range(num_stages):
        last = s == num_stages - 1
        name = f"stage {s} (true loss)" if last else f"stage {s} aux head"
        color = colors[s % len(colors)]
        if train:
            ys = [r["loss"] if last else r["aux_losses"][s] for r in train]
            ax.plot(steps, smooth(ys, window), color=color, lw=2.0 if last else 1.2, label=name)
        if evals:
            ax.plot([r["step"] for r in evals], [r["eval_stage_loss"][s] for r in evals], "o",
                    color=color, mfc="white", ms=6, label=None if train else name)
    if evals:
        ax.plot([], [], "o", color="gray", mfc="white", label="held-out eval")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy per token (nats)")
    ax.set_title(f"{label}: loss of every head" + (f" (train smoothed over {window})" if window > 1 else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_compare(runs, path, window=1):
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, train, evals in runs:
        if train:
            left.plot([r["step"] for r in train], smooth([r["loss"] for r in train], window), label=label)
        if evals:
            right.plot([r["step"] for r in evals], [r["eval_word_ppl"] for r in evals], "o-", label=label)
    left.set_title("true (last-stage) train loss" + (f", smoothed over {window}" if window > 1 else ""))
    left.set_xlabel("optimizer step")
    left.set_ylabel("cross-entropy per token (nats)")
    right.set_title("held-out per-word perplexity (final head)")
    right.set_xlabel("optimizer step")
    right.set_ylabel("perplexity per word")
    right.set_yscale("log")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:   # a run with no evaluations leaves the right side empty
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", help="metrics files (JSON lines)")
    p.add_argument("--out", default=".", help="directory for the PNGs")
    p.add_argument("--labels", default=None, help="comma-separated labels, one per file")
    p.add_argument("--smooth", type=int, default=1, help="moving-average window for train curves")
    p.add_argument("--run", type=int, default=-1,
                   help="which run of a file holding several: 1 = the first, -1 = the last")
    args = p.parse_args(argv)
    if args.run == 0:
        p.error("--run counts from 1 (or from -1 backwards)")
    run = args.run - 1 if args.run > 0 else args.run
    labels = args.labels.split(",") if args.labels else \
        [os.path.splitext(os.path.basename(f))[0] for f in args.files]
    if len(labels) != len(args.files):
        p.error(f"--labels has {len(labels)} entries for {len(args.files)} files")
    os.makedirs(args.out, exist_ok=True)
    runs, written = [], []
    for path, label in zip(args.files, labels):
        train, evals = read_metrics(path, run)
        if not train and not evals:
            p.error(f"{path}: no train or eval records")
        runs.append((label, train, evals))
        written.append(os.path.join(args.out, f"lm_stage_losses_{label}.png"))
        plot_stages(train, evals, label, written[-1], args.smooth)
    written.append(os.path.join(args.out, "lm_compare.png"))
    plot_compare(runs, written[-1], args.smooth)
    for w in written:
        print(f"wrote {w}")
    return written


if __name__ == "__main__":
    main()
