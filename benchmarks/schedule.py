"""Simulated step time and memory: interlocked schedules against the global schedules a user can pick.

    python benchmarks/schedule.py [--json out.json] [--markdown out.md] [--timeline out.png]
                                  [--costs measured.json [--replicate_stages 4 8] [--profile_stage N]]
                                  [--aux_head X] [--quick] [--strict]

Every number comes from replaying schedules under one cost model and one latency model:
our Schedules (the very objects the engine executes) through ds_interlock.replay, and the
global schedules as their own libraries generate them (torch.distributed.pipelining's
Interleaved1F1B, InterleavedZeroBubble (ZB1P), ZBVZeroBubble, DualPipeV; DeepSpeed's 1F1B
and DualPipeV: ds_interlock/library_schedules.py) through the rank-level replay of
ds_interlock/rank_order.py. Costs: unit (F = 1, input chain I = 1, full backward 2, so a split
weight part W = 1; an aux head --aux_head forwards) or measured (--costs, per-stage seconds,
with an optional "aux_head" entry). Global schedules end each batch with an optimizer-step
barrier (flush), interlocked ones step per stage.

Three tables per (S, M):
  main          step time, vs DeepSpeed 1F1B, vs the best global schedule, vs own bound and
                the global 3M bound, peak live micro-batches on stage (rank) 0
  equal_memory  each global schedule capped, rank by rank, at the interlocked schedule's peak
                live micro-batches, recomputing forwards it cannot keep (rank_order.cap_memory)
  latency       per-hop message latency c in {0, 0.1, 0.5, 1} forwards; interlocked also
                re-planned for the costs and latency (interlocked(cost=, latency=)), every
                re-planned schedule checked by the replay and the NCCL model
The issue's goals (S = 8, M = 8) are computed and printed as PASS/FAIL.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ds_interlock.actions import Action  # noqa: E402
from ds_interlock.commcheck import BatchEnd, require_safe  # noqa: E402
from ds_interlock.library_schedules import LIBRARY, Unavailable, from_schedule  # noqa: E402
from ds_interlock.rank_order import cap_memory  # noqa: E402
from ds_interlock.routing import Routing  # noqa: E402
from ds_interlock.schedule import interlocked, one_f_one_b  # noqa: E402
from ds_interlock.simulate import (charge_aux_heads, cost_from_json, format_table, mean_forward,  # noqa: E402
                                   replicate_stages, simulate, simulate_order, timeline_png, unit_costs)

BASELINE = "DeepSpeed 1F1B"
LATENCIES = (0.0, 0.1, 0.5, 1.0)
COLUMNS = [("schedule", "schedule"), ("k", "k"), ("combine", "combine"), ("step", "step"),
           ("vs_1f1b", "vs 1F1B"), ("vs_best_global", "vs best global"), ("best_global", "best global"),
           ("vs_bound", "/own bound"), ("vs_3m", "/3M bound"), ("live_s0", "live s0")]
EQ_COLUMNS = [("schedule", "schedule"), ("k", "cap of k"), ("combine", "combine"), ("step", "step"),
              ("vs_best_global", "vs best global"), ("best_global", "best global (capped)"),
              ("live_s0", "live s0"), ("recompute_s0", "recomputes s0")]
LAT_COLUMNS = [("schedule", "schedule"), ("latency", "c (F)"), ("step", "step"), ("vs_1f1b", "vs 1F1B"),
               ("vs_best_global", "vs best global"), ("best_global", "best global"),
               ("slowdown", "vs c=0"), ("live_s0", "live s0")]


# ---------------------------------------------------------------- what is compared

def global_orders(S, M):
    """{name: RankOrder} of the global schedules available at (S, M), and {name: why not}."""
    orders = {BASELINE: from_schedule(one_f_one_b(Routing(S, S, "furthest"), M), BASELINE)}
    missing = {}
    for name, make in LIBRARY.items():
        try:
            orders[name] = make(S, M)
        except Unavailable as exc:
            missing[name] = str(exc)
    return orders, missing


def interlocked_cases(S):
    """(label, Routing) for k in {1, 2, 3, S}, both combine modes."""
    out = []
    for combine in ("furthest", "sum"):
        for k in sorted({1, 2, 3, S}):
            if k <= S:
                out.append((f"interlocked k={k}" + (" sum" if combine == "sum" else ""), Routing(S, k, combine)))
    return out


def global_bound(cost, S, M):
    """The busiest stage's forwards and full backwards: what no global schedule can beat (3M at unit costs)."""
    return max(M * (cost(s, Action("forward", 0)) + cost(s, Action("weight_grad", 0))) for s in range(S))


