import math

import pytest
import torch

from ds_interlock.lr_schedules import (INVERSE_SQRT_TYPE, InverseSqrtWarmup, inverse_sqrt_lr,
                                       scheduler_from_config)


def paper_lr(step):
    # The paper's formula written out independently of the module.
    return 1024 ** -0.5 * min(step ** -0.5, step * 4000 ** -1.5)


def make_optimizer(lr=1.0, groups=1):
    return torch.optim.Adam([{"params": [torch.nn.Parameter(torch.zeros(2))]}
                             for _ in range(groups)], lr=lr, betas=(0.9, 0.98), eps=1e-9)


def lr_for_step(scheduler, step):
    """Drive the scheduler like DeepSpeed: one scheduler.step() per optimizer step;
    return the rate the optimizer uses for optimizer step `step` (counted from 1)."""
    while scheduler.last_epoch + 1 < step:
        scheduler.optimizer.step()
        scheduler.step()
    return scheduler.optimizer.param_groups[0]["lr"]


@pytest.mark.parametrize("step", [1, 10, 4000, 4001, 16000])
def test_formula_values(step):
    assert inverse_sqrt_lr(step) == pytest.approx(paper_lr(step), rel=1e-12)
    scheduler = scheduler_from_config(make_optimizer(), {"type": INVERSE_SQRT_TYPE, "params": {
        "warmup_num_steps": 4000, "d_model": 1024, "scale": 1.0}})
    assert lr_for_step(scheduler, step) == pytest.approx(paper_lr(step), rel=1e-12)
    assert scheduler.get_last_lr() == [pytest.approx(paper_lr(step), rel=1e-12)]


def test_known_numbers():
    assert inverse_sqrt_lr(1) == pytest.approx(1 / 32 / 4000 ** 1.5)
    assert inverse_sqrt_lr(4000) == pytest.approx(1 / 32 / math.sqrt(4000))  # the peak
    assert inverse_sqrt_lr(16000) == pytest.approx(inverse_sqrt_lr(4000) / 2)
    with pytest.raises(ValueError):
        inverse_sqrt_lr(0)


def test_scale_d_model_and_no_warmup():
    assert inverse_sqrt_lr(10, 100, 256, 2.0) == pytest.approx(2 * 256 ** -0.5 * 10 / 100 ** 1.5)
    assert inverse_sqrt_lr(9, warmup_num_steps=0) == pytest.approx(1024 ** -0.5 / 3)


def test_first_update_gets_step_one_and_all_groups_follow():
    optimizer = make_optimizer(lr=123.0, groups=2)
    scheduler = InverseSqrtWarmup(optimizer)
    assert [g["lr"] for g in optimizer.param_groups] == [paper_lr(1)] * 2
    optimizer.step()
    scheduler.step()
    assert scheduler.get_last_lr() == [paper_lr(2)] * 2


def test_rises_then_falls():
    scheduler = InverseSqrtWarmup(make_optimizer(), warmup_num_steps=50)
    lrs = [lr_for_step(scheduler, step) for step in range(1, 201)]
    peak = lrs.index(max(lrs))
    assert peak == 49  # step 50
    assert all(a < b for a, b in zip(lrs[:peak], lrs[1:peak + 1]))
    assert all(a > b for a, b in zip(lrs[peak:], lrs[peak + 1:]))


def test_state_dict_round_trip():
    scheduler = scheduler_from_config(make_optimizer(), {"warmup_num_steps": 20, "scale": 0.5})
    lr_for_step(scheduler, 37)
    state = scheduler.state_dict()
    assert "optimizer" not in state

    fresh = scheduler_from_config(make_optimizer(), {})  # different params on purpose
    fresh.load_state_dict(state)
    assert fresh.last_epoch == scheduler.last_epoch == 36
    assert fresh.get_last_lr() == scheduler.get_last_lr()
    assert fresh.optimizer.param_groups[0]["lr"] == pytest.approx(scheduler.get_last_lr()[0])
    for _ in range(5):
        for s in (scheduler, fresh):
            s.optimizer.step()
            s.step()
        assert fresh.get_last_lr() == scheduler.get_last_lr()
    assert fresh.get_last_lr()[0] == pytest.approx(0.5 * 1024 ** -0.5 * 42 ** -0.5)


def test_last_batch_iteration_resumes():
    scheduler = scheduler_from_config(make_optimizer(), {"last_batch_iteration": 9})
    assert scheduler.get_last_lr() == [pytest.approx(paper_lr(11))]


def test_defaults_are_the_paper():
    scheduler = scheduler_from_config(make_optimizer(), {"type": INVERSE_SQRT_TYPE})
    assert (scheduler.warmup_num_steps, scheduler.d_model, scheduler.scale) == (4000, 1024, 1.0)


@pytest.mark.parametrize("params, key", [
    ({"warmup_num_steps": -1}, "warmup_num_steps"),
    ({"warmup_num_steps": 2.5}, "warmup_num_steps"),
    ({"d_model": 0}, "d_model"),
    ({"scale": -1.0}, "scale"),
    ({"warmup_steps": 10}, "warmup_steps"),
    ({"type": INVERSE_SQRT_TYPE, "params": {"warmup": 10}}, "scheduler.params.warmup"),
    ({"type": INVERSE_SQRT_TYPE, "params": {"warmup_num_steps": -5}},
     "scheduler.params.warmup_num_steps"),
    ({"type": "WarmupLR", "params": {}}, "scheduler.type"),
])
def test_bad_params_name_the_key(params, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        scheduler_from_config(make_optimizer(), params)


def test_constructor_checks_too():
    with pytest.raises(ValueError, match="warmup_num_steps"):
        InverseSqrtWarmup(make_optimizer(), warmup_num_steps=-4000)
