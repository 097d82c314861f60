"""from_text: plain text -> the One Billion Word raw layout (tokens, sentences, split, bad input, readers)."""

import json
import os
import random
import subprocess
import sys

import pytest

from ds_interlock.data import (HELDOUT_DIR, RELEASE_DIR, TRAIN_DIR, FileSource, LineStats, NotTextError,
                               locate_release, prepare_lm_data)
from ds_interlock.data.from_text import SUMMARY_NAME, convert, is_heldout, main, split_sentences, tokenize

HELD0 = "news.en.heldout-00000-of-00050"


def _words(rng, n):
    return ["".join(rng.choice("bdfgklmnprstv") + rng.choice("aeiou") for _ in range(rng.randint(1, 3)))
            for _ in range(n)]


def _sentences(n, seed=0):
    """``n`` distinct tokenized sentences ("Word word word ." style)."""
    rng = random.Random(seed)
    vocab = _words(rng, 400)
    out, seen = [], set()
    while len(out) < n:
        ws = [rng.choice(vocab) for _ in range(rng.randint(4, 12))]
        s = " ".join([ws[0].capitalize(), *ws[1:], "."])
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def _running_text(sentences, per_paragraph=5, width=60):
    """Sentences as running text: wrapped lines, paragraphs of ``per_paragraph`` sentences."""
    paras = []
    for i in range(0, len(sentences), per_paragraph):
        text = " ".join(s[:-2] + "." for s in sentences[i:i + per_paragraph])   # "word ." -> "word."
        lines, cur = [], ""
        for w in text.split():
            if cur and len(cur) + 1 + len(w) > width:
                lines.append(cur)
                cur = w
            else:
                cur = f"{cur} {w}" if cur else w
        lines.append(cur)
        paras.append("\n".join(lines))
    return "\n\n".join(paras) + "\n"


def _lines(path):
    return path.read_text(encoding="utf-8").splitlines()


def _split_lines(out):
    release = out / RELEASE_DIR
    train = [s for p in sorted((release / TRAIN_DIR).iterdir()) for s in _lines(p)]
    held = [s for p in sorted((release / HELDOUT_DIR).iterdir()) for s in _lines(p)]
    return train, held


def _shard_bytes(out):
    release = out / RELEASE_DIR
    return {p.relative_to(release).as_posix(): p.read_bytes() for p in sorted(release.rglob("news.en*"))}


@pytest.mark.parametrize("text, tokens", [
    ("I don't know, can't say; won't go!", "I do n't know , ca n't say ; wo n't go !"),
    ('He said, "It\'s John\'s (old) car."', 'He said , " It \'s John \'s ( old ) car . "'),
    ("Mr. Smith paid $3.14 for 1,000 items at 10:30: e.g. pens.",
     "Mr. Smith paid $ 3.14 for 1,000 items at 10:30 : e.g. pens ."),
    ("A well-known “curly” ‘quote’—and _italics_… too?", "A well-known \" curly \" ' quote ' -- and italics ... too ?"),
    ("See No. 5 and J. R. R. Tolkien, etc. in the U.S.", "See No. 5 and J. R. R. Tolkien , etc. in the U.S."),
    ("They're here, we've seen O'Neil's rock'n'roll band.",
     "They 're here , we 've seen O'Neil 's rock'n'roll band ."),
    ("He stayed with Mr.", "He stayed with Mr ."),        # the sentence's last period is its own token
])
def test_tokenize(text, tokens):
    assert " ".join(tokenize(text)) == tokens


def test_split_sentences_abbreviations_numbers_quotes():
    text = ('Mr. Smith met Dr. Jones on St. James St. at 3.14 p.m. sharp. It was 1999. "Hello!" he said. '
            '"Who are you?" Jones asked, e.g. twice, i.e. often. Wait... Then J. Smith left! Why? '
            'Because. lowercase after a period. is no boundary.')
    assert split_sentences(text) == [
        "Mr. Smith met Dr. Jones on St. James St. at 3.14 p.m. sharp.",
        "It was 1999.",
        '"Hello!" he said.',
        '"Who are you?"',
        "Jones asked, e.g. twice, i.e. often.",
        "Wait...",
        "Then J. Smith left!",
        "Why?",
        "Because. lowercase after a period. is no boundary.",
    ]


