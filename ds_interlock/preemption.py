"""Preemption: SIGTERM, or the launcher gone, becomes "save and stop after this step" on every rank.

A cluster that preempts a job sends SIGTERM and expects a checkpoint. DeepSpeed's launcher
forwards SIGTERM to the ranks one at a time (30 s each before SIGKILL), and SIGTERM to the
``deepspeed`` command itself kills only that process, leaving the ranks to train on unattended.
So each rank turns SIGTERM into a request, a watcher thread turns a vanished launcher (parent
or grandparent process) into one too, and at the end of every step the ranks agree over a
small CPU (gloo) group: if any rank was asked to stop, all of them stop after the same step,
save, and exit non-zero. The CPU group keeps this off the GPU streams entirely.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import Optional

import torch

EXIT_CODE = 143   # 128 + SIGTERM, what schedulers expect of a terminated job


def _alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped by its parent, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _parent_of(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


class Preemption:
    """Call :meth:`stop_reason` once per step, on every rank; it returns why to stop, or None."""

    def __init__(self, distributed: bool, watch_launcher: bool = True, poll_s: float = 1.0,
                 timeout_s: Optional[float] = None) -> None:
        self.reason: Optional[str] = None
        self._closed = False
        self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        self._group = None
        if distributed:
            import torch.distributed as tdist
            from datetime import timedelta
            timeout = None if timeout_s is None else timedelta(seconds=timeout_s)
            self._group = tdist.new_group(backend="gloo", timeout=timeout)   # every rank, in the same order
        if watch_launcher:
            parent = os.getppid()
            watched = [p for p in (parent, _parent_of(parent)) if p and p > 1]
            threading.Thread(target=self._watch, args=(parent, watched, poll_s), daemon=True,
                             name="ds_interlock-launcher-watch").start()

    def close(self) -> None:
        """Give SIGTERM back to whoever had it (the watcher thread ends with the process)."""
        signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
        self._closed = True

    def _on_sigterm(self, signum, frame) -> None:
        if self.reason is None:
            self.reason = f"SIGTERM on rank {os.environ.get('RANK', '0')}"

    def _watch(self, parent: int, watched: list, poll_s: float) -> None:
        while self.reason is None and not self._closed:
            time.sleep(poll_s)
            if not self._closed and (os.getppid() != parent or not all(_alive(p) for p in watched)):
                self.reason = f"the launcher of rank {os.environ.get('RANK', '0')} is gone"
                return

    def stop_reason(self) -> Optional[str]:
        """Whether any rank wants to stop (a collective over every rank when distributed)."""
        if self._group is None:
            return self.reason
        import torch.distributed as tdist
        flag = torch.tensor([1 if self.reason else 0], dtype=torch.int32)
        tdist.all_reduce(flag, op=tdist.ReduceOp.MAX, group=self._group)
        if flag.item() and self.reason is None:
            self.reason = "another rank was asked to stop"
        return self.reason if flag.item() else None
