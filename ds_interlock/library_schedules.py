"""The global schedules a user can pick, as their own libraries generate them.

Each function returns a ``RankOrder`` (rank_order.py) for S ranks and M micro-batches, or
raises ``Unavailable`` (with the library's reason) where the library refuses that shape:

* torch.distributed.pipelining: ``Schedule1F1B`` is left out (its ``pipeline_order`` IR
  numbers the last rank's forwards 1..M in torch 2.13; the order it executes is DeepSpeed's
  1F1B with one more warm-up forward); ``ScheduleInterleaved1F1B`` and
  ``ScheduleInterleavedZeroBubble`` (ZB1P, also with one stage per rank: ZB-H1),
  ``ScheduleZBVZeroBubble`` and ``ScheduleDualPipeV``. Their constructors compute every
  rank's ``pipeline_order`` from the stage objects' ``num_stages``, ``group_size`` and
  ``group_rank`` alone, so stand-in stages (no process group, no model) are enough; the
  order is read from the instance, compute actions only (F, I, W, B; OVERLAP_F_B is its
  F then its B, as the runtime runs it without a custom overlap function).
* DeepSpeed 0.19.8: ``TrainSchedule`` (1F1B) is ours ``one_f_one_b``, converted by
  ``from_schedule``; ``DualPipeVSchedule`` (runtime/pipe/schedule.py, run by
  ``DualPipeVEngine``) is a plain generator of instructions per rank, read as such,
  ``CommitP2P`` included (its sends leave at the next commit).
"""
from __future__ import annotations

from types import SimpleNamespace

from .rank_order import RankOrder, Task


class Unavailable(ValueError):
    """The library does not offer this schedule for this shape."""


def from_schedule(schedule, name: str = "DeepSpeed 1F1B") -> RankOrder:
    """One of our Schedules of plain backprop (k = S, "furthest") as a rank order: one stage
    per rank, its fused weight_grad is the full backward B."""
    r = schedule.routing
    if not (r.k == r.num_stages and r.combine == "furthest"):
        raise ValueError("from_schedule converts plain-backprop schedules (k = S, furthest) only")
    op = {"forward": "forward", "weight_grad": "backward"}
    ranks = tuple(tuple(Task(s, op[a.op], a.mb) for a in acts if a.op in op)
                  for s, acts in enumerate(schedule.stages))
    return RankOrder(name, schedule.micro_batches, tuple(range(r.num_stages)), ranks)


# ---------------------------------------------------------------- torch.distributed.pipelining

_TORCH_OPS = {"F": "forward", "I": "input_grad", "W": "weight", "B": "backward"}


def _torch_order(name: str, cls_name: str, S: int, M: int, per_rank: int, style: str) -> RankOrder:
    from torch.distributed.pipelining import schedules as ts
    from torch.distributed.pipelining._utils import generate_stage_to_rank_mapping

    V = S * per_rank
    stage_rank = generate_stage_to_rank_mapping(S, V, style=style)
    mine = [v for v in range(V) if stage_rank[v] == 0]
    stand_ins = [SimpleNamespace(num_stages=V, group_size=S, group_rank=0, stage_index=v, submod=None,
                                 stage_index_to_group_rank=None) for v in mine]
    try:
        built = getattr(ts, cls_name)(stand_ins, M)
    except ValueError as exc:
        raise Unavailable(f"torch {cls_name}: {exc}") from exc
    ranks = []
    for r in range(S):
        tasks = []
        for a in built.pipeline_order[r]:
            for leaf in (a.sub_actions or (a,)) if a is not None else ():
                kind = leaf.computation_type.value
                if kind in _TORCH_OPS:
                    tasks.append(Task(leaf.stage_index, _TORCH_OPS[kind], leaf.microbatch_index))
        ranks.append(tuple(tasks))
    return RankOrder(name, M, tuple(stage_rank[v] for v in range(V)), tuple(ranks))


def torch_interleaved_1f1b(S: int, M: int) -> RankOrder:
    return _torch_order("torch Interleaved1F1B", "ScheduleInterleaved1F1B", S, M, 2, "loop")


def torch_zb1p(S: int, M: int) -> RankOrder:
    return _torch_order("torch ZB1P", "ScheduleInterleavedZeroBubble", S, M, 2, "loop")


def torch_zbh1(S: int, M: int) -> RankOrder:
    """ScheduleInterleavedZeroBubble with one stage per rank (the ZB-H1 order)."""
    return _torch_order("torch ZB1P v=1", "ScheduleInterleavedZeroBubble", S, M, 1, "loop")


def torch_zbv(S: int, M: int) -> RankOrder:
    return _torch_order("torch ZBV", "ScheduleZBVZeroBubble", S, M, 2, "v")


def torch_dualpipev(S: int, M: int) -> RankOrder:
    return _torch_order("torch DualPipeV", "ScheduleDualPipeV", S, M, 2, "v")


# ---------------------------------------------------------------- DeepSpeed

def deepspeed_dualpipev(S: int, M: int) -> RankOrder:
    """DeepSpeed's DualPipeVSchedule: rank r holds stage r (phase 0) and 2S-1-r (phase 1);
    buffer ids are phase * M + micro-batch; BackwardPass is a full backward."""
    from deepspeed.runtime.pipe import schedule as ds

    ranks = []
    for r in range(S):
        try:
            steps = ds.DualPipeVSchedule(M, S, r).steps()
            cmds = [c for step in steps for c in step]
        except ValueError as exc:
            raise Unavailable(f"DeepSpeed DualPipeVSchedule: {exc}") from exc
        tasks = []
        for c in cmds:
            if isinstance(c, ds.CommitP2P):
                tasks.append(Task(-1, "commit"))
            elif isinstance(c, (ds.ForwardPass, ds.BackwardPass)):
                phase, mb = divmod(c.buffer_id, M)
                if phase != c.phase:
                    raise AssertionError(f"DualPipeV buffer {c.buffer_id} is not in phase {c.phase}")
                stage = r if phase == 0 else 2 * S - 1 - r
                tasks.append(Task(stage, "forward" if isinstance(c, ds.ForwardPass) else "backward", mb))
        ranks.append(tuple(tasks))
    stage_rank = tuple(v if v < S else 2 * S - 1 - v for v in range(2 * S))
    return RankOrder("DeepSpeed DualPipeV", M, stage_rank, tuple(ranks))


LIBRARY = {
    "torch Interleaved1F1B": torch_interleaved_1f1b,
    "torch ZB1P": torch_zb1p,
    "torch ZB1P v=1": torch_zbh1,
    "torch ZBV": torch_zbv,
    "torch DualPipeV": torch_dualpipev,
    "DeepSpeed DualPipeV": deepspeed_dualpipev,
}
