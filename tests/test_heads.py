"""Aux heads (heads.py): heads sized from the stage output, lazy heads, ready heads, early and
named errors, and heads that leave the trunk's random stream and update untouched. In one
process (InProcessPipeline builds and checks heads as a launch does; the launch's own dry run
over process groups is in test_engine.py)."""
import pytest
import torch
from torch import nn
from deepspeed.pipe import LayerSpec

from ds_interlock import InProcessPipeline
from ds_interlock import heads as H
from ds_interlock.config import InterlockingConfigError
from ds_interlock.stage import HeadMismatchError


class Conv(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x))


class Flat(nn.Module):
    def forward(self, x):
        return x.flatten(1)


class Drop(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.lin = nn.Linear(dim, dim)      # default init: draws from the global generator
        self.drop = nn.Dropout(0.3)         # so does every mask

    def forward(self, x):
        return self.drop(torch.tanh(self.lin(x)))


def cnn_layers(classes=5):
    return [LayerSpec(Conv, 3, 4), LayerSpec(Conv, 4, 6), Flat(), LayerSpec(nn.Linear, 6 * 8 * 8, 32),
            LayerSpec(nn.Linear, 32, classes)]


def images(seed, n=2, classes=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, classes, (n,), generator=g)


def cfg(k=2, combine="furthest", M=2, extra=None):
    c = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": M,
         "optimizer": {"type": "SGD", "params": {"lr": 0.1}}, "interlocking": {"k": k, "combine": combine}}
    c.update(extra or {})
    return c


def pipe(layers, S, aux_head, k=2, sample=True, **kw):
    return InProcessPipeline(layers, S, nn.functional.cross_entropy, aux_head=aux_head, config=cfg(k),
                             devices="cpu", partition_method="uniform", verbose=False,
                             sample_batch=images(0) if sample else None, **kw)


def test_stage_output_and_factory_kinds():
    out = H.StageOutput.of(1, (torch.zeros(2, 5, 8), torch.ones(2, 5, dtype=torch.bool)))
    assert out.shape == (2, 5, 8) and out.features == 8 and out.is_tuple
    assert str(out) == "(Tensor[2, 5, 8] float32, Tensor[2, 5] bool)"
    assert not H.wants_output(lambda s: None) and H.wants_output(lambda s, out: None)
    assert H.wants_output(H.classifier(3)) and not H.wants_output(lambda stage_id, dim=8: None)


def test_classifier_heads_size_themselves_when_the_partition_changes():
    for S in (2, 3, 4):
        p = pipe(cnn_layers(), S, H.classifier(5))
        for s in range(S - 1):
            head = p.model.aux_heads[str(s)]
            assert isinstance(head, H.ClassifierHead)
        losses = [p.train_batch(iter([images(i), images(i + 1)])) for i in range(3)]
        assert all(torch.isfinite(torch.tensor(p.stage_losses))) and losses[-1] == losses[-1]
    flat = pipe(cnn_layers(), 3, H.classifier(5, pool="flatten"))
    assert flat.parts == [0, 2, 4, 5]                                     # stage 0 ends in [B, 6, 8, 8]
    assert flat.model.aux_heads["0"].fc.in_features == 6 * 8 * 8 and flat.model.aux_heads["1"].fc.in_features == 32


def test_lazy_heads_are_materialised_before_the_optimizer():
    p = pipe(cnn_layers(), 3, lambda s: nn.Sequential(nn.Flatten(), nn.LazyLinear(5)))
    weights = [p.model.aux_heads[str(s)][1].weight for s in range(2)]
    assert [w.shape[1] for w in weights] == [6 * 8 * 8, 32]
    before = [w.detach().clone() for w in weights]
    p.train_batch(iter([images(1), images(2)]))
    assert all(not torch.equal(a, w) for a, w in zip(before, weights))   # the optimizer trains them
    with pytest.raises(InterlockingConfigError, match=r"stages \[0, 1\] need the stage output.*sample_batch"):
        pipe(cnn_layers(), 3, lambda s: nn.Sequential(nn.Flatten(), nn.LazyLinear(5)), sample=False)
    with pytest.raises(InterlockingConfigError, match="sample_batch"):
        pipe(cnn_layers(), 3, H.classifier(5), sample=False)


