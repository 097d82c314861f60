"""Checkpoints that count only once complete, and loads that run no code.

DeepSpeed's rank 0 writes ``latest`` while the other ranks may still be writing: a kill in
between leaves ``latest`` naming a half-written tag and the run cannot resume. Here every
rank writes its files (DeepSpeed's save, without ``latest``), all ranks meet, and only then
rank 0 writes the tag's commit marker (``ds_interlock_complete.json``: the run's facts and
every file with its size) and replaces ``latest``, each by temp file + fsync + rename. A load
takes the tag ``latest`` names if its marker and files check out, and otherwise the newest
complete checkpoint, saying which and why. Older checkpoints are removed only after a newer
one is complete.

Every file is read with ``torch.load(weights_only=True)``: tensors and plain data, never
code. DeepSpeed stores a few of its own objects (the run's argparse ``Namespace``, ...),
allowed by name; a file that needs anything else is refused naming the file and the object,
unless ``DS_INTERLOCK_TRUST_CHECKPOINTS=1`` says the files are trusted.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import time
from typing import Any, Optional

import torch

from .files import atomic_write_bytes

MARKER = "ds_interlock_complete.json"
LATEST = "latest"
TRUST_ENV = "DS_INTERLOCK_TRUST_CHECKPOINTS"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the directory or file and why."""


def valid_tag(tag: Any) -> bool:
    """A tag must be a plain directory name inside the save directory (no path, no '..')."""
    return (isinstance(tag, str) and tag not in ("", ".", "..") and "/" not in tag and os.sep not in tag
            and "\x00" not in tag and not tag.startswith("."))