# ---------------------------------------------------------------- tables

def _row(table, label, kind, S, M, k, combine, res, latency, base, best, bound3m):
    return {"table": table, "schedule": label, "kind": kind, "S": S, "M": M, "k": k, "combine": combine,
            "latency": latency, "step": res.step_time, "vs_1f1b": res.step_time / base,
            "vs_best_global": res.step_time / best[1], "best_global": best[0],
            "vs_bound": res.bound_ratio, "own_bound": res.lower_bound, "vs_3m": res.step_time / bound3m,
            "live_s0": res.peak_live[0], "peak_live": res.peak_live, "flush": res.flush,
            "steady_idle": res.steady_idle, "unit": res.unit}


def shape_tables(S, M, cost, batches, check_nccl=True):
    """All rows of the three tables for one pipeline shape."""
    F = mean_forward(cost, S)
    bound3m = global_bound(cost, S, M)
    orders, missing = global_orders(S, M)
    rows = []
    # main: latency 0, the engine's schedules
    glob = {n: simulate_order(o, cost, batches) for n, o in orders.items()}
    base = glob[BASELINE].step_time
    best = min(((n, r.step_time) for n, r in glob.items()), key=lambda x: x[1])
    for n, r in glob.items():
        rows.append(_row("main", n, "global", S, M, S, "furthest", r, 0.0, base, best, bound3m))
    inter = {}
    for label, routing in interlocked_cases(S):
        inter[label] = simulate(interlocked(routing, M), cost, batches, flush=False, name=label)
        rows.append(_row("main", label, "interlocked", S, M, routing.k, routing.combine, inter[label],
                         0.0, base, best, bound3m))
    if S >= 3:
        r3 = simulate(one_f_one_b(Routing(S, 3, "furthest"), M), cost, batches, flush=False, name="1f1b-order k=3")
        rows.append(_row("main", "1f1b-order k=3", "interlocked", S, M, 3, "furthest", r3, 0.0, base, best, bound3m))
    # equal memory: each global schedule capped at an interlocked schedule's live micro-batches
    for label, routing in interlocked_cases(S):
        if routing.k == S:
            continue
        caps = inter[label].peak_live
        capped = {}
        for n, o in orders.items():
            c = cap_memory(o, caps)
            capped[n] = (simulate_order(c, cost, batches, name=c.name),
                         sum(1 for t in c.ranks[0] if t.op == "recompute"))
        cbest = min(((n, r.step_time) for n, (r, _) in capped.items()), key=lambda x: x[1])
        row = _row("equal_memory", label, "interlocked", S, M, routing.k, routing.combine, inter[label], 0.0,
                   base, cbest, bound3m)
        rows.append({**row, "recompute_s0": 0})
        for n, (r, rec) in capped.items():
            row = _row("equal_memory", r.name, "global", S, M, routing.k, routing.combine, r, 0.0, base, cbest, bound3m)
            rows.append({**row, "recompute_s0": rec, "capped_at": label})
    # latency: per-hop delay c forwards; interlocked as the engine runs it and re-planned
    at_zero = {}
    for c in LATENCIES:
        lat = c * F
        g = {n: simulate_order(o, cost, batches, latency=lat) for n, o in orders.items()}
        lbase = g[BASELINE].step_time
        lbest = min(((n, r.step_time) for n, r in g.items()), key=lambda x: x[1])
        cand = [(n, "global", S, "furthest", r) for n, r in g.items()]
        for label, routing in interlocked_cases(S):
            cand.append((label, "interlocked", routing.k, routing.combine,
                         simulate(interlocked(routing, M), cost, batches, flush=False, name=label, latency=lat)))
            plan = interlocked(routing, M, cost=charge_aux_heads(cost, routing), latency=lat)
            if check_nccl:
                require_safe(plan, BatchEnd(flush=False))      # raises on a deadlock under NCCL
            cand.append((label + " replanned", "interlocked", routing.k, routing.combine,
                         simulate(plan, cost, batches, flush=False, name=label + " replanned", latency=lat)))
        for n, kind, k, combine, r in cand:
            at_zero.setdefault(n, r.step_time)
            row = _row("latency", n, kind, S, M, k, combine, r, c, lbase, lbest, bound3m)
            rows.append({**row, "latency_abs": lat, "slowdown": r.step_time / at_zero[n],
                         "nccl_checked": kind == "interlocked" and n.endswith("replanned") and check_nccl})
    return rows, missing


# ---------------------------------------------------------------- goals

