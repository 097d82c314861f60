"""Line cleaning and line sources.

The corpus is one sentence per line, already space tokenized. A bad line must never stop a
multi-hour tokenization run, so it is skipped and counted per reason in :class:`LineStats`,
which the caller can print (and which is stored next to every cached token file).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

from .cache import files_identity

DEFAULT_MAX_CHARS = 10_000
SKIP_REASONS = ("empty", "bad_utf8", "overlong")


@dataclass
class LineStats:
    """Counts of kept lines and of skipped lines per reason."""

    kept: int = 0
    empty: int = 0        # empty or whitespace-only (also a missing value in a table)
    bad_utf8: int = 0     # bytes that do not decode as UTF-8
    overlong: int = 0     # longer than max_chars characters

    @property
    def skipped(self) -> int:
        return self.empty + self.bad_utf8 + self.overlong

    @property
    def total(self) -> int:
        return self.kept + self.skipped

    def add(self, other: "LineStats") -> "LineStats":
        for name in ("kept",) + SKIP_REASONS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LineStats":
        return cls(**{k: int(d.get(k, 0)) for k in ("kept",) + SKIP_REASONS})

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

    def identity(self) -> list:
        raise NotImplementedError

    def iter_lines(self, stats: LineStats, max_chars: int = DEFAULT_MAX_CHARS,
                   progress: bool = False, desc: str | None = None) -> Iterator[str]:
        raise NotImplementedError

    def sample_lines(self, n: int, stats: LineStats, max_chars: int = DEFAULT_MAX_CHARS) -> Iterator[str]:
        """Up to ``n`` clean lines for tokenizer training."""
        raise NotImplementedError


class FileSource(TextSource):
    """Plain text files read in order, line by line, as bytes (so bad UTF-8 is per line)."""

    def __init__(self, paths: Sequence[str | os.PathLike], name: str = "text"):
        if not paths:
            raise ValueError("FileSource needs at least one file")
        self.paths = [Path(p) for p in paths]
        for p in self.paths:
            if not p.is_file():
                raise FileNotFoundError(f"corpus file not found: {p}")
        self.name = name

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
                with open(path, "rb") as f:
                    for raw in f:
                        if bar is not None:
                            bar.update(len(raw))
                        text = clean_line(raw, stats, max_chars)
                        if text is not None:
                            yield text
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
            with open(path, "rb") as f:
                for raw in f:
                    if taken >= per_file or produced >= n:
                        break
                    text = clean_line(raw, stats, max_chars)
                    if text is not None:
                        taken += 1
                        produced += 1
                        yield text
            if produced >= n:
                return
