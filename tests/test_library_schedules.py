"""Other libraries' global schedules as rank-level orders, timed under our cost and latency model."""
import hashlib

import pytest

from ds_interlock.actions import unit_cost
from ds_interlock.commcheck import BatchEnd, require_safe
from ds_interlock.library_schedules import (LIBRARY, Unavailable, deepspeed_dualpipev, from_schedule, torch_zbh1,
                                            torch_zbv)
from ds_interlock.rank_order import RankOrder, Task, cap_memory, check_complete, peak_live, time_order
from ds_interlock.replay import ScheduleError, replay
from ds_interlock.routing import Routing
from ds_interlock.schedule import interlocked, one_f_one_b
from ds_interlock.simulate import simulate, simulate_order, unit_costs

SHAPES = [(S, M) for S in (4, 8) for M in (4, 8, 16, 32)]


def steady(order, latency=0.0, cost=unit_cost):
    return simulate_order(order, cost, batches=5, latency=latency).step_time


@pytest.mark.parametrize("S, M", SHAPES)
def test_library_orders_are_complete_and_run(S, M):
    """Every order a library offers does each (virtual stage, micro-batch) forward once and
    backward once on the rank that holds the stage, and replays without deadlock."""
    for name, make in LIBRARY.items():
        try:
            order = make(S, M)
        except Unavailable:
            assert "DualPipeV" in name and M < 2 * S        # both DualPipeVs need M >= 2S
            continue
        check_complete(order)
        trace = time_order(order.repeat(2), unit_cost)
        assert trace.makespan > 0
        assert sum(1 for t in order.ranks[0] if t.op != "commit") >= 2 * M


def test_v_schedules_fold_the_pipeline():
    """ZBV and DualPipeV: rank 0 holds the first and the last of 2S stages, rank S-1 the middle two."""
    for order in (torch_zbv(4, 8), deepspeed_dualpipev(4, 8)):
        assert order.num_stages == 8
        assert [v for v in range(8) if order.stage_rank[v] == 0] == [0, 7]
        assert [v for v in range(8) if order.stage_rank[v] == 3] == [3, 4]
        assert order.share(0) == 0.5


def test_deepspeed_1f1b_times_the_same_in_both_replays():
    """Our 1F1B Schedule through replay and, converted, through the rank-level replay: the same
    step time, at any latency, and DeepSpeed's (M + S - 1)(F + B) with a flush."""
    for S, M in [(4, 8), (8, 8), (8, 16)]:
        sched = one_f_one_b(Routing(S, S, "furthest"), M)
        order = from_schedule(sched)
        assert steady(order) == (M + S - 1) * 3
        for c in (0.0, 0.5, 1.0):
            ours = simulate(sched, batches=5, flush=True, latency=c).step_time
            assert steady(order, latency=c) == pytest.approx(ours)


@pytest.mark.parametrize("S, M", [(4, 8), (8, 8), (8, 16), (8, 32)])
def test_library_bubbles_match_the_papers(S, M):
    """Known bubbles, per batch, at F = I = W (our unit costs: F = I = 1, B = 2 so W = 1):
    interleaved 1F1B (Megatron, v = 2) (S-1)(F+B)/2; ZB-H1 (S-1)(F+I-W); ZB1P, v = 2, half that."""
    work = 3 * M
    assert steady(LIBRARY["torch Interleaved1F1B"](S, M)) == work + (S - 1) * 3 / 2
    assert steady(torch_zbh1(S, M)) == work + (S - 1) * 1
    assert steady(LIBRARY["torch ZB1P"](S, M)) == work + (S - 1) * 1 / 2


def test_split_backward_costs_add_up():
    """A split backward costs what a full one does (I + W = B), so at zero bubble the work
    per rank of any library order is M (F + B) = 3M at unit costs."""
    for make in LIBRARY.values():
        try:
            res = simulate_order(make(8, 16), unit_cost, batches=3)
        except Unavailable:
            continue
        assert res.work == pytest.approx([48.0] * 8)
        assert res.step_time >= 48


