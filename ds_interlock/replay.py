"""Replays a Schedule the way the engine runs it, to prove it correct and to time it.

    python -m ds_interlock.replay --transport nccl         # the whole matrix, NCCL's rules
    python -m ds_interlock.replay --transport nccl --layout shared --stages 2 --k 2 -v

One rule set serves the checker and the simulator: sends never block (isend),
a receive waits for the matching send, and messages on one channel arrive in the
order they were sent. Each action's local needs are in ``local_needs``.

``replay(schedule, cost)`` runs every stage's list in order with a clock per stage;
it raises ScheduleError on a mismatched receive, an unmet dependency or a deadlock,
and returns a Trace (start/end of every action, peak live activations per stage).
"""
from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass, field

from .actions import UNIT_COSTS, unit_cost  # noqa: F401  (re-exported: the cost model of the docs)


class ScheduleError(Exception):
    pass


@dataclass
class Trace:
    schedule: object
    events: list = field(default_factory=list)       # (stage, action, start, end)
    peak_live: list = field(default_factory=list)    # per stage: most micro-batches between forward and weight_grad
    makespan: float = 0.0

    def busy(self, s):
        return sum(e - b for st, _, b, e in self.events if st == s)

    def idle_fraction(self, s):
        return 1.0 - self.busy(s) / self.makespan if self.makespan else 0.0


def channel(stage: int, action, num_stages: int) -> tuple | None:
    """(sender, receiver, kind) of the message an action sends or receives, else None."""
    if action.op == "send_act":
        return (stage, stage + 1, "act")
    if action.op == "recv_act":
        return (stage - 1, stage, "act")
    if action.op == "send_grad":
        return (stage, stage - 1, "grad")
    if action.op == "recv_grad":
        return (stage + 1, stage, "grad")
    return None


def local_needs(routing, stage: int, action, done: set) -> str | None:
    """Why ``action`` cannot run yet on ``stage`` given the set ``done`` of finished
    (op, mb, loss) on that stage; None when it can."""
    op, mb, j = action.op, action.mb, action.loss
    has = lambda o, l=-1: (o, mb, l) in done   # noqa: E731
    if op == "forward":
        src = "load" if stage == 0 else "recv_act"
        return None if has(src) else f"forward({mb}) before its input ({src})"
    if op in ("send_act", "recv_grad"):
        return None if has("forward") else f"{action} before forward({mb})"
    if op == "input_grad":
        if not has("forward"):
            return f"{action} before forward({mb})"
        if j != stage and not has("recv_grad", j):
            return f"{action} before its component arrived"
        return None
    if op == "weight_grad":
        if not has("forward"):
            return f"{action} before forward({mb})"
        missing = [l for l in routing.trains(stage) if l != stage and not has("recv_grad", l)]
        if missing:
            return f"{action} before components {missing}"
        chains = [l for l in routing.input_chains(stage) if not has("input_grad", l)]
        if chains:
            return f"{action} frees the graph before input chains {chains}"
        return None
    if op == "send_grad":
        made = has("weight_grad") if j == routing.fused_input(stage) else has("input_grad", j)
        return None if made else f"{action} before its gradient exists"
    return None   # load, recv_act, per-batch actions (their place is checked by _check_complete)


