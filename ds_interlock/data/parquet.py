"""One Billion Word from a local parquet / Arrow copy, read through ``datasets``.

Meant for a local copy of the Hub's parquet conversion of ``lm1b`` (a ``text`` column,
splits ``train`` and ``test``), or anything laid out alike: parquet or ``.arrow`` files
whose path names the split (``.../train/0000.parquet``, ``data/test-00000-of-00001.parquet``),
including a ``DatasetDict`` written by ``save_to_disk`` (``train/data-00000-of-00001.arrow``).
Only local files are opened; nothing is fetched.

Note: the ``test`` split of ``lm1b`` holds all 50 held-out shards, not only shard 00000;
``max_sentences`` can cut it to its first rows.

Table files that are found but not read (no split in the name, a split not used, hidden, a
broken symlink with a table name) are named with the reason in the train source's
``skipped_files``. Files are read one at a time, so skipped rows are counted per file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Sequence

from .cache import files_identity
from .lines import DEFAULT_MAX_CHARS, LineStats, TextSource, clean_line
from .textcheck import check_decoded, not_a_file_reason

TABLE_SUFFIXES = (".parquet", ".arrow")
SPLIT_ALIASES = {"train": ("train",), "test": ("test",), "validation": ("validation", "valid", "dev")}
_BATCH_ROWS = 2048


def _split_of(rel: Path) -> str | None:
    """The split a file belongs to, from a directory name or the file-name prefix."""
    for split, names in SPLIT_ALIASES.items():
        for part in rel.parts[:-1]:
            if part.lower() in names:
                return split
        stem = rel.name.lower()
        for n in names:
            if stem.startswith(n + "-") or stem.startswith(n + "_") or stem.startswith(n + "."):
                return split
    return None


def looks_like_tables(data_dir: str | os.PathLike) -> bool:
    p = Path(data_dir)
    if p.is_file():
        return p.name.endswith(TABLE_SUFFIXES)
    return p.is_dir() and any(f.name.endswith(TABLE_SUFFIXES) for f in p.rglob("*") if f.is_file())


def find_table_files(data_dir: str | os.PathLike,
                     skipped: list[tuple[str, str]] | None = None) -> dict[str, list[Path]]:
    """Map split name -> sorted parquet/arrow files found under ``data_dir``.

    (path, reason) of each table-named entry that is not used is appended to ``skipped``.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"parquet/arrow data directory not found: {root}")
    skipped = [] if skipped is None else skipped
    splits: dict[str, list[Path]] = {}
    for f in sorted(root.rglob("*")):
        # A directory with a table name (Spark's out.parquet/part-0.parquet) is searched, not skipped.
        if not f.name.endswith(TABLE_SUFFIXES) or f.is_dir():
            continue
        split = _split_of(f.relative_to(root))
        if why := not_a_file_reason(f):
            skipped.append((str(f), why))
        elif f.name.startswith("."):
            skipped.append((str(f), "a hidden file"))
        elif split is None:
            skipped.append((str(f), "no split (train/test/validation) in its path"))
        else:
            splits.setdefault(split, []).append(f)
    return splits


