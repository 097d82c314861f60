"""Replays a Schedule the way the engine runs it, to prove it correct and to time it.

One rule set serves the checker and the simulator: sends never block (isend),
a receive waits for the matching send, and messages on one channel arrive in the
order they were sent. Each action's local needs are in ``local_needs``.

``replay(schedule, cost)`` runs every stage's list in order with a clock per stage;
it raises ScheduleError on a mismatched receive, an unmet dependency or a deadlock,
and returns a Trace (start/end of every action, peak live activations per stage).
"""
from collections import defaultdict, deque
from dataclasses import dataclass, field


class ScheduleError(Exception):
    pass


UNIT_COSTS = {"forward": 1.0, "input_grad": 1.0, "weight_grad": 2.0}   # ALGORITHM.md §3, in units of F


def unit_cost(stage, action):
    return UNIT_COSTS.get(action.op, 0.0)


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


def channel(stage, action, num_stages):
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


def local_needs(routing, stage, action, done):
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


def replay(schedule, cost=unit_cost, flush=True):
    """``flush``: the optimizer step is a barrier across stages (DeepSpeed's global
    gradient clipping and loss broadcast); False: steps are stage-local, so batch b+1
    may start on a stage while later stages still drain batch b."""
    routing, S = schedule.routing, schedule.routing.num_stages
    lists = [list(schedule.for_stage(s)) for s in range(S)]
    pos = [0] * S
    clock = [0.0] * S
    done = [set() for _ in range(S)]
    sent = defaultdict(deque)   # channel -> deque of (mb, loss, time sent)
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
                    sent[ch].append((act.mb, act.loss, end))
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


def _check_complete(schedule):
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
