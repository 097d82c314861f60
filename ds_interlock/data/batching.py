"""Seeded shuffling, data-parallel sharding and the pipeline batch iterator.

Each epoch draws a permutation from ``(seed, epoch)``, so every rank computes the same
permutation without talking to the others. The permutation is cut to a multiple of
``dp_size`` and rank ``r`` takes every ``dp_size``-th index from ``r``: replicas are
disjoint, equal in size (so DP ranks run the same number of steps and stay in lockstep),
and cover everything except at most ``dp_size - 1`` items, which differ from epoch to
epoch because the permutation does.
"""

from __future__ import annotations

import itertools
from typing import Iterator

import numpy as np
import torch


def epoch_permutation(num_items: int, seed: int, epoch: int = 0) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_items)


def shard_indices(num_items: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
                  epoch: int = 0, shuffle: bool = True) -> np.ndarray:
    """This rank's item indices for one epoch (all ranks get ``num_items // dp_size``)."""
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} not in 0..{dp_size - 1}")
    order = epoch_permutation(num_items, seed, epoch) if shuffle else np.arange(num_items)
    usable = (num_items // dp_size) * dp_size
    return order[:usable][dp_rank::dp_size]


def batches_per_epoch(num_items: int, micro_batch_size: int, dp_size: int = 1) -> int:
    return (num_items // dp_size) // micro_batch_size


def _stack(dataset, idx) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(dataset, "get_batch"):
        return dataset.get_batch(idx)
    pairs = [dataset[int(i)] for i in idx]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def batch_iterator(dataset, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                   seed: int = 0, *, epochs: int | None = None, start_epoch: int = 0,
                   skip_batches: int = 0, shuffle: bool = True
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(input_ids[B, T], labels[B, T])`` micro-batches for one data-parallel rank.

    This is DeepSpeed's pipeline batch format ``(inputs, labels)``. Runs for ``epochs``
    epochs from ``start_epoch`` (forever if None), reshuffling each epoch by
    ``(seed, epoch)``; a partial last micro-batch is dropped so all ranks yield the same
    number of batches. ``skip_batches`` skips that many batches first (resuming), without
    reading them.
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    n = len(dataset)
    per_epoch = batches_per_epoch(n, micro_batch_size, dp_size)
    if per_epoch == 0:
        raise ValueError(f"dataset of {n} sequences is too small for micro_batch_size="
                         f"{micro_batch_size} on {dp_size} data-parallel ranks")
    epoch = start_epoch + skip_batches // per_epoch
    first = skip_batches % per_epoch
    epoch_iter = itertools.count(epoch) if epochs is None else range(epoch, start_epoch + epochs)
    for ep in epoch_iter:
        idx = shard_indices(n, dp_rank, dp_size, seed, ep, shuffle)
        for b in range(first, per_epoch):
            yield _stack(dataset, idx[b * micro_batch_size:(b + 1) * micro_batch_size])
        first = 0
