"""InterlockingPipelineEngine: DeepSpeed glue around the stage executor (stage.py).

DeepSpeed's PipelineEngine keeps what is DeepSpeed's: process groups and grid, data
loading, gradient reduction across data-parallel replicas and tied layers, the optimizer
step (clipping, bf16, ZeRO-1), checkpoints, timers and the monitor. The order of work is
a schedule (schedule.py), the gradient math is the executor's, and tensors travel over
one process group per boundary and direction (wire.py), which commcheck.py proves cannot
deadlock under NCCL; every plan is checked against that model before it runs.
"""
import os
import time
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
from deepspeed import comm as dist
from deepspeed.runtime.pipe.engine import PipelineEngine, TRAIN_BATCH_TIMER
from deepspeed.runtime.torch_autocast import autocast_if_enabled
from deepspeed.runtime.activation_checkpointing import checkpointing as ds_checkpointing
from deepspeed.utils import logger

from . import checkpoints
from . import commcheck
from . import stockckpt
from . import wire
from . import schedule as sched
from .config import InterlockingConfig, InterlockingConfigError
from .module import default_checkpoint_func
from .routing import Routing
from .stage import RunContext, StageExecutor, StageHooks, to_device
from .stage_local import make_optimizer_stage_local
from .wire import P2PTransport


