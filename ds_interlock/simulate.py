"""Time a Schedule under a cost model: step time, bubbles, memory, and pictures of it.

Everything here consumes a ``Schedule`` and ``replay``: the simulator never has its own
idea of what a schedule is, so what is timed is what the engine runs.

Cost models are callables ``cost(stage, action) -> duration``, as ``replay`` takes them:
``unit_cost`` (docs/algorithm.md: F = I = 1, W = 2, messages free), ``unit_costs(aux_head=x)``
or ``cost_from_json`` (per-stage seconds per op, profiled from a real run). A cost model may
carry an aux-head cost (``cost.aux_head(stage)``: the head's forward + backward), which
``simulate`` charges to the forward of every stage that runs a head.

Per-hop latency (``latency=``) delays every message's arrival without occupying either
stage. Other libraries' global schedules (rank_order.py, library_schedules.py) are timed by
``simulate_order`` under the same costs and latency and give the same SimResult and Trace.
"""
import json
import os
from dataclasses import dataclass, field

from .actions import COMPUTE, unit_cost
from .rank_order import RankOrder, task_cost, time_order
from .replay import replay

COLORS = {"forward": "#4c72b0", "input_grad": "#dd8452", "weight_grad": "#55a868",
          "backward": "#2e7d4f", "weight": "#55a868", "recompute": "#9fb6d9"}
OTHER_COLOR = "#8c8c8c"


# ---------------------------------------------------------------- cost models

def cost_from_json(path_or_dict):
    """A cost(stage, action) callable from ``{"per_stage": {"0": {"forward": sec, ...}, ...}}``.

    ``forward`` is the stage's own forward; an ``aux_head`` entry (its head's forward and
    backward) is charged on top by simulate, on stages that run a head.

    Ops a stage does not list cost 0 (a profile that never saw an op measured nothing);
    a stage that is not listed at all is an error, since silently free stages would make
    any schedule look good.
    """
    if isinstance(path_or_dict, (str, os.PathLike)):
        with open(path_or_dict) as f:
            data = json.load(f)
    else:
        data = path_or_dict
    if "per_stage" not in data:
        raise ValueError("measured costs need a top-level 'per_stage' mapping")
    table = {}
    for stage, ops in data["per_stage"].items():
        table[int(stage)] = {op: float(sec) for op, sec in ops.items()
                             if isinstance(sec, (int, float))}

    def cost(stage, action):
        if stage not in table:
            raise ValueError(f"measured costs have no entry for stage {stage} "
                             f"(stages {sorted(table)})")
        return table[stage].get(action.op, 0.0)

    cost.unit = "s"
    cost.num_stages = len(table)
    # the aux head's forward + backward is its own entry, charged by simulate (charge_aux_heads)
    cost.aux_head = lambda stage: table.get(stage, {}).get("aux_head", 0.0)
    return cost


def time_unit(cost):
    """'F' for unit costs (multiples of one forward), else what the model declares ('s')."""
    return getattr(cost, "unit", "F")


def unit_costs(aux_head=0.0):
    """The unit cost model plus an aux head costing ``aux_head`` forwards per stage."""
    def cost(stage, action):
        return unit_cost(stage, action)
    cost.aux_head = lambda stage: float(aux_head)
    return cost


def replicate_stages(data, num_stages, stage=None):
    """A per-stage cost profile with ``num_stages`` copies of one profiled stage (``stage``,
    or the only one), so one representative stage's measurement can stand for a deeper pipeline."""
    per = data["per_stage"]
    if stage is None:
        if len(per) != 1:
            raise ValueError(f"the profile has stages {sorted(per)}: name the one to replicate")
        stage = next(iter(per))
    if str(stage) not in per:
        raise ValueError(f"the profile has no stage {stage} (stages {sorted(per)})")
    return {**data, "per_stage": {str(s): dict(per[str(stage)]) for s in range(num_stages)},
            "replicated_from": str(stage)}


def aux_head_cost(cost, stage):
    """What the cost model charges for one stage's aux head (forward + backward); 0 if none."""
    aux = getattr(cost, "aux_head", None)
    return float(aux(stage)) if aux is not None else 0.0


