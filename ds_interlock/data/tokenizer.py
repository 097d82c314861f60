"""SentencePiece tokenizer trained on a sample of the training text, cached on disk.

The cache key covers the source files (path, size, mtime), the vocabulary size, the sample
size, the model type and the line-cleaning limit, so a changed corpus or setting trains a
new model and an unchanged one is loaded. ``SpmTokenizer.built`` says which happened.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm

from .cache import CorruptCacheError, atomic_write_bytes, atomic_write_json, cache_key, file_sha256, read_json
from .lines import DEFAULT_MAX_CHARS, LineStats, TextSource

DEFAULT_VOCAB_SIZE = 32_000
DEFAULT_SAMPLE_SENTENCES = 500_000
_FORMAT_VERSION = 1


@dataclass
class SpmTokenizer:
    """A loaded SentencePiece model and where it came from."""

    processor: spm.SentencePieceProcessor
    path: Path            # the .model file
    key: str              # cache key of the training inputs
    sha256: str           # hash of the model file: the tokenizer's identity for later caches
    built: bool           # True if trained by this call, False if loaded from the cache

    @property
    def vocab_size(self) -> int:
        # May be below the requested size: a small corpus cannot fill a large vocabulary.
        return self.processor.get_piece_size()

    @property
    def eos_id(self) -> int:
        return self.processor.eos_id()


def load_tokenizer(model_path: str | os.PathLike) -> SpmTokenizer:
    path = Path(model_path)
    if not path.is_file():
        raise FileNotFoundError(f"sentencepiece model not found: {path}")
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as e:
        raise CorruptCacheError(f"sentencepiece model {path} is unreadable ({e}); if it is a cached one, "
                                f"delete it and {path.with_suffix('.json').name} to train it again") from e
    meta_path = path.with_suffix(".json")
    key = read_json(meta_path)["key"] if meta_path.is_file() else ""
    return SpmTokenizer(sp, path, key, file_sha256(path), built=False)


def train_or_load_tokenizer(source: TextSource, cache_dir: str | os.PathLike, *,
                            vocab_size: int = DEFAULT_VOCAB_SIZE,
                            sample_sentences: int = DEFAULT_SAMPLE_SENTENCES,
                            model_type: str = "unigram",
                            max_chars: int = DEFAULT_MAX_CHARS,
                            character_coverage: float = 0.9999,
                            byte_fallback: bool = False,
                            num_threads: int | None = None) -> SpmTokenizer:
    """Load the cached model for these inputs, or train it on ``sample_sentences`` lines.

    Ids: unk=0, bos=1, eos=2 (no pad: sequences are packed to full length). The model is
    written under ``cache_dir/tokenizer/`` by temp file + rename, with a JSON sidecar
    holding the key and the line statistics of the sample.
    """
    if model_type not in ("unigram", "bpe", "char", "word"):
        raise ValueError(f"unknown sentencepiece model_type {model_type!r}")
    settings = {"vocab_size": vocab_size, "sample_sentences": sample_sentences,
                "model_type": model_type, "max_chars": max_chars,
                "character_coverage": character_coverage, "byte_fallback": byte_fallback,
                "version": _FORMAT_VERSION}
    key = cache_key({"source": source.identity(), **settings})
    path = Path(cache_dir) / "tokenizer" / f"spm-{model_type}-{vocab_size}-{key}.model"
    if path.is_file():
        tok = load_tokenizer(path)
        tok.key = key
        return tok

    stats = LineStats()
    model = io.BytesIO()
    try:
        _train(source.sample_lines(sample_sentences, stats, max_chars), model, vocab_size, model_type,
               character_coverage, byte_fallback, max_chars, num_threads)
    except RuntimeError as e:
        if stats.kept == 0:
            raise ValueError(f"no usable sentences to train the tokenizer from {source!r} ({stats})") from e
        raise
    data = model.getvalue()
    # Sidecar first: the .model file appearing is what marks the cache entry as complete.
    atomic_write_json(path.with_suffix(".json"), {"key": key, "settings": settings,
                                                  "source": source.identity(),
                                                  "sample_stats": stats.as_dict()})
    atomic_write_bytes(path, data)
    sp = spm.SentencePieceProcessor(model_proto=data)
    return SpmTokenizer(sp, path, key, file_sha256(path), built=True)


def _train(lines, model_writer, vocab_size, model_type, character_coverage, byte_fallback,
           max_chars, num_threads) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines,
        model_writer=model_writer,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        byte_fallback=byte_fallback,
        # A corpus too small for the requested size gets a smaller vocabulary, not an error.
        hard_vocab_limit=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        input_sentence_size=0,
        max_sentence_length=max(4192, 4 * max_chars),
        num_threads=num_threads or max(1, os.cpu_count() or 1),
        minloglevel=2,
    )