def replay(schedule, cost=unit_cost, flush: bool = True, transport: str = "gloo", layout: str = "channel",
           latency: float = 0.0) -> Trace:
    """``flush``: the optimizer step is a barrier across stages (DeepSpeed's global
    gradient clipping and loss broadcast); False: steps are stage-local, so batch b+1
    may start on a stage while later stages still drain batch b. ``latency``: every
    message arrives that long after its send ends (neither rank is busy meanwhile).

    ``transport``: "gloo" replays with buffered sends (the rules above); "nccl" also runs
    the schedule, as the engine issues it over ``layout``, through the model of NCCL's
    stream rules (commcheck.py) and raises DeadlockError if it would hang on GPUs."""
    if transport == "nccl":
        from .commcheck import BatchEnd, assert_completes
        assert_completes(schedule, BatchEnd(flush=flush), layout, cost)
    elif transport != "gloo":
        raise ValueError(f"transport must be 'gloo' or 'nccl', got {transport!r}")
    routing, S = schedule.routing, schedule.routing.num_stages
    lists = [list(schedule.for_stage(s)) for s in range(S)]
    pos = [0] * S
    clock = [0.0] * S
    done = [set() for _ in range(S)]
    sent = defaultdict(deque)   # channel -> deque of (mb, loss, arrival time)
    live, peak = [0] * S, [0] * S
    trace = Trace(schedule)
    _check_complete(schedule)
    at_step = {}                # batch -> {stage: time it reached its step}
    steps_done = [0] * S
    progress = True
    while progress:
        progress = False
        for s in range(S):
            while pos[s] < len(lists[s]):
                act = lists[s][pos[s]]
                why = local_needs(routing, s, act, done[s])
                if why:
                    raise ScheduleError(f"stage {s}, action {pos[s]} ({act}): {why}")
                ch = channel(s, act, S)
                start = clock[s]
                if act.op.startswith("recv"):
                    queue = sent[ch]
                    if not queue:
                        break            # blocked: the matching send has not happened yet
                    mb, loss, t = queue.popleft()
                    if (mb, loss) != (act.mb, act.loss):
                        raise ScheduleError(f"stage {s} receives {act} but stage {ch[0]} sent "
                                            f"mb={mb} loss={loss} first on that channel")
                    start = max(start, t)
                if act.op == "step" and flush:
                    arrived = at_step.setdefault(steps_done[s], {})
                    arrived[s] = clock[s]
                    if len(arrived) < S:
                        break            # blocked in the barrier until every stage arrives
                    start = max(arrived.values())
                end = start + cost(s, act)
                if act.op.startswith("send"):
                    sent[ch].append((act.mb, act.loss, end + latency))
                if act.op == "forward":
                    live[s] += 1
                    peak[s] = max(peak[s], live[s])
                elif act.op == "weight_grad":
                    live[s] -= 1
                elif act.op == "step":
                    steps_done[s] += 1
                done[s].add((act.op, act.mb, act.loss))
                clock[s] = end
                trace.events.append((s, act, start, end))
                pos[s] += 1
                progress = True
    stuck = [(s, str(lists[s][pos[s]])) for s in range(S) if pos[s] < len(lists[s])]
    if stuck:
        raise ScheduleError(f"deadlock: stages wait forever at {stuck}")
    leftovers = {ch: list(q) for ch, q in sent.items() if q}
    if leftovers:
        raise ScheduleError(f"messages sent but never received: {leftovers}")
    trace.peak_live = peak
    trace.makespan = max(clock) if clock else 0.0
    return trace


def _check_complete(schedule) -> None:
    """Every stage does each piece of its work exactly once, and ends every batch with its step."""
    routing, M, B = schedule.routing, schedule.micro_batches, schedule.batches
    for s in range(routing.num_stages):
        want = []
        for m in range(M * B):
            if s == 0 or s == routing.last:
                want.append(("load", m, -1))
            if s > 0:
                want.append(("recv_act", m, -1))
            want.append(("forward", m, -1))
            if s < routing.last:
                want.append(("send_act", m, -1))
            if schedule.name == "inference":
                continue
            want += [("recv_grad", m, j) for j in routing.receives(s)]
            want += [("input_grad", m, j) for j in routing.input_chains(s)]
            want.append(("weight_grad", m, -1))
            want += [("send_grad", m, j) for j in routing.sends(s)]
        if schedule.name != "inference":
            want += [("reduce_tied", -1, -1), ("reduce_grads", -1, -1), ("step", -1, -1)] * B
        got = [(a.op, a.mb, a.loss) for a in schedule.for_stage(s)]
        if sorted(got) != sorted(want):
            extra = sorted(set(got) - set(want))
            missing = sorted(set(want) - set(got))
            raise ScheduleError(f"stage {s}: missing {missing[:5]}, unexpected {extra[:5]}"
                                + (", duplicated actions" if not (missing or extra) else ""))
        if schedule.name == "inference":
            continue
        # each batch's micro-batches are finished before that batch's reduce/step
        batch_of = lambda a: a.mb // M   # noqa: E731
        b = 0
        acts = schedule.for_stage(s)
        for i, a in enumerate(acts):
            if a.op == "reduce_tied":
                if [x.op for x in acts[i:i + 3]] != ["reduce_tied", "reduce_grads", "step"]:
                    raise ScheduleError(f"stage {s}: a batch must end with reduce_tied, reduce_grads, step")
                b += 1
            elif a.mb >= 0 and batch_of(a) != b:
                raise ScheduleError(f"stage {s}: {a} of batch {batch_of(a)} runs inside batch {b}")


