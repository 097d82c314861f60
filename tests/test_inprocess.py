"""The single-process pipeline (inprocess.py) against the independent autograd reference.

This is the gradient matrix: 2, 3 and 4 stages, every k, both combine modes, both
schedules, aux weights, tied layers, activation checkpointing, several SGD steps. The
multi-process tests (test_engine.py) keep what needs process groups.
"""
import contextlib
import math

import pytest
import torch

import metrics
import reference as ref
import toymodel as tm
from ds_interlock import InProcessPipeline
from ds_interlock.config import InterlockingConfigError

TOL = 1e-5
# The gradient matrix runs on CPU and, where one is present, on a CUDA device (the single-process
# path is how the stages meet a real GPU; the reference stays on CPU in float32).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                  reason="no CUDA device"))]
TOL_ON = {"cpu": TOL, "cuda": 1e-4}    # GPU kernels sum in other orders


def make(S, k, combine="furthest", M=2, w=1.0, tied=False, ckpt=0, schedule="interlocked", heads=True,
         lr=1.0, clip=0.0, extra=None, device="cpu", **kwargs):
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": M, "gradient_clipping": clip,
           "interlocking": {"k": k, "combine": combine, "aux_loss_weight": w, "schedule": schedule}}
    cfg.update(extra or {})
    kwargs.setdefault("optimizer", lambda params: torch.optim.SGD(params, lr=lr))
    return InProcessPipeline(tm.layer_specs(tied=tied), S, tm.loss_fn, aux_head=tm.aux_head() if heads else None,
                             config=cfg, devices=device, partition_method="uniform",
                             activation_checkpoint_interval=ckpt, **kwargs)


def parts_of(pipe):
    return [(pipe.parts[s], pipe.parts[s + 1]) for s in range(pipe.num_stages)]


def params_of(pipe):
    out = {}
    for s in range(pipe.num_stages):
        out.update({n: p.detach().clone() for n, p in pipe.stage_parameters(s).items()})
    return out


def worst_error(pipe, init, new, stages=None):
    errors = {}
    for s in range(pipe.num_stages):
        for name, p in pipe.stage_parameters(s).items():
            want, got = new[name] - init[name], p.detach().float().cpu() - init[name]
            scale = want.norm().item()
            errors[(s, name)] = (got - want).norm().item() / scale if scale > 0 else got.norm().item()
    assert {n for _, n in errors} == set(new)
    return max(errors.values())


def one_step(S, k, combine="furthest", M=2, w=1.0, tied=False, ckpt=0, schedule="interlocked", heads=True,
             ref_k=None, device="cpu"):
    pipe = make(S, k, combine, M, w, tied, ckpt, schedule, heads, device=device)
    batches = [[tm.batch(0, 0, m) for m in range(M)]]
    init, new = ref.reference_step(tm.layer_specs(tied=tied), parts_of(pipe), ref_k or pipe.routing.k, combine, w,
                                   batches, heads=heads)
    pipe.train_batch(iter(batches[0]))
    return pipe, worst_error(pipe, init, new)