def test_a_head_that_does_not_fit_names_stage_and_shape():
    wrong = lambda s: nn.Sequential(nn.Flatten(), nn.Linear(9, 5))   # noqa: E731
    with pytest.raises(InterlockingConfigError) as err:
        pipe(cnn_layers(), 3, wrong)
    msg = str(err.value)
    assert "stage 0" in msg and "Tensor[2, 6, 8, 8] float32" in msg and "expects 9 input features" in msg
    # without a sample: at the first batch, with the same message
    p = pipe(cnn_layers(), 3, wrong, sample=False)
    with pytest.raises(HeadMismatchError, match=r"stage 0: the aux head failed on the stage's output Tensor\[2, 6, 8, 8\]"):
        p.train_batch(iter([images(1), images(2)]))
    # a head whose output the loss cannot take
    with pytest.raises(InterlockingConfigError, match="stage 0: aux_loss_fn on the head's output"):
        pipe(cnn_layers(), 3, H.classifier(7), aux_loss_fn=lambda out, y: nn.functional.mse_loss(out, y))


def test_lm_head_on_a_tuple_output():
    head = H.lm_head(11, norm="rms", rank=4)(0, H.StageOutput.of(0, (torch.zeros(2, 5, 8), torch.zeros(2, 5))))
    out = head((torch.randn(2, 5, 8), torch.zeros(2, 5)))
    assert out.shape == (2, 5, 11) and head.proj[0].weight.shape == (4, 8)
    assert H.lm_head(11)(0, H.StageOutput.of(0, torch.zeros(2, 5, 16))).proj.weight.shape == (11, 16)


def drop_layers():
    return [LayerSpec(nn.Linear, 6, 16)] + [LayerSpec(Drop, 16) for _ in range(3)] + [LayerSpec(nn.Linear, 16, 4)]


def drop_batch(i):
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(2, 6, generator=g), torch.randint(0, 4, (2,), generator=g)


def run_global(aux_head, steps=4, clip=None):
    torch.manual_seed(7)
    c = cfg("global", "furthest", extra={"optimizer": {"type": "SGD", "params": {"lr": 0.5}}})
    if clip is not None:
        c["gradient_clipping"] = clip       # otherwise DeepSpeed's default clipping (1.0) applies
    p = InProcessPipeline(drop_layers(), 3, nn.functional.cross_entropy, aux_head=aux_head, config=c,
                          devices="cpu", partition_method="uniform", verbose=False,
                          sample_batch=drop_batch(0))
    assert p.engine.gradient_clipping() == (1.0 if clip is None else clip)
    after_build = torch.random.get_rng_state()
    losses = [p.train_batch(iter([drop_batch(2 * i), drop_batch(2 * i + 1)])) for i in range(steps)]
    trunk = {n: t.detach().clone() for s in range(3) for n, t in p.model.stages[s].named_parameters()}
    return losses, trunk, after_build, p


def test_global_with_probe_heads_trains_exactly_like_no_heads():
    """Heads (even large ones, with huge gradients) change neither the trunk's initialisation, its
    dropout masks nor its clipped update: global + probe heads is the job without heads, with
    DeepSpeed's default clipping (1.0) and with a clipping that clearly acts."""
    unclipped = run_global(None, clip=0.0)[0]
    big = lambda s, out: nn.Sequential(nn.Linear(out.features, 256), nn.Linear(256, 4))  # noqa: E731
    for clip in (None, 0.05):
        plain_losses, plain, plain_rng, _ = run_global(None, clip=clip)
        if clip:
            assert plain_losses[1:] != unclipped[1:]                # this clipping does act
        for factory in (big, lambda s: nn.Linear(16, 4), H.classifier(4)):
            losses, trunk, rng, p = run_global(factory, clip=clip)
            assert torch.equal(rng, plain_rng)
            assert losses == plain_losses
            assert all(torch.equal(trunk[n], plain[n]) for n in plain)
            assert all(loss == loss for loss in p.stage_losses)     # the probes report a loss


class Detaching(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.LazyLinear(5)

    def forward(self, x):
        return self.fc(x.detach().flatten(1))


def test_a_head_that_detaches_its_input_is_reported_at_the_first_step():
    p = pipe(cnn_layers(), 3, lambda s: Detaching(), k=1)
    with pytest.raises(HeadMismatchError, match="stage 0: the aux head's loss does not depend on the stage's output"):
        p.train_batch(iter([images(1), images(2)]))
