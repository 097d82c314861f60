"""Schedules as plain data: for every stage, an ordered list of actions.

The engine executes a stage's list; tests check and simulate all lists together.
Nothing else describes a schedule, so what is checked is what runs.

Actions (``mb`` = micro-batch, ``loss`` = which loss's gradient component):

    load(mb)              read the next batch from the data iterator
    recv_act / send_act   activations (and labels) from stage s-1 / to stage s+1
    forward(mb)           stage forward, plus the aux head's loss and backward
    recv_grad(mb, loss)   one gradient component from stage s+1
    input_grad(mb, loss)  one input-gradient chain: dL_loss/d(stage input)
    weight_grad(mb)       the weight-gradient chain of the combined components
                          (also yields Routing.fused_input's input gradient)
    send_grad(mb, loss)   one input gradient to stage s-1
    reduce_tied, reduce_grads, step   once per batch, DeepSpeed's own
"""
from dataclasses import dataclass

from .routing import Routing

SHORT = {"load": "L", "recv_act": "rA", "forward": "F", "send_act": "sA", "recv_grad": "rG",
         "input_grad": "I", "weight_grad": "W", "send_grad": "sG", "reduce_tied": "T",
         "reduce_grads": "R", "step": "O"}
PER_BATCH = ("reduce_tied", "reduce_grads", "step")


@dataclass(frozen=True)
class Action:
    op: str
    mb: int = -1
    loss: int = -1

    def __post_init__(self):
        if self.op not in SHORT:
            raise ValueError(f"unknown action {self.op!r}")

    def __str__(self):
        s = SHORT[self.op]
        if self.mb >= 0:
            s += str(self.mb)
        if self.loss >= 0:
            s += f".{self.loss}"
        return s


@dataclass(frozen=True)
class Schedule:
    """One ordered action list per stage."""
    name: str
    routing: Routing
    micro_batches: int
    stages: tuple   # tuple of tuples of Action

    def for_stage(self, s):
        return self.stages[s]

    def grid(self):
        """A printable one-row-per-stage view."""
        return "\n".join(f"stage {s}: " + " ".join(str(a) for a in acts)
                         for s, acts in enumerate(self.stages))


def forward_actions(routing, s, mb):
    acts = []
    if s == 0 or s == routing.last:
        acts.append(Action("load", mb))
    if s > 0:
        acts.append(Action("recv_act", mb))
    acts.append(Action("forward", mb))
    if s < routing.last:
        acts.append(Action("send_act", mb))
    return acts


def backward_actions(routing, s, mb):
    """All backward work of one micro-batch on one stage, bundled (1F1B style)."""
    acts = [Action("recv_grad", mb, j) for j in routing.receives(s)]
    acts += [Action("input_grad", mb, j) for j in routing.input_chains(s)]
    acts.append(Action("weight_grad", mb))
    acts += [Action("send_grad", mb, j) for j in routing.sends(s)]
    return acts


def batch_end_actions():
    return [Action(op) for op in PER_BATCH]


def one_f_one_b(routing, micro_batches):
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


def inference(routing, micro_batches):
    """Forwards only, every stage reporting its own head's loss."""
    stages = []
    for s in range(routing.num_stages):
        acts = []
        for m in range(micro_batches):
            acts += forward_actions(routing, s, m)
        stages.append(tuple(acts))
    return Schedule("inference", routing, micro_batches, tuple(stages))


SCHEDULES = {"1f1b": one_f_one_b}


def train_schedule(name, routing, micro_batches):
    return SCHEDULES[name](routing, micro_batches)
