"""Reading the raw One Billion Word layout: release dir, parent dir, tarball, and errors."""

import os
import shutil
import tarfile

import pytest

from ds_interlock.data import (HELDOUT_DIR, RELEASE_DIR, TARBALL_NAME, TRAIN_DIR, LineStats,
                               detect_source, locate_release, write_sample_corpus)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    write_sample_corpus(root, num_train_shards=3, sentences_per_shard=40,
                        num_heldout_shards=2, heldout_sentences_per_shard=10)
    return root


@pytest.fixture(scope="module")
def tarball(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("tar") / TARBALL_NAME
    with tarfile.open(out, "w:gz") as tar:
        tar.add(corpus / RELEASE_DIR, arcname=RELEASE_DIR)
    return out


def _read(release, which="train"):
    src = release.train_source() if which == "train" else release.heldout_source()
    return list(src.iter_lines(LineStats()))


def test_release_dir_and_parent(corpus):
    direct = locate_release(corpus / RELEASE_DIR)
    parent = locate_release(corpus)
    assert direct.root == parent.root == corpus / RELEASE_DIR
    files = direct.train_files()
    assert [f.name for f in files] == [f"news.en-0000{i}-of-00100" for i in (1, 2, 3)]
    assert [f.name for f in direct.heldout_files()] == ["news.en.heldout-00000-of-00050"]
    assert [f.name for f in direct.heldout_files([1])] == ["news.en.heldout-00001-of-00050"]
    assert [f.name for f in direct.heldout_files(None)] == [
        "news.en.heldout-00000-of-00050", "news.en.heldout-00001-of-00050"]
    lines = _read(direct)
    assert len(lines) == 120
    first = (corpus / RELEASE_DIR / TRAIN_DIR / "news.en-00001-of-00100").read_text().splitlines()
    assert lines[:40] == first
    assert [f.name for f in direct.train_files([2])] == ["news.en-00002-of-00100"]


def test_tarball_is_unpacked_once(corpus, tarball, tmp_path):
    extract = tmp_path / "extract"
    rel = locate_release(tarball, extract_dir=extract)
    assert rel.root.name == RELEASE_DIR and extract in rel.root.parents
    assert _read(rel) == _read(locate_release(corpus))
    assert _read(rel, "heldout") == _read(locate_release(corpus), "heldout")
    shard = rel.train_path(1)
    mtime = shard.stat().st_mtime_ns
    again = locate_release(tarball, extract_dir=extract)
    assert again.root == rel.root and shard.stat().st_mtime_ns == mtime   # reused, not rewritten
    assert [p.name for p in extract.iterdir()] == [rel.root.parent.name]  # no temp dirs left
    with pytest.raises(ValueError, match="extract_dir"):
        locate_release(tarball)


def test_parent_holding_only_tarball(tarball, tmp_path):
    parent = tmp_path / "dl"
    parent.mkdir()
    shutil.copy(tarball, parent / TARBALL_NAME)
    rel = locate_release(parent, extract_dir=tmp_path / "x")
    assert len(rel.train_files()) == 3
    assert detect_source(parent) == "raw"


def test_tarball_without_shards(tmp_path):
    bad = tmp_path / "empty.tar.gz"
    (tmp_path / "readme").write_text("hi")
    with tarfile.open(bad, "w:gz") as tar:
        tar.add(tmp_path / "readme", arcname="readme")
    with pytest.raises(FileNotFoundError, match="no One Billion Word shards"):
        locate_release(bad, extract_dir=tmp_path / "x")


def test_missing_data_dir_names_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError) as e:
        locate_release(missing)
    assert str(missing) in str(e.value)
    with pytest.raises(FileNotFoundError) as e:
        detect_source(missing)
    assert str(missing) in str(e.value)


