"""The NCCL model applied to what the engine issues (commcheck.py), one process, no GPU.

The checker must be able to fail: on the old layout (everything on one communicator) it
finds the S=2, k=2, M=2 crossing and spells out the cycle; it accepts DeepSpeed's own
TrainSchedule; a host that waits after every send (comms_logger) brings deadlocks back.
The engine's layout passes the matrix of every schedule the project generates.
"""
import itertools

import pytest
import torch

from ds_interlock import commcheck, schedule as sc
from ds_interlock.commcheck import BatchEnd, Case, DeadlockError, check, matrix, require_safe, run_case
from ds_interlock.replay import main as replay_main, replay
from ds_interlock.routing import Routing


def test_old_layout_deadlocks_with_the_cycle_spelled_out():
    plan = sc.one_f_one_b(Routing(2, 2, "furthest"), 2)
    result = check(plan, BatchEnd(), layout="shared")
    assert not result.ok
    text = str(result.deadlock)
    # stage 0 sends A1 before it receives G0; stage 1 sends G0 before it receives A1
    assert "stage 0 sA1" in text and "stage 1 rA1" in text
    assert "stage 1 sG0.1" in text and "stage 0 rG0.1" in text
    assert "rank 0" in text and "rank 1" in text and "cycle" in text
    with pytest.raises(DeadlockError, match=r'(?s)"1f1b" schedule, S=2, k=2.*would deadlock under NCCL.*stage 0 sA1'):
        require_safe(sc.one_f_one_b(Routing(2, 2, "furthest"), 2), layout="shared")
    # the replay takes the transport as a parameter: buffered sends pass, NCCL's rules do not
    assert replay(plan, transport="gloo").makespan > 0
    with pytest.raises(DeadlockError, match="shared layout"):
        replay(plan, transport="nccl", layout="shared")
    assert replay(plan, transport="nccl", layout="channel").makespan == replay(plan).makespan


def test_channel_layout_passes_the_same_case_and_keeps_its_time():
    """One communicator per boundary and direction: the buffered replay's rules become true,
    so the NCCL model finishes at the replay's time (with a flush, which both model)."""
    for S, k, combine, M in [(2, 2, "furthest", 2), (4, 3, "sum", 8), (8, 2, "furthest", 16), (5, 5, "sum", 4)]:
        for name in ("1f1b", "interlocked"):
            plan = sc.train_schedule(name, Routing(S, k, combine), M)
            for B in (1, 3):
                p = plan.repeat(B) if B > 1 else plan
                result = check(p, BatchEnd(flush=True))
                assert result.ok, result.deadlock
                assert result.makespan == pytest.approx(replay(p, flush=True).makespan)


def test_deepspeeds_own_order_is_accepted():
    """DeepSpeed's TrainSchedule with blocking sends on one shared communicator: safe,
    because both sides of a boundary issue mirrored sequences."""
    for S, M, B in itertools.product((2, 3, 4, 8), (1, 2, 4, 16), (1, 3)):
        for layout in ("shared", "pair"):
            result = commcheck.check_deepspeed(S, M, B, layout)
            assert result.ok, (S, M, B, layout, result.deadlock)


def test_a_host_wait_after_each_send_brings_deadlocks_back():
    """DeepSpeed's comms_logger synchronizes the device after every op: the interlocked
    order then deadlocks even on the engine's layout. The transport talks to
    torch.distributed directly, so the logger never wraps its sends."""
    plan = sc.one_f_one_b(Routing(2, 2, "furthest"), 2)    # stage 0: sA1 before rG0; stage 1: sG0 before rA1
    assert check(plan, BatchEnd(), "channel").ok
    bad = check(plan, BatchEnd(), "channel", host_sync_after_send=True)
    assert not bad.ok and "comms_logger" in str(bad.deadlock)
    several = [c for c in matrix([3, 4], micro_batches=(4,), batches=(1,))
               if run_case(c, host_sync_after_send=True)]
    assert any(c.schedule.name == "interlocked" for c in several)
    import inspect
    import torch.distributed
    from ds_interlock import wire
    assert wire.tdist is torch.distributed
    assert "tdist.isend" in inspect.getsource(wire.Comm.isend) and "tdist.irecv" in inspect.getsource(wire.Comm.irecv)


def test_one_group_per_direction_for_the_whole_pipeline_is_not_enough():
    deadlocks = [c for c in matrix([3, 4], micro_batches=(2, 4), batches=(1,))
                 if run_case(c, layout="direction")]
    assert deadlocks, "the direction layout should deadlock somewhere (messages to both neighbours share a stream)"