MATRIX = [(S, k, c, n) for S in (2, 3, 4) for k in range(1, S + 1) for c in ("furthest", "sum")
          for n in ("1f1b", "interlocked")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("S, k, combine, schedule", MATRIX)
def test_gradients_match_reference(S, k, combine, schedule, device):
    _, err = one_step(S, k, combine, schedule=schedule, device=device)
    metrics.GRADIENT_ERRORS[f"inprocess_{device}_S{S}_k{k}_{combine}_{schedule}".replace("_cpu", "")] = err
    assert err < TOL_ON[device]


@pytest.mark.parametrize("case", [
    dict(S=2, k=2, combine="sum", M=3, w=0.3), dict(S=2, k=1, combine="furthest", M=3, w=2.5),
    dict(S=3, k=2, combine="sum", M=4, w=0.5), dict(S=2, k=2, combine="furthest", tied=True),
    dict(S=2, k=1, combine="sum", tied=True), dict(S=4, k=3, combine="sum", M=3, w=0.7, tied=True),
    dict(S=4, k=3, combine="furthest", ckpt=1), dict(S=4, k=2, combine="sum", ckpt=2, tied=True),
    dict(S=2, k="global", combine="furthest", M=1, heads=False), dict(S=3, k=5, combine="sum")],
    ids=lambda c: "_".join(f"{a}{b}" for a, b in c.items()))
@pytest.mark.parametrize("device", DEVICES)
def test_gradients_weights_tied_checkpointing(case, device):
    _, err = one_step(**case, device=device)
    name = "_".join(f"{a}{b}" for a, b in case.items())
    metrics.GRADIENT_ERRORS[f"inprocess_{device}_{name}".replace("_cpu", "")] = err
    assert err < TOL_ON[device]


def test_the_comparison_can_fail():
    """The same run checked against the reference for another k, or another combine, is far off."""
    _, err = one_step(3, 2, "furthest", ref_k=1)
    assert err > 1e-2
    pipe = make(3, 2, "sum")
    batches = [[tm.batch(0, 0, m) for m in range(2)]]
    init, new = ref.reference_step(tm.layer_specs(), parts_of(pipe), 2, "furthest", 1.0, batches)
    pipe.train_batch(iter(batches[0]))
    assert worst_error(pipe, init, new) > 1e-2


def test_several_steps_losses_and_eval_stay_exact():
    S, k, combine, w, lr = 3, 2, "sum", 0.5, 0.5
    pipe = make(S, k, combine, w=w, lr=lr)
    specs, parts, params = tm.layer_specs(), parts_of(pipe), None
    for step in range(3):
        batches = [[tm.batch(step, 0, m) for m in range(2)]]
        got = pipe.train_batch(iter(batches[0]))
        init, params = ref.reference_step(specs, parts, k, combine, w, batches, lr=lr, start=params)
        want = ref.stage_losses(specs, parts, init, batches)
        assert pipe.stage_losses == pytest.approx(want, rel=1e-5)
        assert got == pytest.approx(want[-1], rel=1e-5)
        assert pipe.stage_losses_step == step + 1 == pipe.global_steps
    for name, p in params_of(pipe).items():
        assert torch.allclose(p, params[name], rtol=1e-4, atol=1e-6), name
    eval_batches = [[tm.batch(999, 0, m) for m in range(3)]]
    loss = pipe.eval_batch(iter(eval_batches[0]), num_micro_batches=3)
    want = ref.stage_losses(specs, parts, params, eval_batches)
    assert pipe.eval_stage_losses == pytest.approx(want, rel=1e-5) and loss == pytest.approx(want[-1], rel=1e-5)


def grads_after(pipe, M=2):
    """Unclipped per-stage updates: one SGD(lr=1) step from the same start."""
    init = params_of(pipe)
    pipe.train_batch(iter([tm.batch(0, 0, m) for m in range(M)]))
    return {s: torch.cat([(init[n] - p.detach()).flatten() for n, p in sorted(pipe.stage_parameters(s).items())])
            for s in range(pipe.num_stages)}


def test_gradient_clipping_follows_deepspeeds_pipeline():
    free = grads_after(make(3, 2, "sum"))
    # "deepspeed": one coefficient for every stage, from stage 0's norm (DeepSpeed 0.19.8's fp32 pipeline)
    clipped = grads_after(make(3, 2, "sum", clip=0.05))
    coef = 0.05 / (free[0].norm().item() + 1e-6)
    assert coef < 0.5
    for s in free:   # float32 updates of ~1e-3 on weights of ~0.3: compare as vectors
        assert (clipped[s] - free[s] * coef).norm() <= 1e-4 * clipped[s].norm(), s
    # "stage": each stage by its own norm
    local = grads_after(make(3, 2, "sum", clip=0.05, extra={"interlocking": {"k": 2, "combine": "sum",
                                                                            "clip_scope": "stage"}}))
    for s in free:
        assert local[s].norm().item() == pytest.approx(min(0.05, free[s].norm().item()), rel=1e-4)


def test_optimizer_and_our_lr_schedule_from_the_config():
    extra = {"optimizer": {"type": "Adam", "params": {"lr": 1e-3, "betas": [0.9, 0.98], "eps": 1e-9,
                                                      "torch_adam": True}},
             "scheduler": {"type": "InverseSqrtWarmup", "params": {"warmup_num_steps": 2, "d_model": 64}}}
    pipe = make(2, 1, extra=extra, optimizer=None)
    from ds_interlock.lr_schedules import inverse_sqrt_lr
    rates = []
    for step in range(3):
        rates.append(pipe.get_lr()[0])
        pipe.train_batch(iter([tm.batch(step, 0, m) for m in range(2)]))
    assert rates == pytest.approx([inverse_sqrt_lr(i, 2, 64) for i in (1, 2, 3)])
    assert "Adam" in type(pipe.optimizer).__name__    # the config's optimizer, built by DeepSpeed


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tied", [False, True])
def test_bf16_within_rounding(tied, device):
    """bf16 parameters and activations: the same algorithm within bf16 rounding; tied copies
    get the summed gradient from the optimizer's fp32 copies."""
    pipe = make(3, 2, "sum", tied=tied, extra={"bf16": {"enabled": True}}, device=device)
    batches = [[tm.batch(0, 0, m) for m in range(2)]]
    init, new = ref.reference_step(tm.layer_specs(tied=tied), parts_of(pipe), 2, "sum", 1.0, batches)
    pipe.train_batch(iter(batches[0]))
    err = worst_error(pipe, init, new)
    metrics.GRADIENT_ERRORS[f"inprocess_{device}_bf16_S3_k2_sum_tied{tied}".replace("_cpu", "")] = err
    assert err < 0.05
    if tied:
        copies = [pipe.stage_parameters(s)["tied_modules.emb.weight"] for s in (0, 2)]
        assert torch.equal(copies[0], copies[1])


@pytest.mark.parametrize("device", DEVICES)
def test_checkpoint_resume_continues_exactly(tmp_path, device):
    extra = {"optimizer": {"type": "Adam", "params": {"lr": 1e-2, "torch_adam": True}}}
    data = [[tm.batch(step, 0, m) for m in range(2)] for step in range(4)]
    full = make(2, 1, "sum", extra=extra, optimizer=None, device=device)
    losses = [full.train_batch(iter(b)) for b in data]
    first = make(2, 1, "sum", extra=extra, optimizer=None, device=device)
    for b in data[:2]:
        first.train_batch(iter(b))
    first.save_checkpoint(str(tmp_path), client_state={"note": 7})
    second = make(2, 1, "sum", extra=extra, optimizer=None, device=device)
    _, client = second.load_checkpoint(str(tmp_path))
    assert client["note"] == 7 and second.global_steps == 2
    assert [second.train_batch(iter(b)) for b in data[2:]] == pytest.approx(losses[2:], rel=1e-6)
    for name, p in params_of(second).items():
        assert torch.allclose(p, params_of(full)[name]), name


def test_a_device_per_stage_and_bad_input():
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
           "interlocking": {"k": 2, "combine": "sum"}}
    pipe = InProcessPipeline(tm.layer_specs(), 2, tm.loss_fn, aux_head=tm.aux_head(), config=cfg,
                             devices=["cpu", "cpu"], partition_method="uniform",
                             optimizer=lambda ps: torch.optim.SGD(ps, lr=1.0))
    assert math.isfinite(pipe.train_batch(iter([tm.batch(0, 0, m) for m in range(2)])))
    with pytest.raises(RuntimeError, match="ran out at micro-batch 1 of 2"):
        pipe.train_batch(iter([tm.batch(0, 0, 0)]))
    with pytest.raises(TypeError, match=r"\(inputs, labels\) pair"):
        pipe.train_batch(iter([tm.batch(0, 0, 0)[0]] * 2))
    with pytest.raises(InterlockingConfigError, match='"interlocking.k"'):
        InProcessPipeline(tm.layer_specs(), 2, tm.loss_fn, aux_head=tm.aux_head(),
                          config={"train_micro_batch_size_per_gpu": 2, "interlocking": {"k": 0}})
    with pytest.raises(InterlockingConfigError, match='"aux_head"'):
        make(3, 2, heads=False)
    with pytest.raises(InterlockingConfigError, match='"fp16.enabled"'):
        make(2, 2, extra={"fp16": {"enabled": True}})
    with pytest.raises(TypeError, match="must be an iterator"):
        pipe.train_batch([tm.batch(0, 0, m) for m in range(2)])
    # the micro-batch count comes from the config as DeepSpeed derives it
    derived = InProcessPipeline(tm.layer_specs(), 2, tm.loss_fn, aux_head=tm.aux_head(), partition_method="uniform",
                                config={"train_micro_batch_size_per_gpu": 2, "train_batch_size": 6,
                                        "interlocking": {"k": 2}}, devices="cpu",
                                optimizer=lambda ps: torch.optim.SGD(ps, lr=1.0))
    assert derived.micro_batches == 3 == derived.gradient_accumulation_steps()
    assert derived.train_micro_batch_size_per_gpu() == 2


