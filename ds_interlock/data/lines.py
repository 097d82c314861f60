"""Line cleaning and line sources.

The corpus is one sentence per line, already space tokenized. A bad line must never stop a
multi-hour tokenization run, so it is skipped and counted per reason and per file in
:class:`LineStats`, which the caller can print (and which is stored next to every cached
token file). A whole file that is not UTF-8 text is refused instead (see textcheck.py).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from .cache import files_identity
from .textcheck import check_decoded, check_text_file, not_a_file_reason

DEFAULT_MAX_CHARS = 10_000
SKIP_REASONS = ("empty", "bad_utf8", "overlong")
COUNTS = ("kept",) + SKIP_REASONS
UTF8_BOM = b"\xef\xbb\xbf"


@dataclass
class LineStats:
    """Counts of kept lines and of skipped lines per reason (and the same per file in ``per_file``)."""

    kept: int = 0
    empty: int = 0        # empty or whitespace-only (also a missing value in a table)
    bad_utf8: int = 0     # bytes that do not decode as UTF-8
    overlong: int = 0     # longer than max_chars characters
    # file path -> its own counts, filled by the sources that read files; not part of equality
    per_file: dict[str, "LineStats"] = field(default_factory=dict, compare=False, repr=False)

    @property
    def skipped(self) -> int:
        return self.empty + self.bad_utf8 + self.overlong

    @property
    def total(self) -> int:
        return self.kept + self.skipped

    def add(self, other: "LineStats") -> "LineStats":
        for name in COUNTS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for path, counts in other.per_file.items():
            self.per_file.setdefault(path, LineStats()).add(counts)
        return self

    def copy(self) -> "LineStats":
        """The counts alone (no per-file entries)."""
        return LineStats(**self.as_dict())

    def since(self, before: "LineStats") -> "LineStats":
        """What was counted after ``before`` (an earlier :meth:`copy`)."""
        return LineStats(**{k: getattr(self, k) - getattr(before, k) for k in COUNTS})

    def note_file(self, path: str | os.PathLike, before: "LineStats") -> "LineStats":
        """Record what was counted since ``before`` as the counts of file ``path``; return them."""
        delta = self.since(before)
        self.per_file.setdefault(str(path), LineStats()).add(delta)
        return delta

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in COUNTS}

    @classmethod
    def from_dict(cls, d: dict) -> "LineStats":
        return cls(**{k: int(d.get(k, 0)) for k in COUNTS})

    def per_file_as_dict(self) -> dict:
        return {path: counts.as_dict() for path, counts in self.per_file.items()}

    def with_per_file(self, d: dict) -> "LineStats":
        self.per_file = {path: LineStats.from_dict(counts) for path, counts in d.items()}
        return self

    def dropped_by_file(self) -> list[str]:
        """One line per file with skipped lines: its path, how many of how many, and why."""
        out = []
        for path, c in self.per_file.items():
            if c.skipped:
                why = ", ".join(f"{k}={getattr(c, k)}" for k in SKIP_REASONS if getattr(c, k))
                out.append(f"{path}: dropped {c.skipped} of {c.total} lines ({why})")
        return out

    def __str__(self) -> str:
        return (f"kept={self.kept} skipped={self.skipped} "
                f"(empty={self.empty}, bad_utf8={self.bad_utf8}, overlong={self.overlong})")


def clean_line(raw: bytes | str | None, stats: LineStats, max_chars: int = DEFAULT_MAX_CHARS) -> str | None:
    """Return the sentence without surrounding whitespace, or None (counted) if it is bad."""
    if raw is None:
        stats.empty += 1
        return None
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            stats.bad_utf8 += 1
            return None
    # A table cell may hold a newline; the cache formats assume one sentence per line.
    text = raw.strip()
    if "\n" in text or "\r" in text:
        text = " ".join(text.split())
    if not text:
        stats.empty += 1
        return None
    if len(text) > max_chars:
        stats.overlong += 1
        return None
    stats.kept += 1
    return text


class TextSource:
    """A sequence of sentences that can be read several times (sampled, encoded, counted).

    Subclasses give ``identity()`` (JSON-able, used in cache keys), ``iter_lines`` and
    ``sample_lines``.
    """

    name: str = "text"
    # (path, reason) of files found next to the ones read but left out, for the start-up summary
    skipped_files: Sequence[tuple[str, str]] = ()

    def identity(self) -> list:
        raise NotImplementedError

    def iter_lines(self, stats: LineStats, max_chars: int = DEFAULT_MAX_CHARS,
                   progress: bool = False, desc: str | None = None) -> Iterator[str]:
        raise NotImplementedError

    def sample_lines(self, n: int, stats: LineStats, max_chars: int = DEFAULT_MAX_CHARS) -> Iterator[str]:
        """Up to ``n`` clean lines for tokenizer training."""
        raise NotImplementedError


def _raw_lines(path: Path) -> Iterator[bytes]:
    """The lines of a file as bytes, without a UTF-8 byte-order mark (it is no part of the text)."""
    with open(path, "rb") as f:
        for i, raw in enumerate(f):
            yield raw[len(UTF8_BOM):] if i == 0 and raw.startswith(UTF8_BOM) else raw


class FileSource(TextSource):
    """Plain text files read in order, line by line, as bytes (so bad UTF-8 is per line).

    Every file given must be a regular file whose first bytes look like UTF-8 text, else it is
    refused here, naming it. A file that turns out to have too many undecodable lines is
    refused when it has been read (:class:`~ds_interlock.data.textcheck.NotTextError`).
    """

    def __init__(self, paths: Sequence[str | os.PathLike], name: str = "text",
                 skipped_files: Sequence[tuple[str, str]] = ()):
        if not paths:
            raise ValueError("FileSource needs at least one file")
        self.paths = [Path(p) for p in paths]
        for p in self.paths:
            why = not_a_file_reason(p)
            if why:
                raise FileNotFoundError(f"corpus file {why}: {p}")
            check_text_file(p)
        self.name = name
        self.skipped_files = list(skipped_files)

    def identity(self) -> list:
        return files_identity(self.paths)

    def __repr__(self) -> str:
        return f"FileSource({len(self.paths)} files, first={self.paths[0]})"

    def iter_lines(self, stats, max_chars=DEFAULT_MAX_CHARS, progress=False, desc=None):
        bar = None
        if progress:
            from tqdm.auto import tqdm
            total = sum(p.stat().st_size for p in self.paths)
            bar = tqdm(total=total, unit="B", unit_scale=True, desc=desc or self.name)
        try:
            for path in self.paths:
                before = stats.copy()
                try:
                    for raw in _raw_lines(path):
                        if bar is not None:
                            bar.update(len(raw))
                        text = clean_line(raw, stats, max_chars)
                        if text is not None:
                            yield text
                finally:
                    delta = stats.note_file(path, before)
                _check(path, delta)
        finally:
            if bar is not None:
                bar.close()

    def sample_lines(self, n, stats, max_chars=DEFAULT_MAX_CHARS):
        # The 1B-word shards are already shuffled, so the head of every shard is a fair
        # sample, and reading only heads keeps tokenizer training cheap on 30M sentences.
        per_file = math.ceil(n / len(self.paths))
        produced = 0
        for path in self.paths:
            taken = 0
            before = stats.copy()
            try:
                for raw in _raw_lines(path):
                    if taken >= per_file or produced >= n:
                        break
                    text = clean_line(raw, stats, max_chars)
                    if text is not None:
                        taken += 1
                        produced += 1
                        yield text
            finally:
                delta = stats.note_file(path, before)
            _check(path, delta)
            if produced >= n:
                return


def _check(path: Path, counts: LineStats) -> None:
    """Refuse a file once read if too many of its lines were not UTF-8 (isolated ones are only counted)."""
    check_decoded(path, counts.bad_utf8, counts.kept + counts.bad_utf8 + counts.overlong)