def head_stages(routing):
    """Stages whose forward runs an aux head that matters: every stage but the last, unless
    k = S with "furthest" (plain backprop, where heads are optional probes: not charged)."""
    return range(routing.num_stages - 1) if routing.needs_aux_heads else range(0)


def charge_aux_heads(cost, routing):
    """``cost`` with each head's cost added to its stage's forward (the engine runs the head
    inside the forward action)."""
    heads = set(head_stages(routing))
    if not any(aux_head_cost(cost, s) for s in heads):
        return cost

    def charged(stage, action):
        extra = aux_head_cost(cost, stage) if action.op == "forward" and stage in heads else 0.0
        return cost(stage, action) + extra
    charged.unit = time_unit(cost)
    return charged


def mean_forward(cost, num_stages):
    """One forward in the cost model's unit, averaged over stages (latencies are quoted in it)."""
    from .actions import Action
    return sum(cost(s, Action("forward", 0)) for s in range(num_stages)) / num_stages


# ---------------------------------------------------------------- simulation

@dataclass
class SimResult:
    name: str
    schedule: object          # the one-batch Schedule that was simulated
    flush: bool
    batches: int
    unit: str                 # 'F' (unit costs) or 's' (measured)
    trace: object             # replay of ``batches`` batches back to back
    makespan: float
    step_time: float          # steady state per batch when batches >= 3, else makespan / batches
    steady: bool
    busy: list                # per stage, over the whole run
    idle_fraction: list       # per stage, 1 - busy / makespan (fill and drain included)
    work: list                # per stage, its own work per batch under the cost model
    steady_idle: list         # per stage, 1 - work / step_time: bubbles once in steady state
    peak_live: list           # per stage, most micro-batches between forward and weight_grad
    lower_bound: float        # busiest stage's own work per batch
    bound_ratio: float = field(default=0.0)
    latency: float = 0.0      # per-hop message delay it was timed with

    def to_dict(self):
        if isinstance(self.schedule, RankOrder):
            shape = {"num_stages": self.schedule.num_ranks, "k": None, "combine": None}
        else:
            r = self.schedule.routing
            shape = {"num_stages": r.num_stages, "k": r.k, "combine": r.combine}
        return {"name": self.name, **shape, "latency": self.latency,
                "micro_batches": self.schedule.micro_batches, "flush": self.flush,
                "batches": self.batches, "unit": self.unit, "makespan": self.makespan,
                "step_time": self.step_time, "steady": self.steady, "busy": self.busy,
                "idle_fraction": self.idle_fraction, "work": self.work,
                "steady_idle": self.steady_idle, "peak_live": self.peak_live,
                "lower_bound": self.lower_bound, "bound_ratio": self.bound_ratio}


def stage_work(schedule, cost=unit_cost):
    """Per stage, the summed cost of its own actions per batch (waiting excluded)."""
    B = schedule.batches
    return [sum(cost(s, a) for a in acts) / B for s, acts in enumerate(schedule.stages)]


def simulate(schedule, cost=unit_cost, batches=1, flush=True, name=None, latency=0.0):
    """Replay ``batches`` back-to-back batches of a one-batch schedule and summarize.

    With batches >= 3 the step time is (T(B) - T(2)) / (B - 2): the first batch's fill
    and the last batch's drain fall outside the difference, which is what a long run sees.
    Aux heads the cost model prices are charged (charge_aux_heads); ``latency`` delays messages.
    """
    if batches < 1:
        raise ValueError("batches must be >= 1")
    if schedule.batches != 1:
        raise ValueError("simulate() takes a one-batch schedule; use batches= to repeat it")
    cost = charge_aux_heads(cost, schedule.routing)
    trace = replay(schedule.repeat(batches), cost=cost, flush=flush, latency=latency)
    two = (lambda: replay(schedule.repeat(2), cost=cost, flush=flush, latency=latency).makespan) \
        if batches >= 3 else None
    return _summary(name or schedule.name, schedule, flush, batches, cost, trace, two,
                    stage_work(schedule, cost), latency)