def test_wrapped_lines_joined_paragraphs_split(tmp_path):
    src = tmp_path / "book.txt"
    src.write_text("The old man\nwalked to the\n   harbour. He saw\nthe boats.\n\n"
                   "A new paragraph\nstarts here.\n\n\n\nThe last one\r\nhas CRLF endings.\r\n", encoding="utf-8")
    summary = convert([src], tmp_path / "out", heldout_fraction=0.0)
    train, held = _split_lines(tmp_path / "out")
    assert sorted(train) == sorted(["The old man walked to the harbour .", "He saw the boats .",
                                    "A new paragraph starts here .", "The last one has CRLF endings ."])
    assert held == [] and summary["heldout"]["sentences"] == 0
    assert summary["train"]["words"] == 8 + 5 + 6 + 7


def test_short_long_and_punctuation_only_sentences_dropped_and_counted(tmp_path):
    src = tmp_path / "t.txt"
    long = " ".join(["Word"] * 30) + "."
    src.write_text(f"Yes. No way. This one is kept.\n\n* * *\n\nAnother kept sentence here. {long}\n", encoding="utf-8")
    summary = convert([src], tmp_path / "out", heldout_fraction=0.0, min_words=4, max_words=20)
    f = summary["files"][0]
    assert f["sentences"] == 2 and f["words"] == 5 + 5
    assert f["dropped"] == {"no_words": 1, "too_short": 2, "too_long": 1, "overlong": 0}
    assert summary["totals"]["dropped"] == f["dropped"]


def test_deterministic_and_no_sentence_in_both_splits(tmp_path):
    pool = _sentences(1500, seed=1)
    rng = random.Random(2)
    picked = [rng.choice(pool) for _ in range(4000)]       # many sentences repeat
    src = tmp_path / "corpus.txt"
    src.write_text(_running_text(picked), encoding="utf-8")
    kw = dict(heldout_fraction=0.1, train_shards=3)
    a = convert([src], tmp_path / "a", **kw)
    b = convert([src], tmp_path / "b", **kw)
    assert _shard_bytes(tmp_path / "a") == _shard_bytes(tmp_path / "b")
    assert len(_shard_bytes(tmp_path / "a")) == 4                  # 3 train shards + held-out 00000
    assert {**a, "output": None} == {**b, "output": None}
    train, held = _split_lines(tmp_path / "a")
    assert sorted(train + held) == sorted(picked)                  # nothing lost, nothing changed
    assert len(set(held)) > 50 and not set(train) & set(held)
    assert len(held) > len(set(held))                              # repeats present, all on one side
    assert a["train"]["sentences"] == len(train) and a["heldout"]["sentences"] == len(held)
    assert sum(a["train"]["shards"].values()) == len(train)
    env = {**os.environ, "PYTHONHASHSEED": "1"}                   # another process: the same bytes
    subprocess.run([sys.executable, "-m", "ds_interlock.data.from_text", "--out", str(tmp_path / "d"),
                    "--heldout_fraction", "0.1", "--train_shards", "3", str(src)], check=True, env=env,
                   capture_output=True)
    assert _shard_bytes(tmp_path / "d") == _shard_bytes(tmp_path / "a")
    c = convert([src], tmp_path / "c", seed=1, **kw)               # the seed changes the split
    assert set(_split_lines(tmp_path / "c")[1]) != set(held) and c["totals"] == a["totals"]


def test_heldout_fraction_roughly_respected(tmp_path):
    sents = _sentences(5000, seed=3)
    src = tmp_path / "c.txt"
    src.write_text(_running_text(sents), encoding="utf-8")
    for frac in (0.02, 0.2):
        s = convert([src], tmp_path / f"o{frac}", heldout_fraction=frac)
        n = s["heldout"]["sentences"]
        sd = (5000 * frac * (1 - frac)) ** 0.5
        assert abs(n - 5000 * frac) < 4 * sd, (frac, n)
        assert n == sum(is_heldout(x, 0, frac) for x in sents)
        assert s["heldout"]["sentences"] + s["train"]["sentences"] == 5000