def goals(rows, S=8, M=8):
    """The issue's goals at S = 8, M = 8, from the rows (never assumed)."""
    sel = lambda table, name: next((r for r in rows if r["table"] == table and r["S"] == S  # noqa: E731
                                    and r["M"] == M and r["schedule"] == name
                                    and (table != "latency" or r["latency"] == 0)), None)
    out = []

    def add(name, value, limit, detail):
        out.append({"target": name, "pass": bool(value <= limit + 1e-9), "value": value, "limit": limit,
                    "detail": detail})

    local, pair = sel("main", "interlocked k=1"), sel("main", "interlocked k=2")
    if local is None or pair is None:
        return out
    add("local <= 0.6 x DeepSpeed 1F1B", local["vs_1f1b"], 0.6,
        f"{local['step']:.4g} vs {local['step'] / local['vs_1f1b']:.4g} (x{local['vs_1f1b']:.3f})")
    add("local <= 0.9 x best global", local["vs_best_global"], 0.9,
        f"{local['step']:.4g} vs {local['best_global']} (x{local['vs_best_global']:.3f})")
    add("pairwise <= 0.8 x DeepSpeed 1F1B", pair["vs_1f1b"], 0.8,
        f"{pair['step']:.4g} (x{pair['vs_1f1b']:.3f})")
    eq = sel("equal_memory", "interlocked k=2")
    add("pairwise <= 0.85 x best global at equal memory", eq["vs_best_global"], 0.85,
        f"{eq['step']:.4g} vs {eq['best_global']} at live {eq['peak_live']} "
        f"({eq['step'] / eq['vs_best_global']:.4g}; x{eq['vs_best_global']:.3f})")
    for r in rows:
        if r["table"] == "main" and r["S"] == S and r["M"] == M and r["schedule"].startswith("interlocked"):
            add(f"{r['schedule']} within 10% of its own bound", r["vs_bound"], 1.10,
                f"{r['step']:.4g} vs bound {r['own_bound']:.4g} (x{r['vs_bound']:.3f})")
    return out


# ---------------------------------------------------------------- output

def _pick(rows, table, S, M):
    return [r for r in rows if r["table"] == table and r["S"] == S and r["M"] == M]


def markdown(params, rows, missing, targets):
    lines = ["# Simulated schedules: interlocked against the global schedules of torch and DeepSpeed", "",
             f"Generated by `python benchmarks/schedule.py`; cost model: {params['cost_model']} "
             f"(time unit: {params['unit']}); steady state over {params['batches']} batches "
             "((T(B) - T(2)) / (B - 2)); global schedules flush (optimizer-step barrier) after every "
             "batch, interlocked ones step per stage. `live s0`: peak micro-batches holding "
             "activations on stage 0 (for two-stage-per-rank schedules, rank 0's two half stages "
             "together, in whole-stage micro-batches). `/own bound`: over the busiest stage's own "
             "work; `/3M bound`: over the busiest stage's forwards and full backwards (3M at unit "
             "costs). How the library orders were obtained, the cost and latency models and the "
             "equal-memory rule: [schedule_vs_global.md](schedule_vs_global.md).", ""]
    lines += ["## Goals (S = 8, M = 8)", ""]
    lines += [f"- **{'PASS' if t['pass'] else 'FAIL'}** {t['target']}: {t['detail']}" for t in targets]
    lines.append("")
    for S in params["stages"]:
        for M in params["micro_batches"]:
            lines += [f"## S = {S}, M = {M}", ""]
            if missing.get(f"{S},{M}"):
                lines += ["Not offered at this shape: " + "; ".join(missing[f"{S},{M}"].values()), ""]
            lines += ["Main (latency 0):", "", format_table(_pick(rows, "main", S, M), COLUMNS, markdown=True), ""]
            lines += ["Equal memory (global schedules capped at the interlocked schedule's live micro-batches, "
                      "recomputing):", "", format_table(_pick(rows, "equal_memory", S, M), EQ_COLUMNS,
                                                        markdown=True), ""]
            lat = [r for r in _pick(rows, "latency", S, M) if r["kind"] == "global" or "k=1" in r["schedule"]
                   or "k=2" in r["schedule"] or "k=3" in r["schedule"]]
            lines += ["Per-hop latency c (in forwards):", "", format_table(lat, LAT_COLUMNS, markdown=True), ""]
    return "\n".join(lines) + "\n"


