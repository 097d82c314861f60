"""The One Billion Word raw release layout (directory or tarball).

``data_dir`` may be the release directory itself, its parent, the ``.tar.gz`` tarball, or a
parent holding only the tarball. A tarball is unpacked once into a cache directory (keyed
by its path, size and mtime) because sampling, encoding and counting each read the shards.
Shards that are present are used (a sample corpus has fewer); everything else in a shard
directory (a directory or broken symlink with a shard's name, a stray file) is left out and
named, with the reason, in the source's ``skipped_files`` for the start-up summary, and so
are tarball members that are not extracted. Asking for a shard that is not there, or is not
a regular file, raises ``FileNotFoundError`` naming the exact path and the reason.
"""

from __future__ import annotations

import os
import shutil
import tarfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Sequence

from .cache import atomic_write_json, cache_key, file_identity, make_temp_dir_beside, publish_dir, read_json
from .lines import FileSource
from .textcheck import not_a_file_reason

RELEASE_DIR = "1-billion-word-language-modeling-benchmark-r13output"
TARBALL_NAME = RELEASE_DIR + ".tar.gz"
TRAIN_DIR = "training-monolingual.tokenized.shuffled"
HELDOUT_DIR = "heldout-monolingual.tokenized.shuffled"
TRAIN_SHARDS = range(1, 100)     # news.en-00001-of-00100 .. 00099 (00000 became held-out)
HELDOUT_SHARDS = range(0, 50)    # news.en.heldout-00000-of-00050 .. 00049
TEST_SHARD = 0                   # held-out shard 00000 is the conventional test set
TARBALL_SUFFIXES = (".tar.gz", ".tgz", ".tar")
SKIPPED_MEMBERS = "skipped_members.json"   # beside an unpacked release: tarball members left out


def train_shard_name(i: int) -> str:
    return f"news.en-{i:05d}-of-00100"


def heldout_shard_name(i: int) -> str:
    return f"news.en.heldout-{i:05d}-of-00050"


def is_tarball(path: str | os.PathLike) -> bool:
    return str(path).endswith(TARBALL_SUFFIXES)


@dataclass
class RawRelease:
    """A located release directory (``root`` holds the two shard directories)."""

    root: Path
    # (where, reason, shard directory) of tarball members that were not unpacked
    skipped_members: list = field(default_factory=list)

    @property
    def train_dir(self) -> Path:
        return self.root / TRAIN_DIR

    @property
    def heldout_dir(self) -> Path:
        return self.root / HELDOUT_DIR

    def train_path(self, i: int) -> Path:
        return self.train_dir / train_shard_name(i)

    def heldout_path(self, i: int) -> Path:
        return self.heldout_dir / heldout_shard_name(i)

    def train_files(self, shards: Sequence[int] | None = None) -> list[Path]:
        return self._train(shards)[0]

    def heldout_files(self, shards: Sequence[int] | None = (TEST_SHARD,)) -> list[Path]:
        return self._heldout(shards)[0]

    def train_source(self, shards: Sequence[int] | None = None) -> FileSource:
        paths, skipped = self._train(shards)
        return FileSource(paths, name="train", skipped_files=skipped)

    def heldout_source(self, shards: Sequence[int] | None = (TEST_SHARD,)) -> FileSource:
        paths, skipped = self._heldout(shards)
        return FileSource(paths, name="heldout", skipped_files=skipped)

    def _train(self, shards):
        return _pick(self.train_dir, self.train_path, TRAIN_SHARDS, shards, "training", self._members(TRAIN_DIR))

    def _heldout(self, shards):
        return _pick(self.heldout_dir, self.heldout_path, HELDOUT_SHARDS, shards, "held-out",
                     self._members(HELDOUT_DIR))

    def _members(self, shard_dir: str) -> list[tuple[str, str]]:
        return [(where, why) for where, why, d in self.skipped_members if d == shard_dir]


def _pick(directory: Path, path_of, valid: range, shards, what: str,
          skipped_members: list) -> tuple[list[Path], list[tuple[str, str]]]:
    """(shard paths, (path, reason) of what was left out) for the shards asked for, or all there."""
    if not directory.is_dir():
        raise FileNotFoundError(f"One Billion Word {what} directory not found: {directory}")
    first, last = path_of(valid[0]).name, path_of(valid[-1]).name
    if shards is None:
        names = {path_of(i).name for i in valid}
        found, skipped = [], list(skipped_members)
        for entry in sorted(directory.iterdir()):   # zero-padded names: sorted = shard order
            if entry.name not in names:
                why = ("a temporary file of an interrupted write" if ".tmp-" in entry.name
                       else f"not a {what} shard name ({first} .. {last})")
                skipped.append((str(entry), why))
            elif why := not_a_file_reason(entry):
                skipped.append((str(entry), why))
            else:
                found.append(entry)
        if not found:
            left_out = "".join(f"; {p}: {why}" for p, why in skipped[:5])
            raise FileNotFoundError(f"no {what} shards in {directory} (expected e.g. {first}){left_out}")
        return found, skipped
    paths = []
    for i in shards:
        if i not in valid:
            raise ValueError(f"{what} shard index {i} is outside {valid.start}..{valid.stop - 1}")
        p = path_of(i)
        why = not_a_file_reason(p)
        if why:
            raise FileNotFoundError(f"One Billion Word {what} shard {why}: {p}")
        paths.append(p)
    return paths, []