def test_bad_lines_counted_per_file_and_utf16_refused(tmp_path, capsys):
    good = _running_text(_sentences(60, seed=4)).encode("utf-8").split(b"\n")
    bad = good[:5] + [b"caf\xe9 latin-1 line", b"\xff\xfe junk"] + good[5:10] + [b"bell \x07 here", b"esc \x1b[0m"] \
        + good[10:]
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_bytes(b"\n".join(bad))
    b.write_bytes(b"\n".join(good))
    s = convert([a, b], tmp_path / "out")
    fa, fb = s["files"]
    assert fa["path"] == str(a) and fb["path"] == str(b)
    assert fa["skipped_lines"] == {"bad_utf8": 2, "control_chars": 2, "gutenberg": 0}
    assert fb["skipped_lines"] == {"bad_utf8": 0, "control_chars": 0, "gutenberg": 0}
    assert s["totals"]["skipped_lines"]["bad_utf8"] == 2 and fa["lines"] == fb["lines"] + 4
    text = "\n".join(_split_lines(tmp_path / "out")[0])
    assert "latin-1" not in text and "bell" not in text and "\x1b" not in text

    u16 = tmp_path / "utf16.txt"
    u16.write_text("Some text in UTF-16. It has a byte-order mark.\n", encoding="utf-16")
    with pytest.raises(NotTextError, match="utf16.txt"):
        convert([b, u16], tmp_path / "out2")
    assert not (tmp_path / "out2" / RELEASE_DIR).exists()
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "out3"), str(b), str(u16)])
    assert e.value.code == 2 and str(u16) in capsys.readouterr().err

    latin1 = tmp_path / "latin1.txt"                 # mostly undecodable lines: the whole file is refused
    latin1.write_bytes(b"\n".join([b"Caf\xe9 number %d is open. Yes it is." % i for i in range(40)]))
    with pytest.raises(NotTextError, match="latin1.txt"):
        convert([latin1], tmp_path / "out4")
    late = tmp_path / "late_latin1.txt"              # the same past the sniffed head: refused once read
    late.write_bytes(_running_text(_sentences(2000, seed=11)).encode() + latin1.read_bytes())
    assert late.stat().st_size > 64 * 1024
    with pytest.raises(NotTextError, match="late_latin1.txt"):
        convert([late], tmp_path / "out5")
    assert not (tmp_path / "out5" / RELEASE_DIR).exists() and list((tmp_path / "out5").iterdir()) == []


def test_refuses_to_overwrite_without_force(tmp_path, capsys):
    one, two = tmp_path / "one.txt", tmp_path / "two.txt"
    one.write_text(_running_text(_sentences(200, seed=5)), encoding="utf-8")
    two.write_text(_running_text(_sentences(100, seed=6)), encoding="utf-8")
    out = tmp_path / "out"
    convert([one], out)
    before = _shard_bytes(out)
    with pytest.raises(FileExistsError, match="force"):
        convert([two], out)
    with pytest.raises(SystemExit):
        main(["--out", str(out), str(two)])
    assert "--force" in capsys.readouterr().err
    assert _shard_bytes(out) == before
    main(["--out", str(out), "--force", str(two)])
    assert _shard_bytes(out) != before
    summary = json.loads((out / RELEASE_DIR / SUMMARY_NAME).read_text())
    assert summary["totals"]["sentences"] == 100 and summary["files"][0]["path"] == str(two)
    assert [p.name for p in out.iterdir()] == [RELEASE_DIR]          # no temp directories left
    (tmp_path / "empty" / RELEASE_DIR).mkdir(parents=True)          # an empty output is fine
    convert([one], tmp_path / "empty")


def test_strip_gutenberg(tmp_path):
    body = _running_text(_sentences(50, seed=7))
    src = tmp_path / "pg.txt"
    src.write_text("The Project Gutenberg eBook of Something, by Someone.\n\nThis ebook is for the use of anyone.\n\n"
                   "*** START OF THE PROJECT GUTENBERG EBOOK SOMETHING ***\n\n" + body +
                   "\n*** END OF THE PROJECT GUTENBERG EBOOK SOMETHING ***\n\nUpdated editions will replace the "
                   "previous one. Section five of the license applies.\n", encoding="utf-8")
    plain = convert([src], tmp_path / "plain", heldout_fraction=0.0)
    stripped = convert([src], tmp_path / "stripped", heldout_fraction=0.0, strip_gutenberg=True)
    text_plain = " ".join(_split_lines(tmp_path / "plain")[0])
    text_stripped = " ".join(_split_lines(tmp_path / "stripped")[0])
    assert "Gutenberg" in text_plain and "license" in text_plain
    assert "Gutenberg" not in text_stripped and "license" not in text_stripped and "ebook" not in text_stripped
    assert stripped["totals"]["sentences"] == 50 and plain["totals"]["sentences"] > 50
    assert stripped["files"][0]["skipped_lines"]["gutenberg"] == 5 + 3   # through START; from END
    assert plain["files"][0]["skipped_lines"]["gutenberg"] == 0
    no_markers = tmp_path / "plain.txt"                       # nothing to strip: nothing stripped
    no_markers.write_text(body, encoding="utf-8")
    assert convert([no_markers], tmp_path / "nm", strip_gutenberg=True)["totals"]["sentences"] == 50


