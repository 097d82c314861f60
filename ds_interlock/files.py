"""Files written so that a reader never sees half of one: write a unique temp beside the target,
fsync it, rename it into place (atomic within one filesystem), fsync the directory so the rename
itself survives a crash. Used by the data caches and by checkpoints' markers and ``latest``.

Temp names carry host and PID (``.NAME.tmp-HOST-PID-TAG``), so that a later start can tell a
leftover of a dead writer from a live one (data/cache.py removes stale ones).
"""
from __future__ import annotations

import os
import re
import socket
import uuid
from pathlib import Path

# The host in temp names, with no '-' so that the name splits back into host, PID and tag.
HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"
TEMP_NAME = re.compile(r"^\..+\.tmp-(?P<host>[A-Za-z0-9._]+)-(?P<pid>\d+)-(?P<tag>[0-9a-f]{8})$")


def temp_path_for(path: str | os.PathLike) -> Path:
    """A unique sibling name, so concurrent writers never share a temp file (host and PID in it)."""
    p = Path(path)
    return p.with_name(f".{p.name}.tmp-{HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename inside ``directory`` durable (best effort: not every filesystem allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
        fsync_dir(p.parent)
    finally:
        if tmp.exists():
            tmp.unlink()