def looks_like_raw(data_dir: str | os.PathLike) -> bool:
    """True if ``data_dir`` is (or holds) a release directory or its tarball."""
    p = Path(data_dir)
    if p.is_file():
        return is_tarball(p)
    return ((p / TRAIN_DIR).is_dir() or (p / HELDOUT_DIR).is_dir()
            or (p / RELEASE_DIR).is_dir() or (p / TARBALL_NAME).is_file())


def locate_release(data_dir: str | os.PathLike, extract_dir: str | os.PathLike | None = None) -> RawRelease:
    """Find the release directory; unpack a tarball into ``extract_dir`` (once) if given one."""
    p = Path(data_dir).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"data_dir not found: {p}")
    if p.is_dir():
        if (p / TRAIN_DIR).is_dir() or (p / HELDOUT_DIR).is_dir():
            return RawRelease(p)
        if (p / RELEASE_DIR).is_dir():
            return RawRelease(p / RELEASE_DIR)
        if (p / TARBALL_NAME).is_file():
            p = p / TARBALL_NAME
        else:
            raise FileNotFoundError(
                f"One Billion Word release not found under {p}: expected {p / RELEASE_DIR / TRAIN_DIR} "
                f"or {p / TRAIN_DIR} or {p / TARBALL_NAME}")
    if not is_tarball(p):
        raise FileNotFoundError(f"not a release directory or tarball: {p}")
    if extract_dir is None:
        raise ValueError(f"reading the tarball {p} needs an extract_dir to unpack it into")
    root = extract_tarball(p, extract_dir)
    listed = root.parent / SKIPPED_MEMBERS
    return RawRelease(root, [tuple(m) for m in read_json(listed)] if listed.is_file() else [])


def extract_tarball(tarball: str | os.PathLike, extract_dir: str | os.PathLike) -> Path:
    """Unpack the shard files of a release tarball, once; return the release directory.

    Only regular files under the two shard directories are written, by name, so a tarball
    with odd members cannot write outside ``extract_dir``; the other members of those
    directories are listed, with the reason, in ``skipped_members.json`` beside the release.
    """
    tarball = Path(tarball)
    final = Path(extract_dir) / f"{RELEASE_DIR}-{cache_key(file_identity(tarball), 16)}"
    if (final / RELEASE_DIR).is_dir():
        return final / RELEASE_DIR
    tmp = make_temp_dir_beside(final)
    try:
        wanted = {TRAIN_DIR, HELDOUT_DIR}
        n = 0
        skipped = []
        with tarfile.open(tarball, "r:*") as tar:
            for member in tar:   # streaming: a .tar.gz has no random access
                parts = PurePosixPath(member.name).parts
                if len(parts) < 2 or parts[-2] not in wanted:
                    continue
                where = f"{tarball}:{member.name}"
                if not member.isfile():
                    kind = "symlink" if member.issym() else "hard link" if member.islnk() else \
                        "directory" if member.isdir() else "special file"
                    skipped.append((where, f"is a {kind} in the tarball, not a regular file", parts[-2]))
                    continue
                if not (parts[-1].startswith("news.en") and all(c.isalnum() or c in ".-" for c in parts[-1])):
                    skipped.append((where, "not a shard name", parts[-2]))
                    continue
                out = tmp / RELEASE_DIR / parts[-2] / parts[-1]
                out.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(member)
                with open(out, "wb") as f:
                    shutil.copyfileobj(src, f, 1 << 20)
                # Keep the archived mtime so cache keys of the unpacked shards are stable.
                os.utime(out, (member.mtime, member.mtime))
                n += 1
        if n == 0:
            raise FileNotFoundError(f"no One Billion Word shards inside tarball {tarball} "
                                    f"(expected {RELEASE_DIR}/{TRAIN_DIR}/news.en-...)")
        if skipped:
            atomic_write_json(tmp / SKIPPED_MEMBERS, skipped)
        publish_dir(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final / RELEASE_DIR
