"""Memory-mapped token files (cached) and word/token counting for per-word perplexity."""

import json
import math

import numpy as np
import pytest

from ds_interlock.data import (CorruptCacheError, FileSource, LineStats, PackedLMDataset, TextCounts, TokenFile,
                               count_words_and_tokens, encode_to_token_file, load_tokenizer, token_dtype,
                               train_or_load_tokenizer, word_perplexity, write_sample_corpus)
from ds_interlock.data.raw import locate_release


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok_files")
    write_sample_corpus(root, num_train_shards=2, sentences_per_shard=300, heldout_sentences_per_shard=100)
    rel = locate_release(root)
    cache = root / "cache"
    tok = train_or_load_tokenizer(rel.train_source(), cache, vocab_size=300, sample_sentences=600)
    return rel, tok, cache


def _expected(tok, lines):
    return [t for line in lines for t in tok.processor.encode(line) + [tok.eos_id]]


def test_dtype_choice():
    assert token_dtype(300) == np.uint16
    assert token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32
    assert token_dtype(800_000) == np.uint32


def test_encode_matches_sentencepiece_and_is_cached(setup):
    rel, tok, cache = setup
    src = rel.train_source()
    tf = encode_to_token_file(src, tok, cache, name="train", batch_lines=64, progress=False)
    assert tf.built is True and tf.dtype == np.uint16
    lines = [l for p in src.paths for l in p.read_text().splitlines()]
    expected = _expected(tok, lines)
    mm = tf.open()
    assert isinstance(mm, np.memmap) and mm.dtype == np.uint16
    assert mm.tolist() == expected
    assert tf.path.stat().st_size == 2 * len(expected)
    assert tf.counts == TextCounts(sentences=600, words=sum(len(l.split()) + 1 for l in lines),
                                   tokens=len(expected))
    assert int((mm == tok.eos_id).sum()) == 600      # exactly one EOS per sentence
    meta = json.loads(tf.path.with_suffix(".json").read_text())
    assert meta["num_tokens"] == len(expected) and meta["dtype"] == "uint16"
    assert meta["tokenizer_sha256"] == tok.sha256

    again = encode_to_token_file(src, tok, cache, name="train", batch_lines=64, progress=False)
    assert again.built is False and again.path == tf.path and again.counts == tf.counts
    assert again.open().tolist() == expected
    assert not [p for p in (cache / "tokens").iterdir() if ".tmp-" in p.name]


def test_new_tokenizer_means_new_token_file(setup):
    rel, tok, cache = setup
    src = rel.heldout_source()
    a = encode_to_token_file(src, tok, cache, name="heldout", progress=False)
    other = train_or_load_tokenizer(rel.train_source(), cache, vocab_size=200, sample_sentences=600)
    b = encode_to_token_file(src, other, cache, name="heldout", progress=False)
    assert b.built and b.key != a.key and b.path != a.path
    assert a.counts.words == b.counts.words and a.counts.tokens != b.counts.tokens


def test_bad_lines_counted_and_kept_in_cache(tmp_path, setup):
    _, tok, _ = setup
    f = tmp_path / "held.txt"
    f.write_bytes(b"The cat sat .\n\n\xff\xfe\n" + b"z " * 100 + b"\nA dog ran .\n")
    src = FileSource([f], name="held")
    tf = encode_to_token_file(src, tok, tmp_path / "c", max_chars=50, progress=True)
    assert tf.stats == LineStats(kept=2, empty=1, bad_utf8=1, overlong=1)
    assert encode_to_token_file(src, tok, tmp_path / "c", max_chars=50).stats == tf.stats
    assert tf.counts.sentences == 2 and tf.counts.words == 4 + 4 + 2
    counts, stats = count_words_and_tokens(f, tok, max_chars=50)
    assert counts == tf.counts and stats == tf.stats


