"""Where ds_interlock keeps what it builds: caches go in the user's cache directory.

    DS_INTERLOCK_CACHE          if set, the cache directory itself
    $XDG_CACHE_HOME/ds_interlock   otherwise, when XDG_CACHE_HOME is set
    ~/.cache/ds_interlock       otherwise

Never the source checkout: a cache there would be shared by every user of the checkout and
swept up by ``git add``.
"""
from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "DS_INTERLOCK_CACHE"


def default_cache_dir() -> Path:
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "ds_interlock"
