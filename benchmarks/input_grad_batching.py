"""Input-gradient chains of one micro-batch: separate autograd.grad calls against one batched call.

    python benchmarks/input_grad_batching.py --json docs/input_grad_batching_cpu.json
    python benchmarks/input_grad_batching.py --device cuda --json input_grad_batching_cuda.json

A stage that passes n > 1 gradient components on computes n input-gradient chains per micro-batch:
the same graph (roots = the stage's outputs, leaves = its inputs) with n different grad_outputs.
``"batch_input_grads": true`` computes consecutive ``input_grad`` actions of one micro-batch in one
``torch.autograd.grad(..., is_grads_batched=True)`` call (ds_interlock/stage.py). Two measurements,
both ways side by side in alternating rounds (separate, batched, batched, separate, ...), so that
machine noise hits both alike:

* ``pipeline``: the in-process pipeline (InProcessPipeline) training a GPT-2 LM, one pipeline per
  schedule with the executors switched between the two ways each round; the input-gradient time per
  micro-batch and stage is read from the per-action profile (a batched call's time is shared equally
  by the actions it serves), plus the whole step time. Under "interlocked" two chains of one
  micro-batch are never adjacent (a receive sits between), so nothing is batched there: both ways
  run the same calls, which shows the noise floor.
* ``direct``: one stage's graph kept alive, its n chains timed separately and batched, and the largest
  difference between the two results.

Prints a table and writes JSON (``--json``). CPU by default; ``--device cuda`` times on a GPU.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--num_layers", type=int, default=8)
    p.add_argument("--vocab_size", type=int, default=2048)
    p.add_argument("--seq_len", type=int, default=64)
    p.add_argument("--micro_batch", type=int, default=4)
    p.add_argument("--micro_batches", type=int, default=4)
    p.add_argument("--stages", type=int, default=4)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--combine", default="sum")
    p.add_argument("--schedules", default="1f1b,interlocked")
    p.add_argument("--rounds", type=int, default=4, help="alternating rounds (each times both ways)")
    p.add_argument("--steps", type=int, default=1, help="timed train steps per way and round")
    p.add_argument("--direct_repeats", type=int, default=5, help="direct: timed calls per way = rounds x this")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def build(args, schedule):
    from ds_interlock import InProcessPipeline
    from ds_interlock.models import build_lm
    parts = build_lm(args.preset, vocab_size=args.vocab_size, seq_len=args.seq_len,
                     num_layers=args.num_layers, init_seed=0)
    cfg = {"train_micro_batch_size_per_gpu": args.micro_batch, "gradient_accumulation_steps": args.micro_batches,
           "gradient_clipping": 0.0,
           "interlocking": {"k": args.k, "combine": args.combine, "schedule": schedule,
                            "batch_input_grads": False}}
    return InProcessPipeline(parts.layers, args.stages, parts.loss_fn, aux_head=parts.aux_head, config=cfg,
                             devices=args.device, partition_method=parts.partition_method, verbose=False,
                             optimizer=lambda ps: torch.optim.SGD(ps, lr=1e-4))


def batch_for(args, step):
    g = torch.Generator().manual_seed(step)
    return [(torch.randint(0, args.vocab_size, (args.micro_batch, args.seq_len), generator=g),
             torch.randint(0, args.vocab_size, (args.micro_batch, args.seq_len), generator=g))
            for _ in range(args.micro_batches)]


WAYS = ("separate", "batched")


def round_order(r):
    return WAYS if r % 2 == 0 else WAYS[::-1]


def time_pipeline(args, schedule):
    """Per way: step seconds, and per stage input-gradient seconds per micro-batch, per round."""
    pipe = build(args, schedule)
    S, M = args.stages, args.micro_batches
    out = {w: {"step_s": [], "input_grad_s_per_mb": [[] for _ in range(S)], "batched_calls": 0, "chains": 0}
           for w in WAYS}
    for w in WAYS:                       # warm-up, both ways
        for ex in pipe.executors:
            ex.batch_input_grads = w == "batched"
        pipe.train_batch(iter(batch_for(args, 0)))
    step = 1
    for r in range(args.rounds):
        for w in round_order(r):
            for ex in pipe.executors:
                ex.batch_input_grads = w == "batched"
            calls0 = [ex.batched_calls for ex in pipe.executors]
            pipe.profile = [[] for _ in range(S)]
            sync(args.device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                pipe.train_batch(iter(batch_for(args, step)))
                step += 1
            sync(args.device)
            out[w]["step_s"].append((time.perf_counter() - t0) / args.steps)
            for s in range(S):
                recs = [e - b for op, _, _, b, e in pipe.profile[s] if op == "input_grad"]
                out[w]["input_grad_s_per_mb"][s].append(sum(recs) / (M * args.steps))
                if r == 0:
                    out[w]["chains"] += len(recs) // args.steps
            if r == 0:
                out[w]["batched_calls"] = sum(ex.batched_calls - c for ex, c in zip(pipe.executors, calls0)) \
                    // args.steps
    pipe.profile = None
    chains = {s: len(pipe.routing.input_chains(s)) for s in range(S)}
    return pipe, {"schedule": schedule, "chains_per_mb": chains, **out}


def time_direct(args, pipe):
    """Each stage with n > 1 chains: its graph for one micro-batch, the n chains both ways."""
    from ds_interlock.stage import MicroBatch, float_leaves
    S, dev = args.stages, torch.device(args.device)
    ids, _ = batch_for(args, 10_000)[0]
    x = ids.to(dev)
    rows = []
    for s in range(S):
        stage = pipe.model.stages[s]
        ex = pipe.executors[s]
        n = len(pipe.routing.input_chains(s))
        if s == 0 or n < 2:
            with torch.no_grad():
                x = stage(x)
            continue
        inp, leaves = float_leaves(x)
        out = stage(inp)
        st = MicroBatch(inputs=inp, leaves=leaves, outputs=out, roots=[out])
        g = torch.Generator(device=dev).manual_seed(s)
        losses = pipe.routing.input_chains(s)
        st.comps = {j: [torch.randn(out.shape, generator=g, device=dev, dtype=out.dtype)] for j in losses}
        results, times = {}, {w: [] for w in WAYS}
        for w in WAYS:                   # warm-up
            fn = ex._input_grads_batched if w == "batched" else ex._input_grads_separately
            st.in_grads = {}
            fn(st, losses)
            results[w] = {j: [t.clone() for t in v] for j, v in st.in_grads.items()}
        for r in range(args.rounds * args.direct_repeats):    # alternating call by call
            for w in round_order(r):
                fn = ex._input_grads_batched if w == "batched" else ex._input_grads_separately
                sync(dev)
                t0 = time.perf_counter()
                fn(st, losses)
                sync(dev)
                times[w].append(time.perf_counter() - t0)
        diff = max((a - b).abs().max().item() for j in losses
                   for a, b in zip(results["separate"][j], results["batched"][j]))
        scale = max(t.abs().max().item() for j in losses for t in results["separate"][j])
        rows.append({"stage": s, "chains": n, "separate_s": times["separate"], "batched_s": times["batched"],
                     "max_abs_diff": diff, "max_abs_grad": scale})
        del st, out, inp, leaves
        with torch.no_grad():
            x = stage(x)
    return rows


def med(v):
    return statistics.median(v)


def summary(sep, bat):
    """Both ways: medians, minima (the least disturbed run of each) and the median of the paired ratios."""
    return {"separate_median": med(sep), "batched_median": med(bat), "separate_min": min(sep), "batched_min": min(bat),
            "ratio_paired_median": med([b / a for a, b in zip(sep, bat)]), "ratio_of_minima": min(bat) / min(sep)}


def line(label, s, scale):
    return (f"{label} {s['separate_median'] * scale:9.2f} {s['batched_median'] * scale:9.2f} "
            f"{s['separate_min'] * scale:9.2f} {s['batched_min'] * scale:9.2f} "
            f"{s['ratio_paired_median']:7.3f} {s['ratio_of_minima']:7.3f}")


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(0)
    start = time.perf_counter()
    threads = torch.get_num_threads()
    pipelines, direct = [], None
    for schedule in args.schedules.split(","):
        print(f"timing the pipeline, schedule {schedule} ...", flush=True)
        pipe, res = time_pipeline(args, schedule)
        pipelines.append(res)
        if direct is None:
            print("timing the chains directly ...", flush=True)
            direct = time_direct(args, pipe)
        del pipe
    print(f"\nGPT-2 {args.preset} ({args.num_layers} layers, vocab {args.vocab_size}), {args.stages} stages, "
          f"k={args.k}, combine={args.combine}, {args.micro_batches} x {args.micro_batch} x {args.seq_len} tokens, "
          f"device {args.device} ({threads} threads), {args.rounds} alternating rounds, medians")
    head = (f"{'separate':>9} {'batched':>9} {'sep min':>9} {'bat min':>9} {'ratio':>7} {'r(min)':>7}")
    print("\ninput-gradient work per micro-batch, in the pipeline (ms, medians and minima over rounds; "
          "ratio = batched / separate, median of the rounds' ratios; r(min) = ratio of the minima)")
    print(f"{'schedule':12} {'stage':>5} {'chains':>6} " + head)
    for res in pipelines:
        res["summary"] = {}
        for s in range(args.stages):
            n = res["chains_per_mb"][s]
            if not n:
                continue
            sm = summary(res["separate"]["input_grad_s_per_mb"][s], res["batched"]["input_grad_s_per_mb"][s])
            res["summary"][f"stage{s}"] = sm
            print(line(f"{res['schedule']:12} {s:5d} {n:6d}", sm, 1e3))
        sm = res["summary"]["step"] = summary(res["separate"]["step_s"], res["batched"]["step_s"])
        print(line(f"{res['schedule']:12} {'step':>5} {'':6}", sm, 1e3) +
              f"   (per step: {res['batched']['batched_calls']} batched calls for {res['batched']['chains']} chains)")
    print("\ndirect: one stage's chains for one micro-batch, alternating call by call (ms)")
    print(f"{'stage':>5} {'chains':>6} " + head + f" {'max|diff|':>10} {'max|grad|':>10}")
    for row in direct:
        sm = row["summary"] = summary(row["separate_s"], row["batched_s"])
        print(line(f"{row['stage']:5d} {row['chains']:6d}", sm, 1e3) +
              f" {row['max_abs_diff']:10.2e} {row['max_abs_grad']:10.2e}")
    elapsed = time.perf_counter() - start
    print(f"\n{elapsed:.0f} s")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "torch": torch.__version__, "threads": threads,
                       "machine": platform.processor() or platform.machine(),
                       "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                       "elapsed_s": elapsed, "pipeline": pipelines, "direct": direct}, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
