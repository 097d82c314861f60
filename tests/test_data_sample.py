"""The synthetic sample corpus: layout, determinism, and the structure the grammar promises."""

import json
import re
from collections import Counter

import pytest

from ds_interlock.data import (HELDOUT_DIR, RELEASE_DIR, TRAIN_DIR, generate_sentences,
                               write_sample_corpus)
from ds_interlock.data.sample import Lexicon, main


def _lines(path):
    return path.read_text(encoding="utf-8").splitlines()


def test_layout_and_sizes(tmp_path):
    release = write_sample_corpus(tmp_path, num_train_shards=3, sentences_per_shard=200,
                                  num_heldout_shards=2, heldout_sentences_per_shard=50)
    assert release == tmp_path / RELEASE_DIR
    train = sorted(p.name for p in (release / TRAIN_DIR).iterdir())
    held = sorted(p.name for p in (release / HELDOUT_DIR).iterdir())
    assert train == ["news.en-00001-of-00100", "news.en-00002-of-00100", "news.en-00003-of-00100"]
    assert held == ["news.en.heldout-00000-of-00050", "news.en.heldout-00001-of-00050"]
    assert [len(_lines(release / TRAIN_DIR / n)) for n in train] == [200, 200, 200]
    assert [len(_lines(release / HELDOUT_DIR / n)) for n in held] == [50, 50]
    meta = json.loads((release / "SYNTHETIC_SAMPLE.json").read_text())
    assert meta["seed"] == 0 and meta["num_train_shards"] == 3


def test_default_heldout_size_and_bounds(tmp_path):
    release = write_sample_corpus(tmp_path, num_train_shards=1, sentences_per_shard=1000)
    assert len(_lines(release / HELDOUT_DIR / "news.en.heldout-00000-of-00050")) == 200
    with pytest.raises(ValueError):
        write_sample_corpus(tmp_path, num_train_shards=100)
    with pytest.raises(ValueError):
        write_sample_corpus(tmp_path, num_train_shards=1, num_heldout_shards=0)


def test_deterministic_by_seed_and_per_shard(tmp_path):
    a = write_sample_corpus(tmp_path / "a", 2, 300, seed=7)
    b = write_sample_corpus(tmp_path / "b", 3, 300, seed=7)
    c = write_sample_corpus(tmp_path / "c", 2, 300, seed=8)
    for name in ("news.en-00001-of-00100", "news.en-00002-of-00100"):
        assert (a / TRAIN_DIR / name).read_bytes() == (b / TRAIN_DIR / name).read_bytes()
        assert (a / TRAIN_DIR / name).read_bytes() != (c / TRAIN_DIR / name).read_bytes()
    s1 = (a / TRAIN_DIR / "news.en-00001-of-00100").read_bytes()
    s2 = (a / TRAIN_DIR / "news.en-00002-of-00100").read_bytes()
    h0 = (a / HELDOUT_DIR / "news.en.heldout-00000-of-00050").read_bytes()
    assert s1 != s2 and h0 not in s1
    assert list(generate_sentences(5, seed=3)) == list(generate_sentences(5, seed=3))


def test_sentences_are_tokenized_and_structured():
    sents = list(generate_sentences(3000, seed=0))
    words = Counter(w for s in sents for w in s.split())
    lex_types = Lexicon(0).word_types()
    assert 1000 < len(lex_types) < 10000            # "a few thousand" word types
    assert len(words) > 1500                        # and the text actually uses many of them
    lengths = [len(s.split()) for s in sents]
    assert 5 <= sum(lengths) / len(lengths) <= 30
    for s in sents:
        toks = s.split(" ")
        assert all(toks) and "\n" not in s         # single spaces, one line
        assert toks[-1] in (".", "?")
        # long-range pair: questions (and only questions) start with an auxiliary
        assert (toks[-1] == "?") == (toks[0] in ("Do", "Does", "Did", "Will"))
        assert toks.count('"') % 2 == 0
        for det, nxt in zip(toks, toks[1:]):       # local a/an rule
            if det == "a":
                assert not nxt.startswith(tuple("aeiou"))
            if det == "an":
                assert nxt.startswith(tuple("aeiou"))
    # number agreement in questions: "Does" + singular subject ("the X" / "a X" / name)
    does = [s.split() for s in sents if s.startswith("Does ")]
    do = [s.split() for s in sents if s.startswith("Do ")]
    assert does and do
    assert all(t[1] not in ("these", "those", "many", "some") for t in does)
    assert all(t[1] not in ("a", "an", "this", "every") for t in do)


def test_cli_writes_corpus(tmp_path, capsys):
    main(["--out", str(tmp_path), "--train_shards", "2", "--sentences_per_shard", "120",
          "--heldout_sentences", "30"])
    release = tmp_path / RELEASE_DIR
    assert len(_lines(release / TRAIN_DIR / "news.en-00002-of-00100")) == 120
    assert len(_lines(release / HELDOUT_DIR / "news.en.heldout-00000-of-00050")) == 30
    assert not (release / TRAIN_DIR / "news.en-00003-of-00100").exists()
    assert re.search(r"wrote .*" + re.escape(RELEASE_DIR), capsys.readouterr().out)


def test_rewrite_drops_stale_shards_and_never_touches_real_data(tmp_path):
    release = write_sample_corpus(tmp_path / "s", 3, 20)
    write_sample_corpus(tmp_path / "s", 1, 20)
    assert [p.name for p in (release / TRAIN_DIR).iterdir()] == ["news.en-00001-of-00100"]
    real = tmp_path / "real" / RELEASE_DIR / TRAIN_DIR
    real.mkdir(parents=True)
    (real / "news.en-00001-of-00100").write_text("a real sentence .\n")
    with pytest.raises(FileExistsError, match=str(tmp_path / "real" / RELEASE_DIR)):
        write_sample_corpus(tmp_path / "real", 1, 20)
    assert (real / "news.en-00001-of-00100").read_text() == "a real sentence .\n"
