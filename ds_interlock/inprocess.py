"""Every stage of an interlocked pipeline in one process: research on one device, fast tests.

Same inputs as the DeepSpeed pipeline (``layers``, ``aux_head``, ``loss_fn``,
``aux_loss_fn``, the DeepSpeed JSON with its "interlocking" block, ``(inputs, labels)``
batches), same stage executors (stage.py) running the same Schedule objects, in an order
the replay proves valid; tensors go through an in-memory transport. The optimizer,
learning-rate schedule, gradient clipping and bf16 come from DeepSpeed's own engine at
world size 1, built over all stages and heads.

What it mirrors of a multi-process launch, so both give the same numbers: the partition
and the layers (DeepSpeed's code), each stage's random state (every rank starts from the
same seed and builds only its own stage; dropout then draws from that stage's stream), a
tied module is one copy per owning stage whose gradients are summed (DeepSpeed's tied
all-reduce), and ``gradient_clipping`` follows DeepSpeed's pipeline (see ``_clip``).
"""
from __future__ import annotations

import copy
import json
import os
from collections import defaultdict, deque
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
from deepspeed.runtime.engine import DeepSpeedEngine
from torch import nn

from . import checkpoints
from . import config as ilconfig
from . import schedule as sched
from .config import InterlockingConfigError
from .module import default_checkpoint_func
from .replay import replay
from .routing import Routing
from .stage import RunContext, StageExecutor, StageHooks, as_list, from_list, to_device


class InProcessTransport:
    """Mailboxes between stages of one process: one FIFO per (sender, receiver, kind)."""

    def __init__(self, devices: Sequence[Any]) -> None:
        self.devices = list(devices)
        self.boxes: dict = defaultdict(deque)

    def for_stage(self, s: int) -> "_StageMail":
        return _StageMail(self, s)

    def _move(self, x: Any, dst: int) -> Any:
        tensors, was_tuple = as_list(x)
        dev = self.devices[dst]
        return from_list([t.detach().to(dev, non_blocking=dev.type == "cuda") for t in tensors], was_tuple)

    def put(self, src: int, dst: int, kind: str, item: Any) -> None:
        self.boxes[(src, dst, kind)].append(item)

    def take(self, src: int, dst: int, kind: str) -> Any:
        box = self.boxes[(src, dst, kind)]
        if not box:
            raise RuntimeError(f"stage {dst} receives {kind} from stage {src} before it was sent (execution order bug)")
        return box.popleft()


class _StageMail:
    def __init__(self, hub: InProcessTransport, s: int) -> None:
        self.hub, self.s = hub, s

    def send_act(self, mb: int, parts: list) -> None:
        self.hub.put(self.s, self.s + 1, "act", [self.hub._move(p, self.s + 1) for p in parts])

    def recv_act(self, mb: int) -> list:
        return self.hub.take(self.s - 1, self.s, "act")

    def send_grad(self, mb: int, loss: int, tensors: list) -> None:
        self.hub.put(self.s, self.s - 1, "grad", [self.hub._move(t, self.s - 1) for t in tensors])

    def recv_grad(self, mb: int, loss: int, like: list) -> list:
        return self.hub.take(self.s + 1, self.s, "grad")


class _Model(nn.Module):
    """All stages and heads as one module: what DeepSpeed's engine and optimizer see."""

    def __init__(self, stages: list, heads: list) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.aux_heads = nn.ModuleDict({str(s): h for s, h in enumerate(heads) if h is not None})


def _load_config(config: Union[str, os.PathLike, dict, None]) -> dict:
    if config is None:
        raise InterlockingConfigError("InProcessPipeline needs config= (a DeepSpeed JSON path or dict)")
    if isinstance(config, dict):
        return copy.deepcopy(config)
    try:
        with open(config) as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise InterlockingConfigError(f"{config}: not valid JSON ({exc})") from None


