"""Measuring a real run: per-action wall times and live activation memory.

Set ``engine.profile = []`` and every train_batch appends one
``(op, mb, loss, start, end)`` tuple per executed action (perf_counter seconds),
then ``("peak_activation_bytes", -1, -1, peak, peak)``. ``summarize`` turns that
into busy/idle times per stage and mean costs per action kind (the simulator's
measured cost model).
"""
import torch

from .actions import COMPUTE


class ActivationMeter:
    """Bytes saved for backward, per micro-batch, counted while a stage runs.

    On CPU there is no allocator statistic for activations, so this counts what
    autograd saves (``saved_tensors_hooks``); storages shared by several saved
    tensors are counted once per micro-batch. On GPU the caller can also read
    torch.cuda.max_memory_allocated.
    """

    def __init__(self, device):
        self.device = device
        self.per_mb = {}
        self.current = -1
        self.live = 0
        self.peak = 0
        self._seen = {}

    def _pack(self, t):
        mb = self.current
        key = (t.untyped_storage().data_ptr(), mb)
        if mb >= 0 and key not in self._seen:
            self._seen[key] = True
            n = t.untyped_storage().nbytes()
            self.per_mb[mb] = self.per_mb.get(mb, 0) + n
            self.live += n
            self.peak = max(self.peak, self.live)
        return t

    def release(self, mb):
        self.live -= self.per_mb.pop(mb, 0)
        self._seen = {k: v for k, v in self._seen.items() if k[1] != mb}

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


def summarize(records):
    """records: one stage's profile list over one or more batches ->
    dict(wall, busy, idle, idle_fraction, costs={op: mean seconds}, peak_activation_bytes).

    ``costs["forward"]`` excludes the aux head, whose forward and backward is ``costs["aux_head"]``."""
    actions = [r for r in records if r[0] != "peak_activation_bytes"]
    if not actions:
        return {}
    wall = actions[-1][4] - actions[0][3]
    busy = sum(e - b for op, _, _, b, e in actions if op in COMPUTE)
    totals, counts = {}, {}
    for op, _, _, b, e in actions:
        totals[op] = totals.get(op, 0.0) + (e - b)
        counts[op] = counts.get(op, 0) + 1
    if "aux_head" in totals and "forward" in totals:
        # the head runs inside "forward"; the cost model charges the two apart
        totals["forward"] -= totals["aux_head"]
    peaks = [r[3] for r in records if r[0] == "peak_activation_bytes"]
    return {"wall": wall, "busy": busy, "idle": wall - busy, "idle_fraction": 1 - busy / wall if wall else 0.0,
            "costs": {op: totals[op] / counts[op] for op in totals},
            "peak_activation_bytes": max(peaks) if peaks else 0}