def simulate_order(order, cost=unit_cost, batches=1, latency=0.0, name=None):
    """simulate() for a library's rank-level order (rank_order.py): per rank, not per stage."""
    if batches < 1:
        raise ValueError("batches must be >= 1")
    if order.batches != 1:
        raise ValueError("simulate_order() takes a one-batch order; use batches= to repeat it")
    trace = time_order(order.repeat(batches), cost, latency)
    two = (lambda: time_order(order.repeat(2), cost, latency).makespan) if batches >= 3 else None
    work = [sum(task_cost(order, cost, r, t) for t in tasks) for r, tasks in enumerate(order.ranks)]
    return _summary(name or order.name, order, order.flush, batches, cost, trace, two, work, latency)


def _summary(name, schedule, flush, batches, cost, trace, two_batches, work, latency):
    T = trace.makespan
    steady = two_batches is not None
    step = (T - two_batches()) / (batches - 2) if steady else T / batches
    rows = len(work)
    bound = max(work) if work else 0.0
    clamp = lambda x: min(1.0, max(0.0, x))   # noqa: E731  (float noise only)
    return SimResult(
        name=name, schedule=schedule, flush=flush, batches=batches,
        unit=time_unit(cost), trace=trace, makespan=T, step_time=step, steady=steady,
        busy=[trace.busy(s) for s in range(rows)],
        idle_fraction=[clamp(trace.idle_fraction(s)) for s in range(rows)],
        work=work, steady_idle=[clamp(1.0 - w / step) if step else 0.0 for w in work],
        peak_live=list(trace.peak_live), lower_bound=bound,
        bound_ratio=step / bound if bound else float("inf"), latency=latency)


# ---------------------------------------------------------------- pictures and traces

def _trace_of(x):
    return x.trace if isinstance(x, SimResult) else x


def _rows(schedule):
    """Timeline rows: stages of a Schedule, ranks of a library's RankOrder."""
    return schedule.num_ranks if isinstance(schedule, RankOrder) else schedule.routing.num_stages


def _default_title(x):
    tr = _trace_of(x)
    flush = f", flush={x.flush}" if isinstance(x, SimResult) else ""
    if isinstance(tr.schedule, RankOrder):
        return f"{tr.schedule.name}  S={tr.schedule.num_ranks}  M={tr.schedule.micro_batches}{flush}"
    r = tr.schedule.routing
    return f"{tr.schedule.name}  S={r.num_stages} k={r.k} {r.combine}  M={tr.schedule.micro_batches}{flush}"


def _lighten(color, amount):
    from matplotlib.colors import to_rgb
    return tuple(c + (1 - c) * amount for c in to_rgb(color))