class InterlockingPipelineEngine(PipelineEngine):

    def __init__(self, *args: Any, interlocking: Optional[InterlockingConfig] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.module.interlocking_engine = True
        self.checkpoint_engine = checkpoints.safe_checkpoint_engine(self.checkpoint_engine)
        self.loaded_checkpoint_facts = None   # the run facts of the checkpoint last loaded (None: no marker)
        self.interlocking = interlocking or InterlockingConfig()
        self.routing = Routing(self.num_stages, self.interlocking.resolve_k(self.num_stages),
                               self.interlocking.combine)
        self.layout = wire.channel_layout(self.grid._topo.get_axis_comm_lists("pipe"),
                                     timeout_s=self.interlocking.p2p_timeout_s)
        start = time.perf_counter()
        self.layout.warm_up(self.global_rank, self.device)
        if self.global_rank == 0 and not getattr(self.layout, "announced", False):
            self.layout.announced = True
            print(f"ds_interlock: {self.layout.num_groups} point-to-point groups (one per boundary and "
                  f"direction), created in {self.layout.created_s:.3f} s, connected in "
                  f"{time.perf_counter() - start:.3f} s", flush=True)
        self.transport = P2PTransport(
            prev_rank=self.grid.stage_to_global(self.stage_id - 1) if self.stage_id > 0 else None,
            next_rank=self.grid.stage_to_global(self.stage_id + 1) if self.stage_id < self.num_stages - 1 else None,
            rank=self.global_rank, layout=self.layout, device=self.device,
            static_shapes=not self.module.dynamic_shape, stage_id=self.stage_id)
        # gloo reports a send complete only once waited for; under NCCL nothing waits on sends
        self._host_waits = torch.distributed.get_backend() == "gloo"
        head = self.module.aux_head
        self.executor = StageExecutor(
            self.stage_id, self.routing, forward=self.module, loss_fn=self.module.loss_fn, head=head,
            aux_loss_fn=self.module.aux_loss_fn, aux_loss_weight=self.interlocking.aux_loss_weight,
            params=self.module.stage_parameters(), transport=self.transport,
            hooks=StageHooks(load=self._load_micro_batch, autocast=lambda: autocast_if_enabled(self),
                             param_grad_section=self._param_grad_section),
            batch_input_grads=self.interlocking.batch_input_grads)
        self._batch_actions = {"reduce_tied": self._exec_reduce_tied_grads,
                               "reduce_grads": self._exec_reduce_grads,
                               "step": self._exec_optimizer_step}
        self.stage_losses = None        # per-stage mean losses of the last train_batch (list of S floats)
        self.eval_stage_losses = None   # same for the last eval_batch
        self.stage_losses_step = None   # the optimizer step stage_losses belong to
        self._pending_report = None     # report="async": (work, tensor, step) in flight
        self._plans = {}
        self.profile = None             # a list to record (op, mb, loss, start, end) per action, see profile.py
        self._stage_grid = None
        if self.routing.heads_are_probes:
            # DeepSpeed's bf16 and ZeRO optimizers leave parameters so marked out of the clipping
            # norm: probe heads must not change the trunk's update
            for p in self.module.aux_heads.parameters():
                p.ds_pipe_replicated = True
        if self.interlocking.clip_scope == "stage":
            self._stage_grid = make_optimizer_stage_local(self.optimizer, self.grid)
        ckpt = self.module.activation_checkpoint_func
        if ckpt in (ds_checkpointing.checkpoint, ds_checkpointing.non_reentrant_checkpoint):
            # DeepSpeed's checkpoint functions break under several backward calls per graph.
            self.module.activation_checkpoint_func = default_checkpoint_func
            if self.global_rank == 0:
                logger.info("ds_interlock: using torch's non-reentrant checkpoint for activation checkpointing")
        if self.global_rank == 0:
            from .config import describe
            print(describe(self.interlocking, self.num_stages, self.module.has_aux_heads), flush=True)
        # refuse a plan that could deadlock on GPUs now, not an hour into the job
        self._plan("train", self.micro_batches)
        self._plan("inference", self.micro_batches)

    # ------------------------------------------------------------------ public API
    def train_batch(self, data_iter: Optional[Iterator] = None) -> torch.Tensor:
        if not torch.is_grad_enabled():
            raise RuntimeError("train_batch() requires gradients enabled. Use eval_batch() instead.")
        if data_iter is not None:
            self.set_dataiterator(data_iter)
        self.module.train()
        self.timers(TRAIN_BATCH_TIMER).start()
        start = time.time()
        ctx = self._run(self._plan("train", self.micro_batches), self.micro_batches, training=True)
        if self.interlocking.report == "async":
            self._report_async(ctx)
        else:
            self._set_stage_losses(self._aggregate_losses(ctx), self.global_steps)
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
        self.flush_losses()      # collectives must not interleave
        try:
            with torch.no_grad():
                ctx = self._run(self._plan("inference", micro_batches), micro_batches, training=False,
                                eval_logits=return_logits)
            losses = self._aggregate_losses(ctx)
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
            return out, ctx.eval_logits
        return out

    # ------------------------------------------------------------------ checkpoints
    def run_facts(self) -> dict:
        """What a checkpoint records about the run that wrote it (checked on resume)."""
        return {"world_size": dist.get_world_size(), "num_stages": self.num_stages, "data_parallel": self.dp_world_size,
                "k": self.routing.k, "combine": self.routing.combine, "schedule": self.interlocking.schedule,
                "micro_batches": self.micro_batches, "global_steps": self.global_steps}

    def save_checkpoint(self, save_dir, tag=None, client_state=None, save_latest=True, exclude_frozen_parameters=False):
        """DeepSpeed's save, made atomic: the checkpoint counts (commit marker, then ``latest``) only
        once every rank has written its files (checkpoints.py). ``client_state["run"]``, if given,
        goes into the marker with the engine's own facts."""
        tag = checkpoints.save_tag(tag, self.global_steps)
        client_state = dict(client_state or {})
        facts = checkpoints.checked_facts({**self.run_facts(), **(client_state.get("run") or {})})  # every rank
        if self.global_rank == 0:
            checkpoints.begin(save_dir, tag)   # a tag saved again is incomplete until its new marker
        dist.barrier()
        ok = super().save_checkpoint(save_dir, tag=tag, client_state=client_state, save_latest=False,
                                     exclude_frozen_parameters=exclude_frozen_parameters)
        dist.barrier()      # every rank's files are on disk
        if self.global_rank == 0:
            checkpoints.commit(save_dir, tag, facts, latest=save_latest)
        dist.barrier()      # nobody reads or prunes before the marker exists
        return ok

    def load_checkpoint(self, load_dir, tag=None, load_module_strict=True, load_optimizer_states=True,
                        load_lr_scheduler_states=True, load_module_only=False, custom_load_fn=None):
        """DeepSpeed's load_checkpoint, of a complete checkpoint only (``latest``'s, else the newest
        complete one, said on rank 0); a stock DeepSpeed pipeline checkpoint (no aux heads in it)
        loads too: the layers and their optimizer state, with the heads starting fresh."""
        # rank 0 decides and tells everyone: ranks that looked for themselves could pick different tags,
        # or fail alone, on a file system whose views differ
        verdict = [None]
        if self.global_rank == 0:
            try:
                verdict = [checkpoints.plan_load(load_dir, tag)]
            except checkpoints.CheckpointError as exc:
                verdict = [str(exc)]
        dist.broadcast_object_list(verdict, src=0)
        if verdict[0] is None:
            logger.warning(f"ds_interlock: no checkpoint in {load_dir} to load")
            return None, None      # as DeepSpeed's load_checkpoint does when there is none
        if isinstance(verdict[0], str):
            raise checkpoints.CheckpointError(verdict[0])
        tag, note, facts = verdict[0]
        if note and self.global_rank == 0:
            print(f"ds_interlock: {note}", flush=True)
        self.loaded_checkpoint_facts = facts
        checkpoints.check_layout(os.path.join(load_dir, tag), self.loaded_checkpoint_facts, self.run_facts(),
                                 zero=bool(self.zero_optimization()))
        stock = stockckpt.is_stock(load_dir, tag, self.module)
        if not stock:
            return super().load_checkpoint(load_dir, tag=tag, load_module_strict=load_module_strict,
                                           load_optimizer_states=load_optimizer_states,
                                           load_lr_scheduler_states=load_lr_scheduler_states,
                                           load_module_only=load_module_only, custom_load_fn=custom_load_fn)
        with_optimizer = load_optimizer_states and not load_module_only and self.optimizer is not None
        if with_optimizer and (self.zero_optimization() or self.bfloat16_enabled()):
            raise InterlockingConfigError(
                f"{stock}: a stock DeepSpeed checkpoint (no aux heads) keeps the optimizer state of bf16 and ZeRO in "
                "flat buffers that do not include the heads; load it with load_optimizer_states=False (the layers "
                "load, the optimizer starts fresh) or from an fp32 job without ZeRO")
        self.module.fresh_heads = True
        saved = self.optimizer.load_state_dict if with_optimizer else None
        if with_optimizer:
            self.optimizer.load_state_dict = stockckpt.loader_without_heads(
                self.optimizer, saved, {id(p) for p in self.module.aux_heads.parameters()}, stock)
        try:
            out = super().load_checkpoint(load_dir, tag=tag, load_module_strict=load_module_strict,
                                          load_optimizer_states=load_optimizer_states,
                                          load_lr_scheduler_states=load_lr_scheduler_states,
                                          load_module_only=load_module_only, custom_load_fn=custom_load_fn)
        finally:
            self.module.fresh_heads = False
            if saved is not None:
                del self.optimizer.load_state_dict      # back to the class's method
        self.loaded_stock_checkpoint = stock
        if self.global_rank == 0:
            what = "the layers and their optimizer state" if with_optimizer else "the layers"
            print(f"ds_interlock: {stock} is a stock DeepSpeed pipeline checkpoint: loaded {what}; "
                  "the aux heads start fresh", flush=True)
        return out

    def reset_activation_shape(self) -> None:
        super().reset_activation_shape()
        self.transport.reset_shapes()

    # ------------------------------------------------------------------ execution
    def _plan(self, kind: str, micro_batches: int) -> tuple:
        """This stage's action list; generated and checked once per (kind, micro-batch count).

        The whole pipeline's plan is checked against the NCCL model (commcheck.py) with this
        job's batch-end collectives: every rank reaches the same verdict, so a plan that
        could deadlock on GPUs is refused everywhere with the same message."""
        key = (kind, micro_batches)
        if key not in self._plans:
            plan = sched.plan(kind, self.interlocking.schedule, self.routing, micro_batches)
            commcheck.require_safe(plan, self._batch_end(), layout=self.layout.name)
            self._plans[key] = plan.for_stage(self.stage_id)
        return self._plans[key]

    def _batch_end(self) -> commcheck.BatchEnd:
        """What this job does between batches, for the NCCL model (the same on every rank)."""
        clipping = self.gradient_clipping() > 0 or self.using_bf16_optimizer
        return commcheck.BatchEnd(flush=clipping and self._stage_grid is None,
                                  tied=commcheck.tied_stages(self.module._layer_specs, self.module.parts),
                                  static_shapes=not self.module.dynamic_shape)

    def _run(self, actions: tuple, micro_batches: int, training: bool, eval_logits: bool = False) -> RunContext:
        profile = self.profile
        ctx = self.executor.start(training, micro_batches, self.device, eval_logits=eval_logits, profile=profile)
        if profile is not None:
            from .profile import ActivationMeter
            ctx.meter = ActivationMeter(self.device)
        try:
            for act in actions:
                if self.executor.handles(act):
                    self.executor.execute(act, ctx)
                else:
                    t0 = ctx.clock() if profile is not None else 0.0
                    self._batch_actions[act.op]()
                    if profile is not None:
                        profile.append((act.op, act.mb, act.loss, t0, ctx.clock()))
        except BaseException:
            # never wait on peers after a failure: this rank is going down, and waiting
            # for a send to a rank that is itself blocked would hang the job
            self.transport.abort()
            raise
        self.transport.end_batch(host_waits=self._host_waits)
        if profile is not None:
            profile.append(("peak_activation_bytes", -1, -1, ctx.meter.peak, ctx.meter.peak))
            ctx.meter = None
        return ctx

    def _load_micro_batch(self, mb: int) -> Any:
        try:
            batch = self._next_batch()   # the last stage reads too, like DeepSpeed's does
        except StopIteration:
            raise RuntimeError(f"stage {self.stage_id}: the data iterator is exhausted at micro-batch {mb} of this "
                               "batch; each train_batch/eval_batch reads gradient_accumulation_steps micro-batches "
                               "(or num_micro_batches) from it") from None
        if self.stage_id != 0 or not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            return batch             # the executor names what is wrong with it
        # the one host-to-device copy per micro-batch, and the host does not wait for it
        return to_device(batch[0], self.device), to_device(batch[1], self.device)

    def _local_losses(self, ctx: RunContext) -> torch.Tensor:
        v = torch.zeros(self.num_stages, dtype=torch.float64, device=self.device)
        v[self.stage_id] = self.executor.mean_loss(ctx) / self.dp_world_size
        return v

    def _aggregate_losses(self, ctx: RunContext) -> torch.Tensor:
        """Mean over micro-batches and DP replicas of every stage's loss, known on every rank.
        A collective over all ranks: every stage waits here for the slowest."""
        v = self._local_losses(ctx)
        if dist.get_world_size() > 1:
            dist.all_reduce(v)
        return v.float()

    def _set_stage_losses(self, v: torch.Tensor, step: int) -> None:
        self.stage_losses = v.tolist()
        self.stage_losses_step = step
        self.agg_train_loss = v[-1].clone()

    def _report_async(self, ctx: RunContext) -> None:
        """Start this batch's loss reduction and finish the previous one: no stage waits
        for the others at the end of a batch, and losses arrive one batch late."""
        v = self._local_losses(ctx)
        work = dist.all_reduce(v, async_op=True) if dist.get_world_size() > 1 else None
        previous, self._pending_report = self._pending_report, (work, v, self.global_steps)
        if previous is None:
            self.agg_train_loss = torch.tensor(float("nan"))
        else:
            self._finish_report(previous)

    def _finish_report(self, pending: tuple) -> None:
        work, v, step = pending
        if work is not None:
            work.wait()
        self._set_stage_losses(v.float(), step)

    def flush_losses(self) -> torch.Tensor:
        """With report="async": wait for the last batch's losses (stage_losses, agg_train_loss)."""
        if self._pending_report is not None:
            pending, self._pending_report = self._pending_report, None
            self._finish_report(pending)
        return self.agg_train_loss

    def clip_fp32_gradients(self) -> None:
        """DeepSpeed's clipping (or the stage's own with clip_scope "stage"); probe heads are
        clipped by the trunk's coefficient but never count in its norm."""
        from deepspeed.runtime.utils import clip_grad_norm_
        mpu = self._stage_grid or self.mpu
        if not self.routing.heads_are_probes or self.module.aux_head is None:
            clip_grad_norm_(parameters=self.module.parameters(), max_norm=self.gradient_clipping(), mpu=mpu)
            return
        trunk = self.module.stage_parameters()
        norm = clip_grad_norm_(parameters=trunk, max_norm=self.gradient_clipping(), mpu=mpu)
        head = [p for p in self.module.aux_heads.parameters() if p.grad is not None]
        if head:
            coef = torch.clamp(self.gradient_clipping() / (norm + 1e-6), max=1.0)
            for p in head:
                p.grad.data.mul_(coef.to(p.grad.device))

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
    def _report_train(self, seconds: float) -> None:
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