def _micro_batches(cfg: dict) -> int:
    """Micro-batches per batch, as DeepSpeed derives them at world size 1."""
    gas, micro, total = (cfg.get(k) for k in ("gradient_accumulation_steps", "train_micro_batch_size_per_gpu",
                                               "train_batch_size"))
    if gas is None:
        if micro is None or total is None:
            return 1
        if total % micro:
            raise InterlockingConfigError(f'"train_batch_size" {total} is not a multiple of '
                                          f'"train_micro_batch_size_per_gpu" {micro}')
        return total // micro
    if micro is not None and total is not None and total != micro * gas:
        raise InterlockingConfigError(f'"train_batch_size" {total} != "train_micro_batch_size_per_gpu" {micro} x '
                                      f'"gradient_accumulation_steps" {gas} (one process)')
    if not isinstance(gas, int) or gas < 1:
        raise InterlockingConfigError(f'"gradient_accumulation_steps": expected an integer >= 1, got {gas!r}')
    return gas


def _prepare_heads(stages: list, heads: list, seeds: list, factory: Callable, sample: Any,
                   aux_loss_fn: Callable) -> None:
    """Deferred heads built from a dry run on ``sample`` (stage by stage, as the launch does it),
    lazy ones materialised, every head checked against its stage's output."""
    from . import heads as H
    pending = [s for s, h in enumerate(heads[:-1]) if h is None or H.has_lazy(h)]
    if sample is None:
        if pending:
            raise InterlockingConfigError(
                f'"aux_head": the heads of stages {pending} need the stage output to be sized (a factory taking '
                "(stage_id, out), or lazy modules): pass sample_batch=(inputs, labels)")
        return
    inputs, labels = (sample[0], sample[1]) if isinstance(sample, (tuple, list)) and len(sample) == 2 \
        else (sample, None)
    x = inputs
    for s, stage in enumerate(stages[:-1]):
        device = next(iter(stage.parameters()), torch.empty(0)).device
        try:
            x = H.quiet_forward(stage, type(stage).forward, to_device(x, device))
        except Exception as exc:
            raise InterlockingConfigError(f"stage {s} failed on the sample batch: {type(exc).__name__}: {exc}") from exc
        if heads[s] is None:
            heads[s] = H.build(factory, s, seeds[s], H.StageOutput.of(s, x))
        H.dry_run(s, heads[s], x, labels, aux_loss_fn, seeds[s])


