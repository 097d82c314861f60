"""Refuse input that is not UTF-8 text, and say why a path is not a readable file.

Text in another encoding does not fail by itself: UTF-16 splits into lines of garbage pieces
(about twice the tokens), and a Latin-1 shard loses every line with an accent to the bad-UTF-8
counter. Such a file is refused with its path and the reason, from its first bytes when they
already show it, else after it has been read. A few bad lines in a UTF-8 file stay skipped
and counted (:class:`~ds_interlock.data.lines.LineStats`).
"""

from __future__ import annotations

import os
from pathlib import Path

SNIFF_BYTES = 4096          # BOM and NUL bytes are looked for here
HEAD_BYTES = 64 * 1024      # lines that do not decode are counted here, before the file is read
# A file is "not UTF-8" when at least this many of its lines, and this share of its non-empty
# lines, do not decode. The real corpus has none; a Latin-1 copy has one per accented line.
BAD_LINES_MIN = 10
BAD_LINES_SHARE = 0.01

_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"),
         (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16"))
_MAGIC = ((b"\x1f\x8b", "gzip"), (b"\xfd7zXZ\x00", "xz"), (b"PK\x03\x04", "zip"))   # none can start text


class NotTextError(ValueError):
    """A corpus file that is not UTF-8 text; the message names the file and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path}: not UTF-8 text ({reason}); convert it to UTF-8 "
                         f"(e.g. iconv -f <encoding> -t UTF-8) or leave it out")


def not_a_file_reason(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be read as a corpus file, or None if it is a regular file (or a link to one)."""
    p = Path(path)
    if p.is_file():
        return None
    if p.is_symlink():
        return f"is a broken symlink (to {os.readlink(p)})"
    if p.is_dir():
        return "is a directory, not a file"
    if p.exists():
        return "is not a regular file"
    return "not found"


def too_many_bad_lines(bad: int, nonempty: int) -> bool:
    return bad >= BAD_LINES_MIN and bad >= BAD_LINES_SHARE * nonempty


def bad_lines_reason(bad: int, nonempty: int, where: str = "") -> str:
    return (f"{bad} of {nonempty} non-empty lines{where} do not decode as UTF-8: "
            "Latin-1 or another 8-bit encoding?")


def sniff_head(head: bytes) -> str | None:
    """Why the first bytes of a file show it is not UTF-8 text, or None."""
    for bom, name in _BOMS:
        if head.startswith(bom):
            return f"looks like {name} (byte-order mark)"
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return f"looks like a {name} file"
    if b"\x00" in head[:SNIFF_BYTES]:
        return (f"NUL bytes in the first {SNIFF_BYTES // 1024} KiB: binary data, "
                "or UTF-16/32 without a byte-order mark")
    if len(head) > HEAD_BYTES - 1 and b"\n" in head:
        head = head[:head.rindex(b"\n")]   # the last line may be cut inside a character
    bad = nonempty = 0
    for line in head.split(b"\n"):
        if not line.strip():
            continue
        nonempty += 1
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            bad += 1
    if too_many_bad_lines(bad, nonempty):
        return bad_lines_reason(bad, nonempty, f" in the first {HEAD_BYTES // 1024} KiB")
    return None


def check_text_file(path: str | os.PathLike) -> None:
    """Raise :class:`NotTextError` if the head of ``path`` shows it is not UTF-8 text."""
    with open(path, "rb") as f:
        reason = sniff_head(f.read(HEAD_BYTES))
    if reason:
        raise NotTextError(path, reason)


def check_decoded(path: str | os.PathLike, bad: int, nonempty: int) -> None:
    """Raise :class:`NotTextError` if too many of the lines read from ``path`` did not decode."""
    if too_many_bad_lines(bad, nonempty):
        raise NotTextError(path, bad_lines_reason(bad, nonempty))
