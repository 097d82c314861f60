"""What the single-process pipeline costs over plain autograd, on the same model, in one process.

    python benchmarks/inprocess_speed.py --json docs/inprocess_speed_cpu.json

Two pairs, timed side by side in rounds (A, B, A, B, ...) so machine noise hits both alike:

* global: ``InProcessPipeline`` with k = "global" (no heads) against plain autograd over the
  same stage modules: per micro-batch one forward through all stages and one backward of
  loss / M, then the same optimizer step.
* local (k = 1): the pipeline against plain autograd with a detach at every stage boundary
  and each stage's aux head: per micro-batch the sum of all stages' losses, one backward.

Both sides use the same stage modules, heads, optimizer (SGD) and batches; the ratio is
pipeline time / plain time per training step (target: at most 1.1). Prints a table and
writes JSON. Works on CPU or one GPU (``--device cuda``).
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", type=int, default=4)
    p.add_argument("--preset", default="small")
    p.add_argument("--num_layers", type=int, default=8)
    p.add_argument("--vocab_size", type=int, default=2048)
    p.add_argument("--seq_len", type=int, default=64)
    p.add_argument("--micro_batch", type=int, default=4)
    p.add_argument("--micro_batches", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="timed steps per side and round")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="autocast both sides to bf16 (GPU)")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def build(args, k, heads):
    from ds_interlock import InProcessPipeline
    from ds_interlock.models import build_lm
    parts = build_lm(args.preset, vocab_size=args.vocab_size, seq_len=args.seq_len,
                     num_layers=args.num_layers, init_seed=0)
    cfg = {"train_micro_batch_size_per_gpu": args.micro_batch, "gradient_accumulation_steps": args.micro_batches,
           "gradient_clipping": 0.0, "bf16": {"enabled": args.bf16},
           "interlocking": {"k": k, "combine": "furthest"}}
    pipe = InProcessPipeline(parts.layers, args.stages, parts.loss_fn, aux_head=parts.aux_head if heads else None,
                             config=cfg, devices=args.device, partition_method=parts.partition_method,
                             optimizer=lambda ps: torch.optim.SGD(ps, lr=1e-3))
    return pipe, parts.loss_fn


def plain_step(stages, heads, loss_fn, optimizer, batches, local, autocast):
    """The reference a user could write by hand: plain autograd, one process."""
    M = len(batches)
    for ids, labels in batches:
        x, total = ids, 0.0
        for s, stage in enumerate(stages):
            with autocast():
                x = stage(x)
            if s < len(stages) - 1:
                if local:
                    with autocast():
                        total = total + loss_fn(heads[s](x), labels)
                    x = x.detach()
        total = total + loss_fn(x, labels)
        (total / M).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def batches_for(args, step):
    g = torch.Generator().manual_seed(step)
    return [(torch.randint(0, args.vocab_size, (args.micro_batch, args.seq_len), generator=g),
             torch.randint(0, args.vocab_size, (args.micro_batch, args.seq_len), generator=g))
            for _ in range(args.micro_batches)]


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_pair(args, k, local):
    from contextlib import nullcontext
    pipe, loss_fn = build(args, k, heads=local)
    stages = list(pipe.model.stages)
    heads = [pipe.model.aux_heads[str(s)] if str(s) in pipe.model.aux_heads else None for s in range(args.stages)]
    params = [p for p in pipe.model.parameters() if p.requires_grad]
    plain_opt = torch.optim.SGD(params, lr=1e-3)
    dev = torch.device(args.device)
    autocast = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if args.bf16 else nullcontext
    moved = lambda b: [(i.to(dev), t.to(dev)) for i, t in b]   # noqa: E731
    data = [batches_for(args, i) for i in range(args.steps + 1)]

    def run_pipe():
        for b in data[1:]:
            pipe.train_batch(iter(b))

    def run_plain():
        for b in data[1:]:
            plain_step(stages, heads, loss_fn, plain_opt, moved(b), local, autocast)

    pipe.train_batch(iter(data[0]))                     # warm-up both
    plain_step(stages, heads, loss_fn, plain_opt, moved(data[0]), local, autocast)
    times = {"pipeline": [], "plain": []}
    for _ in range(args.rounds):
        for name, fn in (("pipeline", run_pipe), ("plain", run_plain)):
            sync(args.device)
            t0 = time.perf_counter()
            fn()
            sync(args.device)
            times[name].append((time.perf_counter() - t0) / args.steps)
    ratios = [a / b for a, b in zip(times["pipeline"], times["plain"])]
    return {"pipeline_s": times["pipeline"], "plain_s": times["plain"], "ratio_per_round": ratios,
            "ratio_median": statistics.median(ratios),
            "ratio_of_medians": statistics.median(times["pipeline"]) / statistics.median(times["plain"])}


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(0)
    results = {}
    for name, k, local in (("global", "global", False), ("local", 1, True)):
        print(f"timing {name} ...", flush=True)
        results[name] = time_pair(args, k, local)
    print(f"\n{args.stages} stages, {args.preset} preset ({args.num_layers} layers), vocab {args.vocab_size}, "
          f"{args.micro_batches} x {args.micro_batch} x {args.seq_len} tokens, device {args.device}, "
          f"{args.rounds} rounds x {args.steps} steps")
    print(f"{'mode':8} {'pipeline s/step':>16} {'plain s/step':>13} {'ratio (median of rounds)':>25}")
    for name, r in results.items():
        print(f"{name:8} {statistics.median(r['pipeline_s']):16.4f} {statistics.median(r['plain_s']):13.4f} "
              f"{r['ratio_median']:25.3f}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "torch": torch.__version__, "results": results}, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
