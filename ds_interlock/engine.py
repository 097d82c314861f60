"""InterlockingPipelineEngine: executes a schedule (schedule.py) with the gradient math of routing.py.

It reuses DeepSpeed's PipelineEngine for everything that is not the pipeline
order or the backward math: process groups and grid, data loading, gradient
reduction across data-parallel replicas and tied layers, the optimizer step
(clipping, bf16, ZeRO-1), checkpoints, timers and the monitor.

Per micro-batch, stage s keeps its *roots* (the float outputs it produced, or
the loss on the last stage) and, for each loss j it needs, the component
dL_j/d(root) (already weighted by w_j / micro_batches). Backward work is then:
  input_grad(j): autograd.grad(roots, stage inputs, component j)  -> sent to s-1
  weight_grad:   backward(roots, sum of the training components) into the stage's
                 parameters (and, when fused, also its inputs)
"""
import time
from contextlib import contextmanager
from types import SimpleNamespace

import torch
from deepspeed import comm as dist
from deepspeed.runtime.pipe.engine import PipelineEngine, TRAIN_BATCH_TIMER
from deepspeed.runtime.torch_autocast import autocast_if_enabled
from deepspeed.runtime.activation_checkpointing import checkpointing as ds_checkpointing
from deepspeed.utils import logger

from . import schedule as sched
from .config import InterlockingConfig
from .module import default_checkpoint_func
from .routing import Routing
from .stage_local import make_optimizer_stage_local
from .wire import Wire, as_list


def _float_leaves(x):
    """Detached copies of a stage input; float tensors require grad (they get input gradients)."""
    tensors, was_tuple = as_list(x)
    out = []
    for t in tensors:
        t = t.detach()
        if t.is_floating_point():
            t.requires_grad_(True)
        out.append(t)
    return (tuple(out) if was_tuple else out[0]), [t for t in out if t.requires_grad]


def _grads_or_zeros(grads, like):
    """Gradients to send or keep; a tensor the loss did not reach gets zeros (the peer waits for it)."""
    return [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, like)]


