"""The paper's inverse-square-root ("Noam") learning-rate schedule.

    lr(step) = scale * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5),  step = 1, 2, ...

With the defaults (warmup 4000, d_model 1024, scale 1.0) this is the paper's
`1024^-0.5 * min(step^-0.5, step * 4000^-1.5)`: a linear rise to its peak
(about 4.9e-4) at step = warmup, then a 1/sqrt(step) decay.

Step numbering: `step` is the number of the optimizer step the rate is used for,
counted from 1; there is no step 0. DeepSpeed calls `scheduler.step()` after every
optimizer step, so the scheduler's `last_epoch` counts finished steps and the rate
it has set is for the next one: `lr(last_epoch + 1)`. On construction
(last_epoch 0) the optimizer gets lr(1), used by the first update.
The optimizer's own lr is overwritten: every param group gets the same rate.

DeepSpeed does not know this schedule. The engine's `initialize` takes a config
block `{"type": INVERSE_SQRT_TYPE, "params": {...}}` out of the DeepSpeed config
and passes `lambda opt: scheduler_from_config(opt, block)` as `lr_scheduler`.
"""

import math
import numbers

from torch.optim.lr_scheduler import LRScheduler

INVERSE_SQRT_TYPE = "InverseSqrtWarmup"
DEFAULT_PARAMS = {"warmup_num_steps": 4000, "d_model": 1024, "scale": 1.0}


def inverse_sqrt_lr(step, warmup_num_steps=4000, d_model=1024, scale=1.0):
    """The rate for optimizer step `step` (>= 1). Warmup 0 means no warm-up."""
    if step < 1:
        raise ValueError(f"step counts from 1, got {step}")
    decay = step ** -0.5
    rise = step * warmup_num_steps ** -1.5 if warmup_num_steps > 0 else math.inf
    return scale * d_model ** -0.5 * min(decay, rise)


class InverseSqrtWarmup(LRScheduler):
    """`inverse_sqrt_lr` as a torch scheduler; checkpointable through
    `state_dict` / `load_state_dict` (DeepSpeed saves it with the engine)."""

    def __init__(self, optimizer, warmup_num_steps=4000, d_model=1024, scale=1.0,
                 last_epoch=-1):
        _check_params({"warmup_num_steps": warmup_num_steps, "d_model": d_model,
                       "scale": scale})
        self.warmup_num_steps = warmup_num_steps
        self.d_model = d_model
        self.scale = scale
        if last_epoch >= 0:
            # torch wants 'initial_lr' when resuming; this schedule never reads it.
            for group in optimizer.param_groups:
                group.setdefault("initial_lr", group["lr"])
        super().__init__(optimizer, last_epoch)

    def lr_at(self, step):
        return inverse_sqrt_lr(step, self.warmup_num_steps, self.d_model, self.scale)

    def get_lr(self):
        lr = self.lr_at(self.last_epoch + 1)
        return [lr] * len(self.optimizer.param_groups)

    def _get_closed_form_lr(self):
        return self.get_lr()

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        # Also restore the optimizer's rate, in case only the scheduler is reloaded.
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


# key -> (check, what it must be)
_RULES = {
    "warmup_num_steps": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "d_model": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "scale": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    # DeepSpeed's name for torch's last_epoch: -1 on a fresh run.
    "last_batch_iteration": (lambda v: _is_int(v) and v >= -1, "an integer >= -1"),
}


def _check_params(params, where=""):
    if not isinstance(params, dict):
        raise ValueError(f"{INVERSE_SQRT_TYPE}: {where.rstrip('.') or 'params'} must be a dict, "
                         f"got {type(params).__name__}")
    for key, value in params.items():
        if key not in _RULES:
            raise ValueError(f"{INVERSE_SQRT_TYPE}: unknown parameter {where}{key}; "
                             f"known: {', '.join(_RULES)}")
        check, must_be = _RULES[key]
        if not check(value):
            raise ValueError(f"{INVERSE_SQRT_TYPE}: {where}{key} must be {must_be}, "
                             f"got {value!r}")


def scheduler_from_config(optimizer, params):
    """Build `InverseSqrtWarmup` from a DeepSpeed-style scheduler block
    `{"type": "InverseSqrtWarmup", "params": {...}}`, or from its "params" dict
    alone. Params: warmup_num_steps (int >= 0), d_model (> 0), scale (>= 0), and
    DeepSpeed's last_batch_iteration (default -1, a fresh run; L means L + 1
    optimizer steps are done, so the next one gets lr(L + 2)). Missing ones take
    the paper's values; anything else raises ValueError naming the key."""
    if not isinstance(params, dict):
        raise ValueError(f"scheduler config must be a dict, got {type(params).__name__}")
    where = ""
    if "type" in params:
        if params["type"] != INVERSE_SQRT_TYPE:
            raise ValueError(f"scheduler.type must be {INVERSE_SQRT_TYPE!r}, "
                             f"got {params['type']!r}")
        extra = set(params) - {"type", "params"}
        if extra:
            raise ValueError(f"{INVERSE_SQRT_TYPE}: unknown key scheduler.{sorted(extra)[0]}")
        params = params.get("params") or {}
        where = "scheduler.params."
    _check_params(params, where)
    kwargs = {**DEFAULT_PARAMS, **params}
    last_epoch = kwargs.pop("last_batch_iteration", -1)
    return InverseSqrtWarmup(optimizer, last_epoch=last_epoch, **kwargs)
