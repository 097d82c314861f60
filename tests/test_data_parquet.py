"""A local parquet / Arrow copy read through `datasets` (never fetched)."""

import datasets
import pytest

from ds_interlock.data import (LineStats, detect_source, find_table_files, open_table_corpus,
                               prepare_lm_data)

TRAIN = ["the cat sat .", None, "  ", "a dog ran home .", "x" * 300, "birds fly south ."] * 20
TEST = ["the cat ran .", "", "a bird sat ."]


@pytest.fixture(scope="module")
def pq_dir(tmp_path_factory):
    # The Hub's parquet conversion layout: <config>/<split>/0000.parquet
    root = tmp_path_factory.mktemp("lm1b_parquet")
    for split, rows in (("train", TRAIN), ("test", TEST)):
        (root / "plain_text" / split).mkdir(parents=True)
        datasets.Dataset.from_dict({"text": rows}).to_parquet(str(root / "plain_text" / split / "0000.parquet"))
    return root


def test_finds_splits_and_reads_rows(pq_dir):
    splits = find_table_files(pq_dir)
    assert sorted(splits) == ["test", "train"]
    train, test = open_table_corpus(pq_dir)
    stats = LineStats()
    lines = list(train.iter_lines(stats, max_chars=200))
    assert lines == ["the cat sat .", "a dog ran home .", "birds fly south ."] * 20
    assert (stats.kept, stats.empty, stats.overlong, stats.bad_utf8) == (60, 40, 20, 0)
    stats = LineStats()
    assert list(test.iter_lines(stats, progress=True)) == ["the cat ran .", "a bird sat ."]
    assert stats.empty == 1
    assert list(train.sample_lines(2, LineStats())) == ["the cat sat .", "a dog ran home ."]
    assert detect_source(pq_dir) == "parquet"


def test_file_name_splits_and_data_files(tmp_path):
    (tmp_path / "data").mkdir()
    datasets.Dataset.from_dict({"sentence": ["one two", "three"]}).to_parquet(
        str(tmp_path / "data" / "train-00000-of-00001.parquet"))
    datasets.Dataset.from_dict({"sentence": ["four"]}).to_parquet(
        str(tmp_path / "data" / "test-00000-of-00001.parquet"))
    train, test = open_table_corpus(tmp_path, column="sentence")
    assert list(train.iter_lines(LineStats())) == ["one two", "three"]
    train2, _ = open_table_corpus(data_files={"train": str(tmp_path / "data" / "train-00000-of-00001.parquet"),
                                              "test": [tmp_path / "data" / "test-00000-of-00001.parquet"]},
                                  column="sentence")
    assert list(train2.iter_lines(LineStats())) == ["one two", "three"]
    bad_col, _ = open_table_corpus(tmp_path, column="text")
    with pytest.raises(KeyError, match="sentence"):
        list(bad_col.iter_lines(LineStats()))


def test_heldout_max_sentences(pq_dir):
    _, test = open_table_corpus(pq_dir, heldout_max_sentences=2)
    assert list(test.iter_lines(LineStats())) == ["the cat ran ."]


def test_missing_split_and_dir(tmp_path, pq_dir):
    (tmp_path / "train").mkdir()
    datasets.Dataset.from_dict({"text": ["a"]}).to_parquet(str(tmp_path / "train" / "0.parquet"))
    with pytest.raises(FileNotFoundError, match="'test'"):
        open_table_corpus(tmp_path)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        open_table_corpus(tmp_path / "nope")


def test_arrow_saved_dataset_dict(tmp_path):
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a b", "c d e"]}),
                               "test": datasets.Dataset.from_dict({"text": ["f g"]})})
    dd.save_to_disk(str(tmp_path / "saved"))
    train, test = open_table_corpus(tmp_path / "saved")
    assert list(train.iter_lines(LineStats())) == ["a b", "c d e"]
    assert list(test.iter_lines(LineStats())) == ["f g"]


def test_prepare_from_parquet(pq_dir, tmp_path):
    data = prepare_lm_data(pq_dir, tmp_path / "cache", vocab_size=40, seq_len=4, max_chars=200,
                           progress=False, tokenizer_sample_sentences=1000, model_type="char")
    assert data.source == "parquet"
    assert data.train_stats.kept == 60 and data.train_stats.overlong == 20
    assert data.heldout_counts.sentences == 2
    assert data.heldout_counts.words == 4 + 4 + 2          # words + one EOS per sentence
    expected = [t for s in ("the cat ran .", "a bird sat .") for t in data.tokenizer.encode(s) + [data.eos_id]]
    assert data.heldout_counts.tokens == len(expected) == data.heldout_tokens.num_tokens
    assert data.heldout_tokens.open().tolist() == expected
    assert len(data.heldout) == (len(expected) - 1) // 4


# --- table files left out are named; skipped rows are counted per file (issue 13) ---

def test_unused_table_files_named_and_rows_counted_per_file(tmp_path):
    def write(rel, rows):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_dict({"text": rows}).to_parquet(str(tmp_path / rel))

    write("train/0.parquet", ["a b", None, "c d"])
    write("train/1.parquet", ["e f", "g"])
    write("test/0.parquet", ["h i"])
    write("validation/0.parquet", ["j"])
    write("extra/0.parquet", ["k"])
    write("train/2.parquet/part-0.parquet", [" ", "l m"])           # Spark's layout: a directory is searched
    (tmp_path / "train" / "3.parquet").symlink_to(tmp_path / "gone.parquet")
    train, test = open_table_corpus(tmp_path)
    assert [str(f.relative_to(tmp_path)) for f in train.files] == [
        "train/0.parquet", "train/1.parquet", "train/2.parquet/part-0.parquet"]
    assert dict(train.skipped_files) == {
        str(tmp_path / "extra" / "0.parquet"): "no split (train/test/validation) in its path",
        str(tmp_path / "train" / "3.parquet"): f"is a broken symlink (to {tmp_path / 'gone.parquet'})",
        str(tmp_path / "validation" / "0.parquet"): "split 'validation' is not used"}
    stats = LineStats()
    assert list(train.iter_lines(stats)) == ["a b", "c d", "e f", "g", "l m"]
    part = tmp_path / "train" / "2.parquet" / "part-0.parquet"
    assert stats.per_file == {str(tmp_path / "train" / "0.parquet"): LineStats(kept=2, empty=1),
                              str(tmp_path / "train" / "1.parquet"): LineStats(kept=2),
                              str(part): LineStats(kept=1, empty=1)}
    assert stats.dropped_by_file() == [f"{tmp_path / 'train' / '0.parquet'}: dropped 1 of 3 lines (empty=1)",
                                       f"{part}: dropped 1 of 2 lines (empty=1)"]
    with pytest.raises(FileNotFoundError, match="is a directory"):
        open_table_corpus(data_files={"train": str(tmp_path / "train" / "2.parquet"),
                                      "test": str(tmp_path / "test" / "0.parquet")})
    data = prepare_lm_data(tmp_path, tmp_path / "cache", vocab_size=30, seq_len=2, progress=False,
                           model_type="char")
    assert f"skipped file {tmp_path / 'validation' / '0.parquet'}: split 'validation' is not used" in data.summary()
    assert "0.parquet: dropped 1 of 3 lines (empty=1)" in data.summary()