def test_raw_reader_finds_the_shards_and_auto_shard_count(tmp_path):
    sents = _sentences(3000, seed=8)
    src = tmp_path / "c.txt"
    src.write_text(_running_text(sents), encoding="utf-8")
    s = convert([src], tmp_path / "out", heldout_fraction=0.3, shard_mb=0.02)   # 20 kB shards at most
    n_train, n_held = len(s["train"]["shards"]), len(s["heldout"]["shards"])
    assert n_train == -(-s["train"]["bytes"] // 20_000) and n_held == -(-s["heldout"]["bytes"] // 20_000) > 1
    for data_dir in (tmp_path / "out", tmp_path / "out" / RELEASE_DIR):
        release = locate_release(data_dir)
        assert [p.name for p in release.train_files()] == [f"news.en-{i:05d}-of-00100" for i in range(1, n_train + 1)]
        assert [p.name for p in release.heldout_files()] == [HELD0]                  # the test shard
        assert len(release.heldout_files(None)) == n_held
        train_src = release.train_source()
        assert train_src.skipped_files == []
        stats = LineStats()
        assert len(list(train_src.iter_lines(stats))) == s["train"]["sentences"] and stats.skipped == 0
        assert len(list(FileSource(release.heldout_files(None)).iter_lines(LineStats()))) == s["heldout"]["sentences"]
    shards = [_lines(p) for p in sorted((tmp_path / "out" / RELEASE_DIR / TRAIN_DIR).iterdir())]
    sizes = [len(x) for x in shards]
    assert min(sizes) > 0.5 * max(sizes)                      # hash-balanced
    assert shards[0][:50] != [x for x in sents if x in set(shards[0])][:50]   # shuffled, not input order


def test_prepare_lm_data_accepts_the_output(tmp_path):
    src = tmp_path / "c.txt"
    src.write_text(_running_text(_sentences(3000, seed=9)), encoding="utf-8")
    s = convert([src], tmp_path / "out", heldout_fraction=0.05)
    data = prepare_lm_data(tmp_path / "out", tmp_path / "cache", vocab_size=100, seq_len=32,
                           tokenizer_sample_sentences=1000, progress=False)
    assert data.source == "raw" and data.vocab_size == 100
    assert data.train_counts.sentences == s["train"]["sentences"] and data.train_stats.skipped == 0
    assert data.heldout_counts.sentences == s["heldout"]["sentences"] > 100
    # prepare counts a sentence's end as a word (the release's per-word perplexity convention)
    assert data.heldout_counts.words == s["heldout"]["words"] + s["heldout"]["sentences"]
    assert len(data.train) > 0 and len(data.heldout) > 0


def test_cli_prints_summary_and_writes_json(tmp_path, capsys):
    src = tmp_path / "c.txt"
    src.write_text(_running_text(_sentences(300, seed=10)), encoding="utf-8")
    main(["--out", str(tmp_path / "out"), "--seed", "3", "--heldout_fraction", "0.1", "--min_words", "7", str(src)])
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "out" / RELEASE_DIR / SUMMARY_NAME).read_text())
    assert summary["options"]["seed"] == 3 and summary["options"]["min_words"] == 7
    assert f"{src}: {summary['totals']['sentences']} sentences" in printed
    assert f"heldout: {summary['heldout']['sentences']} sentences" in printed
    assert str(tmp_path / "out" / RELEASE_DIR) in printed
    assert summary["totals"]["dropped"]["too_short"] > 0 and "too_short=" in printed
