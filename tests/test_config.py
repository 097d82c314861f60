import pytest

from ds_interlock.config import InterlockingConfig, InterlockingConfigError, from_ds_config


@pytest.mark.parametrize("k, want", [(1, 1), (3, 3), ("local", 1), ("pairwise", 2), ("3wise", 3),
                                     ("global", 4), ("2", 2), (9, 4), (4.0, 4)])
def test_k_values_resolve(k, want):
    cfg = from_ds_config({"interlocking": {"k": k}})
    assert cfg.resolve_k(4) == want


def test_defaults():
    cfg = from_ds_config({"interlocking": {"k": 2}})
    assert (cfg.combine, cfg.aux_loss_weight, cfg.schedule) == ("furthest", 1.0, "interlocked")
    assert from_ds_config({}) == InterlockingConfig()        # no block: plain backprop
    assert from_ds_config({}).resolve_k(3) == 3


@pytest.mark.parametrize("block, key", [
    ({"k": 0}, "interlocking.k"), ({"k": -2}, "interlocking.k"), ({"k": "fourwise"}, "interlocking.k"),
    ({"k": True}, "interlocking.k"), ({"k": 2.5}, "interlocking.k"), ({"k": None}, "interlocking.k"),
    ({"k": 2, "combine": "mean"}, "interlocking.combine"),
    ({"k": 2, "aux_loss_weight": -0.1}, "interlocking.aux_loss_weight"),
    ({"k": 2, "aux_loss_weight": "1"}, "interlocking.aux_loss_weight"),
    ({"k": 2, "aux_loss_weight": float("nan")}, "interlocking.aux_loss_weight"),
    ({"k": 2, "aux_loss_weight": float("inf")}, "interlocking.aux_loss_weight"),
    ({"k": 2, "schedule": "gpipe"}, "interlocking.schedule"),
    ({"k": 2, "combin": "sum"}, "combin"),
])
def test_bad_values_name_the_key(block, key):
    with pytest.raises(InterlockingConfigError, match=key.replace(".", r"\.")):
        from_ds_config({"interlocking": block})


def test_error_is_both_value_and_type_error():
    with pytest.raises(ValueError):
        from_ds_config({"interlocking": {"k": 0}})
    with pytest.raises(TypeError):
        from_ds_config({"interlocking": {"k": 0}})
    with pytest.raises(InterlockingConfigError, match='"interlocking"'):
        from_ds_config({"interlocking": [1, 2]})


def test_misspelt_block_is_refused():
    from ds_interlock.config import InterlockingConfigError, from_ds_config
    for key in ("interlockng", "Interlocking", "INTERLOCKING", "interlocking_"):
        with pytest.raises(InterlockingConfigError, match=f'"{key}" looks like a misspelling'):
            from_ds_config({key: {"k": 2}, "train_batch_size": 8})
    assert from_ds_config({"train_batch_size": 8, "gradient_clipping": 1.0}).k == "global"


def test_start_up_line_says_what_is_trained():
    from ds_interlock.config import describe, from_ds_config
    assert describe(from_ds_config({"interlocking": {"k": 2}}), 4, True) == \
        "ds_interlock: 4 stages, k=2 (pairwise), combine=furthest, schedule=interlocked, aux heads on stages 0-2"
    line = describe(from_ds_config({"interlocking": {"k": "3wise"}}), 2, True)
    assert "k=2 (global)" in line and "more than the 2 stages" in line
    assert "no aux heads" in describe(from_ds_config({}), 4, False)


@pytest.mark.parametrize("value", [True, False, "auto"])
def test_batch_input_grads_values(value):
    assert from_ds_config({"interlocking": {"k": 2, "batch_input_grads": value}}).batch_input_grads == value
    assert from_ds_config({"interlocking": {"k": 2}}).batch_input_grads is False


@pytest.mark.parametrize("value", [1, 0, "yes", "Auto", None, "true"])
def test_batch_input_grads_bad_values_name_the_key(value):
    with pytest.raises(InterlockingConfigError, match=r'"interlocking\.batch_input_grads": expected true, false or "auto"'):
        from_ds_config({"interlocking": {"k": 2, "batch_input_grads": value}})