def test_count_words_and_tokens_matches_token_file(setup):
    rel, tok, cache = setup
    path = rel.heldout_files()[0]
    counts, stats = count_words_and_tokens(path, tok)
    lines = path.read_text().splitlines()
    assert counts.sentences == len(lines) == stats.kept == 100
    assert counts.words == sum(len(l.split()) for l in lines) + len(lines)
    assert counts.tokens == len(_expected(tok, lines))
    tf = encode_to_token_file(rel.heldout_source(), tok, cache, name="heldout", progress=False)
    assert counts == tf.counts


def test_word_perplexity_convention():
    counts = TextCounts(sentences=2, words=10, tokens=25)
    assert counts.tokens_per_word == 2.5
    assert word_perplexity(25 * 0.8, 10) == pytest.approx(math.exp(2.0))
    assert counts.word_perplexity(0.8) == pytest.approx(math.exp(2.0))


def test_empty_source_raises(tmp_path, setup):
    _, tok, _ = setup
    f = tmp_path / "e.txt"
    f.write_text("\n \n")
    with pytest.raises(ValueError, match="no usable sentences"):
        encode_to_token_file(FileSource([f]), tok, tmp_path / "c", progress=False)
    assert not list((tmp_path / "c" / "tokens").iterdir())


# --- a corrupted token cache is named, never an IndexError (issue 13) ---

def _fresh_token_file(tmp_path, setup):
    rel, tok, _ = setup
    return rel, tok, encode_to_token_file(rel.heldout_source(), tok, tmp_path / "c", name="heldout", progress=False)


def test_corrupt_token_cache_names_its_files(tmp_path, setup):
    rel, tok, tf = _fresh_token_file(tmp_path, setup)
    meta, good = tf.meta_path, tf.path.read_bytes()
    assert TokenFile.load(meta).vocab_size == tok.vocab_size
    damage = {
        "truncated": lambda: tf.path.write_bytes(good[:-2]),
        "overwritten": lambda: tf.path.write_bytes(b"\xff\xff" * 8 + good[16:]),    # same size
        "missing": lambda: tf.path.unlink(),
    }
    for what, do in damage.items():
        do()
        with pytest.raises(CorruptCacheError) as e:
            TokenFile.load(meta)
        assert str(tf.path) in str(e.value) and "delete" in str(e.value), what
        tf.path.write_bytes(good)
    text = meta.read_text()
    meta.write_text(text[:len(text) // 2])       # half-written metadata
    with pytest.raises(CorruptCacheError, match="unreadable") as e:
        TokenFile.load(meta)
    assert str(meta) in str(e.value)
    # encode_to_token_file rebuilds the entry, with a warning, rather than stopping
    with pytest.warns(UserWarning, match=f"rebuilding a corrupt token cache: token cache metadata {meta}"):
        again = encode_to_token_file(rel.heldout_source(), tok, tmp_path / "c", name="heldout", progress=False)
    assert again.built and again.rebuilt_because and again.path.read_bytes() == good
    assert encode_to_token_file(rel.heldout_source(), tok, tmp_path / "c", name="heldout").rebuilt_because is None


def test_out_of_vocabulary_id_names_the_token_file(tmp_path, setup):
    _, tok, tf = _fresh_token_file(tmp_path, setup)
    ds = PackedLMDataset(tf, 16)
    assert ds.vocab_size == tok.vocab_size
    ds.get_batch([0, 1])
    mm = np.memmap(tf.path, dtype=tf.dtype, mode="r+")
    mm[20] = tok.vocab_size + 7                  # garbled after the load check
    mm.flush()
    del mm
    ds = PackedLMDataset(tf, 16)
    ds[0]
    with pytest.raises(CorruptCacheError, match=f"token 20 has id {tok.vocab_size + 7}") as e:
        ds[1]
    assert str(tf.path) in str(e.value) and "delete" in str(e.value)
    with pytest.raises(CorruptCacheError):
        PackedLMDataset(tf.path, 16, dtype=tf.dtype, vocab_size=tok.vocab_size).get_batch([1])


def test_corrupt_tokenizer_model_names_its_file(tmp_path):
    bad = tmp_path / "spm.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(CorruptCacheError, match="delete it") as e:
        load_tokenizer(bad)
    assert str(bad) in str(e.value)
