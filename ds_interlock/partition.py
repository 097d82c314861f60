"""A pipeline's stages built in one process, with DeepSpeed's own partitioning and layer code.

``partition`` gives the same layer boundaries as DeepSpeed's PipelineModule for the same
``partition_method``; ``StageModule`` builds and runs one stage's layers with
PipelineModule's own ``_build`` and ``forward`` (LayerSpec, TiedLayerSpec, modules,
callables, activation checkpointing, seed_layers), so its parameters carry the names a
DeepSpeed stage gives them ("3.lin.weight", "tied_modules.embed.weight").
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Callable, Optional

import torch
from torch import nn
from deepspeed.pipe import PipelineModule
from deepspeed.runtime import utils as ds_utils


def partition(layers: list, num_stages: int, method: str = "parameters") -> list[int]:
    """Layer boundaries ``parts`` (stage s owns layers parts[s]:parts[s+1]), as DeepSpeed computes them."""
    specs = list(layers)
    if num_stages < 1 or num_stages > len(specs):
        raise ValueError(f"num_stages must be between 1 and the number of layers ({len(specs)}), got {num_stages}")
    method = method.lower()
    probe = SimpleNamespace(_layer_specs=specs)
    if method == "uniform":
        return ds_utils.partition_uniform(num_items=len(specs), num_parts=num_stages)
    if method == "parameters":
        counts = PipelineModule._count_layer_params(probe)
        return ds_utils.partition_balanced(weights=counts, num_parts=num_stages)
    if method.startswith("type:"):
        weights = [0] * len(specs)
        for idx in PipelineModule._find_layer_type(probe, method.split(":", 1)[1]):
            weights[idx] = 1
        return ds_utils.partition_balanced(weights=weights, num_parts=num_stages)
    raise ValueError(f"partition_method {method!r} is not one of 'parameters', 'uniform', 'type:<regex>'")


class StageModule(nn.Module):
    """Layers ``start:stop`` of a pipeline, built and run exactly as a DeepSpeed stage does."""

    # DeepSpeed's own code, so that a stage here is a stage there
    _build = PipelineModule._build
    forward = PipelineModule.forward
    _is_checkpointable = PipelineModule._is_checkpointable
    _precompute_checkpointable_values = PipelineModule._precompute_checkpointable_values

    def __init__(self, layers: list, start: int, stop: int, activation_checkpoint_interval: int = 0,
                 activation_checkpoint_func: Optional[Callable] = None, checkpointable_layers: Optional[list] = None,
                 seed_layers: bool = False, seed_fn: Optional[Callable] = None, base_seed: int = 1234) -> None:
        super().__init__()
        self._layer_specs = list(layers)
        self._local_start, self._local_stop = start, stop
        self.forward_funcs: list = []
        self.fwd_map: dict = {}
        self.tied_modules = nn.ModuleDict()
        self.tied_weight_attrs: dict = {}
        self.seed_layers, self.seed_fn, self.base_seed = seed_layers, seed_fn, base_seed
        self.micro_offset = 0
        self.checkpointable_layers = checkpointable_layers
        self.activation_checkpoint_interval = activation_checkpoint_interval
        self.activation_checkpoint_func = activation_checkpoint_func
        self.is_checkpointable_results: list = []
        self.is_checkpointable_results_interval = None
        self._build()
        if activation_checkpoint_interval > 0:
            self._precompute_checkpointable_values()

    def tied_weights(self) -> dict[str, list[tuple[str, Any]]]:
        """key -> [(attribute name, tensor)] of the tied modules this stage owns."""
        return {key: [(attr, PipelineModule._recursive_getattr(mod, attr)) for attr in self.tied_weight_attrs[key]]
                for key, mod in self.tied_modules.items()}


def build_stages(layers: list, num_stages: int, partition_method: str = "parameters",
                 aux_head: Optional[Callable] = None, **stage_kwargs) -> tuple[list, list, list, list, list]:
    """(parts, stage modules, aux heads, random states, head seeds) as a multi-process launch builds them.

    Every rank of a launch starts from the same random state, computes the partition and
    builds only its own stage and head; so does each stage here. Returns, per stage, the
    random state it was left with, so that each stage can keep its own stream (dropout).
    Heads are built on their own seeds (heads.py); a factory that takes the stage's output
    leaves None here, to be built from a sample batch."""
    from . import heads as H
    cpu_state = torch.random.get_rng_state()
    parts = partition(layers, num_stages, partition_method)
    after_partition = torch.random.get_rng_state()
    stages, heads, states, seeds = [], [], [], []
    for s in range(num_stages):
        torch.random.set_rng_state(after_partition)
        stages.append(StageModule(layers, parts[s], parts[s + 1], **stage_kwargs))
        seeds.append(H.head_seed(s))
        states.append(torch.random.get_rng_state())
        wanted = aux_head is not None and s < num_stages - 1 and not H.wants_output(aux_head)
        heads.append(H.build(aux_head, s, seeds[s]) if wanted else None)
    torch.random.set_rng_state(cpu_state)
    return parts, stages, heads, states, seeds