def test_checks_catch_bad_orders():
    good = from_schedule(one_f_one_b(Routing(3, 3, "furthest"), 2))
    ranks = [list(t) for t in good.ranks]
    missing = RankOrder("bad", 2, good.stage_rank, (tuple(ranks[0][:-1]),) + good.ranks[1:])
    with pytest.raises(ScheduleError, match="stage 0 micro-batch 1"):
        check_complete(missing)
    wrong_rank = RankOrder("bad", 2, (0, 1, 1), good.ranks)
    with pytest.raises(ScheduleError, match="held by rank"):
        check_complete(wrong_rank)
    # rank 0 waits for backward 0 before sending forward 1, which rank 1 needs first: a cycle
    assert [str(t) for t in ranks[0]] == ["F0@0", "F1@0", "B0@0", "B1@0"]
    cyclic = (ranks[0][0], ranks[0][2], ranks[0][1], ranks[0][3])
    with pytest.raises(ScheduleError, match="wait forever"):
        time_order(RankOrder("bad", 2, good.stage_rank, (cyclic,) + good.ranks[1:]), unit_cost)
    # a weight part before its input-gradient part
    order = torch_zbh1(2, 2)
    r1 = list(order.ranks[1])
    i = next(n for n, t in enumerate(r1) if t.op == "input_grad")
    w = next(n for n, t in enumerate(r1) if t.op == "weight" and t.mb == r1[i].mb)
    r1[i], r1[w] = r1[w], r1[i]
    with pytest.raises(ScheduleError):
        check_complete(RankOrder("bad", 2, order.stage_rank, (order.ranks[0], tuple(r1))))


def test_deepspeed_dualpipev_commits_delay_sends():
    """DeepSpeed's DualPipeV sends at the next CommitP2P: timed with its commits it is never
    faster than the same compute order with sends leaving at once."""
    order = deepspeed_dualpipev(4, 8)
    bare = RankOrder("no commits", 8, order.stage_rank,
                     tuple(tuple(t for t in ts if t.op != "commit") for ts in order.ranks))
    assert steady(order) >= steady(bare)
    assert any(t.op == "commit" for t in order.ranks[0])
    with pytest.raises(Unavailable, match="2 \\* 4"):
        deepspeed_dualpipev(4, 7)


def test_cap_memory_recomputes_what_does_not_fit():
    order = from_schedule(one_f_one_b(Routing(4, 4, "furthest"), 8))
    assert peak_live(order) == [4, 3, 2, 1]
    same = cap_memory(order, [4, 3, 2, 1])
    assert same.ranks == order.ranks                       # everything fits: nothing changes
    capped = cap_memory(order, [2, 2, 2, 2])
    check_complete(capped)
    assert peak_live(capped) == [2, 2, 2, 1]
    extra = sum(1 for t in capped.ranks[0] if t.op == "recompute")
    assert extra > 0
    res = simulate_order(capped, unit_cost, batches=3)
    assert res.work[0] == 24 + extra                       # each recompute costs one forward
    assert res.step_time > steady(order)


def test_replay_latency_delays_each_receive():
    for S, k, combine, M in [(4, 2, "furthest", 8), (4, 3, "sum", 4), (8, 3, "furthest", 8), (8, 8, "sum", 5)]:
        sched = interlocked(Routing(S, k, combine), M).repeat(3)
        for flush in (True, False):
            assert replay(sched, flush=flush, latency=0.0).events == replay(sched, flush=flush).events
            events = replay(sched, flush=flush, latency=0.5).events
            sends = {}
            for s, act, start, end in events:
                if act.op.startswith("send"):
                    sends.setdefault((s, act.op, act.mb, act.loss), []).append(end)
            for s, act, start, end in events:
                if act.op.startswith("recv"):
                    src = s - 1 if act.op == "recv_act" else s + 1
                    sent = sends[(src, "send_act" if act.op == "recv_act" else "send_grad", act.mb, act.loss)]
                    assert start >= min(sent) + 0.5 - 1e-9


