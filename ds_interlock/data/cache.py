"""Small helpers for on-disk caches that several processes may open.

Every build step in this package writes to a temporary name in the target directory and
then renames it into place. A rename inside one filesystem is atomic, so a reader either
sees the finished file or nothing, never a half-written one; that is what lets the training
script build on local rank 0 and simply re-open the results on the other ranks.

A process killed while building leaves its temporary file or directory behind. Their names
carry the writer's host and PID, so :func:`remove_stale_temps` (run at the next start) can
remove those of a dead writer on this host at once, and others once untouched for a while.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterable

from ..files import HOST as _HOST, TEMP_NAME as _TEMP_NAME, atomic_write_bytes, temp_path_for  # noqa: F401 (re-exported)
# A temp of another host (or of an older name format) is removed only when nothing in it has
# changed for this long: a live build writes its token file continuously.
STALE_TEMP_SECONDS = 15 * 60


class CorruptCacheError(ValueError):
    """A cache entry that is unreadable, truncated or does not match its checksum; the message
    names its files and says that deleting them rebuilds it."""


def file_identity(path: str | os.PathLike) -> list:
    """[absolute path, size, mtime_ns] of a file: cheap, and changes when the file does."""
    p = Path(path).resolve()
    st = p.stat()
    return [str(p), st.st_size, st.st_mtime_ns]


def files_identity(paths: Iterable[str | os.PathLike]) -> list:
    return [file_identity(p) for p in paths]


def cache_key(obj: Any, length: int = 20) -> str:
    """Stable short hash of a JSON-able object (dict keys sorted)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:length]


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sampled_digest(path: str | os.PathLike, blocks: int = 16, block_size: int = 1 << 16) -> str:
    """sha256 of a file's size and of ``blocks`` evenly spaced blocks (first and last included).

    Reads at most 1 MiB, so it can be checked at every start even for a multi-GB token file;
    it catches a truncated, extended or swapped file and most overwritten regions, not every
    flipped bit.
    """
    size = os.path.getsize(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        step = max(0, size - block_size) / max(1, blocks - 1)
        for offset in sorted({int(i * step) for i in range(blocks)}):
            f.seek(offset)
            h.update(f.read(block_size))
    return h.hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:     # someone else's process
        return True
    except (OverflowError, ValueError):
        return False
    return True


def _last_change(path: Path) -> float:
    """The newest mtime of ``path`` and, for a directory, of everything in it."""
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                try:
                    newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
                except FileNotFoundError:
                    pass
    return newest


def stale_temp_reason(path: str | os.PathLike, max_age: float = STALE_TEMP_SECONDS,
                      now: float | None = None) -> str | None:
    """Why the temp file or directory ``path`` is a dead writer's leftover, or None."""
    p = Path(path)
    if not (p.name.startswith(".") and ".tmp-" in p.name):
        return None
    m = _TEMP_NAME.match(p.name)
    if m and m["host"] == _HOST:
        # Never by age: a live writer on this host may pause (tokenizer training).
        pid = int(m["pid"])
        return None if _pid_alive(pid) else f"its writer (pid {pid} on this host) is gone"
    age = (time.time() if now is None else now) - _last_change(p)
    return f"untouched for {age / 60:.0f} min" if age > max_age else None


def remove_stale_temps(directory: str | os.PathLike, max_age: float = STALE_TEMP_SECONDS) -> list[tuple[Path, str]]:
    """Remove the temp files and directories that dead writers left in ``directory``.

    Returns (path, reason) of each one removed, so that the caller can report them.
    """
    d = Path(directory)
    removed = []
    if not d.is_dir():
        return removed
    for entry in sorted(d.iterdir()):
        try:
            why = stale_temp_reason(entry, max_age)
        except FileNotFoundError:       # removed meanwhile by its writer or another rank
            continue
        if why is None:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append((entry, why))
    return removed


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def read_json(path: str | os.PathLike) -> Any:
    with open(path, "r", encoding="utf-8") as f:
        return json.load(f)


def make_temp_dir_beside(path: str | os.PathLike) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(p)
    tmp.mkdir(mode=0o700)
    return tmp


def publish_dir(tmp_dir: str | os.PathLike, final: str | os.PathLike) -> None:
    """Rename a finished temp directory into place.

    If another process published the same directory first, keep theirs and drop ours:
    both were built from the same cache key, so they hold the same content.
    """
    try:
        os.rename(tmp_dir, final)
    except OSError:
        if Path(final).is_dir():
            shutil.rmtree(tmp_dir, ignore_errors=True)
        else:
            raise