class InterlockingPipelineEngine(PipelineEngine):

    def __init__(self, *args, interlocking: InterlockingConfig = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.interlocking = interlocking or InterlockingConfig()
        self.routing = Routing(self.num_stages, self.interlocking.resolve_k(self.num_stages),
                               self.interlocking.combine)
        self.wire = Wire(self.device, static_shapes=not self.module.dynamic_shape)
        self._stage_params = self.module.stage_parameters()
        self._head_params = [p for p in self.module.aux_heads.parameters() if p.requires_grad]
        self.stage_losses = None        # per-stage mean losses of the last train_batch (list of S floats)
        self.eval_stage_losses = None   # same for the last eval_batch
        self._eval_logits = None
        self.stage_losses_step = None   # the optimizer step stage_losses belong to
        self._pending_report = None     # report="async": (work, tensor, step) in flight
        self._meter = None
        self._plans = {}
        self.profile = None             # a list to record (op, mb, loss, start, end) per action, see profile.py
        self._stage_grid = None
        if self.interlocking.clip_scope == "stage":
            self._stage_grid = make_optimizer_stage_local(self.optimizer, self.grid)
        ckpt = self.module.activation_checkpoint_func
        if ckpt in (ds_checkpointing.checkpoint, ds_checkpointing.non_reentrant_checkpoint):
            # DeepSpeed's checkpoint functions break under several backward calls per graph.
            self.module.activation_checkpoint_func = default_checkpoint_func
            if self.global_rank == 0:
                logger.info("ds_interlock: using torch's non-reentrant checkpoint for activation checkpointing")

    # ------------------------------------------------------------------ public API
    def train_batch(self, data_iter=None):
        if not torch.is_grad_enabled():
            raise RuntimeError("train_batch() requires gradients enabled. Use eval_batch() instead.")
        if data_iter is not None:
            self.set_dataiterator(data_iter)
        self.module.train()
        self.timers(TRAIN_BATCH_TIMER).start()
        start = time.time()
        self._run(self._plan("train", self.micro_batches), self.micro_batches, training=True)
        if self.interlocking.report == "async":
            self._report_async()
        else:
            self._set_stage_losses(self._aggregate_losses(self.micro_batches), self.global_steps)
        self.timers(TRAIN_BATCH_TIMER).stop()
        self._report_train(time.time() - start)
        return self.agg_train_loss

    def eval_batch(self, data_iter, return_logits=False, compute_loss=True, reduce_output="avg",
                   bcast_loss=True, num_micro_batches=None):
        """Forward only. Returns the true loss; ``eval_stage_losses`` holds every head's loss
        (early-exit evaluation through the aux heads)."""
        if not compute_loss or reduce_output != "avg":
            raise NotImplementedError("ds_interlock eval_batch computes the mean loss of every head "
                                      "(compute_loss=True, reduce_output='avg')")
        self.module.eval()
        saved_iter = self.data_iterator
        self.set_dataiterator(data_iter)
        micro_batches = num_micro_batches or self.micro_batches
        self._eval_logits = [] if return_logits else None
        self.flush_losses()      # collectives must not interleave
        try:
            with torch.no_grad():
                self._run(self._plan("inference", micro_batches), micro_batches, training=False)
            losses = self._aggregate_losses(micro_batches)
        finally:
            self.set_dataiterator(saved_iter)
        self.eval_stage_losses = losses.tolist()
        out = losses[-1].clone()
        if self.global_rank == 0 and self.monitor.enabled:
            events = [("Train/Samples/eval_loss", out.item(), self.global_samples)]
            events += [(f"Train/Samples/eval_stage{s}_loss", v, self.global_samples)
                       for s, v in enumerate(self.eval_stage_losses)]
            self.monitor.write_events(events)
        if return_logits:
            logits, self._eval_logits = self._eval_logits, None
            return out, logits
        return out

    def reset_activation_shape(self):
        super().reset_activation_shape()
        self.wire.reset_shapes()

    # ------------------------------------------------------------------ execution
    def _plan(self, kind, micro_batches):
        """This stage's action list; generated once per (kind, micro-batch count)."""
        key = (kind, micro_batches)
        if key not in self._plans:
            plan = (sched.inference(self.routing, micro_batches) if kind == "inference" else
                    sched.train_schedule(self.interlocking.schedule, self.routing, micro_batches))
            self._plans[key] = plan.for_stage(self.stage_id)
        return self._plans[key]

    def _run(self, actions, micro_batches, training):
        self._mb = {}
        self._training = training
        self._micro_batches = micro_batches
        self._loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        try:
            if self.profile is None:
                for act in actions:
                    getattr(self, "_do_" + act.op)(act)
            else:
                self._run_profiled(actions)
        except BaseException:
            # never wait on peers after a failure: this rank is going down, and waiting
            # for a send to a rank that is itself blocked would hang the job
            self.wire.pending = []
            self._mb = {}
            raise
        self.wire.wait_all()
        self._mb = {}

    def _run_profiled(self, actions):
        from .profile import ActivationMeter
        clock = time.perf_counter
        meter = self._meter = ActivationMeter(self.device)
        for act in actions:
            t0 = clock()
            if act.op == "forward":       # what forward saves for backward is the activation memory
                meter.current = act.mb
                with meter:
                    self._do_forward(act)
            else:
                getattr(self, "_do_" + act.op)(act)
            if act.op == "weight_grad":
                meter.release(act.mb)
            self.profile.append((act.op, act.mb, act.loss, t0, clock()))
        self.profile.append(("peak_activation_bytes", -1, -1, meter.peak, meter.peak))
        self._meter = None

    def _local_losses(self, micro_batches):
        v = torch.zeros(self.num_stages, dtype=torch.float64, device=self.device)
        if self.stage_id < self.num_stages - 1 and self.module.aux_head is None:
            v[self.stage_id] = float("nan")     # no probe head on this stage: no loss to report
        else:
            v[self.stage_id] = self._loss_sum / (micro_batches * self.dp_world_size)
        return v

    def _aggregate_losses(self, micro_batches):
        """Mean over micro-batches and DP replicas of every stage's loss, known on every rank.
        A collective over all ranks: every stage waits here for the slowest."""
        v = self._local_losses(micro_batches)
        if dist.get_world_size() > 1:
            dist.all_reduce(v)
        return v.float()

    def _set_stage_losses(self, v, step):
        self.stage_losses = v.tolist()
        self.stage_losses_step = step
        self.agg_train_loss = v[-1].clone()

    def _report_async(self):
        """Start this batch's loss reduction and finish the previous one: no stage waits
        for the others at the end of a batch, and losses arrive one batch late."""
        v = self._local_losses(self.micro_batches)
        work = dist.all_reduce(v, async_op=True) if dist.get_world_size() > 1 else None
        previous, self._pending_report = self._pending_report, (work, v, self.global_steps)
        if previous is None:
            self.agg_train_loss = torch.tensor(float("nan"))
        else:
            self._finish_report(previous)

    def _finish_report(self, pending):
        work, v, step = pending
        if work is not None:
            work.wait()
        self._set_stage_losses(v.float(), step)

    def flush_losses(self):
        """With report="async": wait for the last batch's losses (stage_losses, agg_train_loss)."""
        if self._pending_report is not None:
            pending, self._pending_report = self._pending_report, None
            self._finish_report(pending)
        return self.agg_train_loss

    def _prev_rank(self):
        return self.grid.stage_to_global(self.stage_id - 1)

    def _next_rank(self):
        return self.grid.stage_to_global(self.stage_id + 1)

    def _state(self, mb):
        return self._mb.setdefault(mb, SimpleNamespace())

    def _do_load(self, act):
        batch = self._next_batch()
        if self.stage_id != 0:
            return   # the last stage reads like DeepSpeed's does; its labels travel from stage 0
        if batch is None:
            raise RuntimeError("stage 0 has no data: pass data_iter= to train_batch()/eval_batch() "
                               "or training_data= to initialize()")
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise TypeError("a batch must be an (inputs, labels) pair, as DeepSpeed's pipeline expects")
        st = self._state(act.mb)
        st.inputs = self._to_device(batch[0])
        st.labels = self._to_device(batch[1])

    def _to_device(self, x):
        tensors, was_tuple = as_list(x)
        tensors = [t.to(self.device).detach() for t in tensors]
        return tuple(tensors) if was_tuple else tensors[0]

    def _do_recv_act(self, act):
        st = self._state(act.mb)
        inputs, st.labels = self.wire.recv_structured(self._prev_rank())
        if self._training:
            st.inputs, st.leaves = _float_leaves(inputs)
        else:
            st.inputs, st.leaves = inputs, []

    def _do_send_act(self, act):
        st = self._mb[act.mb]
        self.wire.send_structured([st.outputs, st.labels], self._next_rank())
        if not self._training:
            del self._mb[act.mb]

    def _do_forward(self, act):
        st = self._mb[act.mb]
        M = self._micro_batches
        with autocast_if_enabled(self):
            out = self.module(st.inputs)
        st.outputs = out
        if self._training:
            st.in_grads, st.finished = {}, False   # input gradients still to send; weight_grad done
        if self.stage_id == self.num_stages - 1:
            loss = self.module.loss_fn(out, st.labels)   # outside autocast, as DeepSpeed does
            self._loss_sum += loss.detach().double()
            if self._eval_logits is not None and not self._training:
                self._eval_logits.append(out.detach())
            if self._training:
                st.roots = [loss]
                st.comps = {self.stage_id: [torch.full_like(loss, 1.0 / M)]}
            else:
                del self._mb[act.mb]
            return
        head = self.module.aux_head
        if not self._training:
            if head is not None:
                self._head_loss(head, out, st.labels)
            return
        st.roots = [t for t in as_list(out)[0] if t.is_floating_point()]
        st.comps = {}
        if head is not None:
            self._aux_forward_backward(st, head, out, M)

    def _aux_forward_backward(self, st, head, out, M):
        """The head's loss, its own gradient, and the component dL_s/dh_s if the stage needs it."""
        s = self.stage_id
        z, z_leaves = _float_leaves(out)
        with self._not_metered():    # the head's activations are freed by its backward right here
            loss = self._head_loss(head, z, st.labels)
            w = self.routing.loss_weight(s, self.interlocking.aux_loss_weight)
            own = self.routing.needs_own_loss_grad(s)
            wants = self._head_params + (z_leaves if own else [])
            if wants and loss.requires_grad:
                with self._param_grad_section():
                    torch.autograd.backward([loss * (w / M)], inputs=wants)
        if own:
            st.comps[s] = _grads_or_zeros([zl.grad for zl in z_leaves], z_leaves)

    def _head_loss(self, head, x, labels):
        """The aux head's loss on this stage's output; counted for the per-stage report."""
        with autocast_if_enabled(self):
            loss = self.module.aux_loss_fn(head(x), labels)
        self._loss_sum += loss.detach().double()
        return loss

    @contextmanager
    def _not_metered(self):
        meter = self._meter
        if meter is None:
            yield
            return
        mb, meter.current = meter.current, -1
        try:
            yield
        finally:
            meter.current = mb

    def _do_recv_grad(self, act):
        st = self._mb[act.mb]
        st.comps[act.loss] = self.wire.recv_like(st.roots, self._next_rank())

    def _backward_pairs(self, st, comp):
        pairs = [(r, g) for r, g in zip(st.roots, comp) if r.requires_grad]
        return [r for r, _ in pairs], [g for _, g in pairs]

    def _do_input_grad(self, act):
        st = self._mb[act.mb]
        roots, grads = self._backward_pairs(st, st.comps[act.loss])
        got = torch.autograd.grad(roots, st.leaves, grads, retain_graph=True, allow_unused=True)
        st.in_grads[act.loss] = _grads_or_zeros(got, st.leaves)

    def _do_weight_grad(self, act):
        st = self._mb[act.mb]
        train = self.routing.trains(self.stage_id)
        combined = [sum(parts) for parts in zip(*(st.comps[j] for j in train))]
        roots, grads = self._backward_pairs(st, combined)
        fused = self.routing.fused_input(self.stage_id)
        leaves = st.leaves if fused is not None and self.stage_id > 0 else []
        if roots:
            with self._param_grad_section():
                torch.autograd.backward(roots, grads, inputs=self._stage_params + leaves)
        if leaves:
            st.in_grads[fused] = _grads_or_zeros([l.grad for l in leaves], leaves)
        # the graph is gone; keep only the input gradients still to be sent
        self._mb[act.mb] = SimpleNamespace(in_grads=st.in_grads, finished=True)
        self._release(act.mb)

    def _do_send_grad(self, act):
        st = self._mb[act.mb]
        self.wire.send_tensors(st.in_grads.pop(act.loss), self._prev_rank())
        self._release(act.mb)

    def _release(self, mb):
        st = self._mb[mb]
        if st.finished and not st.in_grads:
            del self._mb[mb]

    def _do_reduce_tied(self, act):
        self._exec_reduce_tied_grads()

    def _do_reduce_grads(self, act):
        self._exec_reduce_grads()

    def _do_step(self, act):
        self._exec_optimizer_step()

    def clip_fp32_gradients(self):
        if self._stage_grid is None:
            return super().clip_fp32_gradients()
        from deepspeed.runtime.utils import clip_grad_norm_
        clip_grad_norm_(parameters=self.module.parameters(), max_norm=self.gradient_clipping(),
                        mpu=self._stage_grid)

    @contextmanager
    def _param_grad_section(self):
        """Backward into parameters the way DeepSpeed's pipeline does it for non-last stages."""
        bf16 = self.using_bf16_optimizer
        if bf16:
            self.optimizer.clear_lp_grads()
        self._running_engine_backward = True
        try:
            yield
        finally:
            self._running_engine_backward = False
        if bf16 and not self._config.bfloat16_config.immediate_grad_update:
            self.optimizer.update_hp_grads(clear_lp_grads=False)

    # ------------------------------------------------------------------ reporting
    def _report_train(self, seconds):
        steps_per_print = self.steps_per_print()
        if self.global_rank == 0 and self.stage_losses is not None:
            if steps_per_print is not None and self.global_steps % steps_per_print == 0:
                stages = " ".join(f"{v:0.4f}" for v in self.stage_losses)
                late = "" if self.stage_losses_step == self.global_steps else f" (losses of step {self.stage_losses_step})"
                print(f"steps: {self.global_steps}{late} loss: {self.stage_losses[-1]:0.4f} "
                      f"stage_losses: [{stages}] iter time (s): {seconds:0.3f} "
                      f"samples/sec: {self.train_batch_size() / max(seconds, 1e-9):0.3f}", flush=True)
            if self.monitor.enabled:
                samples = self.global_samples - (self.global_steps - self.stage_losses_step) * self.train_batch_size()
                events = [("Train/Samples/train_loss", self.stage_losses[-1], samples)]
                events += [(f"Train/Samples/stage{s}_loss", v, samples) for s, v in enumerate(self.stage_losses)]
                self.monitor.write_events(events)
        self.timers(TRAIN_BATCH_TIMER).elapsed(reset=True)
