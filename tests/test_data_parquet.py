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
