"""Bad lines are skipped and counted per reason, never fatal."""

import pytest

from ds_interlock.data import FileSource, LineStats, clean_line

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
