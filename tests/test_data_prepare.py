"""prepare_lm_data: the one call the training script makes, cached end to end."""

import math
import tarfile

import pytest

from ds_interlock.data import RELEASE_DIR, TARBALL_NAME, prepare_lm_data, write_sample_corpus

SMALL = dict(vocab_size=300, seq_len=32, tokenizer_sample_sentences=1000, progress=False)


def _temp_leftovers(root):
    return [p for p in root.rglob("*") if ".tmp-" in p.name]


def test_sample_corpus_built_once_then_loaded(tmp_path):
    kw = dict(SMALL, sample_corpus=dict(num_train_shards=2, sentences_per_shard=400))
    first = prepare_lm_data(None, tmp_path, **kw)
    assert first.built == {"sample_corpus": True, "tokenizer": True, "train_tokens": True,
                           "heldout_tokens": True}
    assert first.source == "raw" and first.data_dir.name == RELEASE_DIR
    assert first.vocab_size == 300 and first.eos_id == 2
    assert first.train_counts.sentences == 800 and first.heldout_counts.sentences == 100
    assert first.train_stats.kept == 800 and first.train_stats.skipped == 0
    assert len(first.train) == (first.train_tokens.num_tokens - 1) // 32
    x, y = first.train[3]
    assert x.shape == (32,) and x[1:].tolist() == y[:-1].tolist()
    hc = first.heldout_counts
    assert hc.words < hc.tokens == first.heldout_tokens.num_tokens
    assert first.word_perplexity(1.0) == pytest.approx(math.exp(hc.tokens / hc.words))
    assert "heldout: 100 sentences" in first.summary()

    second = prepare_lm_data(None, tmp_path, **kw)
    assert set(second.built.values()) == {False}
    assert second.train_tokens.path == first.train_tokens.path
    assert second.train[3][0].tolist() == x.tolist()
    assert second.heldout_counts == first.heldout_counts
    assert not _temp_leftovers(tmp_path)


def test_raw_tarball_with_shard_selection(tmp_path):
    write_sample_corpus(tmp_path / "src", num_train_shards=3, sentences_per_shard=300,
                        heldout_sentences_per_shard=100)
    tarball = tmp_path / TARBALL_NAME
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(tmp_path / "src" / RELEASE_DIR, arcname=RELEASE_DIR)
    data = prepare_lm_data(tarball, tmp_path / "cache", train_shards=[1, 3], **SMALL)
    assert data.source == "raw"
    assert data.train_counts.sentences == 600
    direct = prepare_lm_data(tmp_path / "src", tmp_path / "cache", train_shards=[1, 3], **SMALL)
    assert direct.train_counts == data.train_counts
    assert direct.train[0][0].tolist() == data.train[0][0].tolist()
    assert not _temp_leftovers(tmp_path / "cache")


def test_missing_shard_and_bad_source(tmp_path):
    write_sample_corpus(tmp_path, num_train_shards=1, sentences_per_shard=50)
    with pytest.raises(FileNotFoundError) as e:
        prepare_lm_data(tmp_path, tmp_path / "cache", train_shards=[2], **SMALL)
    assert "news.en-00002-of-00100" in str(e.value) and str(tmp_path) in str(e.value)
    with pytest.raises(FileNotFoundError) as e:
        prepare_lm_data(tmp_path, tmp_path / "cache", heldout_shard=3, **SMALL)
    assert "news.en.heldout-00003-of-00050" in str(e.value)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing")):
        prepare_lm_data(tmp_path / "missing", tmp_path / "cache", **SMALL)
    with pytest.raises(ValueError, match="source"):
        prepare_lm_data(tmp_path, tmp_path / "cache", source="csv", **SMALL)
