"""Encode a text source into one flat, memory-mapped token file (cached), and count words.

Layout: ``<name>-<key>.bin`` is the raw array of token ids (uint16 when the vocabulary
fits, else uint32); every sentence is followed by the EOS id, so packed windows cross
sentence boundaries with a clear separator. ``<name>-<key>.json`` holds the dtype, the
counts, the line statistics (also per source file) and the key. Lines are streamed and
encoded in batches, so 30M sentences never sit in memory. The key covers the source
identity, the tokenizer's file hash and the cleaning limit. Every load checks the file's
size and a sampled checksum (:func:`~ds_interlock.data.cache.sampled_digest`); an entry that
fails is rebuilt, with a warning, instead of feeding wrong token ids to the model.

Word-level perplexity convention (used by :class:`TextCounts` and :func:`word_perplexity`):
``words`` = space-separated words of the kept lines + one end-of-sentence per line, and
``tokens`` = sentencepiece pieces + one EOS per line. Counting the end of sentence as a
word is the usual One Billion Word convention (the ``</S>`` token is predicted and scored).
Then ``ppl_word = exp(total_token_nll / words)`` when the NLL is summed over all ``tokens``;
for a mean over a subset of tokens use ``exp(mean_token_nll * tokens / words)``.
"""

from __future__ import annotations

import itertools
import math
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .cache import CorruptCacheError, atomic_write_json, cache_key, read_json, sampled_digest, temp_path_for
from .lines import DEFAULT_MAX_CHARS, LineStats, TextSource
from .tokenizer import SpmTokenizer

_FORMAT_VERSION = 1
DEFAULT_BATCH_LINES = 8192


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size < 65536 else np.dtype(np.uint32)


@dataclass
class TextCounts:
    """Sentences, words and tokens of a text (see the module docstring for the convention)."""

    sentences: int = 0
    words: int = 0     # space-separated words + 1 end-of-sentence per sentence
    tokens: int = 0    # sentencepiece pieces + 1 EOS per sentence

    @property
    def tokens_per_word(self) -> float:
        return self.tokens / self.words if self.words else float("nan")

    def word_perplexity(self, mean_token_nll: float) -> float:
        """Per-word perplexity from a mean per-token NLL (nats) measured on this text."""
        return math.exp(mean_token_nll * self.tokens_per_word)

    def as_dict(self) -> dict:
        return asdict(self)


def word_perplexity(total_token_nll: float, num_words: int) -> float:
    """exp(total NLL in nats summed over every token of a text / its word count)."""
    return math.exp(total_token_nll / num_words)


@dataclass
class TokenFile:
    """A finished token file on disk; ``open()`` gives a read-only memmap."""

    path: Path
    dtype: np.dtype
    num_tokens: int
    counts: TextCounts
    stats: LineStats
    key: str
    built: bool    # True if encoded by this call, False if loaded from the cache
    vocab_size: int | None = None         # every id is below it (checked by PackedLMDataset)
    rebuilt_because: str | None = None    # set when a corrupt cache entry was replaced by this call

    @property
    def meta_path(self) -> Path:
        return self.path.with_suffix(".json")

    def open(self) -> np.memmap:
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))

    @classmethod
    def load(cls, meta_path: str | os.PathLike) -> "TokenFile":
        """Open a cache entry; :class:`CorruptCacheError` (naming its files) if it does not check out."""
        meta_path = Path(meta_path)
        path = meta_path.with_suffix(".bin")
        fix = f"delete {meta_path} and {path} to rebuild it"
        try:
            meta = read_json(meta_path)
            tf = cls(path, np.dtype(meta["dtype"]), int(meta["num_tokens"]), TextCounts(**meta["counts"]),
                     LineStats.from_dict(meta["stats"]).with_per_file(meta.get("file_stats", {})),
                     meta["key"], built=False, vocab_size=meta.get("vocab_size"))
        except (ValueError, KeyError, TypeError, AttributeError) as e:   # a JSON error is a ValueError
            raise CorruptCacheError(f"token cache metadata {meta_path} is unreadable "
                                    f"({type(e).__name__}: {e}); {fix}") from e
        expected = tf.num_tokens * tf.dtype.itemsize
        if not path.is_file():
            raise CorruptCacheError(f"token file {path} is missing (its metadata {meta_path} is there); {fix}")
        size = path.stat().st_size
        if size != expected:
            raise CorruptCacheError(f"token file {path} has {size} bytes but its metadata says {tf.num_tokens} "
                                    f"{tf.dtype.name} tokens ({expected} bytes): truncated or overwritten; {fix}")
        if "sampled_sha256" in meta and sampled_digest(path) != meta["sampled_sha256"]:
            raise CorruptCacheError(f"token file {path} does not match the checksum in {meta_path}: "
                                    f"changed since it was written; {fix}")
        return tf