def atomic_write(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _files(tag_dir: str) -> dict[str, int]:
    out = {}
    for root, _, names in os.walk(tag_dir):
        for name in names:
            if name in (MARKER, SAVING) or ".tmp-" in name:
                continue
            path = os.path.join(root, name)
            out[os.path.relpath(path, tag_dir)] = os.path.getsize(path)
    return out


SAVING = "ds_interlock_saving"     # present while a save of this tag is under way


def save_tag(tag: Optional[str], global_steps: int) -> str:
    """The tag a save uses: DeepSpeed's default name, or the caller's, which must be a plain name."""
    tag = f"global_step{global_steps}" if tag is None else str(tag)
    if not valid_tag(tag):
        raise ValueError(f"checkpoint tag {tag!r} must be a plain directory name")
    return tag


def checked_facts(facts: dict) -> dict:
    """The facts a marker records, refused before anything is written if they are not plain JSON."""
    try:
        return json.loads(json.dumps(facts))
    except (TypeError, ValueError) as exc:
        raise ValueError(f'checkpoint facts (client_state["run"]) must be plain JSON values: {exc}') from None


def begin(save_dir: str, tag: str) -> None:
    """Before any rank writes ``tag``: drop a marker from an earlier save of the same tag (the tag is
    incomplete until committed again) and leave a sentinel saying a save is under way."""
    tag_dir = os.path.join(save_dir, tag)
    os.makedirs(tag_dir, exist_ok=True)
    try:
        os.remove(os.path.join(tag_dir, MARKER))
    except FileNotFoundError:
        pass
    atomic_write(os.path.join(tag_dir, SAVING), str(os.getpid()))


def commit(save_dir: str, tag: str, facts: dict, latest: bool = True) -> None:
    """Mark ``tag`` complete (after every rank has written its files), then point ``latest`` at it."""
    tag_dir = os.path.join(save_dir, tag)
    record = {"tag": tag, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "facts": facts, "files": _files(tag_dir)}
    atomic_write(os.path.join(tag_dir, MARKER), json.dumps(record, indent=1, sort_keys=True))
    try:
        os.remove(os.path.join(tag_dir, SAVING))
    except FileNotFoundError:
        pass
    if latest:
        atomic_write(os.path.join(save_dir, LATEST), tag)


def read_marker(tag_dir: str) -> Optional[dict]:
    try:
        with open(os.path.join(tag_dir, MARKER)) as f:
            record = json.load(f)
        return record if isinstance(record, dict) else None
    except (OSError, ValueError):
        return None


def why_incomplete(save_dir: str, tag: Any) -> Optional[str]:
    """Why ``tag`` is not a complete checkpoint of ``save_dir``, or None if it is."""
    if not valid_tag(tag):
        return f"the tag {tag!r} is not a directory name inside {save_dir}"
    tag_dir = os.path.join(save_dir, tag)
    if not os.path.isdir(tag_dir):
        return f"{tag_dir} does not exist"
    if not os.path.exists(os.path.join(tag_dir, MARKER)):
        return f"{tag_dir} has no commit marker (its save did not finish)"
    record = read_marker(tag_dir)
    if record is None or not isinstance(record.get("files"), dict):
        return f"{os.path.join(tag_dir, MARKER)} is unreadable"
    for rel, size in sorted(record["files"].items()):
        path = os.path.join(tag_dir, rel)
        if not os.path.isfile(path):
            return f"{path} is missing"
        if os.path.getsize(path) != size:
            return f"{path} has {os.path.getsize(path)} bytes, the save wrote {size}"
    return None


def complete_tags(save_dir: str) -> list[str]:
    """Complete checkpoints in ``save_dir``, most recently committed first (after a rollback that is
    not the highest step)."""
    found = []
    for name in os.listdir(save_dir) if os.path.isdir(save_dir) else []:
        if valid_tag(name) and why_incomplete(save_dir, name) is None:
            found.append((os.path.getmtime(os.path.join(save_dir, name, MARKER)), name))
    return [name for _, name in sorted(found, reverse=True)]


def _any_marker(save_dir: str) -> bool:
    return any(os.path.exists(os.path.join(save_dir, n, MARKER)) for n in os.listdir(save_dir)
               if os.path.isdir(os.path.join(save_dir, n)))


def read_latest(save_dir: str) -> Optional[str]:
    path = os.path.join(save_dir, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path, errors="replace") as f:
        return f.read().strip()


def has_checkpoint(save_dir: str) -> bool:
    """Anything to resume from: a ``latest`` file or a complete checkpoint."""
    return os.path.isdir(save_dir) and (os.path.isfile(os.path.join(save_dir, LATEST)) or bool(complete_tags(save_dir)))


def resolve(save_dir: str, tag: Optional[str] = None) -> tuple[Optional[str], Optional[str]]:
    """(the tag to load, a note for the log or None). An explicit ``tag`` must be complete; without
    one, ``latest``'s tag if complete, else the newest complete checkpoint. Checkpoints written
    without markers (stock DeepSpeed, older ds_interlock) load as DeepSpeed would, with a note."""
    if not os.path.isdir(save_dir):
        raise CheckpointError(f"{save_dir}: no such checkpoint directory")
    legacy = not _any_marker(save_dir)
    if tag is not None:
        reason = why_incomplete(save_dir, tag)
        if reason is None:
            return tag, None
        if legacy and valid_tag(tag) and os.path.isdir(os.path.join(save_dir, tag)):
            return tag, f"{os.path.join(save_dir, tag)} has no commit marker (stock DeepSpeed or an older ds_interlock)"
        raise CheckpointError(f"cannot load checkpoint {tag!r}: {reason}")
    latest = read_latest(save_dir)
    if latest is None:
        reason = f"{os.path.join(save_dir, LATEST)} does not exist"
    elif latest == "":
        reason = f"{os.path.join(save_dir, LATEST)} is empty"
    else:
        reason = why_incomplete(save_dir, latest)
        if reason is None:
            return latest, None
        if legacy and valid_tag(latest) and os.path.isdir(os.path.join(save_dir, latest)):
            return latest, (f"{os.path.join(save_dir, latest)} has no commit marker (stock DeepSpeed or an older "
                            "ds_interlock): loading it as DeepSpeed would")
    done = complete_tags(save_dir)
    if not done:
        raise CheckpointError(f"{save_dir}: no complete checkpoint to resume from ({reason})")
    return done[0], f"{reason}; resuming from the newest complete checkpoint, {os.path.join(save_dir, done[0])}"


def plan_load(load_dir: str, tag: Optional[str] = None) -> Optional[tuple[str, Optional[str], Optional[dict]]]:
    """What a load will read: (tag, note for the log, the marker's run facts), or None when there is
    nothing to load (as DeepSpeed returns (None, None) then). Raises CheckpointError when there is
    something, but nothing usable."""
    if tag is None and not has_checkpoint(load_dir):
        return None
    tag, note = resolve(load_dir, tag)
    return tag, note, (read_marker(os.path.join(load_dir, tag)) or {}).get("facts")


def check_layout(where: str, saved: Optional[dict], now: dict, zero: bool = False) -> None:
    """A checkpoint of another pipeline layout cannot load (each stage holds other layers and
    optimizer groups): say so instead of DeepSpeed's parameter-group error."""
    keys = ["num_stages"] + (["data_parallel"] if zero else [])
    diff = [f"{key} {saved[key]} (now {now[key]})" for key in keys if saved and key in saved and saved[key] != now[key]]
    if diff:
        raise CheckpointError(f"{where} was written with {', '.join(diff)}: a pipeline checkpoint loads only into "
                              "the same number of stages" + (" and, with ZeRO, data-parallel replicas" if zero else ""))


def prune(save_dir: str, keep: int, protect: Optional[str] = None) -> list[str]:
    """Remove all but the ``keep`` most recent complete checkpoints, and saves of ours that never
    finished (their sentinel is still there) older than the most recent complete one. Never removes
    ``protect`` (the tag just committed) nor ``latest``'s tag, and never a checkpoint without our
    marker or sentinel (stock DeepSpeed's, older runs'): those are the user's to delete."""
    done = complete_tags(save_dir)
    if not done:
        return []
    newest_time = os.path.getmtime(os.path.join(save_dir, done[0], MARKER))
    keep_names = set(done[:max(keep, 1)]) | {protect, read_latest(save_dir)}
    doomed = [name for name in done[max(keep, 1):] if name not in keep_names]
    for name in os.listdir(save_dir):
        path = os.path.join(save_dir, name)
        if (valid_tag(name) and name not in done and name not in keep_names and os.path.isdir(path)
                and os.path.exists(os.path.join(path, SAVING)) and os.path.getmtime(path) < newest_time):
            doomed.append(name)
    for name in doomed:
        shutil.rmtree(os.path.join(save_dir, name), ignore_errors=True)
    return doomed


# ---------------------------------------------------------------- safe loading
# DeepSpeed's own plain-data classes found in its checkpoint files (0.19): allowed by name
_DEEPSPEED_GLOBALS = (("deepspeed.utils.tensor_fragment", "fragment_address"),      # bf16/ZeRO flat-buffer maps
                      ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),         # bf16/ZeRO optimizer state
                      ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
                      ("deepspeed.runtime.zero.config", "ZeroStageEnum"))


