"""Fixed-length next-token windows over a memory-mapped token stream.

Sequence ``i`` reads tokens ``[i*T, i*T + T]`` (T+1 tokens): inputs are the first T, labels
the last T (inputs shifted by one). Consecutive windows overlap by one token, so every
token after the first is a target exactly once, and windows run across sentence
boundaries (sentences are separated by EOS in the stream). The tail that does not fill a
whole window is dropped. A token id at or above the vocabulary size (a corrupted token
file) raises an error naming the file, not an IndexError deep inside the embedding.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .cache import CorruptCacheError
from .tokens import TokenFile


class PackedLMDataset(Dataset):
    """A torch Dataset of ``(input_ids, labels)`` LongTensors of length ``seq_len``.

    Holds only the token file's path; the memmap is opened lazily in each process, so
    pickling the dataset (DataLoader workers) never copies the tokens.
    """

    def __init__(self, tokens: TokenFile | str | os.PathLike, seq_len: int,
                 dtype: np.dtype | str | None = None, num_tokens: int | None = None,
                 vocab_size: int | None = None):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.vocab_size = vocab_size
        if isinstance(tokens, TokenFile):
            self.path, self.dtype, self.num_tokens = tokens.path, tokens.dtype, tokens.num_tokens
            self.vocab_size = vocab_size or tokens.vocab_size
        else:
            if dtype is None:
                raise ValueError("dtype is needed when giving a path instead of a TokenFile")
            self.path, self.dtype = Path(tokens), np.dtype(dtype)
            self.num_tokens = num_tokens if num_tokens is not None else \
                self.path.stat().st_size // self.dtype.itemsize
        self.seq_len = seq_len
        self.num_sequences = max(0, (self.num_tokens - 1) // seq_len)
        if self.num_sequences == 0:
            raise ValueError(f"{self.path} has {self.num_tokens} tokens: too few for one "
                             f"sequence of seq_len={seq_len} (+1 for the shifted labels)")
        self._data = None

    def _tokens(self) -> np.memmap:
        if self._data is None:
            self._data = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))
        return self._data

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_data"] = None
        return state

    def __len__(self) -> int:
        return self.num_sequences

    def window(self, i: int) -> np.ndarray:
        """The T+1 tokens behind sequence ``i`` as int64."""
        if i < 0:
            i += self.num_sequences
        if not 0 <= i < self.num_sequences:
            raise IndexError(f"sequence {i} out of range 0..{self.num_sequences - 1}")
        start = i * self.seq_len
        w = np.asarray(self._tokens()[start:start + self.seq_len + 1], dtype=np.int64)
        if self.vocab_size is not None and w.max() >= self.vocab_size:
            j = int(np.argmax(w >= self.vocab_size))
            raise CorruptCacheError(
                f"token file {self.path} is corrupted: token {start + j} has id {int(w[j])}, not below the "
                f"vocabulary size {self.vocab_size}; delete it and its .json to rebuild it")
        return w

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.from_numpy(self.window(int(i)))
        return w[:-1], w[1:]

    def get_batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """Stack several sequences into ``(input_ids[B, T], labels[B, T])``."""
        w = torch.from_numpy(np.stack([self.window(int(i)) for i in indices]))
        return w[:, :-1], w[:, 1:]