def test_dir_without_release_names_expected_path(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        locate_release(tmp_path)
    assert str(tmp_path / RELEASE_DIR / TRAIN_DIR) in str(e.value)


def test_missing_shard_names_exact_path(corpus):
    rel = locate_release(corpus)
    with pytest.raises(FileNotFoundError) as e:
        rel.train_files([1, 7])
    assert str(corpus / RELEASE_DIR / TRAIN_DIR / "news.en-00007-of-00100") in str(e.value)
    with pytest.raises(FileNotFoundError) as e:
        rel.heldout_files([5])
    assert str(corpus / RELEASE_DIR / HELDOUT_DIR / "news.en.heldout-00005-of-00050") in str(e.value)
    with pytest.raises(ValueError):
        rel.train_files([0])          # shard 00000 is not a training shard
    with pytest.raises(ValueError):
        rel.heldout_files([50])


def test_missing_split_directory_names_path(tmp_path):
    release = write_sample_corpus(tmp_path, num_train_shards=1, sentences_per_shard=5)
    shutil.rmtree(release / HELDOUT_DIR)
    rel = locate_release(release)
    assert len(rel.train_files()) == 1
    with pytest.raises(FileNotFoundError) as e:
        rel.heldout_files()
    assert str(release / HELDOUT_DIR) in str(e.value)
    for f in (release / TRAIN_DIR).iterdir():
        os.remove(f)
    with pytest.raises(FileNotFoundError) as e:
        rel.train_files()
    assert str(release / TRAIN_DIR) in str(e.value)


# --- nothing left out without a word (issue 13) ---

def test_unusable_shards_are_named_not_dropped(tmp_path):
    release = write_sample_corpus(tmp_path, num_train_shards=4, sentences_per_shard=10)
    train = release / TRAIN_DIR
    shard2, shard3 = train / "news.en-00002-of-00100", train / "news.en-00003-of-00100"
    shard2.unlink()
    shard2.mkdir()                                   # a directory with a shard's name
    shard3.unlink()
    shard3.symlink_to(tmp_path / "elsewhere" / "news.en-00003-of-00100")    # broken symlink
    (train / "README").write_text("not a shard")
    (train / ".news.en-00005-of-00100.tmp-h-1-0badcafe").write_text("half")
    rel = locate_release(release)
    src = rel.train_source()
    assert [p.name for p in src.paths] == ["news.en-00001-of-00100", "news.en-00004-of-00100"]
    assert dict(src.skipped_files) == {
        str(train / ".news.en-00005-of-00100.tmp-h-1-0badcafe"): "a temporary file of an interrupted write",
        str(train / "README"): "not a training shard name (news.en-00001-of-00100 .. news.en-00099-of-00100)",
        str(shard2): "is a directory, not a file",
        str(shard3): f"is a broken symlink (to {tmp_path / 'elsewhere' / 'news.en-00003-of-00100'})"}
    assert len(list(src.iter_lines(LineStats()))) == 20
    # asked for by number: refused, with the reason
    with pytest.raises(FileNotFoundError, match="is a directory") as e:
        rel.train_files([1, 2])
    assert str(shard2) in str(e.value)
    with pytest.raises(FileNotFoundError, match="broken symlink") as e:
        rel.train_source([3])
    assert str(shard3) in str(e.value)
    assert rel.train_source([1]).skipped_files == []


def test_no_usable_shard_says_what_was_there(tmp_path):
    release = write_sample_corpus(tmp_path, num_train_shards=1, sentences_per_shard=5)
    shard = release / TRAIN_DIR / "news.en-00001-of-00100"
    shard.unlink()
    shard.mkdir()
    with pytest.raises(FileNotFoundError, match="is a directory") as e:
        locate_release(release).train_files()
    assert str(shard) in str(e.value)


def test_tarball_members_left_out_are_named(corpus, tmp_path):
    tarball = tmp_path / TARBALL_NAME
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(corpus / RELEASE_DIR, arcname=RELEASE_DIR)
        link = tarfile.TarInfo(f"{RELEASE_DIR}/{TRAIN_DIR}/news.en-00009-of-00100")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    member = f"{tarball}:{RELEASE_DIR}/{TRAIN_DIR}/news.en-00009-of-00100"
    for _ in range(2):        # unpacked, then from the unpacked cache: the same report
        rel = locate_release(tarball, extract_dir=tmp_path / "x")
        assert rel.train_source().skipped_files == [(member, "is a symlink in the tarball, not a regular file")]
        assert rel.heldout_source(None).skipped_files == []
        assert len(rel.train_files()) == 3