def _allowed_globals() -> list:
    import argparse
    import importlib
    allowed: list = [argparse.Namespace]    # the `args` DeepSpeed stores with the model states
    for module, name in _DEEPSPEED_GLOBALS:
        try:
            allowed.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return allowed


def trusted() -> bool:
    return os.environ.get(TRUST_ENV, "") not in ("", "0")


def safe_load(path: str, map_location: Any = None) -> Any:
    """torch.load without running code from the file (see the module docstring)."""
    if trusted():
        return torch.load(path, map_location=map_location, weights_only=False)
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        try:
            names = [n for n in torch.serialization.get_unsafe_globals_in_checkpoint(path)
                     if n not in {f"{m}.{c}" for m, c in _DEEPSPEED_GLOBALS}]
        except Exception:  # noqa: BLE001 - only for the message
            names = []
        what = f"it refers to {', '.join(names)}" if names else "it holds more than tensors and plain data"
        raise CheckpointError(f"{path}: refused to load: {what}, and loading it could run code. If you trust the "
                              f"file, set {TRUST_ENV}=1") from None
    except (EOFError, RuntimeError, OSError) as exc:
        text = str(exc).lower()
        if isinstance(exc, RuntimeError) and not any(w in text for w in ("zip", "archive", "unpickl", "magic", "eof")):
            raise       # not the file's fault (out of memory, a bad map_location, ...)
        raise CheckpointError(f"{path}: cannot be read, the file is damaged or incomplete "
                              f"({type(exc).__name__}: {exc})") from None


def safe_checkpoint_engine(base: Any) -> Any:
    """DeepSpeed's checkpoint engine ``base`` with its load made safe (saves are unchanged)."""
    base.load = lambda path, map_location=None: safe_load(path, map_location)
    return base
