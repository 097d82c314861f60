"""Proof that a schedule's communication cannot deadlock on GPUs: the NCCL model, applied.

``nccl_model.py`` knows NCCL's rules (streams, rendezvous, host syncs); this module knows
what the engine issues. It turns a Schedule into the operations every rank's host issues,
by *driving the real transport* (wire.P2PTransport) with a recording Comm, so what is
checked is what wire.py sends: one operation per tensor, the header of a channel's first
message, the host sync that reads it back. Compute actions go on the compute stream; the
batch end adds the engine's collectives (loss all-reduce, tied and clipping collectives)
and host syncs. Then nccl_model.simulate says whether every operation completes.

Layouts (which communicator carries which message):
    channel    one 2-rank group per boundary and direction (what the engine uses)
    shared     every message on the default group, as DeepSpeed 0.19.8's eager
               NCCL initialisation gives: one communicator and stream per rank
    pair       one communicator per pair of neighbouring ranks, both directions (torch's
               lazy initialisation)
    direction  one group per direction spanning the whole pipeline

The model assumes rendezvous for every send (NCCL's internal buffer is not a contract)
and data-parallel replicas that run identical pipelines (their gradient all-reduce uses
other communicators, reached by every replica in the same order).
"""
from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Any, Callable, Optional

from .actions import Action, unit_cost
from .nccl_model import Op, Result, simulate
from .replay import ScheduleError, replay

LAYOUTS = ("channel", "shared", "pair", "direction")


class DeadlockError(ScheduleError):
    """A plan whose communication would hang under NCCL."""


@dataclass(frozen=True)
class BatchEnd:
    """What the engine does between train batches, as far as communication goes."""
    flush: bool = True
    """A collective across all stages at the optimizer step (DeepSpeed's global-norm clipping,
    bf16's norm); False with clip_scope="stage" or no clipping."""
    tied: tuple = ()
    """Per tied module, the stages that own a copy (an all-reduce among them); see tied_stages."""
    static_shapes: bool = True
    """False (a module built with dynamic_shape=True): a header, read on the host, per message."""


class _Done:
    def wait(self) -> None:
        pass

    def is_completed(self) -> bool:
        return True


class RecordingComm:
    """wire.Comm for the model: records what the transport issues and delivers the tensors
    in memory, so the receiving transport reads real headers."""

    def __init__(self, rank: int, program: list, mailboxes: dict, comm_name: Callable[[Any, int, int], str],
                 host_sync_after_send: bool = False) -> None:
        self.rank, self.program, self.mailboxes = rank, program, mailboxes
        self.comm_name = comm_name
        self.host_sync_after_send = host_sync_after_send
        self.label = ""

    def isend(self, tensor, peer, group):
        name = self.comm_name(group, self.rank, peer)
        self.program.append(Op("send", f"{self.label}: send to rank {peer}", comm=name, peer=peer,
                               nbytes=tensor.numel() * tensor.element_size()))
        self.mailboxes[(name, self.rank, peer)].append(tensor)   # the transport never reuses a sent buffer
        if self.host_sync_after_send:      # DeepSpeed's comms_logger: synchronize after each op
            self.program.append(Op("device_sync", f"{self.label}: comms_logger synchronize"))
        return _Done()

    def irecv(self, tensor, peer, group):
        name = self.comm_name(group, peer, self.rank)
        self.program.append(Op("recv", f"{self.label}: recv from rank {peer}", comm=name, peer=peer, wait=True))
        box = self.mailboxes[(name, peer, self.rank)]
        if not box:
            raise ScheduleError(f"rank {self.rank} receives on {name} before rank {peer} sent (a bug)")
        tensor.copy_(box.popleft())
        return None     # the wait is part of the recorded op (wait=True)

    def to_host(self, tensor):
        self.program.append(Op("host_sync", f"{self.label}: read header on the host"))
        return tensor.tolist()

    def upload(self, tensor, device):
        return tensor


class _DirectionLayout:
    def group(self, src: int, dst: int) -> str:
        return "fwd" if dst > src else "bwd"


def _model_layout(name: str, S: int) -> tuple[Any, Callable[[Any, int, int], str]]:
    """(layout object for P2PTransport, group -> communicator name)."""
    from .wire import ChannelLayout, SharedLayout
    if name == "channel":
        made: dict = {}

        def new_group(ranks):   # ChannelLayout asks for (a -> b) first, then (b -> a)
            a, b = ranks
            key = f"{a}>{b}" if (a, b) not in made else f"{b}>{a}"
            made[(a, b)] = True
            return key
        return ChannelLayout([list(range(S))], new_group=new_group), lambda g, src, dst: g
    if name == "shared":
        return SharedLayout(), lambda g, src, dst: "world"
    if name == "pair":
        return SharedLayout(), lambda g, src, dst: f"{min(src, dst)}:{max(src, dst)}"
    if name == "direction":
        return _DirectionLayout(), lambda g, src, dst: g
    raise ValueError(f"unknown layout {name!r}; one of {LAYOUTS}")


