"""The ``"interlocking"`` block of a DeepSpeed JSON config, parsed and validated.

    "interlocking": {"k": 3, "combine": "furthest", "aux_loss_weight": 1.0}

Everything here is checked when the engine starts, so a typo fails in seconds,
not after an hour of training.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

BLOCK = "interlocking"
K_NAMES = {"local": 1, "pairwise": 2, "3wise": 3}   # "global" means k = S, resolved per model
COMBINE_MODES = ("furthest", "sum")
SCHEDULES = ("1f1b", "interlocked")
CLIP_SCOPES = ("deepspeed", "stage")
REPORTS = ("sync", "async")


class InterlockingConfigError(ValueError, TypeError):
    """A configuration that cannot work. Subclasses both ValueError and TypeError
    so callers catching either see it."""


@dataclass(frozen=True)
class InterlockingConfig:
    k: object = "global"            # int >= 1 or one of K_NAMES / "global"
    combine: str = "furthest"
    aux_loss_weight: float = 1.0
    schedule: str = "interlocked"   # order of work per stage, see schedule.py
    clip_scope: str = "deepspeed"   # "stage": clip each stage by its own gradient norm (no cross-stage barrier)
    report: str = "sync"            # "async": per-stage losses arrive one batch late, without a barrier
    p2p_timeout_s: object = None    # seconds a pipeline receive may wait before the job fails; None = DeepSpeed's
    batch_input_grads: object = False   # True / "auto": consecutive input-gradient chains of a micro-batch in one call

    def resolve_k(self, num_stages: int) -> int:
        """k as an integer in 1..S (k > S behaves exactly like k = S)."""
        k = num_stages if self.k == "global" else K_NAMES.get(self.k, self.k)
        return min(int(k), num_stages)


def _fail(key: str, msg: str) -> None:
    raise InterlockingConfigError(f'"{BLOCK}.{key}": {msg}')


def parse_k(value: Any) -> int | str:
    if isinstance(value, bool):
        _fail("k", f"expected an integer >= 1 or one of {sorted(K_NAMES) + ['global']}, got {value!r}")
    if isinstance(value, str):
        v = value.strip().lower()
        if v in K_NAMES or v == "global":
            return v
        if v.isdigit():
            value = int(v)
        else:
            _fail("k", f"unknown name {value!r}; use an integer >= 1 or one of "
                  f"{sorted(K_NAMES) + ['global']}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, numbers.Integral):
        _fail("k", f"expected an integer >= 1, got {value!r}")
    if value < 1:
        _fail("k", f"must be >= 1 (1 = local learning, S = global backprop), got {value}")
    return int(value)


def check_top_level_keys(ds_config: dict | None) -> None:
    """What outside our block would silently change the training: DeepSpeed ignores unknown
    top-level keys (a misspelt block would mean k = "global"), and fp16 would need a loss
    scaling that ds_interlock does not implement."""
    import difflib
    for key in ds_config or {}:
        if key != BLOCK and (key.lower() == BLOCK or difflib.get_close_matches(key.lower(), [BLOCK], n=1, cutoff=0.8)):
            raise InterlockingConfigError(f'top-level key "{key}" looks like a misspelling of "{BLOCK}"; '
                                          "DeepSpeed would ignore it and train with ordinary backprop")
    if ((ds_config or {}).get("fp16") or {}).get("enabled"):
        raise InterlockingConfigError('"fp16.enabled": fp16 needs loss scaling, which ds_interlock does not '
                                      'implement; use "bf16"')


def describe(il: InterlockingConfig, num_stages: int, has_heads: bool) -> str:
    """The one start-up line that says what will be trained."""
    k = il.resolve_k(num_stages)
    label = "global" if k == num_stages else {1: "local", 2: "pairwise", 3: "3wise"}.get(k, f"{k}-wise")
    heads = (f"aux heads on stages 0-{num_stages - 2}" if num_stages > 2 else "aux head on stage 0") \
        if has_heads and num_stages > 1 else "no aux heads"
    line = (f"ds_interlock: {num_stages} stages, k={k} ({label}), combine={il.combine}, "
            f"schedule={il.schedule}, {heads}")
    asked = None if il.k == "global" else int(K_NAMES.get(il.k, il.k))
    if asked is not None and asked > num_stages:
        line += f" [the config asks for k={il.k!r}, more than the {num_stages} stages: it acts as k={num_stages}]"
    return line


def from_ds_config(ds_config: dict | None) -> InterlockingConfig:
    """Parse the block from a DeepSpeed config dict. A missing block means k = "global"."""
    check_top_level_keys(ds_config)
    block = (ds_config or {}).get(BLOCK)
    if block is None:
        return InterlockingConfig()
    if not isinstance(block, dict):
        raise InterlockingConfigError(f'"{BLOCK}": expected an object, got {type(block).__name__}')
    known = {"k", "combine", "aux_loss_weight", "schedule", "clip_scope", "report", "p2p_timeout_s",
             "batch_input_grads"}
    unknown = sorted(set(block) - known)
    if unknown:
        raise InterlockingConfigError(
            f'"{BLOCK}": unknown key(s) {unknown}; known keys are {sorted(known)}')

    k = parse_k(block.get("k", "global"))
    combine = block.get("combine", "furthest")
    if combine not in COMBINE_MODES:
        _fail("combine", f"expected one of {list(COMBINE_MODES)}, got {combine!r}")
    w = block.get("aux_loss_weight", 1.0)
    if isinstance(w, bool) or not isinstance(w, numbers.Real) or w != w or w in (float("inf"), float("-inf")):
        _fail("aux_loss_weight", f"expected a finite number >= 0, got {w!r}")
    if w < 0:
        _fail("aux_loss_weight", f"must be >= 0, got {w}")
    schedule = block.get("schedule", "interlocked")
    if schedule not in SCHEDULES:
        _fail("schedule", f"expected one of {list(SCHEDULES)}, got {schedule!r}")
    clip_scope = block.get("clip_scope", "deepspeed")
    if clip_scope not in CLIP_SCOPES:
        _fail("clip_scope", f"expected one of {list(CLIP_SCOPES)}, got {clip_scope!r}")
    report = block.get("report", "sync")
    if report not in REPORTS:
        _fail("report", f"expected one of {list(REPORTS)}, got {report!r}")
    timeout = block.get("p2p_timeout_s")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, numbers.Real)
                                or not timeout > 0 or timeout == float("inf")):
        _fail("p2p_timeout_s", f"expected a number of seconds > 0 (or null for DeepSpeed's default), got {timeout!r}")
    batch = block.get("batch_input_grads", False)
    if not (isinstance(batch, bool) or batch == "auto"):
        _fail("batch_input_grads", f'expected true, false or "auto", got {batch!r}')
    return InterlockingConfig(k=k, combine=combine, aux_loss_weight=float(w),
                              schedule=schedule, clip_scope=clip_scope, report=report,
                              p2p_timeout_s=None if timeout is None else float(timeout),
                              batch_input_grads=batch)
