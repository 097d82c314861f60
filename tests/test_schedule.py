import pytest

from ds_interlock import schedule as sc
from ds_interlock.replay import ScheduleError, replay
from ds_interlock.routing import Routing
from ds_interlock.schedule import Action, Schedule

ALL = [(S, k, c) for S in (1, 2, 3, 4, 5, 8) for k in range(1, S + 1) for c in ("furthest", "sum")]


def steady_time(schedule, flush, batches=5):
    """Per-batch time once the pipeline is in steady state."""
    t2 = replay(schedule.repeat(2), flush=flush).makespan
    tb = replay(schedule.repeat(batches), flush=flush).makespan
    return (tb - t2) / (batches - 2)


def lower_bound(r, M):
    return max(M * (1 + len(r.input_chains(s)) + 2) for s in range(r.num_stages))


@pytest.mark.parametrize("S, k, combine", ALL)
@pytest.mark.parametrize("M", [1, 3, 8])
@pytest.mark.parametrize("name", ["1f1b", "interlocked"])
def test_schedules_replay_cleanly(S, k, combine, M, name):
    r = Routing(S, k, combine)
    trace = replay(sc.train_schedule(name, r, M))
    assert len(trace.events) == sum(len(a) for a in sc.train_schedule(name, r, M).stages)
    assert replay(sc.train_schedule(name, r, M).repeat(3), flush=False).makespan > 0


@pytest.mark.parametrize("S, M", [(16, 64), (12, 32), (16, 5)])
def test_large_schedules(S, M):
    """Deep pipelines, many micro-batches (every k at S = 16, M = 5; the rest a spread of k;
    `python -m ds_interlock.replay` checks the whole range)."""
    for k in (range(1, S + 1) if M < 8 else sorted({1, 2, 3, 4, S // 2, S - 1, S})):
        for combine in ("furthest", "sum"):
            r = Routing(S, k, combine)
            inter = replay(sc.interlocked(r, M))
            if k < S:
                assert max(inter.peak_live) <= k + 1
            replay(sc.one_f_one_b(r, M))


def test_1f1b_matches_deepspeed_cost_and_memory():
    """Stock 1F1B: (M+S-1)*3F per batch with a flush, stage s holds S-s micro-batches."""
    for S, M in [(4, 8), (8, 16), (2, 4)]:
        r = Routing(S, S, "furthest")
        trace = replay(sc.one_f_one_b(r, M))
        assert trace.makespan == (M + S - 1) * 3
        assert trace.peak_live == [S - s for s in range(S)]


def test_interlocked_targets_s4_m8():
    """Issue targets with the unit costs of docs/algorithm.md at S=4, M=8, steady state."""
    S, M = 4, 8
    glob = steady_time(sc.one_f_one_b(Routing(S, S, "furthest"), M), flush=True)
    assert glob == 33
    local = steady_time(sc.interlocked(Routing(S, 1, "furthest"), M), flush=False)
    assert local <= 0.75 * glob
    for k in range(1, S):
        for combine in ("furthest", "sum"):
            r = Routing(S, k, combine)
            t = steady_time(sc.interlocked(r, M), flush=False)
            bound = lower_bound(r, M)
            assert t <= (1.05 if k == 1 else 1.10) * bound, (k, combine, t, bound)
            assert replay(sc.interlocked(r, M)).peak_live[0] <= k + 1


def test_local_sends_no_gradients():
    for S in (2, 4, 8):
        s = sc.interlocked(Routing(S, 1, "furthest"), 8)
        assert not any(a.op in ("send_grad", "recv_grad") for acts in s.stages for a in acts)


def test_furthest_never_sends_components_that_train_nothing():
    r = Routing(6, 4, "furthest")
    sent = {a.loss for acts in sc.interlocked(r, 4).stages for a in acts if a.op == "send_grad"}
    assert min(sent) >= r.k - 1          # L_j with j < k-1 train only their own heads


def test_no_stage_waits_beyond_k_minus_1():
    """Every message a stage receives comes from a neighbour, and every component it needs
    is a loss at most k-1 stages downstream."""
    for k in (1, 2, 3):
        r = Routing(8, k, "sum")
        for s, acts in enumerate(sc.interlocked(r, 6).stages):
            for a in acts:
                if a.op == "recv_grad":
                    assert a.loss - s <= k - 1


def test_checker_catches_errors():
    r = Routing(3, 2, "sum")
    good = sc.one_f_one_b(r, 2)
    stages = [list(a) for a in good.stages]
    # swap two receives on one channel: out of order
    i = next(i for i, a in enumerate(stages[1]) if a.op == "recv_act")
    j = next(j for j, a in enumerate(stages[1]) if a.op == "recv_act" and j > i)
    stages[1][i], stages[1][j] = stages[1][j], stages[1][i]
    with pytest.raises(ScheduleError):
        replay(Schedule("bad", r, 2, tuple(map(tuple, stages))))
    # weight_grad before the input chain it would free
    stages = [list(a) for a in sc.one_f_one_b(Routing(3, 3, "sum"), 1).stages]
    w = next(i for i, a in enumerate(stages[1]) if a.op == "weight_grad")
    ig = next(i for i, a in enumerate(stages[1]) if a.op == "input_grad")
    stages[1][w], stages[1][ig] = stages[1][ig], stages[1][w]
    with pytest.raises(ScheduleError, match="frees the graph"):
        replay(Schedule("bad", Routing(3, 3, "sum"), 1, tuple(map(tuple, stages))))
    # a deadlock: stage 0 waits for a gradient before sending the activation it needs
    stages = [list(a) for a in sc.one_f_one_b(Routing(2, 2, "sum"), 1).stages]
    stages[0] = [Action("load", 0), Action("forward", 0), Action("recv_grad", 0, 1), Action("send_act", 0),
                 Action("weight_grad", 0)] + stages[0][-3:]
    with pytest.raises(ScheduleError, match="deadlock"):
        replay(Schedule("bad", Routing(2, 2, "sum"), 1, tuple(map(tuple, stages))))
    # missing work
    stages = [list(a) for a in good.stages]
    stages[2] = [a for a in stages[2] if a.op != "weight_grad"]
    with pytest.raises(ScheduleError, match="missing"):
        replay(Schedule("bad", r, 2, tuple(map(tuple, stages))))


def test_flush_barrier_costs_time():
    r = Routing(4, 1, "furthest")
    s = sc.interlocked(r, 8)
    assert steady_time(s, flush=True) > steady_time(s, flush=False)


def test_grid_is_printable():
    text = sc.interlocked(Routing(2, 2, "furthest"), 2).grid()
    assert text.splitlines()[0].startswith("stage 0: L0 F0 sA0")
    assert "sG" in text.splitlines()[1]