# ---------------------------------------------------------------- batched input-gradient chains
def batch_step(S, k, combine, schedule, batch, M=2, w=1.0, ckpt=0, steps=1, around=None):
    """Pipeline steps with "batch_input_grads" set, and the reference's error (``around``: a context
    for the pipeline's train_batch calls only)."""
    block = {"k": k, "combine": combine, "aux_loss_weight": w, "schedule": schedule, "batch_input_grads": batch}
    pipe = make(S, k, combine, M, w, ckpt=ckpt, schedule=schedule, extra={"interlocking": block})
    params = None
    for step in range(steps):
        batches = [[tm.batch(step, 0, m) for m in range(M)]]
        init, params = ref.reference_step(tm.layer_specs(), parts_of(pipe), pipe.routing.k, combine, w, batches,
                                          start=params)
        with around() if around else contextlib.nullcontext():
            pipe.train_batch(iter(batches[0]))
    return pipe, worst_error(pipe, init, params)


def batchable_runs(schedule, s):
    """Runs of >= 2 consecutive input_grad actions of one micro-batch in stage s's list."""
    runs, cur = [], []
    for a in schedule.stages[s]:
        if a.op == "input_grad" and cur and cur[-1].mb == a.mb:
            cur.append(a)
            continue
        if len(cur) > 1:
            runs.append(cur)
        cur = [a] if a.op == "input_grad" else []
    return runs + ([cur] if len(cur) > 1 else [])


