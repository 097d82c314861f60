"""InterlockingPipelineModule: DeepSpeed's PipelineModule plus one aux head per stage boundary."""
from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn
from deepspeed.pipe import PipelineModule

from . import heads as H
from .config import InterlockingConfigError
from .stage import to_device

if TYPE_CHECKING:
    from .routing import Routing

# DeepSpeed's own activation checkpointing breaks under several backward calls
# over one graph; torch's non-reentrant checkpoint does not.
default_checkpoint_func = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)


class InterlockingPipelineModule(PipelineModule):
    """A ``PipelineModule`` whose stages ``s < S-1`` each own an auxiliary head.

    ``aux_head(stage_id)`` is called only on the rank that owns ``stage_id``; the
    head maps the stage's output to whatever ``aux_loss_fn(head_out, labels)``
    takes. Heads are ordinary submodules (``self.aux_heads``), so parameters(),
    the optimizer, data-parallel averaging and checkpoints all include them.
    """

    def __init__(self, layers, num_stages=None, loss_fn=None, aux_head=None, aux_loss_fn=None,
                 activation_checkpoint_func=default_checkpoint_func, sample_batch=None, **pipeline_kwargs):
        super().__init__(layers, num_stages=num_stages, loss_fn=loss_fn,
                         activation_checkpoint_func=activation_checkpoint_func, **pipeline_kwargs)
        self.aux_loss_fn = aux_loss_fn if aux_loss_fn is not None else loss_fn
        self.interlocking_engine = False  # set by our engine; DeepSpeed's own engine would ignore the heads
        self.has_aux_heads = aux_head is not None
        self.aux_heads = nn.ModuleDict()
        self.aux_head_error = None      # reported by initialize(), where config errors live
        self.sample_batch = sample_batch
        self.fresh_heads = False        # set while loading a stock checkpoint, which has no heads
        # drawn once the stage is built and without advancing the global state, so heads never
        # change the trunk's random stream (initialisation, dropout)
        self._head_seed = H.head_seed(self.stage_id)
        self._head_factory = None       # aux_head(stage_id, output): built at initialize from a dry run
        if aux_head is not None and not callable(aux_head):
            self.aux_head_error = f"aux_head must be a callable stage_id -> nn.Module, got {type(aux_head).__name__}"
        elif aux_head is not None and self.stage_id < self.num_stages - 1:
            if H.wants_output(aux_head):
                self._head_factory = aux_head
            else:
                try:
                    self._set_head(H.build(aux_head, self.stage_id, self._head_seed))
                except InterlockingConfigError as exc:
                    self.aux_head_error = str(exc).removeprefix('"aux_head": ')

    def _set_head(self, head: nn.Module) -> None:
        self.aux_heads[str(self.stage_id)] = head.to(next(iter(self.parameters()), torch.empty(0)).device)

    @property
    def heads_pending(self) -> bool:
        """True while this stage's head waits for a sample of its input (deferred factory, lazy modules)."""
        return self._head_factory is not None or H.has_lazy(self.aux_head)

    def prepare_heads(self, sample: Any) -> list[nn.Parameter]:
        """Size, materialise and check this stage's head on a sample batch; returns the parameters of a
        head built here (the optimizer must get them). Every rank calls it: stage s's output travels
        to stage s+1 by a broadcast from the first pipeline replica."""
        inputs, labels = (sample[0], sample[1]) if isinstance(sample, (tuple, list)) and len(sample) == 2 \
            else (sample, None)
        output, error = self._sample_forward(inputs)
        if error:
            raise InterlockingConfigError(error)
        if output is None:
            return []
        new = []
        if self._head_factory is not None:
            self._set_head(H.build(self._head_factory, self.stage_id, self._head_seed,
                                   H.StageOutput.of(self.stage_id, output)))
            self._head_factory = None
            new = [p for p in self.aux_head.parameters() if p.requires_grad]
        if self.aux_head is not None:
            device = next(iter(self.parameters()), torch.empty(0)).device
            labels = to_device(labels, device) if labels is not None else None
            H.dry_run(self.stage_id, self.aux_head, output, labels, self.aux_loss_fn, self._head_seed)
        return new

    def _sample_forward(self, inputs: Any) -> tuple[Any, Optional[str]]:
        """(this stage's output on the sample, or None on the last stage; an error message or None)."""
        import torch.distributed as tdist
        first_pipeline = self._grid._topo.get_axis_comm_lists("pipe")[0] if self.num_stages > 1 else [0]
        distributed = tdist.is_initialized() and tdist.get_world_size() > 1
        device = next(iter(self.parameters()), torch.empty(0)).device
        x, mine, error = inputs, None, None
        for s in range(self.num_stages):
            if s == self.stage_id and error is None:
                try:
                    mine = H.quiet_forward(self, PipelineModule.forward, to_device(x, device))
                except Exception as exc:  # noqa: BLE001 - reported at initialize, naming the stage
                    error = (f"stage {self.stage_id} failed on the sample batch (input {H.StageOutput.of(s, x)}): "
                             f"{type(exc).__name__}: {exc}")
            if s == self.num_stages - 1:
                break
            try:
                box = [(error, None if mine is None or s != self.stage_id else to_device(mine, torch.device("cpu")))]
            except Exception as exc:  # noqa: BLE001 - the others wait in the broadcast: send the error instead
                error = f"stage {self.stage_id}: its output cannot be sent ({type(exc).__name__}: {exc})"
                box = [(error, None)]
            if distributed:
                tdist.broadcast_object_list(box, src=first_pipeline[s])
            got_error, x = box[0]
            if got_error and error is None:
                error = f"stage {s} could not run the sample batch: {got_error}" if s != self.stage_id else got_error
        if self.stage_id == self.num_stages - 1:
            return None, error
        return mine, error

    def mpu(self):
        # deepspeed.initialize asks for the grid before it builds DeepSpeed's own PipelineEngine,
        # which would train this module with plain backprop and ignore its heads: refuse there,
        # on every rank, before any collective
        if not getattr(self, "_built_by_ds_interlock", False):
            raise InterlockingConfigError(
                "an InterlockingPipelineModule must be started with ds_interlock.initialize, not deepspeed.initialize "
                "(DeepSpeed's own engine would train it with plain backprop and ignore the aux heads): "
                "`from ds_interlock import initialize` takes the same arguments")
        return super().mpu()

    def forward(self, forward_input):
        if not self.interlocking_engine:
            raise InterlockingConfigError(
                "this InterlockingPipelineModule is being run by an engine that is not ds_interlock's (did you call "
                "deepspeed.initialize?): DeepSpeed's own PipelineEngine would train it with plain backprop and ignore "
                "the aux heads. Use `from ds_interlock import initialize` with the same arguments.")
        return super().forward(forward_input)

    @property
    def aux_head(self) -> Optional[nn.Module]:
        """This rank's aux head, or None (last stage, or no heads given)."""
        return self.aux_heads[str(self.stage_id)] if str(self.stage_id) in self.aux_heads else None

    def stage_parameters(self) -> list[nn.Parameter]:
        """Parameters of the pipeline layers on this stage (aux head excluded)."""
        head = set(id(p) for p in self.aux_heads.parameters())
        return [p for p in self.parameters() if p.requires_grad and id(p) not in head]

    # DeepSpeed's save/load covers the pipeline layers only; heads would be lost silently.
    def _aux_ckpt_path(self, ckpt_dir: str) -> str:
        return os.path.join(ckpt_dir, f"aux_head_{self.stage_id:02d}-model_states.pt")

    def save_state_dict(self, save_dir, checkpoint_engine, exclude_frozen_params=False):
        super().save_state_dict(save_dir, checkpoint_engine, exclude_frozen_params=exclude_frozen_params)
        if self.aux_head is not None and self._grid.data_parallel_id == 0:
            checkpoint_engine.makedirs(save_dir, exist_ok=True)
            state = {k: v.detach().clone() for k, v in self.aux_head.state_dict().items()}
            checkpoint_engine.save(state_dict=state, path=self._aux_ckpt_path(save_dir))

    def load_state_dir(self, load_dir, checkpoint_engine, strict=True):
        super().load_state_dir(load_dir, checkpoint_engine, strict=strict)
        if self.aux_head is None or self.fresh_heads:
            return
        path = self._aux_ckpt_path(load_dir)
        if not os.path.exists(path):
            if strict:
                raise FileNotFoundError(f"checkpoint has no aux head for stage {self.stage_id}: {path}")
            return
        from .checkpoints import safe_load
        self.aux_head.load_state_dict(safe_load(path, map_location="cpu"), strict=strict)

    def check_heads(self, routing: Routing, aux_loss_fn_needed: bool = True) -> None:
        """Fail at start-up when a head that the algorithm needs is missing."""
        if self.aux_head_error:
            raise InterlockingConfigError(f'"aux_head": {self.aux_head_error}')
        if self.stage_id < self.num_stages - 1 and self.aux_head is None and routing.needs_aux_heads:
            raise InterlockingConfigError(
                f'"aux_head": k={routing.k} with combine="{routing.combine}" needs an aux head on every '
                f"stage before the last, and stage {self.stage_id} has none; pass "
                "aux_head=lambda stage_id: nn.Module(...) (heads are optional only for "
                'k = "global" with combine = "furthest")')
        if self.aux_head is not None and self.aux_loss_fn is None:
            raise InterlockingConfigError('"aux_loss_fn": aux heads need a loss; pass aux_loss_fn or loss_fn')
