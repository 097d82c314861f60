"""Schedules as plain data: for every stage, an ordered list of actions.

The engine executes a stage's list; tests check and simulate all lists together.
Nothing else describes a schedule, so what is checked is what runs.

The actions and what each one does are listed in actions.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from .actions import PER_BATCH, Action
from .routing import Routing

__all__ = ["Action", "Schedule", "one_f_one_b", "interlocked", "inference", "train_schedule", "plan", "SCHEDULES"]


@dataclass(frozen=True)
class Schedule:
    """One ordered action list per stage."""
    name: str
    routing: Routing
    micro_batches: int
    stages: tuple   # tuple[tuple[Action, ...], ...]: one list per stage
    batches: int = 1   # > 1: several train batches back to back (micro-batch ids run on)

    def for_stage(self, s: int) -> tuple:
        return self.stages[s]

    def repeat(self, batches: int) -> Schedule:
        """This schedule run ``batches`` times in a row, as the engine runs successive
        train_batch calls: micro-batch ids of batch b are offset by b * micro_batches."""
        M = self.micro_batches
        stages = tuple(tuple(Action(a.op, a.mb + b * M if a.mb >= 0 else -1, a.loss)
                             for b in range(batches) for a in acts) for acts in self.stages)
        return Schedule(self.name, self.routing, M, stages, self.batches * batches)

    def grid(self) -> str:
        """A printable one-row-per-stage view."""
        return "\n".join(f"stage {s}: " + " ".join(str(a) for a in acts)
                         for s, acts in enumerate(self.stages))


def forward_actions(routing: Routing, s: int, mb: int) -> list[Action]:
    acts = []
    if s == 0 or s == routing.last:
        acts.append(Action("load", mb))
    if s > 0:
        acts.append(Action("recv_act", mb))
    acts.append(Action("forward", mb))
    if s < routing.last:
        acts.append(Action("send_act", mb))
    return acts


def backward_actions(routing: Routing, s: int, mb: int) -> list[Action]:
    """All backward work of one micro-batch on one stage, bundled (1F1B style)."""
    acts = [Action("recv_grad", mb, j) for j in routing.receives(s)]
    acts += [Action("input_grad", mb, j) for j in routing.input_chains(s)]
    acts.append(Action("weight_grad", mb))
    acts += [Action("send_grad", mb, j) for j in routing.sends(s)]
    return acts


def batch_end_actions() -> list[Action]:
    return [Action(op) for op in PER_BATCH]


def one_f_one_b(routing: Routing, micro_batches: int) -> Schedule:
    """DeepSpeed's 1F1B order: S-1-s warm-up forwards, then one forward / one backward.

    Each backward waits for its whole bundle of incoming components, so every
    gradient still waits on the last stage: this is the baseline.
    """
    S, M = routing.num_stages, micro_batches
    stages = []
    for s in range(S):
        warm = min(S - 1 - s, M)
        acts = []
        for m in range(warm):
            acts += forward_actions(routing, s, m)
        for i in range(M - warm):
            acts += forward_actions(routing, s, warm + i)
            acts += backward_actions(routing, s, i)
        for m in range(M - warm, M):
            acts += backward_actions(routing, s, m)
        acts += batch_end_actions()
        stages.append(tuple(acts))
    return Schedule("1f1b", routing, M, tuple(stages))


def inference(routing: Routing, micro_batches: int) -> Schedule:
    """Forwards only, every stage reporting its own head's loss."""
    stages = []
    for s in range(routing.num_stages):
        acts = []
        for m in range(micro_batches):
            acts += forward_actions(routing, s, m)
        stages.append(tuple(acts))
    return Schedule("inference", routing, micro_batches, tuple(stages))


SCHEDULES: dict[str, Callable[[Routing, int], Schedule]] = {"1f1b": one_f_one_b}


def train_schedule(name: str, routing: Routing, micro_batches: int) -> Schedule:
    return SCHEDULES[name](routing, micro_batches)


def plan(kind: str, name: str, routing: Routing, micro_batches: int) -> Schedule:
    """The schedule an engine runs: ``kind`` "train" (the order ``name``) or "inference"."""
    return inference(routing, micro_batches) if kind == "inference" else train_schedule(name, routing, micro_batches)


def interlocked(routing: Routing, micro_batches: int, max_live: Optional[int] = None,
                cost: Optional[Callable] = None, latency: float = 0.0) -> Schedule:
    """Each gradient component is computed and sent as soon as it can be.

    Built by list scheduling over unit costs (F = I = 1, W = 2): every stage, whenever
    it is free, takes the most urgent task that is ready: an input-gradient chain
    (a stage upstream waits for it), then a forward while fewer than ``max_live``
    micro-batches hold activations (default k + 1; 1 for k = 1), then a weight-gradient chain.
    Receives are placed just before the first task that needs them, in channel order;
    sends right after the task that made the tensor. Nothing waits on a stage more
    than k-1 downstream, because no task needs anything from further away.

    ``cost`` (a ``cost(stage, action)`` callable, as simulate takes) and ``latency`` (per-hop
    message delay, same unit) re-plan for those: task durations and message arrival times
    come from them, with the same memory cap. Without them (the engine's call) the plan is
    the unit-cost one above, unchanged.
    """
    S, M, k = routing.num_stages, micro_batches, routing.k
    if k == S and routing.combine == "furthest" and max_live is None:
        # nothing is truncated: plain backprop, for which 1F1B's order is already the best
        return Schedule("interlocked", routing, M, one_f_one_b(routing, M).stages)
    return _list_schedule(routing, M, max_live, cost or _UNIT_PLAN, latency)


