"""One pipeline stage executing its actions: the gradient math of interlocking backpropagation.

No DeepSpeed here. The executor gets the stage's forward, its aux head and losses, its
parameters, a transport (how tensors reach the neighbouring stages) and a few hooks
(autocast, the bf16 gradient bookkeeping, where batches come from); the DeepSpeed engine
(engine.py) and the single-process pipeline (inprocess.py) both drive it.

Per micro-batch, stage s keeps its *roots* (the float outputs it produced, or the loss on
the last stage) and, for each loss j it needs, the component dL_j/d(roots), already
weighted by w_j / micro_batches (see docs/algorithm.md). Backward work is then:

    input_grad(j): autograd.grad(roots, stage inputs, component j)      -> sent to s-1
    weight_grad:   backward(roots, sum of the components that train s) into the stage's
                   parameters (and, when Routing.fused_input says so, its inputs too)

Components are never summed before they leave a stage: each has its own remaining depth.
"""
from __future__ import annotations

import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Optional, Protocol, Sequence

import torch

from . import heads
from .actions import Action
from .routing import Routing

Tensor = torch.Tensor


class HeadMismatchError(RuntimeError):
    """An aux head that does not fit its stage's output (the message names stage and shapes)."""


def as_list(x: Any) -> tuple[list[Tensor], bool]:
    """Tensor or tuple/list of tensors -> (list, was_tuple)."""
    if torch.is_tensor(x):
        return [x], False
    if isinstance(x, (tuple, list)) and all(torch.is_tensor(t) for t in x):
        return list(x), True
    raise TypeError(f"pipeline stages exchange a tensor or a tuple of tensors, got {type(x).__name__}")


def from_list(tensors: Sequence[Tensor], was_tuple: bool) -> Any:
    return tuple(tensors) if was_tuple else tensors[0]


def to_device(x: Any, device: Any) -> Any:
    """A tensor or tuple of tensors onto ``device`` without the host waiting: from host memory
    to CUDA through pinned memory and non-blocking (a pageable copy would be a host sync)."""
    tensors, was_tuple = as_list(x)
    device = torch.device(device)
    cuda = device.type == "cuda"
    out = [(t.pin_memory() if cuda and t.device.type == "cpu" and not t.is_pinned() else t)
           .to(device, non_blocking=cuda).detach() for t in tensors]
    return from_list(out, was_tuple)


def float_leaves(x: Any) -> tuple[Any, list[Tensor]]:
    """Detached copies of a stage input; float tensors require grad (they get input gradients)."""
    tensors, was_tuple = as_list(x)
    out = []
    for t in tensors:
        t = t.detach()
        if t.is_floating_point():
            t.requires_grad_(True)
        out.append(t)
    return from_list(out, was_tuple), [t for t in out if t.requires_grad]


def grads_or_zeros(grads: Sequence[Optional[Tensor]], like: Sequence[Tensor]) -> list[Tensor]:
    """A tensor the loss did not reach gets zeros: the peer still waits for a message."""
    return [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, like)]


class Transport(Protocol):
    """How one stage's tensors reach its neighbours. Receives return what the matching send
    sent; messages of one kind between two stages arrive in the order they were sent."""

    def send_act(self, mb: int, parts: list) -> None: ...
    def recv_act(self, mb: int) -> list: ...
    def send_grad(self, mb: int, loss: int, tensors: list[Tensor]) -> None: ...
    def recv_grad(self, mb: int, loss: int, like: list[Tensor]) -> list[Tensor]: ...


@dataclass
class StageHooks:
    """What the host of the executor decides. Defaults: no autocast, no bf16 bookkeeping."""
    load: Callable[[int], Any] = lambda mb: None
    """Returns micro-batch ``mb``'s ``(inputs, labels)`` on the stage's device (stage 0), or None."""
    autocast: Callable[[], ContextManager] = nullcontext
    """Context for forwards (DeepSpeed's torch_autocast)."""
    param_grad_section: Callable[[], ContextManager] = nullcontext
    """Context around every backward into parameters (bf16 optimizers move gradients after it)."""


@dataclass
class MicroBatch:
    """What a stage holds for one micro-batch between its forward and its last send."""
    inputs: Any = None
    labels: Any = None
    leaves: list = field(default_factory=list)       # float inputs that get input gradients
    outputs: Any = None
    roots: list = field(default_factory=list)        # tensors every backward starts from
    comps: dict = field(default_factory=dict)        # loss j -> dL_j/d(roots), weighted
    in_grads: dict = field(default_factory=dict)     # loss j -> dL_j/d(leaves), still to send
    finished: bool = False                           # weight_grad ran: the graph is gone