def test_latency_delays_messages_not_compute():
    local = interlocked(Routing(4, 1, "furthest"), 8)
    assert simulate(local, batches=5, flush=False, latency=1.0).step_time == 24   # local sends no gradients
    glob = one_f_one_b(Routing(4, 4, "furthest"), 8)
    assert simulate(glob, batches=5, flush=True, latency=1.0).step_time > 33


def test_aux_head_cost_is_charged_on_head_stages():
    cost = unit_costs(aux_head=0.5)
    res = simulate(interlocked(Routing(4, 1, "furthest"), 8), cost, batches=4, flush=False)
    assert res.work == [28, 28, 28, 24]                    # the last stage has no aux head
    plain = simulate(one_f_one_b(Routing(4, 4, "furthest"), 8), cost, batches=4, flush=True)
    assert plain.work == [24] * 4                          # plain backprop: heads are optional probes


def _grid_digest():
    h = hashlib.sha256()
    for S in (1, 2, 3, 4, 5, 8):
        for k in range(1, S + 1):
            for c in ("furthest", "sum"):
                for M in (1, 3, 4, 8, 16, 32):
                    for max_live in (None, 2, 5):
                        h.update(interlocked(Routing(S, k, c), M, max_live=max_live).grid().encode())
    return h.hexdigest()


def test_default_interlocked_schedule_unchanged():
    """The engine's schedules, byte for byte as before cost- and latency-aware planning existed
    (digest of every grid at S 1-8, all k, both combines, M 1-32, three memory caps)."""
    assert _grid_digest() == "5109954a135bbf47b172e847d315e60d04b5b7be1684c358f934f416c0ee444f"
    r = Routing(8, 3, "furthest")
    assert interlocked(r, 8, cost=unit_cost, latency=0.0).stages == interlocked(r, 8).stages


def test_replanning_for_latency_helps_3wise():
    r = Routing(8, 3, "furthest")
    default = simulate(interlocked(r, 8), batches=5, flush=False, latency=1.0)
    plan = interlocked(r, 8, cost=unit_cost, latency=1.0)
    replanned = simulate(plan, batches=5, flush=False, latency=1.0)
    assert replanned.step_time < default.step_time
    assert max(replanned.peak_live) <= r.k + 1             # same memory cap


@pytest.mark.parametrize("S", [4, 8])
def test_replanned_schedules_pass_replay_and_nccl_model(S):
    """Every schedule the benchmark re-plans (its whole grid) is correct and cannot deadlock under NCCL."""
    cost = unit_costs(aux_head=0.5)
    for M in (4, 8, 16, 32):
        for k in sorted({1, 2, 3, S}):
            for combine in ("furthest", "sum"):
                for c in (0.1, 0.5, 1.0):
                    plan = interlocked(Routing(S, k, combine), M, cost=cost, latency=c)
                    replay(plan.repeat(2), flush=False)
                    for flush in (False, True):
                        require_safe(plan, BatchEnd(flush=flush))


def test_peak_live_counts_half_stages():
    order = RankOrder("two halves", 1, (0, 0), ((Task(0, "forward", 0), Task(1, "forward", 0),
                                                  Task(1, "backward", 0), Task(0, "backward", 0)),))
    assert peak_live(order) == [1.0]
    assert time_order(order, unit_cost).makespan == 0.5 + 0.5 + 1 + 1


def test_timeline_draws_library_orders(tmp_path):
    from ds_interlock.simulate import timeline_png
    a = simulate_order(LIBRARY["torch ZB1P"](4, 8), unit_cost, batches=2)
    b = simulate(interlocked(Routing(4, 2, "furthest"), 8), batches=2, flush=False)
    path = tmp_path / "t.png"
    timeline_png([a, b], str(path))
    assert path.stat().st_size > 20_000
