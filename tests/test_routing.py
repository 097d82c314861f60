
import pytest

from ds_interlock.routing import Routing


def test_paper_example_s4_k3_furthest():
    """docs/algorithm.md: stage 0 trained by L2, stages 1-3 by L3; boundaries carry exactly these."""
    r = Routing(4, 3, "furthest")
    assert [r.trains(s) for s in range(4)] == [[2], [3], [3], [3]]
    assert r.sends(1) == [2]            # boundary 1 -> 0 carries dL2/dh0
    assert r.sends(2) == [2, 3]         # boundary 2 -> 1 carries dL2/dh1 and dL3/dh1
    assert r.sends(3) == [3]            # boundary 3 -> 2 carries dL3/dh2
    assert r.sends(0) == []
    # per micro-batch work in F units (F=1, I=1, W=2): stages 1, 2 do 4F, stages 0, 3 do 3F
    assert [1 + len(r.input_chains(s)) + 2 for s in range(4)] == [3, 4, 4, 3]


def test_local_sends_nothing():
    for S in range(1, 7):
        r = Routing(S, 1, "sum")
        assert all(r.sends(s) == [] for s in range(S))
        assert all(r.trains(s) == [s] for s in range(S))


def test_global_furthest_is_backprop():
    for S in range(1, 7):
        r = Routing(S, S, "furthest")
        assert all(r.trains(s) == [S - 1] for s in range(S))
        assert all(r.sends(s) == [S - 1] for s in range(1, S))
        assert all(r.fused_input(s) == S - 1 for s in range(1, S))   # one backward per stage, like 1F1B
        assert all(r.input_chains(s) == [] for s in range(S))


@pytest.mark.parametrize("S, k, combine", [(S, k, c) for S in range(1, 9) for k in range(1, S + 1)
                                           for c in ("furthest", "sum")])
def test_every_component_is_needed_and_available(S, k, combine):
    r = Routing(S, k, combine)
    for s in range(S):
        assert set(r.receives(s)) <= set(r.needs(s)) | {s}      # nothing received in vain
        assert set(r.needs(s)) - {s} <= set(r.receives(s))      # everything needed arrives
        for j in r.sends(s):
            assert s <= j <= min(s + k - 2, S - 1)              # depth not used up
            if combine == "furthest":
                assert j - k + 1 >= 0                           # it still trains some stage
    # under "furthest" a component travels exactly as far as the one stage it trains
    if combine == "furthest":
        for j in range(S):
            trained = [s for s in range(S) if j in r.trains(s)]
            reached = [s for s in range(S) if j in r.needs(s)]
            if trained:
                assert min(reached) == min(trained)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        Routing(3, 0)
    with pytest.raises(ValueError):
        Routing(3, 4)
    with pytest.raises(ValueError):
        Routing(3, 2, "mean")