def test_dynamic_shapes_and_tied_stages_are_modelled():
    plan = sc.interlocked(Routing(3, 2, "sum"), 3)
    dynamic = commcheck.programs_for(plan, BatchEnd(static_shapes=False, tied=((0, 2),)))
    assert sum(op.kind == "host_sync" and "header" in op.label for op in dynamic[1]) == 3   # one per message
    assert [op.comm for op in dynamic[0] if op.kind == "coll"][:1] == ["tied0"]
    assert not any(op.comm == "tied0" for op in dynamic[1])                              # stage 1 owns no copy
    assert check(plan.repeat(2), BatchEnd(static_shapes=False, tied=((0, 2),))).ok
    from deepspeed.pipe import LayerSpec, TiedLayerSpec
    layers = [TiedLayerSpec("e", torch.nn.Linear, 2, 2)] + [LayerSpec(torch.nn.Linear, 2, 2)] * 2 + \
             [TiedLayerSpec("e", torch.nn.Linear, 2, 2)]
    assert commcheck.tied_stages(layers, [0, 1, 2, 3, 4]) == ((0, 3),)
    assert commcheck.tied_stages(layers, [0, 2, 4]) == ((0, 1),)


def test_model_issues_exactly_what_the_transport_issues():
    """One op per tensor (activations and labels), a header on the channel's first message,
    and the one host sync that reads it; gradients carry no header."""
    plan = sc.interlocked(Routing(2, 2, "sum"), 3)
    programs = commcheck.programs_for(plan, BatchEnd(flush=False))
    sends0 = [op for op in programs[0] if op.kind == "send"]
    recvs1 = [op for op in programs[1] if op.kind == "recv"]
    assert len(sends0) == 1 + 3 * 2                 # header + (activation, labels) per micro-batch
    assert len(recvs1) == 1 + 3 * 2
    assert {op.comm for op in sends0} == {"0>1"} and {op.comm for op in programs[1] if op.kind == "send"} == {"1>0"}
    assert sum(op.kind == "host_sync" and "header" in op.label for op in programs[1]) == 1
    grads = [op for op in programs[1] if op.kind == "send"]
    assert len(grads) == 3                           # one component per micro-batch, no header


def test_matrix_every_k_and_mode_up_to_8_stages():
    """Every k, both combine modes, both orders, 1 and 3 batches (with and without flush),
    inference: no deadlock on the engine's layout; on the old layout nearly every train schedule
    with k >= 2 and M >= 2 deadlocks, and nothing else does."""
    cases = list(matrix(range(2, 9), micro_batches=(1, 3)))
    assert len(cases) == 35 * 2 * 2 * 9
    bad = [str(c) for c in cases if run_case(c)]
    assert not bad, bad[:3]
    verdicts = []
    for c in cases[::5]:
        r = c.schedule.routing
        crossing = c.schedule.name != "inference" and r.k >= 2 and c.schedule.micro_batches >= 2
        old = run_case(c, layout="shared")
        assert not old or crossing, str(c)       # every deadlock needs gradients and 2+ micro-batches
        if crossing:
            verdicts.append(bool(old))
    assert sum(verdicts) >= 0.95 * len(verdicts), (sum(verdicts), len(verdicts))


@pytest.mark.parametrize("S", [12, 16])
def test_matrix_deep_pipelines(S):
    cases = list(matrix([S], ks=sorted({1, 2, 3, S // 2, S}), micro_batches=(5,), batches=(1, 3)))
    bad = [str(c) for c in cases if run_case(c)]
    assert not bad, bad[:3]


def test_matrix_many_micro_batches():
    for S, k, combine in [(16, 3, "sum"), (8, 8, "furthest"), (16, 1, "furthest")]:
        for name in ("1f1b", "interlocked"):
            one = sc.train_schedule(name, Routing(S, k, combine), 64)
            assert run_case(Case(one, BatchEnd())) is None
            assert run_case(Case(one.repeat(2), BatchEnd(flush=False))) is None


def test_command_line(capsys):
    assert replay_main(["--transport", "nccl", "--stages", "2-3", "--micro_batches", "1,2"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("180 schedules checked under nccl (channel): 0 deadlocks")
    assert replay_main(["--transport", "nccl", "--layout", "shared", "--stages", "2", "--k", "2",
                        "--micro_batches", "2"]) == 1
    out = capsys.readouterr().out
    assert "deadlocks" in out.strip().splitlines()[-1] and "first deadlock" in out
    assert replay_main(["--transport", "gloo", "--stages", "2", "--micro_batches", "2", "--deepspeed"]) == 0