def cost_models(args):
    """{S: (cost, description)} for the stage counts to simulate."""
    if not args.costs:
        desc = "unit (F=1, I=1, B=2 so W=1, messages 0" + (f", aux head {args.aux_head:g} F" if args.aux_head else "") + ")"
        stages = [4] if args.quick else [4, 8]
        return {S: (unit_costs(args.aux_head), desc) for S in stages}
    with open(args.costs) as f:
        data = json.load(f)
    if args.replicate_stages:
        return {S: (cost_from_json(replicate_stages(data, S, args.profile_stage)),
                    f"{args.costs} (stage {args.profile_stage or 'profiled'} replicated to {S})")
                for S in args.replicate_stages}
    cost = cost_from_json(data)
    return {cost.num_stages: (cost, args.costs)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="write all rows, goals and parameters here")
    ap.add_argument("--markdown", help="write the tables and goals as markdown here")
    ap.add_argument("--timeline", help="PNG at S=8, M=8 (S=4 with --quick): DeepSpeed 1F1B, torch ZB1P, "
                                       "interlocked local and pairwise, 3 batches")
    ap.add_argument("--costs", help="measured per-stage costs ({'per_stage': {'0': {'forward': s, ..., "
                                    "'aux_head': s}}})")
    ap.add_argument("--replicate_stages", type=int, nargs="+",
                    help="simulate these stage counts from one profiled stage (see --profile_stage)")
    ap.add_argument("--profile_stage", help="which profiled stage to replicate (default: the only one)")
    ap.add_argument("--aux_head", type=float, default=0.0, help="unit costs: an aux head's forward+backward, in F")
    ap.add_argument("--batches", type=int, default=6, help="batches replayed for the steady state (>= 3)")
    ap.add_argument("--quick", action="store_true", help="S=4, M=8 only (tests); goals then not computed")
    ap.add_argument("--no_nccl_check", action="store_true", help="skip the NCCL model on re-planned schedules")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a goal fails")
    args = ap.parse_args(argv)
    if args.batches < 3:
        ap.error("--batches must be >= 3 for a steady state")
    if args.replicate_stages and not args.costs:
        ap.error("--replicate_stages needs --costs")

    models = cost_models(args)
    micro = [8] if args.quick else [4, 8, 16, 32]
    rows, missing = [], {}
    for S, (cost, _) in models.items():
        for M in micro:
            got, miss = shape_tables(S, M, cost, args.batches, check_nccl=not args.no_nccl_check)
            rows += got
            missing[f"{S},{M}"] = miss
    stages = list(models)
    unit = next(iter(models.values()))[0]
    unit = getattr(unit, "unit", "F")
    targets = goals(rows)
    params = {"stages": stages, "micro_batches": micro, "batches": args.batches, "unit": unit,
              "cost_model": "; ".join(sorted({d for _, d in models.values()})), "baseline": BASELINE,
              "latencies_in_forwards": list(LATENCIES), "global_flush": True, "interlocked_flush": False,
              "aux_head": args.aux_head if not args.costs else "from --costs"}

    for S in stages:
        for M in micro:
            print(f"\nS = {S}, M = {M}  (step time per batch in {unit}, steady state)")
            for name, why in missing[f"{S},{M}"].items():
                print(f"  not offered: {why}")
            print(format_table(_pick(rows, "main", S, M), COLUMNS))
            print("\n  equal memory:")
            print(format_table(_pick(rows, "equal_memory", S, M), EQ_COLUMNS))
            print("\n  per-hop latency (c in forwards):")
            print(format_table(_pick(rows, "latency", S, M), LAT_COLUMNS))
    if targets:
        print("\nGoals at S = 8, M = 8:")
        for t in targets:
            print(f"  {'PASS' if t['pass'] else 'FAIL'}  {t['target']}: {t['detail']}")
    ok = all(t["pass"] for t in targets)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"parameters": params, "rows": rows, "not_offered": missing, "targets": targets,
                       "all_targets_pass": ok}, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(params, rows, missing, targets))
    if args.timeline:
        S = 8 if 8 in models else stages[0]
        cost = models[S][0]
        orders, _ = global_orders(S, 8)
        items = [simulate_order(orders[BASELINE], cost, 3), simulate_order(orders["torch ZB1P"], cost, 3)]
        for label, routing in interlocked_cases(S)[:2]:
            items.append(simulate(interlocked(routing, 8), cost, 3, flush=False, name=label))
        timeline_png(items, args.timeline, titles=[
            f"{r.name}: S={S}, M=8, 3 batches, {r.step_time:.4g} {r.unit}/batch, live s0 {r.peak_live[0]:g}"
            for r in items])
    return 0 if ok or not args.strict else 1


if __name__ == "__main__":
    sys.exit(main())
