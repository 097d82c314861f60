"""A tiny seeded LM-shaped model for engine tests: every parameter is a function of its
seed alone, so the single-process reference can rebuild exactly the same weights."""
import torch
import torch.nn.functional as F
from torch import nn
from deepspeed.pipe import LayerSpec, TiedLayerSpec


def _init(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module


class Embed(nn.Module):
    def __init__(self, vocab, dim, seed):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab, dim))
        _init(self, seed)

    def forward(self, ids):
        return F.embedding(ids, self.weight)


class Block(nn.Module):
    def __init__(self, dim, seed):
        super().__init__()
        self.lin = _init(nn.Linear(dim, dim), seed)

    def forward(self, x):
        return x + torch.tanh(self.lin(x))


class Head(nn.Module):
    def __init__(self, dim, vocab, seed):
        super().__init__()
        self.proj = _init(nn.Linear(dim, vocab), seed)

    def forward(self, x):
        return self.proj(x)


def tied_logits(embed, x):
    return x @ embed.weight.t()


def layer_specs(blocks=4, vocab=11, dim=8, tied=False):
    specs = [TiedLayerSpec("emb", Embed, vocab, dim, 1) if tied else LayerSpec(Embed, vocab, dim, 1)]
    specs += [LayerSpec(Block, dim, 100 + i) for i in range(blocks)]
    specs.append(TiedLayerSpec("emb", Embed, vocab, dim, 1, forward_fn=tied_logits) if tied
                 else LayerSpec(Head, dim, vocab, 2))
    return specs


def aux_head(dim=8, vocab=11):
    return lambda stage_id: Head(dim, vocab, 1000 + stage_id)


def loss_fn(logits, labels):
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())


def batch(seed, dp_rank, micro, micro_batch_size=2, seq=5, vocab=11):
    g = torch.Generator().manual_seed(seed * 100003 + dp_rank * 1009 + micro)
    ids = torch.randint(0, vocab, (micro_batch_size, seq), generator=g)
    labels = torch.randint(0, vocab, (micro_batch_size, seq), generator=g)
    return ids, labels
