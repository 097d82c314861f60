"""Aux heads: what a head receives, heads that size themselves, and early checks.

A head is called on a *detached copy* of its stage's output (the whole tuple when the stage
outputs a tuple) and must not modify it in place. ``aux_head`` may be

* ``aux_head(stage_id) -> nn.Module``: built with the module, or
* ``aux_head(stage_id, output: StageOutput) -> nn.Module``: built once the stage's output is
  known, from a dry run on a sample batch (``sample_batch=``, or the first item of
  ``training_data=``) at ``initialize``.

Lazy modules (``nn.LazyLinear``) are materialised by the same dry run, before the optimizer is
built. Heads never draw from the global random generator: each is built (and materialised)
from its own seed, so adding probe heads leaves the trunk's initialisation and dropout masks
exactly as they were.
"""
from __future__ import annotations

import inspect
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from .config import InterlockingConfigError


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple
    dtype: torch.dtype

    def __str__(self) -> str:
        dims = ", ".join(str(d) for d in self.shape)
        return f"Tensor[{dims}] {str(self.dtype).replace('torch.', '')}"


@dataclass(frozen=True)
class StageOutput:
    """What stage ``stage_id`` outputs, as seen on a sample batch (dimension 0 is the batch)."""

    stage_id: int
    tensors: tuple          # TensorSpec per tensor of the output (one unless the stage outputs a tuple)
    is_tuple: bool

    @classmethod
    def of(cls, stage_id: int, value: Any) -> "StageOutput":
        items = value if isinstance(value, (tuple, list)) else (value,)
        specs = tuple(TensorSpec(tuple(t.shape), t.dtype) if torch.is_tensor(t) else TensorSpec((), torch.float32)
                      for t in items)
        return cls(stage_id, specs, isinstance(value, (tuple, list)))

    @property
    def shape(self) -> tuple:
        """Shape of the first tensor (the hidden state, by DeepSpeed's convention)."""
        return self.tensors[0].shape

    @property
    def features(self) -> int:
        """Size of the last dimension of the first tensor."""
        return self.shape[-1]

    @property
    def dtype(self) -> torch.dtype:
        return self.tensors[0].dtype

    def __str__(self) -> str:
        if not self.is_tuple:
            return str(self.tensors[0])
        return "(" + ", ".join(str(t) for t in self.tensors) + ")"


def wants_output(factory: Callable) -> bool:
    """True if ``factory`` takes (stage_id, output) rather than (stage_id): two required positional
    parameters (a parameter with a default, like ``def f(stage_id, dim=8)``, does not count)."""
    try:
        params = list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):
        return False
    required = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    return len(required) == 2


def head_seed(stage_id: int) -> int:
    """A seed for stage ``stage_id``'s head, drawn from the current random state without advancing it."""
    with torch.random.fork_rng(devices=[]):
        base = int(torch.randint(0, 2 ** 62, (1,)).item())
    return (base + 0x9E3779B97F4A7C15 * (stage_id + 1)) % (2 ** 63)


def forked_devices() -> list:
    """The CUDA device whose random state a fork must save and restore (none without CUDA)."""
    return [torch.cuda.current_device()] if torch.cuda.is_available() else []


@contextmanager
def own_rng(seed: int) -> Iterator[None]:
    """Run a head's construction (or its materialisation) on its own random stream; the global
    CPU and current-CUDA-device states are restored afterwards."""
    devices = forked_devices()
    with torch.random.fork_rng(devices=devices):
        torch.random.default_generator.manual_seed(seed)
        if devices:
            torch.cuda.manual_seed(seed)
        yield


def quiet_forward(stage: nn.Module, forward: Callable, x: Any) -> Any:
    """``forward(stage, x)`` in eval mode and without gradients, leaving every random state and the
    stage's ``micro_offset`` (DeepSpeed's per-forward seed counter) as they were: a dry run on a
    sample batch changes nothing that training will see."""
    was_training, offset = stage.training, stage.micro_offset
    stage.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=forked_devices()):
            return forward(stage, x)
    finally:
        stage.train(was_training)
        stage.micro_offset = offset


def has_lazy(module: Optional[nn.Module]) -> bool:
    if module is None:
        return False
    return any(isinstance(p, nn.parameter.UninitializedParameter) for p in module.parameters()) or \
        any(isinstance(b, nn.parameter.UninitializedBuffer) for b in module.buffers())


def build(factory: Callable, stage_id: int, seed: int, output: Optional[StageOutput] = None) -> nn.Module:
    """Call the user's factory on the head's own random stream and check what it returns."""
    with own_rng(seed):
        head = factory(stage_id, output) if output is not None else factory(stage_id)
    if not isinstance(head, nn.Module):
        raise InterlockingConfigError(f'"aux_head": aux_head({stage_id}) returned {type(head).__name__}, '
                                      "expected a torch.nn.Module")
    return head


def _expected_input(head: nn.Module) -> str:
    """What the head's first sized layer expects, for error messages."""
    for m in head.modules():
        if isinstance(m, nn.Linear) and not isinstance(m.weight, nn.parameter.UninitializedParameter):
            return f"; its first Linear expects {m.in_features} input features"
        if isinstance(m, nn.modules.conv._ConvNd) and not isinstance(m.weight, nn.parameter.UninitializedParameter):
            return f"; its first {type(m).__name__} expects {m.in_channels} input channels"
    return ""


