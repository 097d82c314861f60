"""initialize(): deepspeed.initialize for an InterlockingPipelineModule (ds_interlock.initialize).

deepspeed.initialize hard-codes PipelineEngine for a PipelineModule, so this
mirrors its pipeline branch and builds our engine instead. Same arguments, same
return value: (engine, optimizer, training_dataloader, lr_scheduler).
"""
import copy
import os
import sys
import traceback

import torch.distributed as tdist
import deepspeed
from deepspeed import comm as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.constants import TORCH_DISTRIBUTED_DEFAULT_PORT
from deepspeed.runtime.config import DeepSpeedConfig
from deepspeed.runtime.tensor_parallel.init_utils import load_ds_config

from . import config as ilconfig
from .config import InterlockingConfigError
from .engine import InterlockingPipelineEngine
from .module import InterlockingPipelineModule
from .routing import Routing


def _agree_on_errors(error):
    """Every rank raises if any rank found a configuration error, so none is left waiting
    in a collective. ``error`` is this rank's message or None."""
    if not tdist.is_initialized() or tdist.get_world_size() == 1:
        if error:
            raise InterlockingConfigError(error)
        return
    errors = [None] * tdist.get_world_size()
    tdist.all_gather_object(errors, error)
    if error:
        raise InterlockingConfigError(error)
    bad = [(r, e) for r, e in enumerate(errors) if e]
    if bad:
        r, e = bad[0]
        raise InterlockingConfigError(f"rank {r} rejected the configuration: {e}")


def _check(model, config):
    """Everything that can be checked before the engine exists. Returns (InterlockingConfig, error)."""
    try:
        if not isinstance(model, InterlockingPipelineModule):
            raise InterlockingConfigError(
                f"model must be an InterlockingPipelineModule, got {type(model).__name__}")
        il = ilconfig.from_ds_config(config)
        _check_scheduler(config)
        return il, None
    except InterlockingConfigError as exc:
        return None, str(exc)


def _sample(model, training_data, collate_fn, config):
    """One micro-batch to size and check the heads on: the module's sample_batch, else the
    first items of training_data (collated as DeepSpeed's loader would), else None."""
    if model.sample_batch is not None:
        return model.sample_batch
    if training_data is None:
        return None
    try:
        n = min(int(config.get("train_micro_batch_size_per_gpu") or 1), len(training_data))
        items = [training_data[i] for i in range(n)]
    except (TypeError, IndexError, KeyError):
        return None     # not a map-style dataset: no sample
    import torch.utils.data
    return (collate_fn or torch.utils.data.default_collate)(items)


def _prepare_heads(model, sample, il):
    """Build deferred heads, materialise lazy ones and check that every head fits its stage, before
    the optimizer exists. Collective when there is a sample (every rank must call it).
    Returns (parameters of heads built here, this rank's error or None)."""
    try:
        new = []
        if model.has_aux_heads and sample is not None:
            new = model.prepare_heads(sample)
        elif model.heads_pending:
            what = ("aux_head takes the stage's output (stage_id, out)" if model._head_factory is not None
                    else f"the aux head of stage {model.stage_id} has lazy modules")
            raise InterlockingConfigError(
                f'"aux_head": {what}, which needs a sample batch to be sized: pass training_data= to initialize, '
                "or sample_batch=(inputs, labels) to InterlockingPipelineModule")
        routing = Routing(model.num_stages, il.resolve_k(model.num_stages), il.combine)
        model.check_heads(routing)
        if not model.stage_parameters():
            layers = f"layers {model._local_start}-{model._local_stop - 1}" if model._local_stop > model._local_start \
                else "no layers"
            raise InterlockingConfigError(
                f"stage {model.stage_id} has no trainable parameters ({layers} of {len(model._layer_specs)}, "
                f"{model.num_stages} stages): the optimizer needs some on every stage; use fewer stages or "
                "another partition_method")
        return new, None
    except Exception as exc:  # noqa: BLE001 - every rank must hear of it (the agreement below), not just this one
        return [], str(exc) if isinstance(exc, InterlockingConfigError) else f"{type(exc).__name__}: {exc}"


def _agree_on_sample(sample):
    """The dry run is collective: every rank must have a sample, or none."""
    if not tdist.is_initialized() or tdist.get_world_size() == 1:
        return sample
    flags = [None] * tdist.get_world_size()
    tdist.all_gather_object(flags, sample is not None)
    if any(flags) and not all(flags):
        missing = [r for r, f in enumerate(flags) if not f]
        _agree_on_errors(f"ranks {missing} have no sample batch while others do: pass the same "
                         "training_data= / sample_batch= on every rank")
    return sample


def _add_to_optimizer(params, optimizer, model_parameters):
    """Heads built at initialize are new parameters: the optimizer must train them too."""
    if not params:
        return optimizer, model_parameters
    if optimizer is not None and hasattr(optimizer, "add_param_group"):
        have = {id(p) for g in optimizer.param_groups for p in g["params"]}
        params = [p for p in params if id(p) not in have]
        if params:
            optimizer.add_param_group({"params": params})
    elif model_parameters is not None:
        # a lazy model.parameters() already yields the new heads: never list a parameter twice
        model_parameters = list(model_parameters)
        if model_parameters and isinstance(model_parameters[0], dict):
            have = {id(p) for g in model_parameters for p in g["params"]}
            params = [p for p in params if id(p) not in have]
            if params:
                model_parameters.append({"params": params})
        else:
            have = {id(p) for p in model_parameters}
            model_parameters += [p for p in params if id(p) not in have]
    return optimizer, model_parameters