@dataclass
class RunContext:
    """State of one train_batch or eval_batch on one stage (nothing of it outlives the run)."""
    training: bool
    micro_batches: int
    loss_sum: Tensor                                 # this stage's head losses, summed (float64)
    mbs: dict = field(default_factory=dict)          # mb -> MicroBatch
    eval_logits: Optional[list] = None               # last stage, eval: outputs per micro-batch
    profile: Optional[list] = None                   # (op, mb, loss, start, end) per action
    meter: Any = None                                # profile.ActivationMeter while profiling
    queued: list = field(default_factory=list)       # input_grad actions to batch: (mb, loss, profile index)

    def clock(self) -> float:
        """Profiling time stamp; on a GPU after the queued work is done (else it times launches only)."""
        if self.loss_sum.is_cuda:
            torch.cuda.synchronize(self.loss_sum.device)
        return time.perf_counter()


class StageExecutor:
    """Runs one stage's actions (actions.py) with the gradient math of routing.py."""

    def __init__(self, stage_id: int, routing: Routing, forward: Callable, loss_fn: Optional[Callable],
                 head: Optional[torch.nn.Module], aux_loss_fn: Optional[Callable], aux_loss_weight: float,
                 params: list[Tensor], transport: Transport, hooks: Optional[StageHooks] = None,
                 batch_input_grads: Any = False) -> None:
        self.stage_id = stage_id
        self.routing = routing
        self.forward_fn = forward
        self.loss_fn = loss_fn
        self.head = head
        self.aux_loss_fn = aux_loss_fn
        self.aux_loss_weight = aux_loss_weight
        self.params = [p for p in params if p.requires_grad]
        self.head_params = [p for p in head.parameters() if p.requires_grad] if head is not None else []
        self.transport = transport
        self.hooks = hooks or StageHooks()
        self.is_last = stage_id == routing.last
        self._dispatch = {"load": self._load, "recv_act": self._recv_act, "forward": self._forward,
                          "send_act": self._send_act, "recv_grad": self._recv_grad,
                          "input_grad": self._input_grad, "weight_grad": self._weight_grad,
                          "send_grad": self._send_grad}
        # False, True or "auto" (config.py): consecutive input_grad actions of one micro-batch in one
        # autograd.grad(..., is_grads_batched=True) call; "auto" times both ways first, then keeps the faster
        self.batch_input_grads = batch_input_grads
        self.batched_calls = 0      # batched calls made, each computing >= 2 input-gradient chains
        self.batched_chains = 0     # chains computed by them
        self._auto: dict = {}       # "auto": chains per call -> ([separate s], [batched s]) or the choice (bool)

    # ------------------------------------------------------------------ running
    def start(self, training: bool, micro_batches: int, device: Any, eval_logits: bool = False,
              profile: Optional[list] = None) -> RunContext:
        return RunContext(training=training, micro_batches=micro_batches,
                          loss_sum=torch.zeros((), dtype=torch.float64, device=device),
                          eval_logits=[] if eval_logits else None, profile=profile)

    def execute(self, action: Action, ctx: RunContext) -> None:
        """One action of this stage's schedule (per-batch actions belong to the host)."""
        if ctx.queued and not (action.op == "input_grad" and action.mb == ctx.queued[0][0]):
            self._flush_input_grads(ctx)     # the run of batched chains ended: compute them now
        if ctx.profile is None:
            self._dispatch[action.op](action, ctx)
            return
        t0 = ctx.clock()
        if action.op == "forward" and ctx.meter is not None:   # what forward saves is the activation memory
            ctx.meter.current = action.mb
            with ctx.meter:
                self._forward(action, ctx)
        else:
            self._dispatch[action.op](action, ctx)
        if action.op == "weight_grad" and ctx.meter is not None:
            ctx.meter.release(action.mb)
        ctx.profile.append((action.op, action.mb, action.loss, t0, ctx.clock()))

    def handles(self, action: Action) -> bool:
        return action.op in self._dispatch

    def mean_loss(self, ctx: RunContext) -> Tensor:
        """This stage's head loss, mean over the run's micro-batches (NaN without a head)."""
        if not self.is_last and self.head is None:
            return torch.full_like(ctx.loss_sum, float("nan"))
        return ctx.loss_sum / ctx.micro_batches

    # ------------------------------------------------------------------ actions
    def _load(self, act: Action, ctx: RunContext) -> None:
        batch = self.hooks.load(act.mb)
        if self.stage_id != 0:
            return   # only stage 0 feeds the pipeline; labels travel with the activations
        if batch is None:
            raise RuntimeError("stage 0 has no data: pass data_iter= to train_batch()/eval_batch() "
                               "or training_data= to initialize()")
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise TypeError("a batch must be an (inputs, labels) pair, as DeepSpeed's pipeline expects")
        ctx.mbs[act.mb] = MicroBatch(inputs=batch[0], labels=batch[1])

    def _recv_act(self, act: Action, ctx: RunContext) -> None:
        inputs, labels = self.transport.recv_act(act.mb)
        if ctx.training:
            inputs, leaves = float_leaves(inputs)
        else:
            leaves = []
        ctx.mbs[act.mb] = MicroBatch(inputs=inputs, labels=labels, leaves=leaves)

    def _send_act(self, act: Action, ctx: RunContext) -> None:
        st = ctx.mbs[act.mb]
        self.transport.send_act(act.mb, [st.outputs, st.labels])
        if not ctx.training:
            del ctx.mbs[act.mb]

    def _forward(self, act: Action, ctx: RunContext) -> None:
        st = ctx.mbs[act.mb]
        with self.hooks.autocast():
            out = self.forward_fn(st.inputs)
        st.outputs = out
        if self.is_last:
            loss = self.loss_fn(out, st.labels)   # outside autocast, as DeepSpeed does
            ctx.loss_sum += loss.detach().double()
            if ctx.eval_logits is not None:
                ctx.eval_logits.append(out.detach())
            if ctx.training:
                st.roots = [loss]
                st.comps = {self.stage_id: [torch.full_like(loss, 1.0 / ctx.micro_batches)]}
            else:
                del ctx.mbs[act.mb]
            return
        if not ctx.training:
            if self.head is not None:
                self._head_loss(out, st.labels, ctx)
            return
        st.roots = [t for t in as_list(out)[0] if t.is_floating_point()]
        if self.head is not None:
            self._aux_forward_backward(st, out, ctx, act.mb)

    def _aux_forward_backward(self, st: MicroBatch, out: Any, ctx: RunContext, mb: int) -> None:
        """The head's loss, its own gradient, and the component dL_s/dh_s if the stage needs it."""
        s = self.stage_id
        t0 = ctx.clock() if ctx.profile is not None else 0.0
        z, z_leaves = float_leaves(out)
        with self._not_metered(ctx):    # the head's activations are freed by its backward right here
            loss = self._head_loss(z, st.labels, ctx)
            w = self.routing.loss_weight(s, self.aux_loss_weight)
            own = self.routing.needs_own_loss_grad(s)
            wants = self.head_params + (z_leaves if own else [])
            if wants and loss.requires_grad:
                with self.hooks.param_grad_section():
                    torch.autograd.backward([loss * (w / ctx.micro_batches)], inputs=wants)
        if own:
            grads = [zl.grad for zl in z_leaves]
            if z_leaves and all(g is None for g in grads) and loss.requires_grad:
                raise HeadMismatchError(
                    f"stage {s}: the aux head's loss does not depend on the stage's output (does the head detach "
                    f"its input, or use torch.no_grad?): with k={self.routing.k} this stage's own loss would send it "
                    "no gradient at all")
            st.comps[s] = grads_or_zeros(grads, z_leaves)
        if ctx.profile is not None:     # part of "forward" too: the cost model charges it on its own
            ctx.profile.append(("aux_head", mb, -1, t0, ctx.clock()))

    def _head_loss(self, x: Any, labels: Any, ctx: RunContext) -> Tensor:
        with self.hooks.autocast():
            try:
                out = self.head(x)
            except Exception as exc:
                raise HeadMismatchError(heads.mismatch(self.stage_id, self.head, x, exc)) from exc
            try:
                loss = self.aux_loss_fn(out, labels)
            except Exception as exc:
                raise HeadMismatchError(heads.mismatch(self.stage_id, self.head, x, exc, part="loss")) from exc
        ctx.loss_sum += loss.detach().double()
        return loss

    @contextmanager
    def _not_metered(self, ctx: RunContext):
        meter = ctx.meter
        if meter is None:
            yield
            return
        mb, meter.current = meter.current, -1
        try:
            yield
        finally:
            meter.current = mb

    def _recv_grad(self, act: Action, ctx: RunContext) -> None:
        st = ctx.mbs[act.mb]
        st.comps[act.loss] = self.transport.recv_grad(act.mb, act.loss, st.roots)

    @staticmethod
    def _backward_pairs(st: MicroBatch, comp: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        pairs = [(r, g) for r, g in zip(st.roots, comp) if r.requires_grad]
        return [r for r, _ in pairs], [g for _, g in pairs]

    def _input_grad(self, act: Action, ctx: RunContext) -> None:
        if self.batch_input_grads:
            # wait: the next actions may be more chains of this micro-batch (execute() flushes at any other)
            ctx.queued.append((act.mb, act.loss, -1 if ctx.profile is None else len(ctx.profile)))
            return
        self._input_grads_separately(ctx.mbs[act.mb], [act.loss])

    def _input_grads_separately(self, st: MicroBatch, losses: list[int]) -> None:
        for j in losses:
            roots, grads = self._backward_pairs(st, st.comps[j])
            got = torch.autograd.grad(roots, st.leaves, grads, retain_graph=True, allow_unused=True)
            st.in_grads[j] = grads_or_zeros(got, st.leaves)

    def _input_grads_batched(self, st: MicroBatch, losses: list[int]) -> None:
        """Several chains of one graph (same roots and leaves, other grad_outputs) in one vmapped call."""
        pairs = [self._backward_pairs(st, st.comps[j]) for j in losses]
        roots = pairs[0][0]
        stacked = [torch.stack([grads[i] for _, grads in pairs]) for i in range(len(roots))]
        got = torch.autograd.grad(roots, st.leaves, stacked, retain_graph=True, allow_unused=True,
                                  is_grads_batched=True)
        for n, j in enumerate(losses):
            st.in_grads[j] = grads_or_zeros([None if g is None else g[n] for g in got], st.leaves)
        self.batched_calls += 1
        self.batched_chains += len(losses)

    def _flush_input_grads(self, ctx: RunContext) -> None:
        """The queued chains (consecutive input_grad actions of one micro-batch), batched when asked."""
        queued, ctx.queued = ctx.queued, []
        st, losses = ctx.mbs[queued[0][0]], [j for _, j, _ in queued]
        t0 = ctx.clock() if ctx.profile is not None else 0.0
        batched = len(losses) > 1 and self._batch_now(len(losses))
        if batched is None:          # "auto", still measuring: one way, timed
            batched = self._auto_trial(st, losses, ctx)
        elif batched:
            try:
                self._input_grads_batched(st, losses)
            except RuntimeError as exc:  # an op without a vmap rule: separate calls from now on
                warnings.warn(f"stage {self.stage_id}: batched input gradients failed ({exc}); "
                              "computing them one by one", RuntimeWarning)
                self.batch_input_grads = False
                self._input_grads_separately(st, losses)
        else:
            self._input_grads_separately(st, losses)
        if ctx.profile is not None:  # each queued input_grad gets an equal share of the time
            t1, n = ctx.clock(), len(queued)
            for i, (_, _, at) in enumerate(queued):
                op, mb, loss = ctx.profile[at][:3]
                ctx.profile[at] = (op, mb, loss, t0 + (t1 - t0) * i / n, t0 + (t1 - t0) * (i + 1) / n)

    AUTO_TRIALS = 3     # "auto": timed calls each way per chain count before choosing

    def _batch_now(self, n: int) -> Optional[bool]:
        if self.batch_input_grads != "auto":
            return bool(self.batch_input_grads)
        choice = self._auto.get(n)
        return choice if isinstance(choice, bool) else None

    def _auto_trial(self, st: MicroBatch, losses: list[int], ctx: RunContext) -> bool:
        separate, batched = self._auto.setdefault(len(losses), ([], []))
        way = len(batched) < len(separate)
        sync = (lambda: torch.cuda.synchronize(ctx.loss_sum.device)) if ctx.loss_sum.is_cuda else (lambda: None)
        sync()
        t0 = time.perf_counter()
        try:
            (self._input_grads_batched if way else self._input_grads_separately)(st, losses)
        except RuntimeError:
            if not way:
                raise
            self._auto[len(losses)] = False     # batching does not work for this stage: never again
            self._input_grads_separately(st, losses)
            return False
        sync()
        (batched if way else separate).append(time.perf_counter() - t0)
        if len(batched) >= self.AUTO_TRIALS:
            self._auto[len(losses)] = min(batched) < min(separate)
        return way

    def _weight_grad(self, act: Action, ctx: RunContext) -> None:
        st = ctx.mbs[act.mb]
        train = self.routing.trains(self.stage_id)
        combined = [sum(parts) for parts in zip(*(st.comps[j] for j in train))]
        roots, grads = self._backward_pairs(st, combined)
        fused = self.routing.fused_input(self.stage_id)
        leaves = st.leaves if fused is not None and self.stage_id > 0 else []
        if roots and (self.params or leaves):    # a stage of parameter-free layers only passes gradients on
            with self.hooks.param_grad_section():
                torch.autograd.backward(roots, grads, inputs=self.params + leaves)
        if leaves:
            st.in_grads[fused] = grads_or_zeros([leaf.grad for leaf in leaves], leaves)
        # the graph is gone; keep only the input gradients still to be sent
        ctx.mbs[act.mb] = MicroBatch(in_grads=st.in_grads, finished=True)
        self._release(act.mb, ctx)

    def _send_grad(self, act: Action, ctx: RunContext) -> None:
        st = ctx.mbs[act.mb]
        self.transport.send_grad(act.mb, act.loss, st.in_grads.pop(act.loss))
        self._release(act.mb, ctx)

    @staticmethod
    def _release(mb: int, ctx: RunContext) -> None:
        st = ctx.mbs[mb]
        if st.finished and not st.in_grads:
            del ctx.mbs[mb]