def timeline_png(results_or_traces, path, titles=None, dpi=110):
    """One panel per schedule (shared time axis), one row per stage, a box per action.

    Forward / input-grad / weight-grad boxes are coloured by kind, with the micro-batch
    id inside when it fits; successive batches alternate in shade. Messages and per-batch
    ops that cost nothing are left out, except the optimizer step (a thin black tick),
    because where it sits shows the flush.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    items = list(results_or_traces)
    if not items:
        raise ValueError("nothing to draw")
    titles = list(titles) if titles is not None else [_default_title(x) for x in items]
    traces = [_trace_of(x) for x in items]
    xmax = max(t.makespan for t in traces) or 1.0
    rows = [_rows(t.schedule) for t in traces]
    width = 14.0
    fig, axes = plt.subplots(len(traces), 1, sharex=True, squeeze=False,
                             figsize=(width, sum(0.45 * r + 0.9 for r in rows)),
                             gridspec_kw={"height_ratios": rows})
    axes = axes[:, 0]
    px_per_unit = width * dpi * 0.85 / xmax   # rough: the axes take ~85% of the figure width
    for ax, tr, title in zip(axes, traces, titles):
        M = tr.schedule.micro_batches
        S = _rows(tr.schedule)
        for s, act, start, end in tr.events:
            dur = end - start
            y = S - 1 - s                      # stage 0 on top
            if act.op in COLORS:
                shade = 0.45 if (act.mb // M) % 2 else 0.0
                ax.barh(y, dur, left=start, height=0.8, color=_lighten(COLORS[act.op], shade),
                        edgecolor="white", linewidth=0.5)
                label = str(act.mb % M)
                if dur * px_per_unit >= 6.5 * len(label) + 3:
                    ax.text(start + dur / 2, y, label, ha="center", va="center",
                            fontsize=7, color="white" if shade == 0 else "black")
            elif act.op == "step":
                ax.plot([start, start], [y - 0.45, y + 0.45], color="black", linewidth=1.2)
            elif dur > 0:
                ax.barh(y - 0.3, dur, left=start, height=0.2, color=OTHER_COLOR)
        ax.set_yticks(range(S))
        what = "rank" if isinstance(tr.schedule, RankOrder) else "stage"
        ax.set_yticklabels([f"{what} {S - 1 - i}" for i in range(S)], fontsize=8)
        ax.set_ylim(-0.6, S - 0.4)
        ax.set_title(title, fontsize=9, loc="left")
        ax.grid(axis="x", alpha=0.3)
    axes[-1].set_xlim(0, xmax)
    unit = items[0].unit if isinstance(items[0], SimResult) else "F"
    axes[-1].set_xlabel("time (units of one forward)" if unit == "F" else f"time ({unit})")
    present = {a.op for t in traces for _, a, _, _ in t.events}
    handles = [Patch(color=COLORS[k], label=k) for k in COLORS if k in present or k in COMPUTE]
    handles.append(Patch(color="black", label="step"))
    # above the first panel, right of its (left-aligned) title: never over a box
    axes[0].legend(handles=handles, loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize=7,
                   ncol=4, frameon=False, borderaxespad=0.2)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def chrome_trace(trace, path, us_per_unit=None):
    """Chrome trace-event JSON (chrome://tracing, Perfetto): one thread per stage.

    Times are microseconds: a unit-cost unit is 1000 us, measured seconds are 1e6 us.
    Compute actions always get an event; other actions only when they take time.
    """
    unit = trace.unit if isinstance(trace, SimResult) else "F"
    tr = _trace_of(trace)
    if us_per_unit is None:
        us_per_unit = 1e6 if unit == "s" else 1000.0
    M = tr.schedule.micro_batches
    events = [{"name": "process_name", "ph": "M", "pid": 0, "tid": 0,
               "args": {"name": _default_title(trace)}}]
    for s in range(_rows(tr.schedule)):
        events.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": s,
                       "args": {"name": f"stage {s}"}})
        events.append({"name": "thread_sort_index", "ph": "M", "pid": 0, "tid": s,
                       "args": {"sort_index": s}})
    for s, act, start, end in tr.events:
        if act.op not in COMPUTE and end <= start:
            continue
        args = {"op": act.op}
        if act.mb >= 0:
            args.update(mb=act.mb, batch=act.mb // M)
        if act.loss >= 0:
            args["loss"] = act.loss
        events.append({"name": str(act), "cat": act.op, "ph": "X", "pid": 0, "tid": s,
                       "ts": start * us_per_unit, "dur": (end - start) * us_per_unit,
                       "args": args})
    with open(path, "w") as f:
        json.dump({"traceEvents": events, "displayTimeUnit": "ms"}, f)
    return path


# ---------------------------------------------------------------- tables

def _fmt(v):
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != v or v in (float("inf"), float("-inf")):
            return str(v)
        if v == int(v) and abs(v) < 1e6:
            return f"{v:.0f}"
        return f"{v:.1f}" if abs(v) >= 100 else f"{v:.3g}"
    return str(v)


def format_table(rows, columns, markdown=False):
    """Aligned text table. ``rows``: dicts (keyed by column) or sequences (in column order);
    ``columns``: names, or (key, header) pairs. Numbers are right-aligned."""
    cols = [c if isinstance(c, tuple) else (c, c) for c in columns]
    cells = []
    for row in rows:
        if isinstance(row, dict):
            cells.append([_fmt(row.get(k, "")) for k, _ in cols])
        else:
            cells.append([_fmt(v) for v in row])
    heads = [h for _, h in cols]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(heads)]
    numeric = [all(_is_number(r[i]) for r in cells) and bool(cells) for i in range(len(cols))]

    def line(vals):
        out = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(vals, widths, numeric)]
        return ("| " + " | ".join(out) + " |") if markdown else "  ".join(out).rstrip()

    lines = [line(heads)]
    if markdown:
        lines.append("|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2))
                                    for w, num in zip(widths, numeric)) + "|")
    else:
        lines.append("  ".join("-" * w for w in widths))
    lines += [line(r) for r in cells]
    return "\n".join(lines)


def _is_number(text):
    try:
        float(text.rstrip("x%"))
        return True
    except ValueError:
        return False