# ---------------------------------------------------------------- command line

def _int_list(text):
    """'2-8', '1,2,4' or '2-4,8' -> [ints]."""
    out = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            lo, hi = part.split("-", 1)
            out += list(range(int(lo), int(hi) + 1))
        elif part:
            out.append(int(part))
    if not out or min(out) < 1:
        raise ValueError(f"expected positive integers like '2-8' or '1,2,4', got {text!r}")
    return out


def _check_one(job):
    from .commcheck import run_case
    case, transport, layout, logger_sync = job
    return str(case), run_case(case, transport, layout, logger_sync)


def main(argv=None):
    import argparse
    import sys
    import time
    from .commcheck import LAYOUTS, check_deepspeed, matrix

    p = argparse.ArgumentParser(
        prog="python -m ds_interlock.replay",
        description="Check that every schedule ds_interlock generates runs to completion: under gloo's "
                    "buffered sends, or under a model of NCCL's stream rules (no deadlock on GPUs).")
    p.add_argument("--transport", choices=("nccl", "gloo"), default="nccl")
    p.add_argument("--layout", choices=LAYOUTS, default="channel",
                   help="which communicator carries which message (nccl only): channel = one group per boundary "
                        "and direction (what the engine uses); shared = everything on the default group "
                        "(DeepSpeed's eager NCCL init; the old layout); pair = one per pair of ranks; "
                        "direction = one per direction for the whole pipeline")
    p.add_argument("--stages", default="2-16", help="stage counts, e.g. 2-8 or 2,4,8")
    p.add_argument("--k", default="all", help="k values (all = 1..S)")
    p.add_argument("--micro_batches", default="1,2,4,8,16,32,64")
    p.add_argument("--combine", default="furthest,sum")
    p.add_argument("--schedules", default="1f1b,interlocked")
    p.add_argument("--batches", default="1,3", help="back-to-back batches per check (>1 also without flush)")
    p.add_argument("--comms_logger", action="store_true",
                   help="model DeepSpeed's comms_logger: a device synchronize after every send")
    p.add_argument("--deepspeed", action="store_true",
                   help="also check DeepSpeed's own TrainSchedule (blocking sends) under --layout shared/pair")
    p.add_argument("--jobs", type=int, default=1, help="worker processes")
    p.add_argument("-v", "--verbose", action="store_true", help="print every deadlock's wait-for cycle")
    args = p.parse_args(argv)
    try:
        stages = _int_list(args.stages)
        ks = None if args.k == "all" else _int_list(args.k)
        mbs = _int_list(args.micro_batches)
        batches = _int_list(args.batches)
    except ValueError as exc:
        p.error(str(exc))
    combines = [c.strip() for c in args.combine.split(",") if c.strip()]
    schedules = [c.strip() for c in args.schedules.split(",") if c.strip()]
    start = time.time()
    jobs = ((case, args.transport, args.layout, args.comms_logger)
            for case in matrix(stages, ks, mbs, combines, schedules, batches))
    n = bad = 0
    first = None
    if args.jobs > 1:
        import multiprocessing
        pool = multiprocessing.Pool(args.jobs)
        results = pool.imap_unordered(_check_one, jobs, chunksize=8)
    else:
        results = map(_check_one, jobs)
    for name, why in results:
        n += 1
        if why:
            bad += 1
            first = first or (name, why)
            if args.verbose:
                print(f"DEADLOCK {name}:\n{why}\n", flush=True)
        if n % 500 == 0:
            print(f"  {n} checked, {bad} deadlocks ({time.time() - start:.0f} s)", file=sys.stderr, flush=True)
    if args.deepspeed:
        for S in stages:
            for M in mbs:
                for B in batches:
                    n += 1
                    result = check_deepspeed(S, M, B, "pair" if args.layout == "pair" else "shared")
                    if not result.ok:
                        bad += 1
                        first = first or (f"DeepSpeed TrainSchedule S={S} M={M} batches={B}", str(result.deadlock))
    if first and not args.verbose:
        print(f"first deadlock: {first[0]}\n{first[1]}\n")
    layout = args.layout if args.transport == "nccl" else "buffered sends"
    print(f"{n} schedules checked under {args.transport} ({layout}): {bad} deadlocks "
          f"[{time.time() - start:.0f} s]")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
