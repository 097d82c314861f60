"""Packing the token stream into (input_ids, labels) windows."""

import pickle

import numpy as np
import pytest
import torch

from ds_interlock.data import PackedLMDataset, encode_to_token_file, train_or_load_tokenizer, write_sample_corpus
from ds_interlock.data.raw import locate_release


@pytest.fixture
def stream(tmp_path):
    path = tmp_path / "stream.bin"
    np.arange(1000, dtype=np.uint16).tofile(path)
    return path


def test_windows_are_shifted_by_one(stream):
    ds = PackedLMDataset(stream, seq_len=16, dtype="uint16")
    assert len(ds) == (1000 - 1) // 16 == 62
    for i in (0, 1, 30, 61, -1):
        x, y = ds[i]
        j = i % len(ds)
        assert x.dtype == torch.long and y.dtype == torch.long
        assert x.shape == y.shape == (16,)
        assert x.tolist() == list(range(16 * j, 16 * j + 16))
        assert y.tolist() == list(range(16 * j + 1, 16 * j + 17))
    with pytest.raises(IndexError):
        ds[62]
    xb, yb = ds.get_batch([3, 0])
    assert xb.shape == yb.shape == (2, 16)
    assert xb[0, 0].item() == 48 and yb[1, -1].item() == 16


def test_every_token_after_the_first_is_a_target_once(stream):
    ds = PackedLMDataset(stream, seq_len=7, dtype=np.uint16)
    targets = torch.cat([ds[i][1] for i in range(len(ds))]).tolist()
    assert targets == list(range(1, 1 + 7 * len(ds)))
    assert 1000 - 1 - len(targets) < 7          # only a partial tail is dropped


def test_pickle_does_not_copy_tokens(stream):
    ds = PackedLMDataset(stream, seq_len=16, dtype="uint16")
    ds[0]  # opens the memmap
    blob = pickle.dumps(ds)
    assert len(blob) < 1000
    assert pickle.loads(blob)[5][0].tolist() == ds[5][0].tolist()


def test_too_short(tmp_path):
    path = tmp_path / "s.bin"
    np.arange(8, dtype=np.uint16).tofile(path)
    with pytest.raises(ValueError, match="too few"):
        PackedLMDataset(path, seq_len=8, dtype="uint16")
    assert len(PackedLMDataset(path, seq_len=7, dtype="uint16")) == 1


def test_sequences_cross_sentence_boundaries(tmp_path):
    write_sample_corpus(tmp_path, num_train_shards=1, sentences_per_shard=200)
    src = locate_release(tmp_path).train_source()
    tok = train_or_load_tokenizer(src, tmp_path / "c", vocab_size=200, sample_sentences=200)
    tf = encode_to_token_file(src, tok, tmp_path / "c", progress=False)
    ds = PackedLMDataset(tf, seq_len=64)
    eos = tok.eos_id
    crossing = 0
    for i in range(len(ds)):
        x, y = ds[i]
        assert torch.equal(x[1:], y[:-1])
        pos = (x[:-1] == eos).nonzero().flatten().tolist()
        for p in pos:                      # an EOS inside a window is followed by the next sentence
            assert x[p + 1].item() != eos and y[p].item() == x[p + 1].item()
            crossing += 1
    assert crossing > len(ds)              # ~12 tokens a sentence: several boundaries per window
    text = tok.processor.decode(ds[0][0].tolist())
    first_line = src.paths[0].read_text().splitlines()[0]
    assert text.startswith(first_line)