def _encode_batch(sp, lines: list[str], eos: int, dtype: np.dtype, counts: TextCounts,
                  num_threads: int) -> np.ndarray:
    pieces = sp.encode(lines, out_type=int, num_threads=num_threads)
    for ids in pieces:
        ids.append(eos)
    n = sum(len(ids) for ids in pieces)
    counts.sentences += len(lines)
    counts.words += sum(len(line.split()) for line in lines) + len(lines)
    counts.tokens += n
    return np.fromiter(itertools.chain.from_iterable(pieces), dtype=dtype, count=n)


def encode_to_token_file(source: TextSource, tokenizer: SpmTokenizer, cache_dir: str | os.PathLike,
                         *, name: str | None = None, max_chars: int = DEFAULT_MAX_CHARS,
                         batch_lines: int = DEFAULT_BATCH_LINES, progress: bool = True,
                         num_threads: int | None = None) -> TokenFile:
    """Return the cached token file for (source, tokenizer, max_chars), encoding it if needed."""
    name = name or source.name
    key = cache_key({"source": source.identity(), "tokenizer": tokenizer.sha256,
                     "max_chars": max_chars, "separator": "eos", "version": _FORMAT_VERSION})
    out_dir = Path(cache_dir) / "tokens"
    meta_path = out_dir / f"{name}-{key}.json"
    rebuilt_because = None
    if meta_path.is_file():
        try:
            return TokenFile.load(meta_path)
        except CorruptCacheError as e:
            # Derived data: rebuild it rather than stop, but say so.
            rebuilt_because = str(e)
            warnings.warn(f"rebuilding a corrupt token cache: {e}", stacklevel=2)

    out_dir.mkdir(parents=True, exist_ok=True)
    sp = tokenizer.processor
    dtype = token_dtype(tokenizer.vocab_size)
    eos = tokenizer.eos_id
    if eos < 0:
        raise ValueError(f"tokenizer {tokenizer.path} has no EOS id")
    threads = num_threads or max(1, os.cpu_count() or 1)
    stats, counts = LineStats(), TextCounts()
    bin_path = out_dir / f"{name}-{key}.bin"
    tmp = temp_path_for(bin_path)
    try:
        with open(tmp, "wb") as f:
            batch: list[str] = []
            for line in source.iter_lines(stats, max_chars, progress=progress, desc=f"tokenize {name}"):
                batch.append(line)
                if len(batch) >= batch_lines:
                    _encode_batch(sp, batch, eos, dtype, counts, threads).tofile(f)
                    batch = []
            if batch:
                _encode_batch(sp, batch, eos, dtype, counts, threads).tofile(f)
        if counts.tokens == 0:
            raise ValueError(f"no usable sentences in {source!r} ({stats})")
        os.replace(tmp, bin_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    # The JSON appears last and marks the entry complete.
    atomic_write_json(meta_path, {"key": key, "dtype": dtype.name, "num_tokens": counts.tokens,
                                  "counts": counts.as_dict(), "stats": stats.as_dict(),
                                  "file_stats": stats.per_file_as_dict(),
                                  "sampled_sha256": sampled_digest(bin_path),
                                  "eos_id": eos, "vocab_size": tokenizer.vocab_size,
                                  "tokenizer": str(tokenizer.path), "tokenizer_sha256": tokenizer.sha256,
                                  "source": source.identity(), "version": _FORMAT_VERSION})
    tf = TokenFile.load(meta_path)
    tf.built = True
    tf.rebuilt_because = rebuilt_because
    return tf


def count_words_and_tokens(source: TextSource | str | os.PathLike, tokenizer: SpmTokenizer,
                           *, max_chars: int = DEFAULT_MAX_CHARS,
                           batch_lines: int = DEFAULT_BATCH_LINES) -> tuple[TextCounts, LineStats]:
    """Count sentences, words and tokens of a held-out text without writing anything.

    ``source`` may be a path to a plain one-sentence-per-line file. Bad lines are skipped
    exactly as when encoding, so the counts match the token file of the same text.
    """
    from .lines import FileSource

    if not isinstance(source, TextSource):
        source = FileSource([source], name="heldout")
    stats, counts = LineStats(), TextCounts()
    sp, eos = tokenizer.processor, tokenizer.eos_id
    batch: list[str] = []
    for line in source.iter_lines(stats, max_chars):
        batch.append(line)
        if len(batch) >= batch_lines:
            _encode_batch(sp, batch, eos, np.dtype(np.int64), counts, 1)
            batch = []
    if batch:
        _encode_batch(sp, batch, eos, np.dtype(np.int64), counts, 1)
    return counts, stats