def ensure_process_group(backend: Optional[str] = None) -> None:
    """A world of one process, as DeepSpeed's engine needs one (no launcher required)."""
    import deepspeed
    import torch.distributed as tdist
    if tdist.is_initialized():
        return
    from .launching import free_port
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    # DeepSpeed names its CPU shared-memory buffers after the port; nothing listens on it: an
    # in-memory store needs no socket, so runs started side by side cannot race for a port
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    # with a GPU present, CPU tensors (a CPU pipeline, or DeepSpeed's own CPU collectives) go to gloo
    backend = backend or ("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    tdist.init_process_group(backend, store=tdist.HashStore(), rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)


class InProcessPipeline:
    """An interlocked pipeline of ``num_stages`` stages, all in this process.

    ``devices``: one device for every stage (default: CUDA if available, else CPU), or a
    list with a device per stage. ``optimizer`` / ``lr_scheduler``: as for
    ``deepspeed.initialize`` (default: the config's). ``sample_batch``: one ``(inputs, labels)``
    micro-batch to size heads that take the stage's output and check every head early
    (heads.py). ``train_batch(data_iter)`` returns the
    true loss; ``stage_losses`` holds every head's loss; ``eval_batch`` fills
    ``eval_stage_losses``.
    """

    def __init__(self, layers: list, num_stages: int, loss_fn: Callable, aux_head: Optional[Callable] = None,
                 aux_loss_fn: Optional[Callable] = None, config: Union[str, dict, None] = None,
                 devices: Union[str, torch.device, Sequence, None] = None, partition_method: str = "parameters",
                 activation_checkpoint_interval: int = 0, activation_checkpoint_func: Callable = default_checkpoint_func,
                 checkpointable_layers: Optional[list] = None, seed_layers: bool = False,
                 seed_fn: Optional[Callable] = None, base_seed: int = 1234,
                 optimizer: Any = None, lr_scheduler: Any = None, verbose: bool = True,
                 sample_batch: Any = None) -> None:
        from .bootstrap import _check_scheduler, _take_our_scheduler
        from .partition import build_stages

        cfg = _load_config(config)
        self.interlocking = ilconfig.from_ds_config(cfg)
        _check_scheduler(cfg)
        S = num_stages
        self.num_stages = S
        self.routing = Routing(S, self.interlocking.resolve_k(S), self.interlocking.combine)
        if isinstance(devices, (list, tuple)):
            if len(devices) != S:
                raise ValueError(f"devices: got {len(devices)} devices for {S} stages")
            self.devices = [torch.device(d) for d in devices]
        else:
            default = "cuda" if torch.cuda.is_available() else "cpu"
            self.devices = [torch.device(devices or default)] * S
        self.micro_batches = _micro_batches(cfg)

        if aux_head is not None and not callable(aux_head):
            raise InterlockingConfigError(f'"aux_head": expected a callable stage_id -> nn.Module, got '
                                          f"{type(aux_head).__name__}")
        parts, stages, heads, states, seeds = build_stages(
            layers, S, partition_method, aux_head, activation_checkpoint_interval=activation_checkpoint_interval,
            activation_checkpoint_func=activation_checkpoint_func, checkpointable_layers=checkpointable_layers,
            seed_layers=seed_layers, seed_fn=seed_fn, base_seed=base_seed)
        self.parts = parts
        aux_fn = aux_loss_fn if aux_loss_fn is not None else loss_fn
        if aux_head is not None:
            _prepare_heads(stages, heads, seeds, aux_head, sample_batch, aux_fn)
        missing = [s for s in range(S - 1) if heads[s] is None]
        if missing and self.routing.needs_aux_heads:
            raise InterlockingConfigError(
                f'"aux_head": k={self.routing.k} with combine="{self.routing.combine}" needs an aux head on every '
                f"stage before the last; stages {missing} have none")
        for s in range(S):
            stages[s].to(self.devices[s])
            if heads[s] is not None:
                heads[s].to(self.devices[s])
        self._tie_copies(stages)
        self.model = _Model(stages, heads)
        if self.routing.heads_are_probes:     # out of the bf16 optimizer's clipping norm, as in a launch
            for p in self.model.aux_heads.parameters():
                p.ds_pipe_replicated = True
        self._rng = [_RngStream(st, d) for st, d in zip(states, self.devices)]

        self.engine = self._deepspeed_engine(cfg, optimizer, lr_scheduler, _take_our_scheduler)
        self.optimizer = self.engine.optimizer
        self.engine.checkpoint_engine = checkpoints.safe_checkpoint_engine(self.engine.checkpoint_engine)
        self.loaded_checkpoint_facts: Optional[dict] = None
        self.lr_scheduler = self.engine.lr_scheduler
        bf16 = type(self.optimizer).__name__ == "BF16_Optimizer"
        self._bf16 = bf16
        if bf16 and len(set(self.devices)) > 1:
            raise InterlockingConfigError('"bf16": the bf16 optimizer keeps one flat buffer; use one device for all stages')
        if bf16 and self.interlocking.clip_scope == "stage" and self.engine.gradient_clipping() > 0:
            raise InterlockingConfigError('"interlocking.clip_scope": "stage" with bf16 is not available in one process '
                                          "(DeepSpeed's bf16 optimizer clips by one global norm)")
        self.transport = InProcessTransport(self.devices)
        self.executors = [
            StageExecutor(s, self.routing, forward=stages[s], loss_fn=loss_fn, head=heads[s],
                          aux_loss_fn=aux_fn,
                          aux_loss_weight=self.interlocking.aux_loss_weight,
                          params=list(stages[s].parameters()), transport=self.transport.for_stage(s),
                          hooks=StageHooks(load=self._loader(s), autocast=self._autocast,
                                           param_grad_section=self._param_grad_section),
                          batch_input_grads=self.interlocking.batch_input_grads)
            for s in range(S)]
        self._orders: dict = {}
        self._data: Optional[Iterator] = None
        self.summary = ilconfig.describe(self.interlocking, S, aux_head is not None) + " (one process)"
        if verbose:
            print(self.summary, flush=True)
        self.stage_losses: Optional[list] = None
        self.stage_losses_step: Optional[int] = None   # the step stage_losses belong to (as the engine's)
        self.eval_stage_losses: Optional[list] = None
        # a list per stage (set ``pipe.profile = [[] for _ in range(S)]``): (op, mb, loss, start, end)
        # per executed action, as on a rank of the engine (profile.py summarizes one stage's list)
        self.profile: Optional[list] = None

    # ------------------------------------------------------------------ construction
    def _tie_copies(self, stages: list) -> None:
        """Tied modules: each owning stage keeps its copy (as on separate ranks), initialised
        from the first owner's (DeepSpeed broadcasts from the lowest rank)."""
        self._tied: dict = defaultdict(list)
        for s, st in enumerate(stages):
            for key, weights in st.tied_weights().items():
                self._tied[key].append((s, weights))
        with torch.no_grad():
            for key, owners in self._tied.items():
                first = owners[0][1]
                for _, weights in owners[1:]:
                    for (_, src), (_, dst) in zip(first, weights):
                        dst.copy_(src)
                        dst.ds_pipe_replicated = True   # DeepSpeed's norms count a tied weight once
        self._tied = {k: v for k, v in self._tied.items() if len(v) > 1}

    def _deepspeed_engine(self, cfg: dict, optimizer: Any, lr_scheduler: Any, take_scheduler: Callable) -> Any:
        ensure_process_group()
        from deepspeed.runtime.config import DeepSpeedConfig
        import deepspeed

        inner = {k: v for k, v in cfg.items() if k not in (ilconfig.BLOCK, "pipeline")}
        micro = inner.get("train_micro_batch_size_per_gpu") or inner.get("train_batch_size", self.micro_batches) \
            // self.micro_batches
        # our pipeline makes the micro-batches; DeepSpeed's engine sees one step per batch
        inner.update(gradient_accumulation_steps=1, train_micro_batch_size_per_gpu=micro * self.micro_batches,
                     train_batch_size=micro * self.micro_batches)
        zero = inner.get("zero_optimization", {}) or {}
        if zero.get("stage", 0) > 1:
            raise InterlockingConfigError('"zero_optimization.stage": the pipeline supports ZeRO stage 0 or 1')
        inner.pop("zero_optimization", None)   # ZeRO-1 partitions over data-parallel ranks: nothing to do at world size 1
        inner, lr_scheduler = take_scheduler(inner, lr_scheduler)
        params = [p for p in self.model.parameters() if p.requires_grad]
        config_class = DeepSpeedConfig(inner, None)
        deepspeed.set_optimizer_flags(config_class, self.model)
        engine = _Engine(args=None, model=self.model, optimizer=optimizer, model_parameters=params,
                         lr_scheduler=lr_scheduler, config=inner, config_class=config_class,
                         dont_change_device=True)
        engine.pipeline = self
        return engine

    # ------------------------------------------------------------------ hooks
    def _loader(self, s: int) -> Callable[[int], Any]:
        def load(mb: int) -> Any:
            if s != 0:
                return None
            try:
                batch = next(self._data)
            except StopIteration:
                raise RuntimeError(f"the data iterator ran out at micro-batch {mb} of {self._run_micro_batches} "
                                   "in this batch") from None
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                return batch
            return tuple(to_device(part, self.devices[0]) for part in batch)
        return load

    def _autocast(self):
        from deepspeed.runtime.torch_autocast import autocast_if_enabled
        return autocast_if_enabled(self.engine)

    @contextmanager
    def _param_grad_section(self):
        if self._bf16:
            self.optimizer.clear_lp_grads()
        yield
        if self._bf16 and not self.engine._config.bfloat16_config.immediate_grad_update:
            self.optimizer.update_hp_grads(clear_lp_grads=False)

    # ------------------------------------------------------------------ running
    def _order(self, kind: str, M: int) -> list:
        """(stage, action) in an order the replay proves valid (every receive after its send)."""
        key = (kind, M)
        if key not in self._orders:
            plan = sched.plan(kind, self.interlocking.schedule, self.routing, M)
            self._orders[key] = [(s, a) for s, a, _, _ in replay(plan).events if a.kind != "batch"]
        return self._orders[key]

    def _run(self, kind: str, data_iter: Iterator, M: int, training: bool) -> list[RunContext]:
        if not hasattr(data_iter, "__next__"):
            raise TypeError(f"data_iter must be an iterator (e.g. iter(loader)), got {type(data_iter).__name__}: "
                            "a new iterator per batch would start the data over every time")
        self._data, self._run_micro_batches = data_iter, M
        if self.profile is not None and len(self.profile) != len(self.executors):
            raise ValueError(f"profile needs one list per stage ({len(self.executors)}), got {len(self.profile)}")
        ctxs = [ex.start(training, M, self.devices[s], profile=None if self.profile is None else self.profile[s])
                for s, ex in enumerate(self.executors)]
        try:
            for s, act in self._order(kind, M):
                with self._rng[s]:
                    self.executors[s].execute(act, ctxs[s])
        finally:
            self._data = None
            self.transport.boxes.clear()
        return ctxs

    def _losses(self, ctxs: list) -> list[float]:
        means = [ex.mean_loss(c).to(self.devices[0]) for ex, c in zip(self.executors, ctxs)]
        return torch.stack(means).float().tolist()   # the one host sync per batch

    def train_batch(self, data_iter: Iterator) -> float:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches of ``data_iter``."""
        if not torch.is_grad_enabled():
            raise RuntimeError("train_batch() requires gradients enabled. Use eval_batch() instead.")
        self.model.train()
        ctxs = self._run("train", data_iter, self.micro_batches, training=True)
        self._reduce_tied()
        self.engine.step()
        self.stage_losses = self._losses(ctxs)
        self.stage_losses_step = self.global_steps
        return self.stage_losses[-1]

    def eval_batch(self, data_iter: Iterator, num_micro_batches: Optional[int] = None) -> float:
        """Forward only through every head; returns the true loss, ``eval_stage_losses`` all of them."""
        self.model.eval()
        with torch.no_grad():
            ctxs = self._run("inference", data_iter, num_micro_batches or self.micro_batches, training=False)
        self.eval_stage_losses = self._losses(ctxs)
        return self.eval_stage_losses[-1]

    def _reduce_tied(self) -> None:
        """Sum the gradients of a tied module's copies (DeepSpeed's tied all-reduce)."""
        for owners in self._tied.values():
            for i in range(len(owners[0][1])):
                # bf16: the optimizer has already moved gradients into its fp32 copies
                grads = [getattr(weights[i][1], "_hp_grad", None) if self._bf16 else weights[i][1].grad
                         for _, weights in owners]
                if any(g is None for g in grads):
                    continue
                total = sum(g.to(grads[0].device) for g in grads)
                for g in grads:
                    g.copy_(total)

    # ------------------------------------------------------------------ DeepSpeed's
    @property
    def global_steps(self) -> int:
        return self.engine.global_steps

    def get_lr(self) -> list:
        return self.engine.get_lr()

    def train_micro_batch_size_per_gpu(self) -> int:
        return self.engine.train_micro_batch_size_per_gpu() // self.micro_batches

    def gradient_accumulation_steps(self) -> int:
        return self.micro_batches

    def run_facts(self) -> dict:
        """What a checkpoint records about the run that wrote it (checked on resume)."""
        return {"world_size": 1, "num_stages": self.num_stages, "data_parallel": 1, "k": self.routing.k,
                "combine": self.routing.combine, "schedule": self.interlocking.schedule,
                "micro_batches": self.micro_batches, "global_steps": self.global_steps}

    def save_checkpoint(self, save_dir: str, tag: Optional[str] = None, client_state: Optional[dict] = None) -> None:
        """DeepSpeed's save of every stage and head, counted complete only once written (checkpoints.py)."""
        tag = checkpoints.save_tag(tag, self.global_steps)
        client_state = dict(client_state or {})
        facts = checkpoints.checked_facts({**self.run_facts(), **(client_state.get("run") or {})})
        checkpoints.begin(save_dir, tag)
        self.engine.save_checkpoint(save_dir, tag=tag, save_latest=False,
                                    client_state={**client_state, "rng": [r.state() for r in self._rng]})
        checkpoints.commit(save_dir, tag, facts)

    def load_checkpoint(self, load_dir: str, tag: Optional[str] = None) -> tuple:
        """The checkpoint ``tag``, else ``latest``'s if complete, else the newest complete one."""
        plan = checkpoints.plan_load(load_dir, tag)
        if plan is None:
            print(f"ds_interlock: no checkpoint in {load_dir} to load", flush=True)
            return None, None
        tag, note, self.loaded_checkpoint_facts = plan
        if note:
            print(f"ds_interlock: {note}", flush=True)
        checkpoints.check_layout(os.path.join(load_dir, tag), self.loaded_checkpoint_facts, self.run_facts())
        path, client = self.engine.load_checkpoint(load_dir, tag=tag)
        if client and "rng" in client:
            for r, state in zip(self._rng, client["rng"]):
                r.load(state)
        return path, client

    def _clip(self, max_norm: float) -> None:
        """``gradient_clipping`` as DeepSpeed's pipeline applies it in fp32.

        clip_scope "deepspeed": DeepSpeed 0.19.8's fp32 pipeline computes one norm from
        model-parallel rank 0's gradients, i.e. stage 0's (its layers and head), and scales
        every stage by it; reproduced so that one process and a launch agree. "stage":
        every stage (with its head) by its own norm."""
        groups = [[p for p in self.stage_parameters(s).values() if p.grad is not None]
                  for s in range(self.num_stages)]
        probes = {id(p) for p in self.model.aux_heads.parameters()} if self.routing.heads_are_probes else set()
        counted = [[p for p in g if id(p) not in probes] for g in groups]   # probe heads never count
        if self.interlocking.clip_scope == "stage":
            for g, c in zip(groups, counted):
                if c:
                    coef = torch.clamp(max_norm / (_norm(c) + 1e-6), max=1.0)
                    for p in g:
                        p.grad.detach().mul_(coef.to(p.grad.device))
            return
        if not counted[0]:
            return
        coef = torch.clamp(max_norm / (_norm(counted[0]) + 1e-6), max=1.0)
        for g in groups:
            for p in g:
                p.grad.detach().mul_(coef.to(p.grad.device))

    def stage_parameters(self, s: int) -> dict[str, torch.Tensor]:
        """Stage ``s``'s parameters under the names a DeepSpeed stage gives them (head included)."""
        out = {n: p for n, p in self.model.stages[s].named_parameters()}
        if str(s) in self.model.aux_heads:
            out.update({f"aux_heads.{s}.{n}": p for n, p in self.model.aux_heads[str(s)].named_parameters()})
        return out


