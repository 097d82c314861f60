"""Point-to-point transport between pipeline stages in different processes (gloo or NCCL).

Why it looks like this (docs/gpu.md has the long form): under NCCL every send and receive
is a kernel that holds its communicator's stream until the peer's matching call runs, and
the operations of one communicator run in issue order. If activations (s -> s+1) and
gradients (s+1 -> s) share a communicator, two stages can each wait for an operation the
other queued behind its own: a deadlock for every k >= 2 with more than one micro-batch.
So every boundary and direction gets its own 2-rank process group (``ChannelLayout``):
each communicator then carries one FIFO channel with one sender and one receiver, which is
exactly the model replay.py proves schedules against. commcheck.py checks that claim by
driving this very class with a recording ``Comm`` and simulating NCCL's rules.

Sends are asynchronous and their buffers live until they complete; receives make the
caller wait (the host under gloo, only the current stream under NCCL). Shapes travel once
per channel in a header (static shapes, DeepSpeed's default): the only host sync here.
"""
from __future__ import annotations

import time
from datetime import timedelta
from typing import Any, Callable, Optional

import torch
import torch.distributed as tdist

from .stage import as_list, from_list, to_device

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8, torch.int8,
          torch.int16, torch.int32, torch.int64, torch.bool]
META_LEN = 128


class Comm:
    """The three primitives the transport uses, over torch.distributed.

    Straight to torch, not through deepspeed.comm: DeepSpeed's comms_logger wraps its own
    functions with a device synchronize after each call, and a host that waits after each
    send brings the deadlocks back (commcheck.py shows it).
    """

    def isend(self, tensor: torch.Tensor, peer: int, group: Any) -> Any:
        return tdist.isend(tensor, peer, group=group)

    def irecv(self, tensor: torch.Tensor, peer: int, group: Any) -> Any:
        return tdist.irecv(tensor, peer, group=group)

    def to_host(self, tensor: torch.Tensor) -> list:
        return tensor.tolist()

    def upload(self, tensor: torch.Tensor, device: Any) -> torch.Tensor:
        """Host tensor to the device without a host sync (stage.to_device)."""
        return to_device(tensor, device)


class SharedLayout:
    """Every message on the default process group: the layout that deadlocks under NCCL.
    Kept so the checker can show why ``ChannelLayout`` exists."""
    name = "shared"
    created_s = 0.0
    num_groups = 0

    def group(self, src: int, dst: int) -> Any:
        return None

    def warm_up(self, rank: int, device: Any, comm: Optional["Comm"] = None) -> None:
        pass


class ChannelLayout:
    """One 2-rank process group per pipeline boundary and direction.

    ``pipe_lists``: the global ranks of every pipeline (one list per data-parallel /
    tensor-slice coordinate, ordered by stage), as DeepSpeed's topology gives them
    (``topo.get_axis_comm_lists("pipe")``). Every rank must build the layout, in the same
    order, because creating a process group is collective over the whole job.
    """
    name = "channel"
    created_s = 0.0     # seconds it took to create the groups (start-up cost)

    def __init__(self, pipe_lists: list[list[int]],
                 new_group: Callable[[list[int]], Any] = lambda ranks: tdist.new_group(ranks)) -> None:
        self._groups: dict[tuple[int, int], Any] = {}
        for ranks in sorted(pipe_lists):
            for a, b in zip(ranks, ranks[1:]):
                self._groups[(a, b)] = new_group([a, b])   # activations a -> b
                self._groups[(b, a)] = new_group([a, b])   # gradients b -> a: a communicator of its own

    @property
    def num_groups(self) -> int:
        return len(self._groups)

    def warm_up(self, rank: int, device: Any, comm: Optional["Comm"] = None) -> None:
        """One tiny message over each of this rank's channels, in one global order, so that
        NCCL connects every communicator at start-up rather than in the middle of a step."""
        comm = comm or Comm()
        for (src, dst), group in sorted(self._groups.items()):
            if rank == src:
                comm.isend(torch.zeros(1, device=device), dst, group).wait()
            elif rank == dst:
                comm.irecv(torch.zeros(1, device=device), src, group).wait()

    def group(self, src: int, dst: int) -> Any:
        return self._groups[(src, dst)]


