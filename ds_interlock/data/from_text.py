"""Convert plain-text files (any corpus, e.g. public-domain books) to the One Billion Word raw layout.

``examples/train_lm.py --data_dir DIR`` then trains on it unchanged: the readers, tokenizer
and caches see shards exactly like the real release's. Running text becomes one sentence per
line, space-tokenized like the release, so word counts (and per-word perplexity) mean the same:

* paragraphs: wrapped lines are joined; a blank line (or a skipped bad line) ends a paragraph;
* sentences end at ``. ! ?`` (with any closing quotes or brackets) followed by a space and a
  capital letter or an opening quote; not after ``Mr. Mrs. Dr. St.`` and the like, initials
  (``J. Smith``) or dotted abbreviations (``e.g. i.e. U.S.``, so "in the U.S. He ..." stays one
  sentence), and ``3.14`` has no space, so it is no boundary;
* tokens: punctuation ``. , ; : ! ? " ' ( ) [ ] $ % ...`` is split off; contractions as in the
  release (``don't`` -> ``do n't``, ``can't`` -> ``ca n't``, ``it's`` -> ``it 's``, ``John's``
  -> ``John 's``); hyphenated words, numbers (``3.14 1,000 10:30``), dotted abbreviations and
  ``Mr.`` (not at a sentence's end) stay whole; curly quotes become ``"`` / ``'``, an em dash
  ``--``, and ``_italic_`` underscores are dropped.

Which split and shard a sentence lands in is decided by a hash of its tokenized text and
``seed`` alone, so a re-run writes byte-identical files and a repeated sentence can never be
in both train and held-out. Within a shard sentences are ordered by another part of that hash:
a deterministic shuffle, as the release's shards are shuffled (tokenizer training samples the
head of every shard). Held-out shard 00000 is what evaluation reads; more held-out shards are
written only when it would exceed the shard size.

Bad input is handled like the readers do (lines.py, textcheck.py): a file that is not UTF-8
is refused naming it; undecodable lines and lines with control characters are skipped and
counted per file, as are sentences dropped for length. Everything is written into a temp
directory beside the output and renamed into place; an existing non-empty output is kept
unless ``force``.

CLI: ``python -m ds_interlock.data.from_text --out DIR FILE [FILE ...]``
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import re
import shutil
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from .cache import atomic_write_json, make_temp_dir_beside, stale_temp_reason, temp_path_for
from .lines import DEFAULT_MAX_CHARS, _raw_lines
from .raw import (HELDOUT_DIR, HELDOUT_SHARDS, RELEASE_DIR, TEST_SHARD, TRAIN_DIR, TRAIN_SHARDS,
                  heldout_shard_name, train_shard_name)
from .textcheck import NotTextError, check_decoded, check_text_file, not_a_file_reason

SUMMARY_NAME = "from_text_summary.json"
FORMAT_VERSION = 1
DEFAULT_SHARD_MB = 50
MAX_PARAGRAPH_CHARS = 200_000   # a file without blank lines is split as it goes, not held whole

# -- tokenization --------------------------------------------------------------

_NORMALIZE = str.maketrans({"“": '"', "”": '"', "„": '"', "«": '"', "»": '"', "‘": "'", "’": "'",
                            "‚": "'", "—": " -- ", "…": "...", "\t": " ", "\u00a0": " "})
_TOKEN = re.compile(r"""
      (?:[^\W\d_]\.){2,}            # U.S. e.g. i.e.: a dotted abbreviation keeps its periods
    | \d+(?:[.,:/]\d+)+             # 3.14 1,000 10:30 1/2
    | [^\W_]+(?:[-'][^\W_]+)*       # words, hyphenated words, contractions (split below)
    | \.{2,} | -{2,}                # ellipsis, dash
    | \S                            # any other character is a token of its own
""", re.X)
_CLITICS = {"s", "re", "ve", "ll", "d", "m"}
# Abbreviations whose period ends no sentence (the next word is capitalized anyway).
_NO_BREAK = {"mr", "mrs", "ms", "messrs", "dr", "st", "jr", "sr", "prof", "rev", "hon", "gen", "col",
             "capt", "lt", "sgt", "mt", "mme", "mlle", "vs", "cf"}
# Abbreviations that keep their period as a token when not at a sentence's end ...
_KEEP_PERIOD = _NO_BREAK | {"etc", "inc", "ltd", "co", "corp", "jan", "feb", "mar", "apr", "jun", "jul",
                            "aug", "sep", "sept", "oct", "nov", "dec"}
_BEFORE_NUMBER = {"no", "nos", "vol", "ch", "fig", "pp", "art"}   # ... these only before a number


def normalize(text: str) -> str:
    """Curly quotes to straight ones, em dash to ``--``, whitespace runs to one space."""
    return " ".join(text.translate(_NORMALIZE).split())


def _split_clitic(word: str) -> list[str]:
    low = word.lower()
    if low.endswith("n't") and len(word) > 3:
        return [word[:-3], word[-3:]]
    i = word.rfind("'")
    if i > 0 and low[i + 1:] in _CLITICS:
        return [word[:i], word[i:]]
    return [word]


def tokenize(sentence: str) -> list[str]:
    """Split one sentence into One-Billion-Word-style tokens (see the module docstring)."""
    chunks = normalize(sentence).split(" ")
    out: list[str] = []
    for c, chunk in enumerate(chunks):
        if chunk.isalnum():                            # the common case: a plain word or number
            out.append(chunk)
            continue
        toks = _TOKEN.findall(chunk)
        i = 0
        while i < len(toks):
            tok = toks[i]
            if tok.strip("_") == "":                   # _italic_ markup
                i += 1
                continue
            if i + 1 < len(toks) and toks[i + 1] == "." and (i + 2 < len(toks) or c + 1 < len(chunks)):
                low = tok.lower()
                following = toks[i + 2] if i + 2 < len(toks) else chunks[c + 1]
                if (low in _KEEP_PERIOD or (len(tok) == 1 and tok.isupper())
                        or (low in _BEFORE_NUMBER and following[:1].isdigit())):
                    out.append(tok + ".")              # Mr. / J. / No. 5, not at the end
                    i += 2
                    continue
            out.extend(_split_clitic(tok) if "'" in tok[1:] else [tok])
            i += 1
    return out


# -- sentence splitting ----------------------------------------------------------

_BOUNDARY = re.compile(r"""[.!?]+["')\]]*\s+""")
_OPENERS = "\"'(["
_DOTTED = re.compile(r"(?:[^\W\d_]\.)+[^\W\d_]")


def _no_break_after(word: str) -> bool:
    """True if ``word.`` is an abbreviation or initial rather than a sentence's last word."""
    word = word.lstrip(_OPENERS)
    return (word.lower() in _NO_BREAK or (len(word) == 1 and word.isupper())
            or _DOTTED.fullmatch(word) is not None)


def split_sentences(paragraph: str) -> list[str]:
    """The sentences of one paragraph (wrapped lines already joined), normalized."""
    text = normalize(paragraph)
    out, start = [], 0
    for m in _BOUNDARY.finditer(text):
        after = text[m.end():m.end() + 8]
        head = after.lstrip(_OPENERS)
        if not (head[:1].isupper() or '"' in after[:len(after) - len(head)]):
            continue
        if m.group().startswith(".") and not m.group().startswith(".."):
            word = text[text.rfind(" ", start, m.start()) + 1:m.start()]
            if _no_break_after(word):
                continue
        out.append(text[start:m.end()].strip())
        start = m.end()
    if text[start:].strip():
        out.append(text[start:].strip())
    return out


# -- reading input files -----------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")   # tab is fine; C1 codes mean mis-decoded text
_GUTENBERG_START = re.compile(rb"^\s*\*{3}\s*START OF\b", re.I)
_GUTENBERG_END = re.compile(rb"^\s*\*{3}\s*END OF\b", re.I)
DROP_REASONS = ("no_words", "too_short", "too_long", "overlong")
LINE_REASONS = ("bad_utf8", "control_chars", "gutenberg")


@dataclass
class FileCounts:
    """What became of one input file (or, added up, of all of them)."""

    lines: int = 0           # lines read
    blank: int = 0           # empty or whitespace-only lines (paragraph breaks)
    bad_utf8: int = 0        # lines skipped: not UTF-8
    control_chars: int = 0   # lines skipped: control characters
    gutenberg: int = 0       # lines stripped as Project Gutenberg header/footer
    sentences: int = 0       # sentences kept
    words: int = 0           # their tokens
    no_words: int = 0        # sentences dropped: punctuation only (e.g. "* * *")
    too_short: int = 0       # fewer than min_words tokens
    too_long: int = 0        # more than max_words tokens
    overlong: int = 0        # more characters than the readers accept (lines.DEFAULT_MAX_CHARS)
    path: str = field(default="", compare=False)

    def add(self, other: "FileCounts") -> "FileCounts":
        for f in fields(self):
            if f.name != "path":
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def as_dict(self) -> dict:
        d = {"path": self.path} if self.path else {}
        d.update(lines=self.lines, blank_lines=self.blank, sentences=self.sentences, words=self.words,
                 dropped={k: getattr(self, k) for k in DROP_REASONS},
                 skipped_lines={k: getattr(self, k) for k in LINE_REASONS})
        return d


def _gutenberg_bounds(path: Path) -> tuple[int, int | None]:
    """(index of the START marker line or -1, index of the END marker line or None)."""
    start, end = -1, None
    for i, raw in enumerate(_raw_lines(path)):
        if start < 0 and end is None and _GUTENBERG_START.match(raw):
            start = i
        elif _GUTENBERG_END.match(raw):
            end = i
            break
    return start, end


def _file_lines(path: Path, counts: FileCounts, strip_gutenberg: bool) -> Iterator[str]:
    """The usable lines of a file; "" for a paragraph break (a blank or skipped line)."""
    start, end = _gutenberg_bounds(path) if strip_gutenberg else (-1, None)
    for i, raw in enumerate(_raw_lines(path)):
        counts.lines += 1
        if i <= start or (end is not None and i >= end):
            counts.gutenberg += 1
            continue
        try:
            line = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            counts.bad_utf8 += 1
            yield ""
            continue
        if _CONTROL.search(line):
            counts.control_chars += 1
            yield ""
            continue
        counts.blank += not line.strip()
        yield line


def _sentences(lines: Iterable[str]) -> Iterator[str]:
    """Join lines into paragraphs and split those into sentences."""
    buf: list[str] = []
    size = 0
    for line in lines:
        if not line.strip():
            if buf:
                yield from split_sentences(" ".join(buf))
                buf, size = [], 0
            continue
        buf.append(line)
        size += len(line)
        if size > MAX_PARAGRAPH_CHARS:   # keep only the unfinished last sentence
            sents = split_sentences(" ".join(buf))
            if len(sents) > 1:
                yield from sents[:-1]
                buf, size = [sents[-1]], len(sents[-1])
            else:                        # no boundary at all: give it up (dropped as too long)
                yield from sents
                buf, size = [], 0
    if buf:
        yield from split_sentences(" ".join(buf))


def file_sentences(path: str | os.PathLike, counts: FileCounts, *, min_words: int = 3, max_words: int = 200,
                   strip_gutenberg: bool = False) -> Iterator[str]:
    """The kept, tokenized sentences of one UTF-8 text file; ``counts`` says what was dropped."""
    path = Path(path)
    for sent in _sentences(_file_lines(path, counts, strip_gutenberg)):
        toks = tokenize(sent)
        if not any(c.isalnum() for t in toks for c in t):
            counts.no_words += 1
        elif len(toks) < min_words:
            counts.too_short += 1
        elif len(toks) > max_words:
            counts.too_long += 1
        else:
            line = " ".join(toks)
            if len(line) > DEFAULT_MAX_CHARS:
                counts.overlong += 1
                continue
            counts.sentences += 1
            counts.words += len(toks)
            yield line
    # Refuse a file that turned out to be mostly another encoding (isolated bad lines stay counted).
    check_decoded(path, counts.bad_utf8, counts.lines - counts.gutenberg - counts.blank)


# -- the split and the shards --------------------------------------------------------

def _digest(line: str, seed: int) -> bytes:
    return hashlib.blake2b(f"{seed}\n{line}".encode("utf-8"), digest_size=24).digest()


def is_heldout(line: str, seed: int = 0, heldout_fraction: float = 0.02) -> bool:
    """Whether a tokenized sentence goes to held-out; depends on its text and ``seed`` only."""
    return int.from_bytes(_digest(line, seed)[:8], "big") < heldout_fraction * 2 ** 64


def _shard_of(digest: bytes, num_shards: int) -> int:
    return (int.from_bytes(digest[8:16], "big") * num_shards) >> 64


def _write_shards(spool: Path, paths: Sequence[Path], seed: int) -> list[int]:
    """Route the spooled lines to ``paths`` by hash, each shard ordered by hash; sentences per shard."""
    n = len(paths)
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
    buckets = [p.with_name(p.name + ".part") for p in paths] if n > 1 else [spool]
    if n > 1:
        outs = [open(b, "wb") for b in buckets]
        try:
            with open(spool, "rb") as f:
                for raw in f:   # lines end in b"\n" only: normalize() left no other line break
                    outs[_shard_of(_digest(raw[:-1].decode("utf-8"), seed), n)].write(raw)
        finally:
            for o in outs:
                o.close()
    sizes = []
    for bucket, path in zip(buckets, paths):
        lines = bucket.read_bytes().decode("utf-8").split("\n")[:-1]
        lines.sort(key=lambda s: (_digest(s, seed)[16:], s))
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.writelines(s + "\n" for s in lines)
        bucket.unlink()
        sizes.append(len(lines))
    return sizes


def _num_shards(size: int, shard_bytes: int, most: int) -> int:
    return min(most, max(1, math.ceil(size / shard_bytes)))


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` is moved aside first, then removed."""
    old = None
    if final.exists() or final.is_symlink():
        old = temp_path_for(final)
        os.rename(final, old)
    os.rename(tmp, final)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()


def convert(files: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *, seed: int = 0,
            heldout_fraction: float = 0.02, min_words: int = 3, max_words: int = 200,
            train_shards: int | None = None, shard_mb: float = DEFAULT_SHARD_MB,
            strip_gutenberg: bool = False, force: bool = False) -> dict:
    """Write ``files`` as a One Billion Word raw release under ``out_dir``; return the summary.

    The release directory is ``out_dir/<RELEASE_DIR>``; the summary is also written there as
    ``from_text_summary.json``. ``train_shards`` None = enough shards of at most ``shard_mb``
    MB each (1..99); held-out uses shard 00000, and more only past ``shard_mb``.
    """
    if not files:
        raise ValueError("no input files given")
    if not 0 <= heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    if not 1 <= min_words <= max_words:
        raise ValueError(f"need 1 <= min_words <= max_words, got {min_words} and {max_words}")
    if train_shards is not None and not 1 <= train_shards <= len(TRAIN_SHARDS):
        raise ValueError(f"train_shards must be in 1..{len(TRAIN_SHARDS)}, got {train_shards}")
    if shard_mb <= 0:
        raise ValueError(f"shard_mb must be positive, got {shard_mb}")
    paths = [Path(f) for f in files]
    for p in paths:   # refuse bad input before any work
        why = not_a_file_reason(p)
        if why:
            raise FileNotFoundError(f"input file {why}: {p}")
        check_text_file(p)
    out_dir = Path(out_dir).expanduser()
    final = out_dir / RELEASE_DIR
    if (final.exists() or final.is_symlink()) and not force and (not final.is_dir() or any(final.iterdir())):
        raise FileExistsError(f"{final} already exists and is not empty; pass --force (force=True) to replace it")
    if out_dir.is_dir():   # temp directories of an earlier, killed conversion
        for entry in out_dir.iterdir():
            if entry.name.startswith(f".{RELEASE_DIR}.") and stale_temp_reason(entry):
                shutil.rmtree(entry, ignore_errors=True)

    tmp = make_temp_dir_beside(final)
    try:
        per_file, totals = [], FileCounts()
        spools = {"train": tmp / "train.spool", "heldout": tmp / "heldout.spool"}
        size = {"train": 0, "heldout": 0}
        words = {"train": 0, "heldout": 0}
        with open(spools["train"], "w", encoding="utf-8", newline="\n") as tr, \
                open(spools["heldout"], "w", encoding="utf-8", newline="\n") as ho:
            for p in paths:
                counts = FileCounts(path=str(p))
                for line in file_sentences(p, counts, min_words=min_words, max_words=max_words,
                                           strip_gutenberg=strip_gutenberg):
                    split = "heldout" if is_heldout(line, seed, heldout_fraction) else "train"
                    (ho if split == "heldout" else tr).write(line + "\n")
                    size[split] += len(line.encode("utf-8")) + 1
                    words[split] += line.count(" ") + 1
                per_file.append(counts)
                totals.add(counts)
        if totals.sentences == 0:
            raise ValueError(f"no sentences kept from {len(paths)} input file(s): "
                             f"{totals.as_dict()['dropped']}, lines skipped {totals.as_dict()['skipped_lines']}")
        if size["train"] == 0:
            raise ValueError(f"every one of the {totals.sentences} sentences went to held-out; "
                             f"lower heldout_fraction ({heldout_fraction})")
        shard_bytes = int(shard_mb * 1e6)
        n_train = train_shards or _num_shards(size["train"], shard_bytes, len(TRAIN_SHARDS))
        n_held = _num_shards(size["heldout"], shard_bytes, len(HELDOUT_SHARDS))
        release = tmp / RELEASE_DIR
        train_paths = [release / TRAIN_DIR / train_shard_name(i) for i in TRAIN_SHARDS[:n_train]]
        # Held-out shard 00000 (TEST_SHARD) is the one evaluation reads; more only past shard_mb.
        held_paths = [release / HELDOUT_DIR / heldout_shard_name(i) for i in range(TEST_SHARD, TEST_SHARD + n_held)]
        split_info = {}
        for split, shard_paths in (("train", train_paths), ("heldout", held_paths)):
            per_shard = _write_shards(spools[split], shard_paths, seed)
            spools[split].unlink(missing_ok=True)
            split_info[split] = {"sentences": sum(per_shard), "words": words[split], "bytes": size[split],
                                 "shards": {p.name: n for p, n in zip(shard_paths, per_shard)}}
        summary = {
            "format": "ds_interlock.data.from_text", "version": FORMAT_VERSION, "output": str(final),
            "options": {"seed": seed, "heldout_fraction": heldout_fraction, "min_words": min_words,
                        "max_words": max_words, "train_shards": train_shards, "shard_mb": shard_mb,
                        "strip_gutenberg": strip_gutenberg},
            "files": [c.as_dict() for c in per_file], "totals": totals.as_dict(),
            "train": split_info["train"], "heldout": split_info["heldout"],
        }
        atomic_write_json(release / SUMMARY_NAME, summary)
        _replace_dir(release, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


def format_summary(summary: dict) -> str:
    """The summary as a few human-readable lines."""
    def dropped(c: dict) -> str:
        parts = [f"{k}={v}" for k, v in {**c["dropped"], **c["skipped_lines"]}.items() if v]
        return f"; dropped {', '.join(parts)}" if parts else ""

    out = [f"{c['path']}: {c['sentences']} sentences, {c['words']} words from {c['lines']} lines{dropped(c)}"
           for c in summary["files"]]
    t = summary["totals"]
    out.append(f"total: {t['sentences']} sentences, {t['words']} words from {t['lines']} lines{dropped(t)}"
               " (sentence drops: no_words / too_short / too_long / overlong; line skips: bad_utf8 /"
               " control_chars / gutenberg boilerplate)")
    for split in ("train", "heldout"):
        s = summary[split]
        out.append(f"{split}: {s['sentences']} sentences, {s['words']} words, {s['bytes'] / 1e6:.1f} MB "
                   f"in {len(s['shards'])} shard(s) ({', '.join(list(s['shards'])[:3])}"
                   f"{', ...' if len(s['shards']) > 3 else ''})")
    if summary["heldout"]["sentences"] == 0:
        out.append("warning: the held-out shard is empty (a small corpus, or heldout_fraction 0): "
                   "evaluation has nothing to read")
    out.append(f"wrote {summary['output']} (summary: {Path(summary['output']) / SUMMARY_NAME})")
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        description="Convert plain-text files to the One Billion Word raw layout "
                    "(one tokenized sentence per line, train / held-out shards).")
    ap.add_argument("files", nargs="+", metavar="FILE", help="UTF-8 text files (paragraphs of running text)")
    ap.add_argument("--out", required=True, help="directory to create the release directory in")
    ap.add_argument("--seed", type=int, default=0, help="seed of the hash that splits train / held-out")
    ap.add_argument("--heldout_fraction", type=float, default=0.02)
    ap.add_argument("--min_words", type=int, default=3, help="drop sentences with fewer tokens")
    ap.add_argument("--max_words", type=int, default=200, help="drop sentences with more tokens")
    ap.add_argument("--train_shards", type=int, default=None,
                    help="number of training shards (default: enough for <= --shard_mb each)")
    ap.add_argument("--shard_mb", type=float, default=DEFAULT_SHARD_MB)
    ap.add_argument("--strip_gutenberg", action="store_true",
                    help="drop Project Gutenberg header/footer ('*** START OF ...' / '*** END OF ...')")
    ap.add_argument("--force", action="store_true", help="replace an existing non-empty output")
    a = ap.parse_args(argv)
    try:
        summary = convert(a.files, a.out, seed=a.seed, heldout_fraction=a.heldout_fraction,
                          min_words=a.min_words, max_words=a.max_words, train_shards=a.train_shards,
                          shard_mb=a.shard_mb, strip_gutenberg=a.strip_gutenberg, force=a.force)
    except (NotTextError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"from_text: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    print(format_summary(summary))


if __name__ == "__main__":
    main()
