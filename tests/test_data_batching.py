"""Seeded shuffling, data-parallel sharding and the (inputs, labels) batch iterator."""

import itertools

import numpy as np
import pytest
import torch

from ds_interlock.data import PackedLMDataset, batch_iterator, batches_per_epoch, shard_indices


@pytest.mark.parametrize("n,dp", [(100, 4), (103, 4), (7, 3), (50, 1)])
def test_shards_disjoint_covering_equal(n, dp):
    shards = [shard_indices(n, r, dp, seed=5, epoch=2) for r in range(dp)]
    assert {len(s) for s in shards} == {n // dp}
    union = np.concatenate(shards)
    assert len(set(union.tolist())) == len(union) == (n // dp) * dp      # disjoint
    assert set(union.tolist()) <= set(range(n))
    if n % dp == 0:
        assert sorted(union.tolist()) == list(range(n))                  # covering


def test_dropped_remainder_changes_between_epochs():
    dropped = set()
    for epoch in range(20):
        kept = set(np.concatenate([shard_indices(10, r, 4, 0, epoch) for r in range(4)]).tolist())
        dropped |= set(range(10)) - kept
    assert len(dropped) > 2


def test_shuffle_deterministic_by_seed():
    a = shard_indices(1000, 0, 1, seed=1)
    assert np.array_equal(a, shard_indices(1000, 0, 1, seed=1))
    assert not np.array_equal(a, shard_indices(1000, 0, 1, seed=2))
    assert not np.array_equal(a, shard_indices(1000, 0, 1, seed=1, epoch=1))
    assert sorted(a.tolist()) == list(range(1000))
    assert np.array_equal(shard_indices(10, 1, 2, shuffle=False), [1, 3, 5, 7, 9])
    with pytest.raises(ValueError):
        shard_indices(10, 2, 2)


@pytest.fixture
def dataset(tmp_path):
    path = tmp_path / "s.bin"
    np.arange(8 * 50 + 1, dtype=np.uint16).tofile(path)
    return PackedLMDataset(path, seq_len=8, dtype="uint16")     # 50 sequences, item i starts at 8*i


def _ids(batches):
    """Sequence index of every row (row i of the stream dataset starts with token 8*i)."""
    return [int(row[0]) // 8 for x, _ in batches for row in x]


def test_batches_shapes_and_labels(dataset):
    batches = list(batch_iterator(dataset, 4, 0, 1, seed=0, epochs=1))
    assert len(batches) == batches_per_epoch(50, 4) == 12
    for x, y in batches:
        assert isinstance(x, torch.Tensor) and x.dtype == torch.long
        assert x.shape == y.shape == (4, 8)
        assert torch.equal(y, x + 1)
    ids = _ids(batches)
    assert len(set(ids)) == 48 and ids != sorted(ids)


def test_dp_ranks_disjoint_and_lockstep(dataset):
    per_rank = [list(batch_iterator(dataset, 4, r, 3, seed=9, epochs=1)) for r in range(3)]
    assert [len(b) for b in per_rank] == [4, 4, 4]               # 50 // 3 = 16 -> 4 batches each
    ids = [set(_ids(b)) for b in per_rank]
    assert all(len(s) == 16 for s in ids)
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    again = list(batch_iterator(dataset, 4, 1, 3, seed=9, epochs=1))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(again, per_rank[1]))


def test_infinite_epochs_and_resume(dataset):
    it = batch_iterator(dataset, 5, 0, 2, seed=3)                # 25 per rank -> 5 batches/epoch
    first = list(itertools.islice(it, 12))
    e0, e1 = _ids(first[:5]), _ids(first[5:10])
    assert len(set(e0)) == 25 and len(set(e1)) == 25             # a full epoch each, no repeats
    assert e0 != e1                                               # reshuffled per epoch
    assert e0 == _ids(batch_iterator(dataset, 5, 0, 2, seed=3, epochs=1))
    assert e1 == _ids(batch_iterator(dataset, 5, 0, 2, seed=3, epochs=1, start_epoch=1))
    resumed = list(itertools.islice(batch_iterator(dataset, 5, 0, 2, seed=3, skip_batches=7), 5))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(resumed, first[7:12]))
    two = list(batch_iterator(dataset, 5, 0, 2, seed=3, epochs=2))
    assert len(two) == 10 and all(torch.equal(a[0], b[0]) for a, b in zip(two, first[:10]))


def test_plain_dataset_and_errors():
    data = [(torch.arange(3) + i, torch.arange(3) + i + 1) for i in range(10)]
    x, y = next(batch_iterator(data, 2, shuffle=False))
    assert x.tolist() == [[0, 1, 2], [1, 2, 3]] and torch.equal(y, x + 1)
    with pytest.raises(ValueError, match="too small"):
        next(batch_iterator(data, 4, 0, 4))
    with pytest.raises(ValueError):
        next(batch_iterator(data, 0))