class TableSource(TextSource):
    """One split of a local table dataset: parquet or arrow files, all of one kind, read
    with ``load_dataset(kind, data_files=..., streaming=True)`` in row batches, so the
    split is never loaded whole and no Arrow copy is written to the datasets cache.
    """

    def __init__(self, files: Sequence[str | os.PathLike], column: str = "text",
                 name: str = "text", split: str | None = None, max_sentences: int | None = None):
        self.files = [Path(f) for f in files]
        if not self.files:
            raise ValueError("TableSource needs at least one file")
        kinds = {f.suffix for f in self.files}
        if len(kinds) != 1 or not kinds <= {".parquet", ".arrow"}:
            raise ValueError(f"TableSource needs only .parquet or only .arrow files, got {sorted(kinds)}")
        for f in self.files:
            if why := not_a_file_reason(f):
                raise FileNotFoundError(f"table file {why}: {f}")
        self.column = column
        self.name = name
        self.split = split
        self.max_sentences = max_sentences

    def __repr__(self) -> str:
        return f"TableSource({len(self.files)} files, first={self.files[0]}, column={self.column!r})"

    def identity(self) -> list:
        return [files_identity(self.files), self.column, self.split, self.max_sentences]

    def _open(self, f: Path):
        """One file as a streaming dataset (one at a time, so that counts are per file)."""
        import datasets  # heavy import, only when a table source is used

        ds = datasets.load_dataset(f.suffix[1:], data_files=[str(f)], split="train", streaming=True)
        if ds.column_names is not None and self.column not in ds.column_names:
            raise KeyError(f"column {self.column!r} not found in {f} ({self!r}); columns: {ds.column_names}")
        return ds

    def _values(self, f: Path) -> Iterator:
        for batch in self._open(f).iter(batch_size=_BATCH_ROWS):
            yield from batch[self.column]

    def _num_rows(self) -> int | None:
        """Rows to read, for the progress bar (parquet metadata; None for arrow)."""
        try:
            import pyarrow.parquet as pq
            num_rows = sum(pq.ParquetFile(f).metadata.num_rows for f in self.files)
        except Exception:  # only used for the progress bar
            num_rows = None
        if self.max_sentences is not None:
            num_rows = self.max_sentences if num_rows is None else min(num_rows, self.max_sentences)
        return num_rows

    def _read(self, stats: LineStats, max_chars: int, n: int | None = None, bar=None) -> Iterator[str]:
        """Clean lines of every file in turn (at most ``n``), counted per file in ``stats``."""
        remaining, produced = self.max_sentences, 0
        for f in self.files:
            before = stats.copy()
            try:
                for value in self._values(f):
                    if remaining == 0 or (n is not None and produced >= n):
                        break
                    if remaining is not None:
                        remaining -= 1
                    if bar is not None:
                        bar.update(1)
                    text = clean_line(value, stats, max_chars)
                    if text is not None:
                        produced += 1
                        yield text
            finally:
                delta = stats.note_file(f, before)
            # Binary cells are decoded here too: refuse a file that is mostly not UTF-8.
            check_decoded(f, delta.bad_utf8, delta.kept + delta.bad_utf8 + delta.overlong)
            if remaining == 0 or (n is not None and produced >= n):
                return

    def iter_lines(self, stats, max_chars=DEFAULT_MAX_CHARS, progress=False, desc=None):
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=self._num_rows(), unit="sent", unit_scale=True, desc=desc or self.name)
        try:
            yield from self._read(stats, max_chars, bar=bar)
        finally:
            if bar is not None:
                bar.close()

    def sample_lines(self, n, stats, max_chars=DEFAULT_MAX_CHARS):
        # lm1b's train split comes from the shuffled shards, so its first rows are a fair sample.
        return self._read(stats, max_chars, n)


def open_table_corpus(data_dir: str | os.PathLike | None = None, *, data_files: dict | None = None,
                      column: str = "text", train_split: str = "train", heldout_split: str = "test",
                      heldout_max_sentences: int | None = None) -> tuple[TableSource, TableSource]:
    """(train source, held-out source) from a local directory or an explicit ``data_files`` map."""
    skipped: list[tuple[str, str]] = []
    if data_files is not None:
        splits = {k: [Path(f) for f in ([v] if isinstance(v, (str, os.PathLike)) else v)]
                  for k, v in data_files.items()}
    else:
        if data_dir is None:
            raise ValueError("give data_dir or data_files")
        root = Path(data_dir).expanduser()
        if not root.exists():
            raise FileNotFoundError(f"data_dir not found: {root}")
        if root.is_file():
            raise ValueError(f"{root} is a file: point data_dir at the directory holding the split "
                             "files, or pass data_files={'train': [...], 'test': [...]}")
        splits = find_table_files(root, skipped)
    for split in (train_split, heldout_split):
        if not splits.get(split):
            where = data_dir if data_files is None else "data_files"
            left_out = "".join(f"; {p}: {why}" for p, why in skipped[:5])
            raise FileNotFoundError(
                f"no parquet/arrow files for split {split!r} in {where} (found splits: {sorted(splits)}){left_out}")
    for split, files in sorted(splits.items()):
        if split not in (train_split, heldout_split):
            skipped += [(str(f), f"split {split!r} is not used") for f in files]
    train = TableSource(splits[train_split], column=column, name="train", split=train_split)
    train.skipped_files = skipped       # reported once, with the training source
    return (train, TableSource(splits[heldout_split], column=column, name="heldout", split=heldout_split,
                               max_sentences=heldout_max_sentences))