def _norm(params: list) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.detach().float()) for p in params]))


class _RngStream:
    """One stage's random state, swapped in while that stage runs (a rank of its own)."""

    def __init__(self, cpu_state: torch.Tensor, device: torch.device) -> None:
        self.cpu = cpu_state
        self.device = device
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self._saved: Any = None

    def __enter__(self) -> None:
        self._saved = (torch.random.get_rng_state(),
                       torch.cuda.get_rng_state(self.device) if self.cuda is not None else None)
        torch.random.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)

    def __exit__(self, *exc: Any) -> None:
        self.cpu = torch.random.get_rng_state()
        torch.random.set_rng_state(self._saved[0])
        if self.cuda is not None:
            self.cuda = torch.cuda.get_rng_state(self.device)
            torch.cuda.set_rng_state(self._saved[1], self.device)

    def state(self) -> dict:
        return {"cpu": self.cpu, "cuda": self.cuda}

    def load(self, state: dict) -> None:
        self.cpu = state["cpu"]
        if state.get("cuda") is not None and self.cuda is not None:
            self.cuda = state["cuda"]


class _Engine(DeepSpeedEngine):
    """DeepSpeed's engine over all stages; gradient clipping follows DeepSpeed's pipeline."""

    def clip_fp32_gradients(self):
        self.pipeline._clip(self.gradient_clipping())