def _comms(S: int, programs: dict, end: BatchEnd = BatchEnd()) -> dict:
    members: dict = defaultdict(set)
    for r, ops in programs.items():
        for op in ops:
            if op.kind in ("send", "recv"):
                members[op.comm] |= {r, op.peer}
    out = {name: tuple(sorted(m)) for name, m in members.items()}
    out.update({"world": tuple(range(S)), "mp": tuple(range(S))})
    out.update({f"tied{i}": owners for i, owners in enumerate(end.tied)})
    return out


def tied_stages(layers: list, parts: list) -> tuple:
    """For every tied key, the stages that own a copy (the same on every rank: from the specs)."""
    from deepspeed.pipe import TiedLayerSpec
    owners: dict = {}
    for s in range(len(parts) - 1):
        for spec in layers[parts[s]:parts[s + 1]]:
            if isinstance(spec, TiedLayerSpec):
                owners.setdefault(spec.key, set()).add(s)
    return tuple(tuple(sorted(v)) for _, v in sorted(owners.items()) if len(v) > 1)


def _batch_end_ops(action: Action, stage: int, S: int, end: BatchEnd) -> list:
    """The engine's collectives and host syncs for a per-batch action. The loss all-reduce is
    modelled as a stream wait plus a host sync with either ``report`` setting ("async" waits one
    batch later). Waiting at once is the stronger assumption, and a sound one: each rank's issue
    order is fixed, so the verdict does not depend on timing, and an extra wait can only add
    dependencies (a cycle can appear, never vanish)."""
    if action.op == "reduce_tied":
        return [Op("coll", f"reduce_tied: all-reduce tied gradients among stages {owners}", comm=f"tied{i}", wait=True)
                for i, owners in enumerate(end.tied) if stage in owners]
    if action.op == "step":
        ops = []
        if end.flush:
            ops.append(Op("coll", "step: gradient-norm all-reduce across stages", comm="mp", wait=True))
        ops.append(Op("host_sync", "step: optimizer step"))
        ops.append(Op("coll", "loss all-reduce", comm="world", wait=True))
        ops.append(Op("host_sync", "losses read on the host"))
        return ops
    return []


def programs_for(schedule, batch_end: BatchEnd = BatchEnd(), layout: str = "channel", cost=unit_cost,
                 host_sync_after_send: bool = False) -> dict:
    """Every rank's host issue order for ``schedule`` (one rank per stage)."""
    import torch
    from .wire import P2PTransport

    S = schedule.routing.num_stages
    order = replay(schedule, cost=cost, flush=batch_end.flush).events   # a valid global order
    layout_obj, comm_name = _model_layout(layout, S)
    programs: dict = {s: [] for s in range(S)}
    mailboxes: dict = defaultdict(deque)
    comms = [RecordingComm(s, programs[s], mailboxes, comm_name, host_sync_after_send) for s in range(S)]
    wires = [P2PTransport(s - 1 if s > 0 else None, s + 1 if s < S - 1 else None, s, layout_obj, "cpu",
                          static_shapes=batch_end.static_shapes, comm=comms[s]) for s in range(S)]
    act = torch.zeros(1)
    labels = torch.zeros(1, dtype=torch.int64)
    for s, a, _, _ in order:
        comms[s].label = f"stage {s} {a}"
        if a.op == "send_act":
            wires[s].send_act(a.mb, [act, labels])
        elif a.op == "recv_act":
            wires[s].recv_act(a.mb)
        elif a.op == "send_grad":
            wires[s].send_grad(a.mb, a.loss, [act])
        elif a.op == "recv_grad":
            wires[s].recv_grad(a.mb, a.loss, [act])
        elif a.kind == "compute":
            programs[s].append(Op("compute", f"stage {s} {a}", cost=cost(s, a)))
        elif a.kind == "batch":
            programs[s] += _batch_end_ops(a, s, S, batch_end)
    if schedule.name == "inference":
        for s in range(S):
            programs[s] += [Op("coll", "eval loss all-reduce", comm="world", wait=True),
                            Op("host_sync", "eval losses read on the host")]
    return programs


def check(schedule, batch_end: BatchEnd = BatchEnd(), layout: str = "channel", cost=unit_cost,
          host_sync_after_send: bool = False) -> Result:
    """Simulate ``schedule`` under NCCL's rules; Result.ok is False on a deadlock."""
    programs = programs_for(schedule, batch_end, layout, cost, host_sync_after_send)
    return simulate(programs, _comms(schedule.routing.num_stages, programs, batch_end))


def describe(schedule) -> str:
    r = schedule.routing
    return (f'"{schedule.name}" schedule, S={r.num_stages}, k={r.k}, combine={r.combine}, '
            f"M={schedule.micro_batches}, {schedule.batches} batch(es)")


def assert_completes(schedule, batch_end: BatchEnd = BatchEnd(), layout: str = "channel", cost=unit_cost) -> Result:
    """check(), raising DeadlockError (naming the schedule and the wait-for cycle) on a deadlock."""
    result = check(schedule, batch_end, layout, cost)
    if not result.ok:
        raise DeadlockError(f"{describe(schedule)} would deadlock under NCCL ({layout} layout):\n{result.deadlock}")
    return result


