"""Caches go to the user's cache directory, never into the source checkout."""
from pathlib import Path

from ds_interlock import paths


def test_cache_dir_rules(monkeypatch, tmp_path):
    monkeypatch.delenv(paths.CACHE_ENV, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert paths.default_cache_dir() == tmp_path / "home" / ".cache" / "ds_interlock"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert paths.default_cache_dir() == tmp_path / "xdg" / "ds_interlock"
    monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path / "mine"))
    assert paths.default_cache_dir() == tmp_path / "mine"


def test_data_preparation_uses_it(monkeypatch, tmp_path):
    from ds_interlock.data import prepare_lm_data
    from ds_interlock.launching import ROOT
    monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path / "cache"))
    data = prepare_lm_data(None, vocab_size=200, seq_len=16, progress=False,
                           sample_corpus={"num_train_shards": 1, "sentences_per_shard": 300})
    assert Path(data.tokenizer_path).is_relative_to(tmp_path / "cache" / "lm_data")
    assert not (Path(ROOT) / "runs" / "cache").exists() or not any((Path(ROOT) / "runs" / "cache").iterdir())
