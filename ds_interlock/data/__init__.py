"""Data pipeline for Transformer-LM training on One Billion Word (or a synthetic sample).

raw text (release dir / tarball / local parquet) -> cleaned lines (bad ones counted)
-> sentencepiece tokenizer (cached) -> memory-mapped token file (cached)
-> packed fixed-length (input_ids, labels) dataset -> seeded, DP-sharded batch iterator.
"""

from .batching import batch_iterator, batches_per_epoch, epoch_permutation, shard_indices
from .cache import CorruptCacheError, remove_stale_temps
from .lines import DEFAULT_MAX_CHARS, FileSource, LineStats, TextSource, clean_line
from .packing import PackedLMDataset
from .parquet import TableSource, find_table_files, open_table_corpus
from .prepare import LMData, detect_source, prepare_lm_data, sample_corpus_dir
from .raw import (HELDOUT_DIR, RELEASE_DIR, TARBALL_NAME, TEST_SHARD, TRAIN_DIR, RawRelease,
                  heldout_shard_name, locate_release, train_shard_name)
from .textcheck import NotTextError
from .tokenizer import SpmTokenizer, load_tokenizer, train_or_load_tokenizer
from .tokens import (TextCounts, TokenFile, count_words_and_tokens, encode_to_token_file,
                     token_dtype, word_perplexity)

__all__ = [
    "prepare_lm_data", "LMData", "detect_source", "sample_corpus_dir",
    "locate_release", "RawRelease", "RELEASE_DIR", "TARBALL_NAME", "TRAIN_DIR", "HELDOUT_DIR",
    "TEST_SHARD", "train_shard_name", "heldout_shard_name",
    "open_table_corpus", "find_table_files", "TableSource",
    "TextSource", "FileSource", "LineStats", "clean_line", "DEFAULT_MAX_CHARS",
    "train_or_load_tokenizer", "load_tokenizer", "SpmTokenizer",
    "encode_to_token_file", "TokenFile", "TextCounts", "count_words_and_tokens",
    "word_perplexity", "token_dtype",
    "PackedLMDataset", "batch_iterator", "shard_indices", "batches_per_epoch", "epoch_permutation",
    "NotTextError", "CorruptCacheError", "remove_stale_temps",
    "write_sample_corpus", "generate_sentences",
]


def __getattr__(name):
    # ``sample`` is imported on first use, not here, so that
    # ``python -m ds_interlock.data.sample`` does not find it already imported.
    if name in ("write_sample_corpus", "generate_sentences"):
        from . import sample
        return getattr(sample, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
