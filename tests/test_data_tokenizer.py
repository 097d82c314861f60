"""SentencePiece training on a sample, cached by inputs, loaded (not retrained) on reuse."""

import os

import pytest
import sentencepiece as spm

from ds_interlock.data import FileSource, load_tokenizer, train_or_load_tokenizer, write_sample_corpus
from ds_interlock.data.raw import locate_release


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok_corpus")
    write_sample_corpus(root, num_train_shards=2, sentences_per_shard=800)
    return locate_release(root).train_source()


def test_train_then_load(source, tmp_path, monkeypatch):
    tok = train_or_load_tokenizer(source, tmp_path, vocab_size=300, sample_sentences=1000)
    assert tok.built is True
    assert tok.vocab_size == 300
    assert (tok.processor.unk_id(), tok.processor.bos_id(), tok.eos_id) == (0, 1, 2)
    assert tok.path.is_file() and tok.path.parent == tmp_path / "tokenizer"
    text = "The cat sat on the mat ."
    ids = tok.processor.encode(text)
    assert ids and max(ids) < 300

    # A second call must load the cached model; make training impossible to prove it.
    def no_training(*a, **k):
        raise AssertionError("retrained instead of loading the cache")
    monkeypatch.setattr(spm.SentencePieceTrainer, "train", no_training)
    again = train_or_load_tokenizer(source, tmp_path, vocab_size=300, sample_sentences=1000)
    assert again.built is False
    assert again.path == tok.path and again.key == tok.key and again.sha256 == tok.sha256
    assert again.processor.encode(text) == ids
    assert load_tokenizer(tok.path).processor.encode(text) == ids


def test_key_changes_with_inputs(source, tmp_path, tmp_path_factory):
    base = train_or_load_tokenizer(source, tmp_path, vocab_size=300, sample_sentences=1000)
    other_vocab = train_or_load_tokenizer(source, tmp_path, vocab_size=250, sample_sentences=1000)
    other_sample = train_or_load_tokenizer(source, tmp_path, vocab_size=300, sample_sentences=500)
    other_type = train_or_load_tokenizer(source, tmp_path, vocab_size=300, sample_sentences=1000,
                                         model_type="bpe")
    keys = {base.key, other_vocab.key, other_sample.key, other_type.key}
    assert len(keys) == 4 and all(t.built for t in (other_vocab, other_sample, other_type))
    assert other_vocab.vocab_size == 250

    # a changed source file (mtime/size) means a new tokenizer
    copy_dir = tmp_path_factory.mktemp("copy")
    files = []
    for p in source.paths:
        q = copy_dir / p.name
        q.write_bytes(p.read_bytes())
        files.append(q)
    first = train_or_load_tokenizer(FileSource(files), tmp_path, vocab_size=300, sample_sentences=1000)
    assert first.built
    os.utime(files[0], ns=(1, 1))
    touched = train_or_load_tokenizer(FileSource(files), tmp_path, vocab_size=300, sample_sentences=1000)
    assert touched.built and touched.key != first.key


def test_small_corpus_gets_smaller_vocab_not_error(tmp_path):
    f = tmp_path / "tiny.txt"
    f.write_text("a b c .\nb c a .\n" * 20)
    tok = train_or_load_tokenizer(FileSource([f]), tmp_path, vocab_size=32000, sample_sentences=100)
    assert 4 < tok.vocab_size < 100


def test_no_usable_lines(tmp_path):
    f = tmp_path / "empty.txt"
    f.write_bytes(b"\n  \n\xff\n")
    with pytest.raises(ValueError, match="no usable sentences"):
        train_or_load_tokenizer(FileSource([f]), tmp_path, vocab_size=50, sample_sentences=10)
    assert not list(tmp_path.rglob("*.model"))
