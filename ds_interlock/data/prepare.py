"""One call that gives the training script everything it needs from the data side.

Every step (sample corpus, tarball unpacking, tokenizer, token files) is cached under
``cache_dir`` and published by atomic rename, so the caller can run this on local rank 0
first and then, after a barrier, on the other ranks, which only re-open the files.

Nothing is left out silently: :meth:`LMData.summary` (printed by the training script at
start-up) names every file left out and why, the files that had lines dropped and how many,
the temporary files of killed builds removed at this start, and cache entries rebuilt.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import sentencepiece as spm

from .cache import cache_key, make_temp_dir_beside, publish_dir, remove_stale_temps
from .lines import DEFAULT_MAX_CHARS, LineStats
from .packing import PackedLMDataset
from .parquet import looks_like_tables, open_table_corpus
from .raw import RELEASE_DIR, TEST_SHARD, locate_release, looks_like_raw
from .tokenizer import DEFAULT_SAMPLE_SENTENCES, DEFAULT_VOCAB_SIZE, train_or_load_tokenizer
from .tokens import TextCounts, TokenFile, encode_to_token_file


@dataclass
class LMData:
    """What :func:`prepare_lm_data` returns."""

    train: PackedLMDataset
    heldout: PackedLMDataset               # held-out shard 00000 (raw) or the test split (parquet)
    tokenizer: spm.SentencePieceProcessor
    tokenizer_path: Path
    vocab_size: int                        # actual size of the trained model (may be < requested)
    eos_id: int
    train_stats: LineStats                 # bad lines skipped while encoding, per reason
    heldout_stats: LineStats
    train_counts: TextCounts               # sentences / words (+1 EOS each) / tokens (+1 EOS each)
    heldout_counts: TextCounts
    source: str                            # "raw" or "parquet"
    data_dir: Path
    train_tokens: TokenFile
    heldout_tokens: TokenFile
    built: dict = field(default_factory=dict)   # step -> True if built by this call, False if loaded
    skipped_files: list = field(default_factory=list)   # (path, reason) of corpus files left out
    notes: list = field(default_factory=list)           # stale temps removed, corrupt caches rebuilt

    def word_perplexity(self, mean_token_nll: float) -> float:
        """Per-word held-out perplexity from the mean per-token NLL (nats) on the held-out set."""
        return self.heldout_counts.word_perplexity(mean_token_nll)

    def summary(self) -> str:
        return "\n".join([
            f"data: {self.source} corpus at {self.data_dir}",
            *(f"  skipped file {path}: {why}" for path, why in self.skipped_files),
            f"tokenizer: {self.tokenizer_path} (vocab {self.vocab_size}, eos {self.eos_id})",
            f"train: {self.train_counts.sentences} sentences, {self.train_counts.tokens} tokens, "
            f"{len(self.train)} sequences of {self.train.seq_len}; lines {self.train_stats}",
            *(f"  {line}" for line in self.train_stats.dropped_by_file()),
            f"heldout: {self.heldout_counts.sentences} sentences, {self.heldout_counts.words} words, "
            f"{self.heldout_counts.tokens} tokens ({self.heldout_counts.tokens_per_word:.3f} tokens/word), "
            f"{len(self.heldout)} sequences; lines {self.heldout_stats}",
            *(f"  {line}" for line in self.heldout_stats.dropped_by_file()),
            "built: " + ", ".join(f"{k}={'built' if v else 'cached'}" for k, v in self.built.items()),
            *(f"note: {n}" for n in self.notes),
        ])


# The cache sub-directories whose entries are built by temp + rename (a killed build leaves its temp).
CACHE_SUBDIRS = ("sample_corpus", "extracted", "tokenizer", "tokens")


def clean_cache_dir(cache_dir: str | os.PathLike) -> list[str]:
    """Remove what killed builds left in ``cache_dir``; one line per removed temp, for the summary."""
    return [f"removed {path}: {why}" for sub in CACHE_SUBDIRS
            for path, why in remove_stale_temps(Path(cache_dir) / sub)]


def sample_corpus_dir(cache_dir: str | os.PathLike, num_train_shards: int = 4,
                      sentences_per_shard: int = 10_000, seed: int = 0, **kwargs) -> tuple[Path, bool]:
    """Generate the synthetic sample corpus under ``cache_dir`` once; (release dir, built)."""
    from .sample import GENERATOR_VERSION, write_sample_corpus  # lazy: see __init__

    settings = {"num_train_shards": num_train_shards, "sentences_per_shard": sentences_per_shard,
                "seed": seed, "version": GENERATOR_VERSION, **kwargs}
    final = Path(cache_dir) / "sample_corpus" / f"sample-{cache_key(settings, 12)}"
    if (final / RELEASE_DIR).is_dir():
        return final / RELEASE_DIR, False
    tmp = make_temp_dir_beside(final)
    try:
        write_sample_corpus(tmp, num_train_shards, sentences_per_shard, seed, **kwargs)
        publish_dir(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final / RELEASE_DIR, True


def detect_source(data_dir: str | os.PathLike) -> str:
    """'raw' for a release dir / parent / tarball, 'parquet' for parquet or arrow files."""
    p = Path(data_dir).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"data_dir not found: {p}")
    if looks_like_raw(p):
        return "raw"
    if looks_like_tables(p):
        return "parquet"
    raise FileNotFoundError(f"no One Billion Word data under {p}: expected {p / RELEASE_DIR} "
                            f"(raw release), its tarball, or parquet/arrow files with train/test splits")


def prepare_lm_data(data_dir: str | os.PathLike | None = None,
                    cache_dir: str | os.PathLike | None = None, *,
                    vocab_size: int = DEFAULT_VOCAB_SIZE,
                    seq_len: int = 256,
                    source: str = "auto",
                    train_shards: Sequence[int] | None = None,
                    heldout_shard: int = TEST_SHARD,
                    tokenizer_sample_sentences: int = DEFAULT_SAMPLE_SENTENCES,
                    model_type: str = "unigram",
                    max_chars: int = DEFAULT_MAX_CHARS,
                    text_column: str = "text",
                    heldout_max_sentences: int | None = None,
                    sample_corpus: dict | None = None,
                    progress: bool = True) -> LMData:
    """Locate the corpus, build or load the tokenizer and token files, and pack them.

    data_dir: None generates (once) the synthetic sample corpus under ``cache_dir``
        (``sample_corpus`` holds keyword arguments for :func:`write_sample_corpus`);
        otherwise the raw release dir, its parent or tarball, or a parquet/arrow directory.
    cache_dir: where the tokenizer, token files and sample corpus are cached; None = the
        user's cache directory (ds_interlock/paths.py), sub-directory ``lm_data``.
    source: 'auto' (detect), 'raw' or 'parquet'.
    train_shards: raw training shard numbers (1..99) to use; None uses every shard present.
    heldout_shard: raw held-out shard used for evaluation (00000 is the test set).
    heldout_max_sentences: parquet only, keep the first N rows of the test split.
    """
    if cache_dir is None:
        from ..paths import default_cache_dir
        cache_dir = default_cache_dir() / "lm_data"
    cache_dir = Path(cache_dir).expanduser()
    notes = clean_cache_dir(cache_dir)
    built: dict[str, bool] = {}
    if data_dir is None:
        data_dir, built["sample_corpus"] = sample_corpus_dir(cache_dir, **(sample_corpus or {}))
        source = "raw"
    data_dir = Path(data_dir).expanduser()
    if source == "auto":
        source = detect_source(data_dir)
    if source == "raw":
        release = locate_release(data_dir, extract_dir=cache_dir / "extracted")
        train_src = release.train_source(train_shards)
        heldout_src = release.heldout_source([heldout_shard])
    elif source == "parquet":
        train_src, heldout_src = open_table_corpus(data_dir, column=text_column,
                                                   heldout_max_sentences=heldout_max_sentences)
    else:
        raise ValueError(f"source must be 'auto', 'raw' or 'parquet', got {source!r}")

    tok = train_or_load_tokenizer(train_src, cache_dir, vocab_size=vocab_size,
                                  sample_sentences=tokenizer_sample_sentences,
                                  model_type=model_type, max_chars=max_chars)
    built["tokenizer"] = tok.built
    train_tf = encode_to_token_file(train_src, tok, cache_dir, name="train",
                                    max_chars=max_chars, progress=progress)
    heldout_tf = encode_to_token_file(heldout_src, tok, cache_dir, name="heldout",
                                      max_chars=max_chars, progress=progress)
    built["train_tokens"], built["heldout_tokens"] = train_tf.built, heldout_tf.built
    notes += [f"rebuilt: {tf.rebuilt_because}" for tf in (train_tf, heldout_tf) if tf.rebuilt_because]
    return LMData(
        train=PackedLMDataset(train_tf, seq_len),
        heldout=PackedLMDataset(heldout_tf, seq_len),
        tokenizer=tok.processor, tokenizer_path=tok.path, vocab_size=tok.vocab_size,
        eos_id=tok.eos_id, train_stats=train_tf.stats, heldout_stats=heldout_tf.stats,
        train_counts=train_tf.counts, heldout_counts=heldout_tf.counts,
        source=source, data_dir=data_dir, train_tokens=train_tf, heldout_tokens=heldout_tf,
        built=built, skipped_files=[*train_src.skipped_files, *heldout_src.skipped_files], notes=notes)
