"""prepare_lm_data: the one call the training script makes, cached end to end."""

import math
import os
import subprocess
import sys
import tarfile
import time

import pytest

from ds_interlock.data import (RELEASE_DIR, TARBALL_NAME, TRAIN_DIR, NotTextError, cache, prepare_lm_data,
                               write_sample_corpus)

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


# --- the start-up summary says what was left out, dropped, removed or rebuilt (issue 13) ---

def test_summary_names_skipped_files_and_dropped_lines(tmp_path):
    release = write_sample_corpus(tmp_path / "src", num_train_shards=3, sentences_per_shard=300,
                                  heldout_sentences_per_shard=100)
    train = release / TRAIN_DIR
    shard2, shard3 = train / "news.en-00002-of-00100", train / "news.en-00003-of-00100"
    with open(shard2, "ab") as f:
        f.write(b"caf\xe9 au lait .\n")          # one isolated bad line: counted, against its file
    shard3.unlink()
    shard3.mkdir()                               # today 600 of 900 sentences would be read silently
    for attempt in ("built", "cached"):
        data = prepare_lm_data(release, tmp_path / "cache", **SMALL)
        assert data.built["train_tokens"] is (attempt == "built")
        assert data.train_counts.sentences == 600
        assert data.skipped_files == [(str(shard3), "is a directory, not a file")]
        summary = data.summary()
        assert f"skipped file {shard3}: is a directory, not a file" in summary, attempt
        assert f"{shard2}: dropped 1 of 301 lines (bad_utf8=1)" in summary, attempt
        assert "news.en-00001-of-00100: dropped" not in summary


def test_non_utf8_shard_is_refused_by_name(tmp_path):
    release = write_sample_corpus(tmp_path / "src", num_train_shards=2, sentences_per_shard=200)
    shard = release / TRAIN_DIR / "news.en-00002-of-00100"
    shard.write_bytes(shard.read_text(encoding="utf-8").encode("utf-16"))
    with pytest.raises(NotTextError, match="UTF-16") as e:
        prepare_lm_data(release, tmp_path / "cache", **SMALL)
    assert e.value.path == shard
    shard.write_bytes("le caf\u00e9 est tr\u00e8s bon .\n".encode("latin-1") * 200)   # the whole shard
    with pytest.raises(NotTextError, match="200 of 200") as e:
        prepare_lm_data(release, tmp_path / "cache", **SMALL)
    assert e.value.path == shard


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temps_of_killed_builds_are_removed_at_start(tmp_path):
    kw = dict(SMALL, sample_corpus=dict(num_train_shards=1, sentences_per_shard=300))
    prepare_lm_data(None, tmp_path, **kw)
    host = cache._HOST
    dead = tmp_path / "tokens" / f".train-x.bin.tmp-{host}-{_dead_pid()}-0123abcd"   # killed tokenization
    dead.write_bytes(b"\0" * 100)
    old_dir = tmp_path / "extracted" / ".release-x.tmp-k2j4l1q0"     # old mkdtemp name, an hour untouched
    (old_dir / "sub").mkdir(parents=True)
    (old_dir / "sub" / "shard").write_text("x")
    for p in (old_dir / "sub" / "shard", old_dir / "sub", old_dir):
        os.utime(p, (time.time() - 3600,) * 2)
    live = tmp_path / "tokens" / f".train-y.bin.tmp-{host}-{os.getpid()}-0123abcd"    # a live writer's
    live.write_bytes(b"")
    other = tmp_path / "tokenizer" / ".spm.model.tmp-otherhost-1-0123abcd"            # fresh, another host
    other.write_bytes(b"")
    data = prepare_lm_data(None, tmp_path, **kw)
    assert not dead.exists() and not old_dir.exists()
    assert live.exists() and other.exists()
    notes = "\n".join(data.notes)
    assert f"removed {dead}: its writer (pid" in notes and f"removed {old_dir}: untouched for 60 min" in notes
    assert str(live) not in notes and str(other) not in notes
    assert f"note: removed {dead}" in data.summary()


def test_failed_sample_build_leaves_no_temp(tmp_path, monkeypatch):
    from ds_interlock.data import sample

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(sample, "write_sample_corpus", broken)
    with pytest.raises(OSError, match="disk full"):
        prepare_lm_data(None, tmp_path, **SMALL)
    assert not _temp_leftovers(tmp_path)


def test_corrupt_token_cache_is_rebuilt_and_reported(tmp_path):
    kw = dict(SMALL, sample_corpus=dict(num_train_shards=1, sentences_per_shard=300))
    first = prepare_lm_data(None, tmp_path, **kw)
    expected = first.train_tokens.open().tolist()
    path = first.train_tokens.path
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 6)      # a copy or disk cut short
    with pytest.warns(UserWarning, match="rebuilding a corrupt token cache"):
        second = prepare_lm_data(None, tmp_path, **kw)
    assert second.built["train_tokens"] is True and second.built["tokenizer"] is False
    assert second.train_tokens.open().tolist() == expected
    assert f"note: rebuilt: token file {path} has" in second.summary()
    assert "delete" in second.summary()