OUR_SCHEDULER = "InverseSqrtWarmup"   # lr_schedules.INVERSE_SQRT_TYPE


def _check_scheduler(config):
    block = config.get("scheduler")
    if isinstance(block, dict) and block.get("type") == OUR_SCHEDULER:
        from .lr_schedules import scheduler_from_config
        import torch
        probe = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        try:
            scheduler_from_config(probe, block.get("params", {}))
        except ValueError as exc:
            raise InterlockingConfigError(f'"scheduler": {exc}') from None


def _take_our_scheduler(config, lr_scheduler):
    """DeepSpeed does not know our scheduler type: build it ourselves and hide it from DeepSpeed."""
    block = config.get("scheduler")
    if isinstance(block, dict) and block.get("type") == OUR_SCHEDULER:
        from .lr_schedules import scheduler_from_config
        config = {k: v for k, v in config.items() if k != "scheduler"}
        if lr_scheduler is None:
            params = dict(block.get("params", {}))
            lr_scheduler = lambda optimizer: scheduler_from_config(optimizer, params)  # noqa: E731
    return config, lr_scheduler


def _fail_fast_on_exception():
    """A crash on one rank must end the job, not leave the others blocked in a receive.

    The default exit path can wait on communicator teardown; print the traceback and
    leave at once so the launcher sees the failure and stops the remaining ranks.
    """
    if getattr(sys, "_ds_interlock_hook", False):
        return
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        rank = os.environ.get("RANK", "?")
        sys.stderr.write(f"[ds_interlock] rank {rank} failed:\n")
        traceback.print_exception(exc_type, exc, tb)
        sys.stderr.flush()
        sys.stdout.flush()
        if exc_type is KeyboardInterrupt:
            previous(exc_type, exc, tb)
        os._exit(1)

    sys.excepthook = hook
    sys._ds_interlock_hook = True


def initialize(args=None, model=None, optimizer=None, model_parameters=None, training_data=None,
               lr_scheduler=None, distributed_port=TORCH_DISTRIBUTED_DEFAULT_PORT, mpu=None,
               dist_init_required=None, collate_fn=None, config=None, mesh_param=None, config_params=None):
    """Like ``deepspeed.initialize``, for an :class:`InterlockingPipelineModule`.

    The DeepSpeed config may carry an ``"interlocking"`` block (see config.py); a
    config that cannot work raises InterlockingConfigError naming the key, on every rank.
    """
    if model is None:
        raise InterlockingConfigError("initialize() requires model=InterlockingPipelineModule(...)")
    if mpu is not None:
        raise InterlockingConfigError("mpu must be None with pipeline parallelism (the module has its own grid)")
    if mesh_param is not None:
        raise InterlockingConfigError("mesh_param is not supported with pipeline parallelism")
    dist.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                          distributed_port=distributed_port, dist_init_required=dist_init_required)
    _fail_fast_on_exception()
    # our start-up collectives (error agreement, the heads' dry run) run before DeepSpeed's engine
    # picks this rank's device: pick it now, or every local rank would talk through device 0
    get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", getattr(args, "local_rank", 0) or 0)))

    if config is None and config_params is not None:
        config = config_params
    if getattr(args, "deepspeed_config", None) is not None:
        if config is not None:
            raise InterlockingConfigError("got a config both in args.deepspeed_config and in config=")
        config = args.deepspeed_config
    if config is None:
        raise InterlockingConfigError("DeepSpeed requires --deepspeed_config or config= to specify a configuration")
    if isinstance(config, dict):
        config = copy.deepcopy(config)
    else:
        try:
            config = load_ds_config(config)
        except ValueError as exc:       # DeepSpeed parses with hjson; its errors give line and column
            raise InterlockingConfigError(f"{config}: not valid JSON: {exc}") from None

    il, error = _check(model, config)
    _agree_on_errors(error)
    # a head factory that failed on some stage must stop every rank before the collective dry run
    _agree_on_errors(f'"aux_head": {model.aux_head_error}' if model.aux_head_error else None)
    sample = _agree_on_sample(_sample(model, training_data, collate_fn, config))
    new_params, error = _prepare_heads(model, sample, il)
    _agree_on_errors(error)
    optimizer, model_parameters = _add_to_optimizer(new_params, optimizer, model_parameters)
    config, lr_scheduler = _take_our_scheduler(config, lr_scheduler)
    if args is not None and getattr(args, "deepspeed_config", None) is not None:
        args = copy.copy(args)          # the engine must read our (possibly edited) dict, not the file
        args.deepspeed_config = None

    model._built_by_ds_interlock = True
    mpu = model.mpu()
    config_class = DeepSpeedConfig(config, mpu)
    deepspeed.set_optimizer_flags(config_class, model)
    engine = InterlockingPipelineEngine(args=args, model=model, optimizer=optimizer,
                                        model_parameters=model_parameters, training_data=training_data,
                                        lr_scheduler=lr_scheduler, mpu=mpu, dist_init_required=dist_init_required,
                                        collate_fn=collate_fn, config=config, config_class=config_class,
                                        interlocking=il)
    engine._configure_python_gc()
    return engine, engine.optimizer, engine.training_dataloader, engine.lr_scheduler
