"""The action vocabulary: the one list of what a pipeline stage can do.

A schedule (schedule.py) is a list of these per stage; the executor (stage.py) runs them,
the replay (replay.py) checks and times them, the NCCL model (commcheck.py) maps them to
stream operations, and the simulator draws them. Every one of those reads this table.

``mb`` = micro-batch, ``loss`` = which loss's gradient component (docs/algorithm.md: L_j).
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class OpSpec:
    name: str
    short: str        # text form in schedule grids: "F3", "sG2.3"
    kind: str         # "data", "compute", "send", "recv" or "batch" (once per train batch)
    unit_cost: float  # cost in units of one stage forward (F = I = 1, W = 2); messages are free
    doc: str


OPS = {o.name: o for o in (
    OpSpec("load", "L", "data", 0.0, "read the next batch from the data iterator (stage 0; the last stage consumes its own)"),
    OpSpec("recv_act", "rA", "recv", 0.0, "activations and labels from stage s-1"),
    OpSpec("forward", "F", "compute", 1.0, "stage forward, plus the aux head's loss and the head's own backward"),
    OpSpec("send_act", "sA", "send", 0.0, "activations and labels to stage s+1"),
    OpSpec("recv_grad", "rG", "recv", 0.0, "one gradient component dL_loss/dh_s from stage s+1"),
    OpSpec("input_grad", "I", "compute", 1.0, "one input-gradient chain: dL_loss/d(stage input)"),
    OpSpec("weight_grad", "W", "compute", 2.0, "the weight-gradient chain of the combined components that train "
                                               "the stage (also yields Routing.fused_input's input gradient)"),
    OpSpec("send_grad", "sG", "send", 0.0, "one input gradient dL_loss/dh_{s-1} to stage s-1"),
    OpSpec("reduce_tied", "T", "batch", 0.0, "sum the gradients of tied layers across the stages that own them"),
    OpSpec("reduce_grads", "R", "batch", 0.0, "average gradients across data-parallel replicas"),
    OpSpec("step", "O", "batch", 0.0, "the optimizer step (clipping, bf16, ZeRO-1 are DeepSpeed's)"),
)}

COMPUTE = tuple(n for n, o in OPS.items() if o.kind == "compute")
PER_BATCH = tuple(n for n, o in OPS.items() if o.kind == "batch")
UNIT_COSTS = {n: o.unit_cost for n, o in OPS.items() if o.unit_cost}


@dataclass(frozen=True)
class Action:
    op: str
    mb: int = -1
    loss: int = -1

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"unknown action {self.op!r}; known: {sorted(OPS)}")

    @property
    def kind(self) -> str:
        return OPS[self.op].kind

    def __str__(self) -> str:
        s = OPS[self.op].short
        if self.mb >= 0:
            s += str(self.mb)
        if self.loss >= 0:
            s += f".{self.loss}"
        return s


def unit_cost(stage: int, action: Action) -> float:
    """The unit cost model (a ``cost(stage, action)`` callable, as replay and simulate take)."""
    return OPS[action.op].unit_cost
