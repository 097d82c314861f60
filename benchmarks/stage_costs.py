"""Per-action costs of pipeline stages, profiled in one process: the simulator's measured cost model.

    python benchmarks/stage_costs.py --preset paper --stages 4 8 --device cuda --bf16 \
        --aux_heads full 256 64 --out ~/ds_interlock_costs

For every stage count S and aux-head option, the LM is split into S stages, all in one process
(``InProcessPipeline``: on one GPU, or on CPU), trained for ``--warmup`` steps, then profiled over
``--steps`` steps of the interlocked schedule with k = 2, so that every stage runs forwards,
input-gradient chains and weight-gradient chains. On a GPU each action is timed between device
synchronisations (the profile's clock), so the numbers are the work of that action alone.

Writes, per (S, head): OUT/costs_S{S}_{head}.json in the simulator's format
(``{"per_stage": {"0": {"forward": s, "input_grad": s, "weight_grad": s, "aux_head": s}}}``, forward
without the head; ``python benchmarks/schedule.py --costs FILE``), and OUT/stage_costs.json with all of
them, the activation message size, and the head's cost relative to its stage's forward + backward.
A head option: ``full`` (a d x V projection) or an integer r (the low-rank d -> r -> V head).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

COST_OPS = ("forward", "input_grad", "weight_grad", "aux_head")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="paper")
    p.add_argument("--arch", default="gpt2", choices=("gpt2", "llama"))
    p.add_argument("--num_layers", type=int, default=None)
    p.add_argument("--vocab_size", type=int, default=None, help="None = the preset's (paper: 32000)")
    p.add_argument("--seq_len", type=int, default=None, help="None = the preset's (paper: 256)")
    p.add_argument("--stages", type=int, nargs="+", default=[4, 8])
    p.add_argument("--aux_heads", nargs="+", default=["full", "256", "64"],
                   help="'full' or a rank r for the low-rank head")
    p.add_argument("--micro_batch", type=int, default=8)
    p.add_argument("--micro_batches", type=int, default=8, help="M per profiled step")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--out", required=True, help="output folder")
    args = p.parse_args(argv)
    for h in args.aux_heads:
        if h != "full" and not (h.isdigit() and int(h) > 0):
            p.error(f"--aux_heads: {h!r} is not 'full' or a positive rank")
    return args


def profile_one(args, S: int, head: str) -> dict:
    from ds_interlock import InProcessPipeline
    from ds_interlock.models import build_lm
    from ds_interlock.profile import summarize

    rank = int(head) if head.isdigit() else None
    parts = build_lm(args.preset, arch=args.arch, vocab_size=args.vocab_size, seq_len=args.seq_len,
                     num_layers=args.num_layers, aux_head_rank=rank)
    cfg = {"train_micro_batch_size_per_gpu": args.micro_batch, "gradient_accumulation_steps": args.micro_batches,
           "gradient_clipping": 1.0, "bf16": {"enabled": args.bf16},
           "optimizer": {"type": "Adam", "params": {"lr": 1e-4, "torch_adam": True}},
           "interlocking": {"k": 2, "combine": "furthest", "schedule": "interlocked"}}
    pipe = InProcessPipeline(layers=parts.layers, num_stages=S, loss_fn=parts.loss_fn,
                             aux_head=parts.aux_head,
                             partition_method=parts.partition_method, config=cfg, devices=args.device,
                             verbose=False)
    from ds_interlock.models.lm_presets import PRESETS
    vocab, seq = parts.config.vocab_size, args.seq_len or PRESETS[args.preset].seq_len
    g = torch.Generator().manual_seed(0)

    def batches():
        while True:
            ids = torch.randint(0, vocab, (args.micro_batch, seq + 1), generator=g)
            yield ids[:, :-1].contiguous(), ids[:, 1:].contiguous()

    data = batches()
    for _ in range(args.warmup):
        pipe.train_batch(data)
    pipe.profile = [[] for _ in range(S)]
    start = time.perf_counter()
    for _ in range(args.steps):
        pipe.train_batch(data)
    wall = (time.perf_counter() - start) / args.steps
    per_stage = {}
    for s, records in enumerate(pipe.profile):
        costs = summarize(records)["costs"]
        per_stage[str(s)] = {op: costs[op] for op in COST_OPS if op in costs}
    d_model = parts.config.hidden_size
    act_bytes = args.micro_batch * seq * d_model * (2 if args.bf16 else 4)
    layers_per_stage = [int(pipe.parts[s + 1] - pipe.parts[s]) for s in range(S)]   # layer specs, embedding included
    mid = [per_stage[str(s)] for s in range(1, S - 1)] or [per_stage["0"]]
    head_rel = (statistics.mean(c.get("aux_head", 0.0) for c in mid) /
                statistics.mean(c["forward"] + c.get("input_grad", 0.0) + c["weight_grad"] for c in mid))
    del pipe
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"per_stage": per_stage, "unit": "s", "S": S, "aux_head": head, "message_bytes": act_bytes,
            "layers_per_stage": layers_per_stage, "profiled_step_wall_s": wall,
            "aux_head_vs_stage_work": head_rel}


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    device = torch.device(args.device)
    about = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
             "torch": torch.__version__, "threads": torch.get_num_threads(),
             **{k: v for k, v in vars(args).items() if k != "out"}}
    results = []
    for S in args.stages:
        for head in args.aux_heads:
            res = profile_one(args, S, head)
            path = os.path.join(args.out, f"costs_S{S}_{head}.json")
            with open(path, "w") as f:
                json.dump({**res, "about": about}, f, indent=1)
            mid = res["per_stage"][str(min(1, S - 1))]
            print(f"S={S} head={head:>4}: stage-1 forward {mid['forward'] * 1e3:.2f} ms, input_grad "
                  f"{mid.get('input_grad', 0) * 1e3:.2f} ms, weight_grad {mid['weight_grad'] * 1e3:.2f} ms, "
                  f"aux head {mid.get('aux_head', 0) * 1e3:.2f} ms ({res['aux_head_vs_stage_work']:.2f} of a middle "
                  f"stage's F+I+W); profiled step {res['profiled_step_wall_s'] * 1e3:.0f} ms -> {path}", flush=True)
            results.append(res)
    with open(os.path.join(args.out, "stage_costs.json"), "w") as f:
        json.dump({"about": about, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
