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