def mismatch(stage_id: int, head: nn.Module, output: Any, exc: BaseException, part: str = "head") -> str:
    """The message for a head that does not fit its stage."""
    what = "the aux head" if part == "head" else "aux_loss_fn on the head's output"
    return (f"stage {stage_id}: {what} failed on the stage's output {StageOutput.of(stage_id, output)}"
            f"{_expected_input(head) if part == 'head' else ''}: {type(exc).__name__}: {exc}. "
            "Let the head size itself: aux_head=lambda stage_id, out: ... receives the stage's output shape "
            "(out.shape, out.features), or use ds_interlock.heads.classifier / lm_head")


def dry_run(stage_id: int, head: nn.Module, output: Any, labels: Any, aux_loss_fn: Optional[Callable],
            seed: int) -> None:
    """Run the head (and its loss when labels are known) once on a sample output: materialises
    lazy modules and turns a head that does not fit into an error naming the stage."""
    was_training = head.training
    head.eval()
    try:
        with own_rng(seed), torch.no_grad():
            try:
                out = head(output)
            except Exception as exc:  # noqa: BLE001 - any failure here is the head not fitting
                raise InterlockingConfigError(mismatch(stage_id, head, output, exc)) from exc
            if labels is not None and aux_loss_fn is not None:
                try:
                    aux_loss_fn(out, labels)
                except Exception as exc:  # noqa: BLE001
                    raise InterlockingConfigError(mismatch(stage_id, head, output, exc, part="loss")) from exc
    finally:
        head.train(was_training)


# ---------------------------------------------------------------- ready heads
class ClassifierHead(nn.Module):
    """Pool (or flatten) the stage output, then one linear layer to ``num_classes`` logits.

    ``pool="mean"`` averages every dimension after the channel dimension 1 ([B, C, H, W] ->
    [B, C]; [B, T, d] -> [B, T] is not what you want: use ``channel_dim=-1``).
    """

    def __init__(self, in_features: int, num_classes: int, pool: str = "mean", channel_dim: int = 1,
                 select: int = 0) -> None:
        super().__init__()
        if pool not in ("mean", "flatten", "none"):
            raise ValueError(f"pool must be 'mean', 'flatten' or 'none', got {pool!r}")
        self.pool, self.channel_dim, self.select = pool, channel_dim, select
        self.fc = nn.Linear(in_features, num_classes)

    def _pooled(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() <= 2 or self.pool == "none":
            return x
        if self.pool == "flatten":
            return x.flatten(1)
        c = self.channel_dim % x.dim()
        dims = [d for d in range(1, x.dim()) if d != c]
        return x.mean(dim=dims)

    def forward(self, x: Any) -> torch.Tensor:
        if isinstance(x, (tuple, list)):
            x = x[self.select]
        return self.fc(self._pooled(x))


def _pooled_features(shape: Sequence[int], pool: str, channel_dim: int) -> int:
    if len(shape) <= 2 or pool == "none":
        return int(shape[-1])
    if pool == "flatten":
        return int(math.prod(shape[1:]))
    return int(shape[channel_dim % len(shape)])


def classifier(num_classes: int, pool: str = "mean", channel_dim: int = 1, select: int = 0) -> Callable:
    """An ``aux_head`` factory: a :class:`ClassifierHead` sized from each stage's output.

    ``select``: which tensor of a tuple output to classify (default the first)."""
    def factory(stage_id: int, out: StageOutput) -> nn.Module:
        shape = out.tensors[select].shape
        return ClassifierHead(_pooled_features(shape, pool, channel_dim), num_classes, pool, channel_dim, select)
    return factory


class LMHead(nn.Module):
    """Norm + vocabulary projection, [B, T, d] -> [B, T, V]. ``rank``: a low-rank projection
    d -> rank -> V (cheaper than d x V when rank << d); ``norm``: "layer", "rms" or None."""

    def __init__(self, hidden: int, vocab_size: int, norm: Optional[str] = "layer", rank: Optional[int] = None,
                 select: int = 0) -> None:
        super().__init__()
        if norm not in ("layer", "rms", None):
            raise ValueError(f"norm must be 'layer', 'rms' or None, got {norm!r}")
        self.select = select
        self.norm = nn.LayerNorm(hidden) if norm == "layer" else nn.RMSNorm(hidden) if norm == "rms" else nn.Identity()
        if rank is None:
            self.proj = nn.Linear(hidden, vocab_size, bias=False)
        else:
            self.proj = nn.Sequential(nn.Linear(hidden, rank, bias=False), nn.Linear(rank, vocab_size, bias=False))

    def forward(self, x: Any) -> torch.Tensor:
        if isinstance(x, (tuple, list)):
            x = x[self.select]
        return self.proj(self.norm(x))


def lm_head(vocab_size: int, norm: Optional[str] = "layer", rank: Optional[int] = None, select: int = 0) -> Callable:
    """An ``aux_head`` factory: an :class:`LMHead` sized from each stage's hidden size."""
    def factory(stage_id: int, out: StageOutput) -> nn.Module:
        return LMHead(out.tensors[select].shape[-1], vocab_size, norm=norm, rank=rank, select=select)
    return factory
