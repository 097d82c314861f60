"""Starting from a stock DeepSpeed pipeline checkpoint: the layers and their optimizer state load,
the aux heads (absent from it) start fresh, with no optimizer state.

A stock checkpoint is recognised by having no ``aux_head_XX-model_states.pt`` file in its tag
directory while this model has heads. Its optimizer state indexes only the pipeline's
parameters; this job's optimizer also holds the heads. Parameter order is preserved (the heads
come after the layers in ``module.parameters()``), so stock state entry i belongs to the i-th
non-head parameter of the same group.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Optional

import torch

from .config import InterlockingConfigError


def is_stock(load_dir: str, tag: str, module: Any) -> Optional[str]:
    """The checkpoint's directory if it is a stock one this model can start from, else None."""
    if not getattr(module, "has_aux_heads", False) or module.num_stages < 2:
        return None
    path = os.path.join(load_dir, tag)
    if not os.path.isdir(path):
        return None     # DeepSpeed reports what is missing
    if any(name.startswith("aux_head_") for name in os.listdir(path)):
        return None
    return path


def loader_without_heads(optimizer: Any, load: Callable, head_ids: set, where: str) -> Callable:
    """A load_state_dict for ``optimizer`` that takes a state dict without the heads' parameters."""
    def load_stock(stock: dict) -> None:
        groups, index = [], 0
        for g in optimizer.param_groups:        # this job's indices, as Optimizer.state_dict() numbers them
            groups.append([(index + i, id(p) in head_ids, p) for i, p in enumerate(g["params"])])
            index += len(g["params"])
        # a group of head parameters only has no counterpart in the stock job (an empty group does)
        trunk_groups = [gi for gi, entries in enumerate(groups) if not (entries and all(h for _, h, _ in entries))]
        if len(stock["param_groups"]) != len(trunk_groups):
            raise InterlockingConfigError(
                f"{where}: the stock checkpoint's optimizer has {len(stock['param_groups'])} parameter groups, this "
                f"job's has {len(trunk_groups)} besides the aux heads")
        own = optimizer.state_dict()["param_groups"]
        stock_of = dict(zip(trunk_groups, stock["param_groups"]))
        state, param_groups = {}, []
        for gi, entries in enumerate(groups):
            ids = [i for i, _, _ in entries]
            if gi not in stock_of:                       # a group of head parameters only: fresh
                param_groups.append({**own[gi], "params": ids})
                continue
            sg = stock_of[gi]
            trunk = [(i, p) for i, head, p in entries if not head]
            if len(sg["params"]) != len(trunk):
                raise InterlockingConfigError(
                    f"{where}: parameter group {gi} of the stock checkpoint's optimizer has {len(sg['params'])} "
                    f"parameters, this job's pipeline layers {len(trunk)}")
            for (ours, p), theirs in zip(trunk, sg["params"]):
                entry = stock["state"].get(theirs)
                if entry is None:
                    continue
                for key, value in entry.items():
                    if torch.is_tensor(value) and value.dim() > 0 and value.shape != p.shape:
                        raise InterlockingConfigError(
                            f"{where}: optimizer state {key!r} of parameter {theirs} has shape {tuple(value.shape)}, "
                            f"this job's parameter {tuple(p.shape)}: the layers differ from the stock job's")
                state[ours] = entry
            param_groups.append({**sg, "params": ids})
        load({"state": state, "param_groups": param_groups})
    return load_stock
