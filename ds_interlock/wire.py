"""Point-to-point messages between neighbouring stages, over DeepSpeed's comm layer.

Sends are asynchronous (isend) and kept alive until the batch ends, so a stage
never blocks on a send; receives block. A schedule is then deadlock-free exactly
when every receive's matching send is eventually issued (schedule checker).
Messages between one pair of ranks arrive in the order they were sent.
"""
import torch
from deepspeed import comm as dist

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8, torch.int8,
          torch.int16, torch.int32, torch.int64, torch.bool]
META_LEN = 128


def as_list(x):
    """Tensor or tuple/list of tensors -> (list, was_tuple)."""
    if torch.is_tensor(x):
        return [x], False
    if isinstance(x, (tuple, list)) and all(torch.is_tensor(t) for t in x):
        return list(x), True
    raise TypeError(f"pipeline stages exchange a tensor or a tuple of tensors, got {type(x).__name__}")


def from_list(tensors, was_tuple):
    return tuple(tensors) if was_tuple else tensors[0]


class Wire:
    """``static_shapes``: like DeepSpeed's pipeline (module ``dynamic_shape=False``), shapes are
    sent once per channel and then assumed; a change raises on the sending side instead of
    corrupting the receiver. Saves a message and, on GPUs, a host sync per activation."""

    def __init__(self, device, static_shapes=True):
        self.device = device
        self.static = static_shapes
        self.pending = []   # (work, tensor): the tensor must live until the send completes
        self._sent_meta = {}     # dst -> header last sent
        self._recv_meta = {}     # src -> header last received

    def reset_shapes(self):
        """Call on every rank together when activation shapes change (DeepSpeed's reset_activation_shape)."""
        self._sent_meta, self._recv_meta = {}, {}

    def _isend(self, tensor, dst):
        tensor = tensor.contiguous()
        self.pending.append((dist.isend(tensor, dst), tensor))

    def send_structured(self, parts, dst):
        """Send several tensors-or-tuples (e.g. activations, labels) with their shapes."""
        meta = [len(parts)]
        flat = []
        for part in parts:
            tensors, was_tuple = as_list(part)
            meta += [len(tensors), int(was_tuple)]
            for t in tensors:
                meta += [DTYPES.index(t.dtype), t.dim(), *t.shape]
            flat += tensors
        if len(meta) > META_LEN:
            raise ValueError(f"message metadata too long ({len(meta)} > {META_LEN} ints)")
        known = self._sent_meta.get(dst)
        if known is None or not self.static:
            header = torch.zeros(META_LEN, dtype=torch.int64, device=self.device)
            header[:len(meta)] = torch.tensor(meta, dtype=torch.int64)
            self._isend(header, dst)
            self._sent_meta[dst] = meta
        elif known != meta:
            raise RuntimeError(
                f"activation/label shapes or dtypes sent to rank {dst} changed ({known} -> {meta}); "
                "build the module with dynamic_shape=True, or call engine.reset_activation_shape() "
                "on every rank before the change")
        for t in flat:
            self._isend(t.detach(), dst)

    def recv_structured(self, src):
        meta = self._recv_meta.get(src) if self.static else None
        if meta is None:
            header = torch.empty(META_LEN, dtype=torch.int64, device=self.device)
            dist.recv(header, src)
            meta = self._recv_meta[src] = header.tolist()
        pos, parts = 1, []
        for _ in range(meta[0]):
            n, was_tuple = meta[pos], meta[pos + 1]
            pos += 2
            tensors = []
            for _ in range(n):
                dtype, ndim = DTYPES[meta[pos]], meta[pos + 1]
                shape = meta[pos + 2:pos + 2 + ndim]
                pos += 2 + ndim
                t = torch.empty(shape, dtype=dtype, device=self.device)
                dist.recv(t, src)
                tensors.append(t)
            parts.append(from_list(tensors, bool(was_tuple)))
        return parts

    def send_tensors(self, tensors, dst):
        """Send tensors whose shapes the receiver already knows (gradient components)."""
        for t in tensors:
            self._isend(t.detach(), dst)

    def recv_like(self, templates, src):
        out = []
        for t in templates:
            buf = torch.empty_like(t, memory_format=torch.contiguous_format)
            dist.recv(buf, src)
            out.append(buf)
        return out

    def wait_all(self):
        for work, _ in self.pending:
            work.wait()
        self.pending = []