def require_safe(schedule, batch_end: BatchEnd = BatchEnd(), layout: str = "channel") -> None:
    """The engine's start-up check: two batches of ``schedule`` back to back (one for
    inference) must run to completion under the NCCL model."""
    assert_completes(schedule if schedule.name == "inference" else schedule.repeat(2), batch_end, layout)


# ---------------------------------------------------------------- DeepSpeed's own order

def deepspeed_programs(S: int, M: int, batches: int = 1, layout: str = "shared") -> dict:
    """DeepSpeed's TrainSchedule as its engine issues it: blocking sends and receives
    (the stream waits), the first activation preceded by a shape message that the receiver
    reads on the host, and a loss broadcast with a host sync at every batch end."""
    from deepspeed.runtime.pipe import schedule as ds

    _, comm_name = _model_layout("pair" if layout == "pair" else "shared", S)
    if layout not in ("shared", "pair"):
        raise ValueError("DeepSpeed's own p2p uses the default group: layout 'shared' or 'pair'")
    programs: dict = {s: [] for s in range(S)}
    for s in range(S):
        ops = programs[s]
        meta_sent = meta_received = False
        for _ in range(batches):
            for step in ds.TrainSchedule(micro_batches=M, stages=S, stage_id=s).steps():
                for cmd in step:
                    name = type(cmd).__name__
                    if name == "ForwardPass":
                        ops.append(Op("compute", f"stage {s} forward", cost=1.0))
                    elif name == "BackwardPass":
                        ops.append(Op("compute", f"stage {s} backward", cost=2.0))
                    elif name in ("SendActivation", "SendGrad"):
                        peer = s + 1 if name == "SendActivation" else s - 1
                        if name == "SendActivation" and not meta_sent:
                            ops.append(Op("send", f"stage {s} send shapes", comm=comm_name(None, s, peer),
                                          peer=peer, wait=True))
                            meta_sent = True
                        ops.append(Op("send", f"stage {s} {name}", comm=comm_name(None, s, peer), peer=peer,
                                      wait=True))
                    elif name in ("RecvActivation", "RecvGrad"):
                        peer = s - 1 if name == "RecvActivation" else s + 1
                        if name == "RecvActivation" and not meta_received:
                            ops += [Op("recv", f"stage {s} recv shapes", comm=comm_name(None, peer, s), peer=peer,
                                       wait=True), Op("host_sync", f"stage {s} read shapes")]
                            meta_received = True
                        ops.append(Op("recv", f"stage {s} {name}", comm=comm_name(None, peer, s), peer=peer,
                                      wait=True))
            ops += [Op("coll", "loss broadcast", comm="world", wait=True), Op("host_sync", "loss read")]
    return programs


def check_deepspeed(S: int, M: int, batches: int = 1, layout: str = "shared") -> Result:
    programs = deepspeed_programs(S, M, batches, layout)
    return simulate(programs, _comms(S, programs))


# ---------------------------------------------------------------- the matrix

@dataclass(frozen=True)
class Case:
    schedule: Any          # one batch, or several back to back
    batch_end: BatchEnd

    def __str__(self) -> str:
        return (f"{describe(self.schedule)}, flush={self.batch_end.flush}"
                + ("" if self.batch_end.static_shapes else ", dynamic shapes")
                + (f", tied {list(self.batch_end.tied)}" if self.batch_end.tied else ""))


def matrix(stages, ks=None, micro_batches=(1, 2, 4, 8, 16, 32, 64), combines=("furthest", "sum"),
           schedules=("1f1b", "interlocked"), batches=(1, 3)):
    """Every schedule the project generates over the given ranges: train orders for one batch
    and several back to back (with and without a flush between them; and with dynamic shapes
    and tied first and last stages), and inference.
    ``ks``: None for every k in 1..S."""
    from . import schedule as sched
    from .routing import Routing
    for S in stages:
        for k in (range(1, S + 1) if ks is None else [k for k in ks if k <= S]):
            for combine in combines:
                routing = Routing(S, k, combine)
                for M in micro_batches:
                    for name in schedules:
                        one = sched.train_schedule(name, routing, M)
                        for B in batches:
                            yield Case(one.repeat(B) if B > 1 else one, BatchEnd(flush=True))
                            if B > 1:
                                yield Case(one.repeat(B), BatchEnd(flush=False))
                                # a header per message (dynamic shapes) and a tied first/last stage
                                yield Case(one.repeat(B), BatchEnd(flush=False, static_shapes=False,
                                                                   tied=((0, S - 1),)))
                    yield Case(sched.inference(routing, M), BatchEnd())


def run_case(case: Case, transport: str = "nccl", layout: str = "channel",
             host_sync_after_send: bool = False) -> Optional[str]:
    """None if ``case`` runs to completion under ``transport`` ("nccl" or "gloo"), else why not."""
    try:
        if transport == "gloo":
            replay(case.schedule, flush=case.batch_end.flush)
            return None
        result = check(case.schedule, case.batch_end, layout, host_sync_after_send=host_sync_after_send)
    except ScheduleError as exc:
        return str(exc)
    return None if result.ok else str(result.deadlock)