BATCH_MATRIX = [(S, k, c, n) for S in (2, 3, 4, 5) for k in range(2, S + 1) for c in ("furthest", "sum")
                for n in ("1f1b", "interlocked")]


@pytest.mark.parametrize("S, k, combine, schedule", BATCH_MATRIX)
def test_batched_input_grads_match_reference(S, k, combine, schedule):
    pipe, err = batch_step(S, k, combine, schedule, True, M=3)
    assert err < TOL
    from ds_interlock.schedule import train_schedule
    sched = train_schedule(schedule, pipe.routing, 3)
    for s, ex in enumerate(pipe.executors):   # every run of consecutive chains was one call, nothing else
        runs = batchable_runs(sched, s)
        assert (ex.batched_calls, ex.batched_chains) == (len(runs), sum(len(r) for r in runs)), s


@pytest.mark.parametrize("case", [dict(S=4, k=3, combine="sum", schedule="1f1b", ckpt=1, w=0.4),
                                  dict(S=5, k=3, combine="furthest", schedule="1f1b", steps=2),
                                  dict(S=4, k=4, combine="sum", schedule="interlocked", ckpt=2)],
                         ids=lambda c: "_".join(f"{a}{b}" for a, b in c.items()))
@pytest.mark.parametrize("batch", [True, "auto"])
def test_batched_input_grads_checkpointing_and_auto(case, batch):
    _, err = batch_step(**case, batch=batch, M=3)
    assert err < TOL


def test_batching_happens_and_saves_autograd_calls(monkeypatch):
    """1F1B bundles: every stage's k-1 chains per micro-batch become one call; off, one call per chain;
    the interlocked order never has two chains of one micro-batch in a row (a receive sits between)."""
    calls = []
    real = torch.autograd.grad

    def counting(*args, **kwargs):
        calls.append(bool(kwargs.get("is_grads_batched")))
        return real(*args, **kwargs)

    @contextlib.contextmanager
    def counted():
        with monkeypatch.context() as m:
            m.setattr(torch.autograd, "grad", counting)
            yield

    S, k, M = 4, 3, 3
    counts = {}
    for batch in (False, True):
        calls.clear()
        pipe, err = batch_step(S, k, "sum", "1f1b", batch, M=M, around=counted)
        assert err < TOL
        counts[batch] = (len(calls), sum(calls), sum(ex.batched_calls for ex in pipe.executors))
    chains = sum(len(pipe.routing.input_chains(s)) for s in range(S)) * M     # 2 per mb on stages 1-3
    assert counts[False] == (chains, 0, 0)
    assert counts[True] == (chains // 2, chains // 2, chains // 2)
    calls.clear()
    pipe, _ = batch_step(S, k, "sum", "interlocked", True, M=M, around=counted)
    assert (len(calls), sum(calls)) == (chains, 0)
    assert all(ex.batched_calls == 0 for ex in pipe.executors)


def test_auto_times_both_ways_then_chooses():
    pipe, err = batch_step(4, 3, "sum", "1f1b", "auto", M=4, steps=2)
    assert err < TOL
    ex = pipe.executors[1]
    assert ex._auto == {2: ex._auto[2]} and isinstance(ex._auto[2], bool)   # 8 groups: 3 + 3 timed, then chosen
    assert ex.batched_calls >= ex.AUTO_TRIALS


def test_batched_profile_shares_the_call_time():
    pipe = make(4, 3, "sum", M=2, schedule="1f1b", extra={"interlocking": {"k": 3, "combine": "sum",
                                                                           "schedule": "1f1b",
                                                                           "batch_input_grads": True}})
    pipe.profile = [[] for _ in range(4)]
    pipe.train_batch(iter([tm.batch(0, 0, m) for m in range(2)]))
    for s in (1, 2):      # the last stage's one chain rides with its weight chain
        recs = pipe.profile[s]
        assert [r[0] for r in recs].count("input_grad") == 2 * 2
        assert all(b <= e for _, _, _, b, e in recs)
        assert all(a[4] <= b[3] + 1e-9 for a, b in zip(recs, recs[1:]) if a[0] != "aux_head" != b[0])
        assert all(e > b for op, _, _, b, e in recs if op == "input_grad")
