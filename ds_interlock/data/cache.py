"""Small helpers for on-disk caches that several processes may open.

Every build step in this package writes to a temporary name in the target directory and
then renames it into place. A rename inside one filesystem is atomic, so a reader either
sees the finished file or nothing, never a half-written one; that is what lets the training
script build on local rank 0 and simply re-open the results on the other ranks.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterable


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


def temp_path_for(path: str | os.PathLike) -> Path:
    """A unique sibling name, so concurrent writers never share a temp file."""
    p = Path(path)
    return p.with_name(f".{p.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(p)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def read_json(path: str | os.PathLike) -> Any:
    with open(path, "r", encoding="utf-8") as f:
        return json.load(f)


def make_temp_dir_beside(path: str | os.PathLike) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{p.name}.tmp-", dir=p.parent))


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