_UNIT_PLAN = {"forward": 1.0, "input_grad": 1.0, "weight_grad": 2.0}


def _list_schedule(routing: Routing, micro_batches: int, max_live: Optional[int], cost, latency: float) -> Schedule:
    """The list scheduling of interlocked(); ``cost`` is the unit table (the default plan,
    its exact numbers) or a cost(stage, action) callable."""
    S, M, k = routing.num_stages, micro_batches, routing.k
    # local learning never waits, so one live micro-batch loses nothing and halves memory
    cap = max_live or (1 if k == 1 else k + 1)
    INF = float("inf")
    if isinstance(cost, dict):
        duration = lambda s, op, mb, j: cost[op]   # noqa: E731  (the default plan's exact numbers)
    else:
        duration = lambda s, op, mb, j: cost(s, Action(op, mb, j))   # noqa: E731
    acts = [[] for _ in range(S)]
    clock = [0.0] * S
    live = [0] * S
    fwd_done = [0] * S                 # forwards issued per stage (in micro-batch order)
    pending_i = [dict() for _ in range(S)]   # mb -> set of input chains still to do
    pending_w = [set() for _ in range(S)]    # mbs whose forward ran and weight_grad did not
    arrived = [dict() for _ in range(S)]     # (kind, mb, loss) -> arrival time, sent to this stage
    channel_order = [{"act": [], "grad": []} for _ in range(S)]   # messages in send order
    received = [{"act": 0, "grad": 0} for _ in range(S)]
    have = [set() for _ in range(S)]         # (mb, loss) components present

    def send(s, kind, mb, loss, t):
        dst = s + 1 if kind == "act" else s - 1
        arrived[dst][(kind, mb, loss)] = t + latency
        channel_order[dst][kind].append((mb, loss))
        acts[s].append(Action("send_act", mb) if kind == "act" else Action("send_grad", mb, loss))

    def receive_through(s, kind, mb, loss):
        order = channel_order[s][kind]
        while True:
            m, l = order[received[s][kind]]
            received[s][kind] += 1
            acts[s].append(Action("recv_act", m) if kind == "act" else Action("recv_grad", m, l))
            if kind == "grad":
                have[s].add((m, l))
            if (m, l) == (mb, loss):
                return

    def ready_time(s, kind, mb, loss):
        if kind == "grad" and (mb, loss) in have[s]:
            return clock[s]
        return max(clock[s], arrived[s].get((kind, mb, loss), INF))

    def candidates(s):
        """(earliest start, priority, task) for the tasks stage s could do next."""
        out = []
        for mb, chains in pending_i[s].items():
            for j in chains:
                t = clock[s] if j == s else ready_time(s, "grad", mb, j)
                out.append((t, 0, mb, ("input_grad", mb, j)))
        if fwd_done[s] < M and live[s] < cap:
            mb = fwd_done[s]
            t = clock[s] if s == 0 else ready_time(s, "act", mb, -1)
            out.append((t, 1, mb, ("forward", mb, -1)))
        for mb in pending_w[s]:
            if pending_i[s].get(mb):
                continue
            t = clock[s]
            for j in routing.trains(s):
                if j != s:
                    t = max(t, ready_time(s, "grad", mb, j))
            out.append((t, 2, mb, ("weight_grad", mb, -1)))
        return out

    def best_of(s):
        found = [(t, prio, mb, s, task) for t, prio, mb, task in candidates(s) if t < INF]
        return min(found) if found else None

    best = [best_of(s) for s in range(S)]     # only a stage and its neighbours change per task
    remaining = S * M * 2 + sum(len(routing.input_chains(s)) for s in range(S)) * M
    while remaining:
        found = [b for b in best if b is not None]
        if not found:
            raise RuntimeError("interlocked schedule generation stalled (a bug)")
        t, _, _, s, (op, mb, j) = min(found)
        end = t + duration(s, op, mb, j)
        if op == "forward":
            if s == 0 or s == routing.last:
                acts[s].append(Action("load", mb))
            if s > 0:
                receive_through(s, "act", mb, -1)
            acts[s].append(Action("forward", mb))
            fwd_done[s] += 1
            live[s] += 1
            pending_i[s][mb] = set(routing.input_chains(s))
            pending_w[s].add(mb)
            if s < routing.last:
                send(s, "act", mb, -1, end)
        elif op == "input_grad":
            if j != s and (mb, j) not in have[s]:
                receive_through(s, "grad", mb, j)
            acts[s].append(Action("input_grad", mb, j))
            pending_i[s][mb].discard(j)
            send(s, "grad", mb, j, end)
        else:
            for l in routing.trains(s):
                if l != s and (mb, l) not in have[s]:
                    receive_through(s, "grad", mb, l)
            acts[s].append(Action("weight_grad", mb))
            pending_w[s].discard(mb)
            del pending_i[s][mb]
            live[s] -= 1
            fused = routing.fused_input(s)
            if fused is not None:
                send(s, "grad", mb, fused, end)
        clock[s] = end
        remaining -= 1
        for n in (s - 1, s, s + 1):
            if 0 <= n < S:
                best[n] = best_of(n)
    # components that arrived but trained nothing here are still received (FIFO), so drain them
    for s in range(S):
        left = len(channel_order[s]["grad"]) - received[s]["grad"]
        if left:
            raise RuntimeError(f"stage {s} left {left} gradient messages unreceived (a bug)")
        acts[s] += batch_end_actions()
    return Schedule("interlocked", routing, M, tuple(tuple(a) for a in acts))


SCHEDULES["interlocked"] = interlocked