_LAYOUTS: dict = {}


def channel_layout(pipe_lists: list[list[int]], timeout_s: Optional[float] = None) -> ChannelLayout:
    """The job's ChannelLayout, created once per process (engines built later reuse its groups).

    ``timeout_s``: how long a receive may wait before the job fails. None: DeepSpeed's
    default (10 minutes unless DEEPSPEED_TIMEOUT says otherwise); torch's new_group would
    otherwise use its own default, not the job's."""
    from deepspeed.constants import default_pg_timeout

    key = (id(tdist.group.WORLD), tuple(map(tuple, sorted(pipe_lists))), timeout_s)
    if key not in _LAYOUTS:
        timeout = default_pg_timeout if timeout_s is None else timedelta(seconds=timeout_s)
        start = time.perf_counter()
        layout = ChannelLayout(pipe_lists, new_group=lambda ranks: tdist.new_group(ranks, timeout=timeout))
        layout.created_s = time.perf_counter() - start
        _LAYOUTS[key] = layout
    return _LAYOUTS[key]


class P2PTransport:
    """A stage's transport to its neighbours (stage.Transport) over process groups.

    ``prev_rank`` / ``next_rank``: global ranks of stages s-1 and s+1 (None at the ends).
    ``static_shapes``: like DeepSpeed's pipeline (module ``dynamic_shape=False``), shapes are
    sent once per channel and then assumed; a change raises on the sending side instead of
    corrupting the receiver.
    """

    def __init__(self, prev_rank: Optional[int], next_rank: Optional[int], rank: int, layout: Any,
                 device: Any, static_shapes: bool = True, comm: Optional[Comm] = None,
                 stage_id: Optional[int] = None) -> None:
        self.prev, self.next, self.rank = prev_rank, next_rank, rank
        self.stage_id = stage_id
        self.layout = layout
        self.device = device
        self.static = static_shapes
        self.comm = comm or Comm()
        self.pending: list[tuple[Any, torch.Tensor, int]] = []   # (work, buffer, peer): buffers live until sent
        self._sent_meta: Optional[list[int]] = None
        self._recv_meta: Optional[list[int]] = None

    # ------------------------------------------------------------------ stage.Transport
    def send_act(self, mb: int, parts: list) -> None:
        meta, flat = _describe(parts)
        if self._sent_meta is None or not self.static:
            header = torch.zeros(META_LEN, dtype=torch.int64)
            header[:len(meta)] = torch.tensor(meta, dtype=torch.int64)
            self._isend(self.comm.upload(header, self.device), self.next)   # built on the host
            self._sent_meta = meta
        elif self._sent_meta != meta:
            raise RuntimeError(
                f"activation/label shapes or dtypes sent to rank {self.next} changed ({self._sent_meta} -> "
                f"{meta}); build the module with dynamic_shape=True, or call engine.reset_activation_shape() "
                "on every rank before the change")
        for t in flat:
            self._isend(t.detach(), self.next)

    def recv_act(self, mb: int) -> list:
        meta = self._recv_meta if self.static else None
        if meta is None:
            header = torch.empty(META_LEN, dtype=torch.int64, device=self.device)
            self._recv(header, self.prev)
            meta = self._recv_meta = self.comm.to_host(header)   # the one host sync: once per channel
        pos, parts = 1, []
        for _ in range(meta[0]):
            n, was_tuple = meta[pos], meta[pos + 1]
            pos += 2
            tensors = []
            for _ in range(n):
                dtype, ndim = DTYPES[meta[pos]], meta[pos + 1]
                shape = meta[pos + 2:pos + 2 + ndim]
                pos += 2 + ndim
                t = torch.empty(shape, dtype=dtype, device=self.device)
                self._recv(t, self.prev)
                tensors.append(t)
            parts.append(from_list(tensors, bool(was_tuple)))
        return parts

    def send_grad(self, mb: int, loss: int, tensors: list) -> None:
        for t in tensors:
            self._isend(t.detach(), self.prev)

    def recv_grad(self, mb: int, loss: int, like: list) -> list:
        out = []
        for t in like:
            buf = torch.empty_like(t, memory_format=torch.contiguous_format)
            self._recv(buf, self.next)
            out.append(buf)
        return out

    # ------------------------------------------------------------------ plumbing
    def reset_shapes(self) -> None:
        """Call on every rank together when activation shapes change (DeepSpeed's reset_activation_shape)."""
        self._sent_meta = self._recv_meta = None

    def _isend(self, tensor: torch.Tensor, dst: int) -> None:
        tensor = tensor.contiguous()
        work = self.comm.isend(tensor, dst, self.layout.group(self.rank, dst))
        self.pending.append((work, tensor, dst))
        if len(self.pending) > 256:
            self.release_completed()

    def _recv(self, tensor: torch.Tensor, src: int) -> None:
        work = self.comm.irecv(tensor, src, self.layout.group(src, self.rank))
        if work is not None:
            self._wait(work, src, "receive from")   # gloo: the host waits; NCCL: only the current stream does

    def _wait(self, work: Any, peer: int, what: str) -> None:
        try:
            work.wait()
        except RuntimeError as exc:     # the peer died, hung past the timeout, or the job is stopping
            raise PeerLostError(self._name(self.rank), self._name(peer), what, exc) from exc

    def _name(self, rank: Optional[int]) -> str:
        if self.stage_id is None:
            return f"rank {rank}"
        stage = self.stage_id if rank == self.rank else self.stage_id - 1 if rank == self.prev else self.stage_id + 1
        return f"rank {rank} (stage {stage})"

    def release_completed(self) -> None:
        """Drop the buffers of sends that completed; never waits (a wait could stall a stream)."""
        self.pending = [(w, t, d) for w, t, d in self.pending if w is not None and not w.is_completed()]

    def end_batch(self, host_waits: bool) -> None:
        """After a batch. ``host_waits`` (gloo, where a send reports completion only once
        waited for): wait for this batch's sends, whose receives every peer has posted by the
        end of its batch. NCCL: only drop what completed; a wait there would make the stream,
        not the host, wait, and is never needed for correctness."""
        if host_waits:
            self.wait_all()
        else:
            self.release_completed()

    def wait_all(self) -> None:
        """Wait for every send (before the process group goes away, or before timing)."""
        pending, self.pending = self.pending, []
        for work, _, dst in pending:
            if work is not None:
                self._wait(work, dst, "send to")

    def abort(self) -> None:
        """After a failure on this rank: forget pending sends, never wait on peers."""
        self.pending = []


class PeerLostError(RuntimeError):
    """A neighbouring stage stopped answering; the message names both ranks and stages."""

    def __init__(self, me: str, peer: str, what: str, cause: BaseException) -> None:
        super().__init__(f"{me}: the {what} {peer} failed; {peer} stopped answering (it died, hung past the "
                         f"timeout, or the job is being stopped). Cause: {cause}")


def _describe(parts: list) -> tuple[list[int], list[torch.Tensor]]:
    """Header ints (counts, tuple flags, dtypes, shapes) and the flat tensor list of a message."""
    meta = [len(parts)]
    flat: list[torch.Tensor] = []
    for part in parts:
        tensors, was_tuple = as_list(part)
        meta += [len(tensors), int(was_tuple)]
        for t in tensors:
            meta += [DTYPES.index(t.dtype), t.dim(), *t.shape]
        flat += tensors
    if len(meta) > META_LEN:
        raise ValueError(f"message metadata too long ({len(meta)} > {META_LEN} ints)")
    return meta, flat
