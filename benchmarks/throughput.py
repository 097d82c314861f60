"""Real-run throughput: stock DeepSpeed (1F1B, global backprop) against interlocked local,
pairwise and 3-wise training of the same Transformer LM, measured side by side.

    python benchmarks/throughput.py --stages 2 --repeats 3 --json docs/throughput.json \
        --costs_out docs/measured_costs.json

launches ``deepspeed --num_gpus <stages * dp>`` on this script (the same command runs on GPU
nodes; there the device is CUDA and peak memory is read from the allocator as well). Every mode
is built and timed inside one launch, in rounds (mode A, B, C, A, B, C, ...), so that a noisy
machine affects all modes alike; the tables give min / median / max over the rounds.

Per mode: tokens per second, each stage's busy and idle time per step (busy = forward,
input-gradient and weight-gradient work), and peak activation memory per stage (bytes saved
for backward; see ds_interlock/profile.py). ``--costs_out`` writes the measured mean cost of
each action kind per stage, the simulator's measured cost model (benchmarks/schedule.py --costs).
Interlocked modes use the interlocked schedule with stage-local clipping and asynchronous loss
reporting, so consecutive batches may overlap; stock DeepSpeed flushes between batches.
"""
import argparse
import gc
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODES = {   # name -> interlocking block (None: stock DeepSpeed); "heads": False builds no aux heads
    "stock": None,
    "global_noheads": {"k": "global", "heads": False},   # our engine doing exactly stock's work
    "global": {"k": "global"},                           # plus aux heads as probes
    "local": {"k": "local"},
    "pairwise": {"k": "pairwise"},
    "3wise": {"k": "3wise"},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--dp", type=int, default=1, help="data-parallel replicas (processes = stages * dp)")
    p.add_argument("--modes", default="stock,global_noheads,global,local,pairwise,3wise")
    p.add_argument("--repeats", type=int, default=3, help="rounds over all modes")
    p.add_argument("--steps", type=int, default=6, help="timed train_batch calls per mode and round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--arch", default="gpt2")
    p.add_argument("--num_layers", type=int, default=None)
    p.add_argument("--vocab_size", type=int, default=2048)
    p.add_argument("--seq_len", type=int, default=64)
    p.add_argument("--micro_batch", type=int, default=4)
    p.add_argument("--micro_batches", type=int, default=8, help="micro-batches per batch (M)")
    p.add_argument("--schedule", default="interlocked")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--no_profile", action="store_true",
                   help="time whole steps only (no per-action timing or activation metering)")
    p.add_argument("--json", default=None)
    p.add_argument("--costs_out", default=None, help="measured action costs per stage (3wise or last mode)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- worker side
def ds_config(args, block):
    cfg = {"train_micro_batch_size_per_gpu": args.micro_batch,
           "gradient_accumulation_steps": args.micro_batches,
           "train_batch_size": args.micro_batch * args.micro_batches * args.dp,
           "optimizer": {"type": "Adam", "params": {"lr": 1e-4, "betas": [0.9, 0.98], "eps": 1e-9,
                                                     "torch_adam": True}},
           "gradient_clipping": 0.0, "steps_per_print": 10 ** 9,
           "bf16": {"enabled": bool(args.bf16)}}
    if block is not None:
        block = {k: v for k, v in block.items() if k != "heads"}
        cfg["interlocking"] = dict(block, schedule=args.schedule, clip_scope="stage", report="async")
    return cfg


def instrument_stock(engine, records, meter_cls):
    """Time DeepSpeed's own instructions without changing them (instance-level map)."""
    from deepspeed.runtime.pipe import schedule as ds_sched
    meter = meter_cls(engine.device)
    names = {ds_sched.ForwardPass: "forward", ds_sched.BackwardPass: "weight_grad"}

    def timed(fn, kind):
        def run(self, *a, **kw):
            t0 = time.perf_counter()
            if kind == "forward":
                meter.current = kw.get("buffer_id", -1)
                with meter:
                    fn(self, *a, **kw)
            else:
                fn(self, *a, **kw)
                if kind == "weight_grad":
                    meter.release(kw.get("buffer_id", -1))
            records.append((kind, -1, -1, t0, time.perf_counter()))
        return run
    engine._INSTRUCTION_MAP = {t: timed(f, names.get(t, t.__name__)) for t, f in type(engine)._INSTRUCTION_MAP.items()}
    return meter


def worker(args):
    import torch
    import deepspeed
    from deepspeed.pipe import PipelineModule
    from ds_interlock import InterlockingPipelineModule, initialize
    from ds_interlock.models import build_lm
    from ds_interlock.profile import ActivationMeter, summarize

    deepspeed.init_distributed()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    torch.manual_seed(0)
    parts = build_lm(args.preset, arch=args.arch, vocab_size=args.vocab_size, seq_len=args.seq_len,
                     num_layers=args.num_layers)
    tokens_per_batch = args.micro_batch * args.micro_batches * args.dp * args.seq_len
    modes = args.modes.split(",")
    results = {m: {"tokens_per_s": [], "stages": []} for m in modes}
    costs_mode = "3wise" if "3wise" in modes else modes[-1]
    costs_records = []

    def batches(seed):
        g = torch.Generator().manual_seed(seed)
        while True:
            ids = torch.randint(0, args.vocab_size, (args.micro_batch, args.seq_len + 1), generator=g)
            yield ids[:, :-1].contiguous(), ids[:, 1:].contiguous()

    for rnd in range(args.repeats):
        for mode in modes:
            block = MODES[mode]
            common = dict(num_stages=args.stages, loss_fn=parts.loss_fn, partition_method=parts.partition_method)
            if block is None:
                module = PipelineModule(layers=parts.layers, **common)
                engine, *_ = deepspeed.initialize(model=module, model_parameters=module.parameters(),
                                                  config=ds_config(args, None))
            else:
                heads = parts.aux_head if block.get("heads", True) else None
                module = InterlockingPipelineModule(layers=parts.layers, aux_head=heads, **common)
                engine, *_ = initialize(model=module, model_parameters=module.parameters(),
                                        config=ds_config(args, block))
            it = batches(1000 * rnd + engine.grid.data_parallel_id)
            for _ in range(args.warmup):
                engine.train_batch(data_iter=it)
            if block is not None:
                engine.flush_losses()
            records = []
            if args.no_profile:
                pass
            elif block is None:
                meter = instrument_stock(engine, records, ActivationMeter)
            else:
                engine.profile = records
            torch.distributed.barrier()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                engine.train_batch(data_iter=it)
            if block is not None:
                engine.flush_losses()
            torch.distributed.barrier()
            elapsed = time.perf_counter() - t0
            if block is None and not args.no_profile:
                records.append(("peak_activation_bytes", -1, -1, meter.peak, meter.peak))
            summary = summarize(records) or {"busy": float("nan"), "idle": float("nan"), "idle_fraction": float("nan"),
                                             "costs": {}, "peak_activation_bytes": 0}
            summary = {"busy_per_step": summary["busy"] / args.steps, "idle_per_step": summary["idle"] / args.steps,
                       "idle_fraction": summary["idle_fraction"], "costs": summary["costs"],
                       "min_costs": min_costs(records), "peak_activation_bytes": summary["peak_activation_bytes"]}
            if torch.cuda.is_available():
                summary["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            gathered = [None] * world
            torch.distributed.all_gather_object(gathered, (engine.stage_id, engine.grid.data_parallel_id, summary))
            if rank == 0:
                per_stage = {s: summ for s, d, summ in gathered if d == 0}
                results[mode]["tokens_per_s"].append(tokens_per_batch * args.steps / elapsed)
                results[mode]["stages"].append([per_stage[s] for s in range(args.stages)])
                print(f"round {rnd + 1}/{args.repeats} {mode:9s} {tokens_per_batch * args.steps / elapsed:9.1f} tokens/s",
                      flush=True)
            if mode == costs_mode and rnd == args.repeats - 1:
                costs_records = gathered
            del engine, module
            gc.collect()
    if rank == 0:
        out = {"args": vars(args), "tokens_per_batch": tokens_per_batch, "modes": results}
        if costs_records:
            out["measured_costs"] = {"per_stage": {str(s): dict(summ["costs"], **{k: v for k, v in summ["min_costs"].items()
                                                                                   if k.startswith("recv")})
                                                   for s, d, summ in costs_records if d == 0},
                                     "mode": costs_mode, "unit": "s",
                                     # one activation (or its gradient) between stages, per micro-batch
                                     "message_bytes": args.micro_batch * args.seq_len * parts.config.hidden_size
                                     * (2 if args.bf16 else 4)}
        with open(args.json_tmp, "w") as f:
            json.dump(out, f)


def min_costs(records):
    """Receives (and DeepSpeed's blocking sends) wait while the peer works: their shortest duration is
    the transfer itself."""
    best = {}
    for op, _, _, b, e in records:
        if op.lower().startswith(("recv", "send")):
            best[op] = min(best.get(op, float("inf")), e - b)
    return best


# ----------------------------------------------------------------------------- parent side
def report(data, stages):
    modes = data["modes"]
    base = statistics.median(modes["stock"]["tokens_per_s"]) if "stock" in modes else None
    rows = []
    print(f"\n{'mode':9s} {'tokens/s min':>12s} {'median':>9s} {'max':>9s} {'x stock':>8s}  "
          + "  ".join(f"st{s} busy/idle(s) peak act MB" for s in range(stages)))
    for mode, r in modes.items():
        tps = r["tokens_per_s"]
        med = statistics.median(tps)
        ratio = med / base if base else float("nan")
        cells = []
        for s in range(stages):
            busy = statistics.median(x[s]["busy_per_step"] for x in r["stages"])
            idle = statistics.median(x[s]["idle_per_step"] for x in r["stages"])
            peak = max(x[s]["peak_activation_bytes"] for x in r["stages"]) / 2 ** 20
            cells.append(f"{busy:6.3f}/{idle:6.3f} {peak:8.2f}")
        print(f"{mode:9s} {min(tps):12.1f} {med:9.1f} {max(tps):9.1f} {ratio:8.3f}  " + "  ".join(cells))
        rows.append({"mode": mode, "tokens_per_s": {"min": min(tps), "median": med, "max": max(tps)},
                     "ratio_to_stock_median": ratio})
    return rows


# DeepSpeed's instruction names (instrument_stock) -> our action names, for the simulator
STOCK_OPS = {"OptimizerStep": "step", "ReduceGrads": "reduce_grads", "ReduceTiedGrads": "reduce_tied",
             "LoadMicroBatch": "load", "SendActivation": "send_act", "RecvActivation": "recv_act",
             "SendGrad": "send_grad", "RecvGrad": "recv_grad"}


def measured_cost_table(rounds, stages):
    """Per stage and action: the median over rounds of the mean duration; messages take their shortest
    duration (the transfer: a receive also waits for its sender, which the simulator adds itself)."""
    table = {}
    for s in range(stages):
        ops = {}
        for rnd in rounds:
            summ = rnd[s]
            for op, sec in summ["costs"].items():
                name = STOCK_OPS.get(op, op)
                transfer = name.startswith(("recv", "send"))
                ops.setdefault(name, []).append(summ["min_costs"].get(op, sec) if transfer else sec)
        table[str(s)] = {op: statistics.median(v) for op, v in ops.items()}
    return {"per_stage": table, "unit": "s"}


def predict(data, args):
    """Step time per batch the simulator predicts from each mode's own measured action costs, next to
    the measured one. With more processes than cores an action's wall time includes the time its process
    waited for a core, so there the prediction tests the schedule's timing, not the cost of the work."""
    from ds_interlock.config import K_NAMES
    from ds_interlock.routing import Routing
    from ds_interlock.schedule import one_f_one_b, plan
    from ds_interlock.simulate import cost_from_json, simulate
    S, M, cores = args.stages, args.micro_batches, os.cpu_count() or 1
    rows = []
    for mode, r in data["modes"].items():
        if not r["stages"] or not r["stages"][0][0]["costs"]:
            continue                                   # --no_profile: nothing measured per action
        costs = measured_cost_table(r["stages"], S)
        # every head this run built ran inside its stage's forward (probes of k = "global" too)
        folded = {st: {op: sec + (ops.get("aux_head", 0.0) if op == "forward" else 0.0)
                       for op, sec in ops.items() if op != "aux_head"} for st, ops in costs["per_stage"].items()}
        cost = cost_from_json({"per_stage": folded})
        block = MODES[mode]
        if block is None:
            sched, flush = one_f_one_b(Routing(S, S, "furthest"), M), True
        else:
            k = S if block["k"] == "global" else min(K_NAMES[block["k"]], S)   # k > S acts as S
            sched, flush = plan("train", args.schedule, Routing(S, k, "furthest"), M), False
        predicted = simulate(sched, cost=cost, batches=6, flush=flush).step_time
        measured = statistics.median(data["tokens_per_batch"] / t for t in r["tokens_per_s"])
        rows.append({"mode": mode, "measured_s": measured, "predicted_s": predicted,
                     "predicted_over_measured": predicted / measured, "costs": costs})
    if rows:
        print(f"\nprediction from measured action costs (s per batch; {S * args.dp} processes on {cores} cores)")
        print(f"{'mode':15s} {'measured':>9s} {'predicted':>9s} {'pred/meas':>9s}")
        for row in rows:
            print(f"{row['mode']:15s} {row['measured_s']:9.3f} {row['predicted_s']:9.3f} "
                  f"{row['predicted_over_measured']:9.2f}")
    return rows


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    import tempfile
    import torch
    from ds_interlock.launching import deepspeed_launch
    unknown = [m for m in args.modes.split(",") if m not in MODES]
    if unknown:
        raise SystemExit(f"--modes: unknown {unknown}; choose from {sorted(MODES)}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp_json = os.path.join(tmp, "out.json")
        passthrough = [a for a in (argv or sys.argv[1:])]
        env = {} if torch.cuda.is_available() else {"OMP_NUM_THREADS": "1"}
        code, log = deepspeed_launch(args.stages * args.dp, os.path.abspath(__file__),
                                     passthrough + ["--worker", "--json_tmp", tmp_json], timeout=None, env=env,
                                     stream=True)
        if code != 0:
            raise SystemExit(f"benchmark launch failed with exit code {code}")
        with open(tmp_json) as f:
            data = json.load(f)
    data["summary"] = report(data, args.stages)
    data["prediction"] = predict(data, args)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)
        print(f"wrote {args.json}")
    if args.costs_out and "measured_costs" in data:
        with open(args.costs_out, "w") as f:
            json.dump(data["measured_costs"], f, indent=1)
        print(f"wrote {args.costs_out} (simulate with: python benchmarks/schedule.py --costs {args.costs_out})")


if __name__ == "__main__":
    if "--json_tmp" in sys.argv:   # worker processes get the output path from the parent
        i = sys.argv.index("--json_tmp")
        json_tmp = sys.argv[i + 1]
        del sys.argv[i:i + 2]
        ns = parse_args()
        ns.json_tmp = json_tmp
        worker(ns)
    else:
        main()
