"""Rank-level orders: how other libraries' global schedules are timed next to ours.

torch.distributed.pipelining and DeepSpeed's DualPipeV describe a schedule as, per rank,
an ordered list of compute tasks on *virtual* stages (a rank may hold two), with the
backward either whole (B) or split into an input-gradient part (I) and a weight part (W).
A ``RankOrder`` holds such a list; ``time_order`` replays it in order on one clock per
rank, every task starting once the tasks it needs have ended (plus the per-hop latency
when they ran on another rank). It returns replay's own ``Trace``, so the simulator's
summaries and pictures serve both kinds of schedule.

Cost model (the same ``cost(stage, action)`` as replay): a virtual stage holding a share
``h`` of its rank's layers costs ``h`` times the rank's forward (F), input-gradient chain
(I) and full backward (B = our fused ``weight_grad``, which back-propagates through the
whole stage); a split-off weight part costs W = B - I, so I + W = B.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from .actions import Action
from .replay import ScheduleError, Trace

# op -> (short text, the Action whose cost it takes; "weight" is costed as B - I)
OPS = {"forward": "F", "input_grad": "I", "weight": "W", "backward": "B", "recompute": "R", "commit": "C"}
FREES = ("backward", "weight")       # the task after which a micro-batch's activations are gone


@dataclass(frozen=True)
class Task:
    stage: int        # virtual stage (-1 for a commit)
    op: str
    mb: int = -1

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"unknown task {self.op!r}; known: {sorted(OPS)}")

    @property
    def loss(self) -> int:            # Action's fields, so trace consumers read both alike
        return -1

    def __str__(self) -> str:
        return OPS[self.op] + (f"{self.mb}" if self.mb >= 0 else "") + (f"@{self.stage}" if self.stage >= 0 else "")


@dataclass(frozen=True)
class RankOrder:
    """One ordered task list per rank. ``stage_rank[v]``: the rank holding virtual stage v.
    A "commit" task (DeepSpeed's CommitP2P) launches the sends queued since the previous one
    and waits for the receives queued before it; orders without commits send at once."""
    name: str
    micro_batches: int
    stage_rank: tuple
    ranks: tuple                      # tuple[tuple[Task, ...], ...]
    flush: bool = True                # an optimizer-step barrier across ranks after each batch
    batches: int = 1

    @property
    def num_ranks(self) -> int:
        return len(self.ranks)

    @property
    def num_stages(self) -> int:
        return len(self.stage_rank)

    def share(self, v: int) -> float:
        """Virtual stage v's share of its rank's layers (and so of its costs and activations)."""
        return 1.0 / sum(1 for r in self.stage_rank if r == self.stage_rank[v])

    def repeat(self, batches: int) -> RankOrder:
        M = self.micro_batches
        ranks = tuple(tuple(Task(t.stage, t.op, t.mb + b * M if t.mb >= 0 else -1)
                            for b in range(batches) for t in tasks) for tasks in self.ranks)
        return RankOrder(self.name, M, self.stage_rank, ranks, self.flush, self.batches * batches)

    def grid(self) -> str:
        return "\n".join(f"rank {r}: " + " ".join(map(str, t)) for r, t in enumerate(self.ranks))


def check_complete(order: RankOrder) -> None:
    """Every (virtual stage, micro-batch) is run forward once and backward once (B, or I then
    W), on the rank that holds the stage; a recompute only precedes that micro-batch's backward."""
    N = order.micro_batches * order.batches
    seen = defaultdict(list)
    for r, tasks in enumerate(order.ranks):
        for t in tasks:
            if t.op == "commit":
                continue
            if not (0 <= t.stage < order.num_stages and 0 <= t.mb < N):
                raise ScheduleError(f"{order.name}: rank {r} runs {t}, outside {order.num_stages} stages x {N} micro-batches")
            if order.stage_rank[t.stage] != r:
                raise ScheduleError(f"{order.name}: rank {r} runs {t} of a stage held by rank {order.stage_rank[t.stage]}")
            seen[(t.stage, t.mb)].append(t.op)
    for v in range(order.num_stages):
        for m in range(N):
            ops = seen.pop((v, m), [])
            plain = [o for o in ops if o != "recompute"]
            if plain not in (["forward", "backward"], ["forward", "input_grad", "weight"]):
                raise ScheduleError(f"{order.name}: stage {v} micro-batch {m} runs {ops} "
                                    "(want F then B, or F, I, W in that order)")
            if "recompute" in ops and ops.index("recompute") != ops.index(plain[1]) - 1:
                raise ScheduleError(f"{order.name}: stage {v} micro-batch {m}: recompute not right before its backward")


def task_cost(order: RankOrder, cost, rank: int, task: Task) -> float:
    """The cost model above; ``cost`` is replay's cost(stage, action), read for the rank."""
    if task.op == "commit":
        return 0.0
    h = order.share(task.stage)
    c = lambda op: cost(rank, Action(op, task.mb))   # noqa: E731
    if task.op in ("forward", "recompute"):
        return h * c("forward")
    if task.op == "input_grad":
        return h * c("input_grad")
    if task.op == "backward":
        return h * c("weight_grad")
    return h * max(0.0, c("weight_grad") - c("input_grad"))


def _needs(order: RankOrder, task: Task, done_ops) -> list:
    """The (stage, op, mb) tasks ``task`` consumes: its forward input, the gradient from the
    next stage, or its own earlier part."""
    v, m, last = task.stage, task.mb, order.num_stages - 1
    if task.op == "forward":
        return [(v - 1, "forward", m)] if v > 0 else []
    if task.op == "recompute":
        return [(v, "forward", m)]
    if task.op in ("input_grad", "backward"):
        own = [(v, "recompute" if (v, "recompute", m) in done_ops else "forward", m)]
        if v == last:
            return own
        nxt = "input_grad" if (v + 1, "input_grad", m) in done_ops else "backward"
        return own + [(v + 1, nxt, m)]
    if task.op == "weight":
        return [(v, "input_grad", m)]
    return []


def time_order(order: RankOrder, cost, latency: float = 0.0) -> Trace:
    """Replay every rank's list in order; raise ScheduleError on incomplete work or a deadlock.
    Trace events are (rank, Task, start, end); ``peak_live`` is per rank, in micro-batches of
    a whole stage (a virtual stage's micro-batch counts its share)."""
    check_complete(order)
    R = order.num_ranks
    all_tasks = {(t.stage, t.op, t.mb) for tasks in order.ranks for t in tasks if t.op != "commit"}
    # commits: a message leaves at the sender's next commit and is waited for at the
    # receiver's previous one (DeepSpeed's queued p2p)
    next_commit, prev_commit = {}, {}
    for r, tasks in enumerate(order.ranks):
        pending, last = [], None
        for i, t in enumerate(tasks):
            if t.op == "commit":
                for key in pending:
                    next_commit[key] = (r, i)
                pending, last = [], (r, i)
            else:
                pending.append((t.stage, t.op, t.mb))
                prev_commit[(t.stage, t.op, t.mb)] = last
    waits = defaultdict(list)         # (rank, index of a commit) -> [(sender's commit, lag)]
    needs = {}
    for r, tasks in enumerate(order.ranks):
        for t in tasks:
            if t.op == "commit":
                continue
            key = (t.stage, t.op, t.mb)
            needs[key] = []
            for dep in _needs(order, t, all_tasks):
                src = order.stage_rank[dep[0]]
                lag = latency if src != r else 0.0
                if src != r and dep in next_commit and prev_commit.get(key) is not None:
                    waits[prev_commit[key]].append((("launch",) + next_commit[dep], lag))
                else:
                    needs[key].append((dep, lag))
    end = {}
    pos, clock = [0] * R, [0.0] * R
    trace = Trace(order)
    barrier = {}                      # batch -> {rank: arrival}
    batch_done = [0] * R
    per_batch = [len(tasks) // order.batches for tasks in order.ranks]   # repeat() concatenates
    progress = True
    while progress:
        progress = False
        for r in range(R):
            tasks = order.ranks[r]
            while pos[r] < len(tasks):
                if order.flush and pos[r] == per_batch[r] * (batch_done[r] + 1):
                    arrived = barrier.setdefault(batch_done[r], {})
                    arrived[r] = clock[r]
                    if len(arrived) < R:
                        break         # the optimizer-step barrier: wait for every rank
                    clock[r] = max(clock[r], max(arrived.values()))
                    batch_done[r] += 1
                t = tasks[pos[r]]
                start = clock[r]
                if t.op == "commit":
                    end[("launch", r, pos[r])] = start
                    deps = waits.get((r, pos[r]), [])
                else:
                    deps = needs[(t.stage, t.op, t.mb)]
                if any(d not in end for d, _ in deps):
                    break             # blocked on another rank (or, if never, a deadlock)
                start = max([start] + [end[d] + lag for d, lag in deps])
                stop = start + task_cost(order, cost, r, t)
                if t.op != "commit":
                    end[(t.stage, t.op, t.mb)] = stop
                clock[r] = stop
                trace.events.append((r, t, start, stop))
                pos[r] += 1
                progress = True
    stuck = [(r, str(order.ranks[r][pos[r]])) for r in range(R) if pos[r] < len(order.ranks[r])]
    if stuck:
        raise ScheduleError(f"{order.name}: deadlock or unmet dependency: ranks wait forever at {stuck}")
    trace.peak_live = peak_live(order)
    trace.makespan = max(clock) if clock else 0.0
    return trace


def peak_live(order: RankOrder) -> list:
    """Per rank, the most activations held between tasks, in micro-batches of a whole stage:
    a (virtual stage, micro-batch) holds its share from its forward (or recompute) until
    its backward or weight part; a forward marked as checkpointed holds none."""
    out = []
    for tasks in order.ranks:
        held, live, peak = set(), 0.0, 0.0
        dropped = {(t.stage, t.mb) for t in tasks if t.op == "recompute"}
        for t in tasks:
            key = (t.stage, t.mb)
            if (t.op == "forward" and key not in dropped) or t.op == "recompute":
                held.add(key)
                live += order.share(t.stage)
            elif t.op in FREES and key in held:
                held.discard(key)
                live -= order.share(t.stage)
            peak = max(peak, live)
        out.append(round(peak, 9))
    return out


def cap_memory(order: RankOrder, caps) -> RankOrder:
    """``order`` with recomputation, so that rank r holds at most ``caps[r]`` micro-batches'
    activations (whole-stage units), the rule of docs/schedule_bench.md: walking the rank's
    order, a micro-batch keeps its activations if that keeps the rank within its cap for the
    micro-batch's whole lifetime; otherwise it keeps only its stage input (not counted, a
    1/layers fraction) and its forward is recomputed right before its backward, holding its
    activations from there to its backward's (or weight part's) end; those windows count
    against later decisions but are not themselves refused, so ``peak_live`` reports what
    results (above the cap only where a cap is below one micro-batch's recompute window)."""
    if order.batches != 1:
        raise ValueError("cap_memory takes a one-batch order; repeat() the result")
    ranks = []
    for r, tasks in enumerate(order.ranks):
        tasks = list(tasks)
        first_bwd, free_at = {}, {}
        for i, t in enumerate(tasks):
            key = (t.stage, t.mb)
            if t.op in ("input_grad", "backward"):
                first_bwd[key] = i
            if t.op in FREES:
                free_at[key] = i
        use = [0.0] * len(tasks)            # weight held while each task runs
        recompute = set()
        for i, t in enumerate(tasks):
            if t.op != "forward":
                continue
            key, h = (t.stage, t.mb), order.share(t.stage)
            span = range(i, free_at[key] + 1)
            if not all(use[j] + h <= caps[r] + 1e-9 for j in span):
                recompute.add(key)              # held again from its recompute (just before
                span = range(first_bwd[key], free_at[key] + 1)   # its backward) to its end
            for j in span:
                use[j] += h
        out = []
        for i, t in enumerate(tasks):
            if (t.stage, t.mb) in recompute and first_bwd.get((t.stage, t.mb)) == i:
                out.append(Task(t.stage, "recompute", t.mb))
            out.append(t)
        ranks.append(tuple(out))
    return RankOrder(f"{order.name} +recompute", order.micro_batches, order.stage_rank, tuple(ranks),
                     order.flush, order.batches)
