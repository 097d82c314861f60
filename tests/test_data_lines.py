"""Bad lines are skipped and counted per reason and per file, never fatal; a file that is not
UTF-8 text, or not a file, is refused by name."""

import gzip

import pytest

from ds_interlock.data import FileSource, LineStats, NotTextError, clean_line

BAD_FILE = (b"good line one\n"
            b"\n"
            b"   \t  \n"
            b"caf\xc3\xa9 is fine\n"          # valid UTF-8
            b"\xff\xfe broken bytes\n"        # invalid UTF-8
            b"x" + b" y" * 40 + b"\n"         # 81 chars: overlong for max_chars=50
            b"  padded  line \r\n"
            b"last line without newline")


def test_file_source_skips_and_counts(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(BAD_FILE)
    stats = LineStats()
    lines = list(FileSource([path]).iter_lines(stats, max_chars=50))
    assert lines == ["good line one", "café is fine", "padded  line", "last line without newline"]
    assert (stats.kept, stats.empty, stats.bad_utf8, stats.overlong) == (4, 2, 1, 1)
    assert stats.skipped == 4 and stats.total == 8
    assert str(stats) == "kept=4 skipped=4 (empty=2, bad_utf8=1, overlong=1)"


def test_limit_is_inclusive_and_sampling_counts(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"abcde\n" + b"abcdef\n" + b"\n" + b"ab\n")
    stats = LineStats()
    assert list(FileSource([path]).iter_lines(stats, max_chars=5)) == ["abcde", "ab"]
    assert stats.as_dict() == {"kept": 2, "empty": 1, "bad_utf8": 0, "overlong": 1}
    stats = LineStats()
    assert list(FileSource([path]).sample_lines(1, stats, max_chars=5)) == ["abcde"]
    assert stats.kept == 1


def test_clean_line_values():
    s = LineStats()
    assert clean_line(None, s) is None
    assert clean_line("", s) is None
    assert clean_line("a\nb  c", s) == "a b c"      # a table cell with a newline stays one line
    assert clean_line(b"\xc3", s) is None
    assert (s.kept, s.empty, s.bad_utf8) == (1, 2, 1)
    total = LineStats(kept=1, empty=2).add(LineStats(kept=3, overlong=4))
    assert total == LineStats(kept=4, empty=2, overlong=4)
    assert LineStats.from_dict(total.as_dict()) == total


def test_sample_lines_spreads_over_files(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("".join(f"a{i}\n" for i in range(10)))
    b.write_text("".join(f"b{i}\n" for i in range(10)))
    got = list(FileSource([a, b]).sample_lines(6, LineStats()))
    assert got == ["a0", "a1", "a2", "b0", "b1", "b2"]


def test_missing_file_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "gone")):
        FileSource([tmp_path / "gone"])


# --- input that is not UTF-8 text is refused with its path and why (issue 13) ---

def test_utf16_utf32_and_binary_refused_by_name(tmp_path):
    text = "the cat sat .\na dog ran .\n" * 50
    cases = {"utf16.txt": (text.encode("utf-16"), "looks like UTF-16 (byte-order mark)"),
             "utf16be.txt": (b"\xfe\xff" + text.encode("utf-16-be"), "looks like UTF-16 (byte-order mark)"),
             "utf32.txt": (text.encode("utf-32"), "looks like UTF-32 (byte-order mark)"),
             "nobom.txt": (text.encode("utf-16-le"), "NUL bytes in the first 4 KiB"),
             "shard.gz": (gzip.compress(text.encode()), "gzip")}
    for name, (data, why) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(NotTextError) as e:
            FileSource([path])
        assert str(path) in str(e.value) and why in str(e.value), name


def test_latin1_file_refused_from_its_head(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("le café est très bon .\n".encode("latin-1") * 100)
    with pytest.raises(NotTextError, match="100 of 100 non-empty lines in the first 64 KiB") as e:
        FileSource([path])
    assert e.value.path == path


def test_latin1_past_the_head_refused_after_reading(tmp_path):
    ok, path = tmp_path / "ok.txt", tmp_path / "late.txt"
    ok.write_text("fine line\n" * 10)
    # a clean head, then enough Latin-1 lines (>= 10 and >= 1%) further down
    path.write_bytes(b"plain ascii words here .\n" * 3000 + "déjà vu .\n".encode("latin-1") * 40)
    src = FileSource([ok, path])            # the first 64 KiB look fine
    with pytest.raises(NotTextError, match="40 of 3040 non-empty lines do not decode") as e:
        list(src.iter_lines(LineStats()))
    assert str(path) in str(e.value)
    with pytest.raises(NotTextError):
        list(src.sample_lines(10_000, LineStats()))


def test_isolated_bad_lines_are_counted_per_file(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("one\ntwo\n")
    b.write_bytes(b"three\n\xff bad\n\nfour\n")
    stats = LineStats()
    assert list(FileSource([a, b]).iter_lines(stats)) == ["one", "two", "three", "four"]
    assert stats == LineStats(kept=4, empty=1, bad_utf8=1)
    assert stats.per_file == {str(a): LineStats(kept=2), str(b): LineStats(kept=2, empty=1, bad_utf8=1)}
    assert stats.dropped_by_file() == [f"{b}: dropped 2 of 4 lines (empty=1, bad_utf8=1)"]
    assert stats.as_dict() == {"kept": 4, "empty": 1, "bad_utf8": 1, "overlong": 0}   # counts only
    again = LineStats.from_dict(stats.as_dict()).with_per_file(stats.per_file_as_dict())
    assert again.per_file == stats.per_file


def test_utf8_bom_is_not_part_of_the_first_sentence(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbfhello world\nsecond\n")
    assert list(FileSource([path]).iter_lines(LineStats())) == ["hello world", "second"]
    assert list(FileSource([path]).sample_lines(1, LineStats())) == ["hello world"]


def test_directory_or_broken_symlink_asked_for_is_refused(tmp_path):
    (tmp_path / "adir").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    with pytest.raises(FileNotFoundError, match="is a directory") as e:
        FileSource([tmp_path / "adir"])
    assert str(tmp_path / "adir") in str(e.value)
    with pytest.raises(FileNotFoundError, match="broken symlink") as e:
        FileSource([tmp_path / "link"])
    assert str(tmp_path / "link") in str(e.value)
