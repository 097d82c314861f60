"""The NCCL execution model: known deadlocks are found and explained, known-good programs
complete with hand-computed times, bad input is refused."""
import ast
import sys

import pytest

import ds_interlock.nccl_model as nccl_model
from ds_interlock.nccl_model import Deadlock, Op, Result, simulate


def F(label, cost=1.0):
    return Op("compute", label, cost=cost)


def send(label, comm, peer, **kw):
    return Op("send", label, comm=comm, peer=peer, **kw)


def recv(label, comm, peer, wait=True, **kw):
    return Op("recv", label, comm=comm, peer=peer, wait=wait, **kw)


def coll(label, comm, **kw):
    return Op("coll", label, comm=comm, **kw)


def two_stage(act0, act1, grad):
    """Two pipeline stages, two micro-batches, 1F1B: stage 0 sends A1 before it receives G0,
    stage 1 sends G0 before it receives A1 (the S=2 crossing). F costs 1, B costs 2."""
    rank0 = [F("F0"), send("send A0", act0, 1), F("F1"), send("send A1", act0, 1),
             recv("recv G0", grad, 1), F("B0", 2), recv("recv G1", grad, 1), F("B1", 2)]
    rank1 = [recv("recv A0", act1, 0), F("F0"), F("B0", 2), send("send G0", grad, 0),
             recv("recv A1", act1, 0), F("F1"), F("B1", 2), send("send G1", grad, 0)]
    return [rank0, rank1]


# ---------------------------------------------------------------- p2p ordering

def test_crossing_sends_on_one_stream_deadlock():
    res = simulate(two_stage("world", "world", "world"), {"world": (0, 1)}, latency=0.5)
    assert not res.ok and isinstance(res.deadlock, Deadlock)
    assert res.deadlock.cycle == [
        "rank 0: send A1 on comm world is posted and waits for its match on rank 1: recv A1",
        "rank 1: recv A1 on comm world is queued behind send G0 (stream world)",
        "rank 1: send G0 on comm world is posted and waits for its match on rank 0: recv G0",
        "rank 0: recv G0 on comm world is queued behind send A1 (stream world)",
    ]
    text = str(res.deadlock)
    assert "deadlock" in text and "rank 0" in text and "rank 1" in text
    assert "host issued all 8 ops" in res.deadlock.stuck[0]
    # what ran before the hang has times; the stuck ops have None
    assert res.times[0][:3] == [(0.0, 1.0), (1.0, 1.5), (1.0, 2.0)]
    assert res.times[0][3] is None and res.times[1][3] is None and res.times[1][4] is None
    assert res.finish == {0: 2.0, 1: 4.5} and res.makespan == 4.5


def test_per_direction_communicators_complete_with_hand_computed_times():
    comms = {"act:0>1": (0, 1), "grad:1>0": (0, 1)}
    res = simulate(two_stage("act:0>1", "act:0>1", "grad:1>0"), comms, latency=0.5)
    assert res.ok and res.deadlock is None
    # rank 0: F0 0-1, send A0 posted 1, F1 1-2, send A1 posted 2; recv G0 posted 2 (after F1).
    # rank 1: recv A0 done 1.5, F0 1.5-2.5, B0 2.5-4.5, send G0 posted 4.5 -> done 5.0;
    #   recv A1 was issued after B0, so it is posted at 4.5 -> done 5.0; F1 5-6, B1 6-8,
    #   send G1 posted 8 -> done 8.5.
    # rank 0: B0 5-7, recv G1 posted 7 (after B0) -> done 8.5, B1 8.5-10.5.
    assert res.times[1] == [(0.0, 1.5), (1.5, 2.5), (2.5, 4.5), (4.5, 5.0), (4.5, 5.0),
                            (5.0, 6.0), (6.0, 8.0), (8.0, 8.5)]
    assert res.times[0][3] == (2.0, 5.0) and res.times[0][7] == (8.5, 10.5)
    assert res.makespan == 10.5 and res.finish == {0: 10.5, 1: 8.5}


def test_mirrored_order_on_one_shared_stream_completes():
    # DeepSpeed's even/odd phases: both sides issue send/recv in the same interleaving
    rank0 = [F("F0"), send("send A0", "world", 1), F("F1"), recv("recv G0", "world", 1),
             send("send A1", "world", 1), F("B0", 2), recv("recv G1", "world", 1), F("B1", 2)]
    rank1 = [recv("recv A0", "world", 0), F("F0"), F("B0", 2), send("send G0", "world", 0),
             recv("recv A1", "world", 0), F("F1"), F("B1", 2), send("send G1", "world", 0)]
    res = simulate([rank0, rank1], {"world": (0, 1)}, latency=0.5)
    assert res.ok
    # send A1 is issued after recv G0's wait, so it is posted only at 5.0 (G0 done): 11, not 10.5
    assert res.times[0][4] == (5.0, 5.5)
    assert res.makespan == 11.0


def test_recv_whose_send_is_never_issued_is_unmatched():
    res = simulate({0: [F("F0"), recv("recv X", "world", 1)], 1: [F("F0")]}, {"world": (0, 1)})
    assert not res.ok and res.deadlock.cycle == []
    assert res.deadlock.unmatched == [
        "rank 0: recv X on comm world is unmatched: rank 1 issues only 0 send(s) to rank 0 on "
        "comm world, this is #1"]
    text = str(res.deadlock)
    assert "unmatched" in text and "no wait-for cycle" in text
    assert res.times == {0: [(0.0, 1.0), None], 1: [(0.0, 1.0)]}
    assert 1 not in res.deadlock.stuck          # rank 1 finished everything it issued


def test_matching_is_by_order_per_pair_and_communicator_not_by_label():
    # labels are only text: the first send meets the first recv, whatever they are called
    res = simulate([[send("send X", "c", 1), send("send Y", "c", 1)],
                    [recv("recv Y", "c", 0), recv("recv X", "c", 0)]], {"c": (0, 1)})
    assert res.ok
    # a send to rank 2 does not match a recv from rank 0 at rank 1
    res = simulate([[send("s", "c", 2)], [recv("r", "c", 0)], []], {"c": (0, 1, 2)})
    assert not res.ok and res.deadlock.cycle == [] and len(res.deadlock.unmatched) == 2


# ---------------------------------------------------------------- stream waits and host syncs

def test_host_sync_on_a_waited_recv_deadlocks_and_says_where_the_hosts_are():
    comms = {"x:1>0": (0, 1), "y:0>1": (0, 1)}
    item = Op("host_sync", "loss.item()")
    progs = [[recv("recv X", "x:1>0", 1), item, send("send Y", "y:0>1", 1)],
             [recv("recv Y", "y:0>1", 0), item, send("send X", "x:1>0", 0)]]
    res = simulate(progs, comms)
    assert not res.ok
    cycle = res.deadlock.cycle
    assert cycle[0] == ("rank 0: recv X on comm x:1>0 is posted and waits for its match on "
                        "rank 1: send X")
    blocked = "is not issued yet: the host is blocked at loss.item()"
    assert f"rank 1: send X on comm x:1>0 {blocked}" in cycle
    assert f"rank 0: send Y on comm y:0>1 {blocked}" in cycle
    assert sum("the host is blocked at loss.item(), waiting for the compute stream" in line
               for line in cycle) == 2
    for r in (0, 1):
        assert res.deadlock.stuck[r].startswith("host stopped at op 1 of 3: the host is blocked at "
                                                "loss.item()")
    assert res.times == {0: [None] * 3, 1: [None] * 3}


def test_wait_links_the_communicator_streams_even_without_a_host_sync():
    # torch makes the NCCL stream wait for the compute stream, which waits (work.wait) for the
    # recv: 'send Y' cannot be posted before 'recv X' completed, on both ranks -> deadlock
    comms = {"x:1>0": (0, 1), "y:0>1": (0, 1)}
    progs = [[recv("recv X", "x:1>0", 1), send("send Y", "y:0>1", 1)],
             [recv("recv Y", "y:0>1", 0), send("send X", "x:1>0", 0)]]
    res = simulate(progs, comms)
    assert not res.ok
    assert ("rank 0: send Y on comm y:0>1 cannot be posted before earlier compute-stream work "
            "completes; the compute stream is at wait(recv X)") in res.deadlock.cycle
    assert ("rank 0: wait(recv X) on the compute stream (wait=True) waits for recv X on comm "
            "x:1>0 to complete") in res.deadlock.cycle
    # without the stream waits the two directions are independent
    progs = [[recv("recv X", "x:1>0", 1, wait=False), send("send Y", "y:0>1", 1)],
             [recv("recv Y", "y:0>1", 0, wait=False), send("send X", "x:1>0", 0)]]
    assert simulate(progs, comms).ok


def test_device_sync_waits_for_communicator_streams_host_sync_does_not():
    comms = {"a": (0, 1), "b": (0, 1)}
    rank1 = [recv("recv Y", "b", 0), Op("host_sync", "sync1"), recv("recv X", "a", 0)]

    def rank0(sync):
        return [send("send X", "a", 1), Op(sync, "sync0"), send("send Y", "b", 1)]

    ok = simulate([rank0("host_sync"), rank1], comms, latency=1.0)
    assert ok.ok
    # host_sync on an empty compute stream: the host passes it at once
    assert ok.times[0] == [(0.0, 2.0), (0.0, 0.0), (0.0, 1.0)]
    assert ok.times[1] == [(0.0, 1.0), (0.0, 1.0), (1.0, 2.0)]
    bad = simulate([rank0("device_sync"), rank1], comms)
    assert not bad.ok
    assert ("rank 0: the host is blocked at sync0, waiting for the a stream, which is stuck at "
            "send X") in bad.deadlock.cycle


def test_host_sync_times_and_ops_behind_it():
    res = simulate([[F("F", 2), Op("host_sync", "item"), F("G", 3), Op("device_sync")]], {})
    assert res.ok and res.times[0] == [(0.0, 2.0), (0.0, 2.0), (2.0, 5.0), (2.0, 5.0)]
    assert res.makespan == 5.0 and res.finish == {0: 5.0}


# ---------------------------------------------------------------- eager (buffered) sends

def test_eager_sends_complete_without_the_receiver_only_when_they_fit():
    def progs(nbytes):
        return [[send("send X", "world", 1, nbytes=nbytes), recv("recv Y", "world", 1)],
                [send("send Y", "world", 0, nbytes=nbytes), recv("recv X", "world", 0)]]

    comms = {"world": (0, 1)}
    res = simulate(progs(100), comms, latency=0.5, eager_bytes=1024)
    assert res.ok and res.times[0] == [(0.0, 0.5), (0.5, 0.5)] and res.makespan == 0.5
    assert not simulate(progs(4096), comms, latency=0.5, eager_bytes=1024).ok
    # the checker's default assumes rendezvous for every size
    res = simulate(progs(100), comms)
    assert not res.ok and len(res.deadlock.cycle) == 4


def test_eager_recv_completes_at_the_later_of_its_post_and_the_send():
    comms = {"c": (0, 1)}
    late_send = [[F("F", 3), send("send X", "c", 1, nbytes=8)], [recv("recv X", "c", 0)]]
    res = simulate(late_send, comms, latency=0.5, eager_bytes=8)
    assert res.times[0][1] == (3.0, 3.5) and res.times[1] == [(0.0, 3.5)]
    late_recv = [[send("send X", "c", 1, nbytes=8)], [F("F", 10), recv("recv X", "c", 0)]]
    res = simulate(late_recv, comms, latency=0.5, eager_bytes=8)
    assert res.times[0] == [(0.0, 0.5)] and res.times[1][1] == (10.0, 10.0)


# ---------------------------------------------------------------- collectives

def test_coll_issued_by_only_some_members_is_unmatched():
    res = simulate([[coll("allreduce loss", "world")], [], [coll("allreduce loss", "world")]],
                   {"world": (0, 1, 2)})
    assert not res.ok and res.deadlock.cycle == []
    assert res.deadlock.unmatched[0] == (
        "rank 0: allreduce loss on comm world is unmatched: rank 1 issues only 0 coll(s) on comm "
        "world, this is coll #1")
    assert set(res.deadlock.stuck) == {0, 2}


def test_colls_in_the_same_order_complete_at_the_last_post():
    progs = [[F("F", r + 1), coll("A", "world"), F("G"), coll("B", "world")] for r in range(3)]
    res = simulate(progs, {"world": (0, 1, 2)}, latency=0.5)
    assert res.ok
    # A: posts at 1, 2, 3 -> 3.5 everywhere. G does not wait for A (no wait=True).
    # B on rank 2: G 3-4, so the last post is at 4 -> 4.5.
    assert [res.times[r][1] for r in range(3)] == [(1.0, 3.5), (2.0, 3.5), (3.0, 3.5)]
    assert res.times[0][3] == (3.5, 4.5) and res.makespan == 4.5


def test_colls_on_two_communicators_in_opposite_orders():
    comms = {"A": (0, 1), "B": (0, 1)}

    def progs(wait, sync):
        mid = [Op("host_sync", "sync")] if sync else []
        return [[coll("coll A", "A", wait=wait), *mid, coll("coll B", "B")],
                [coll("coll B", "B", wait=wait), *mid, coll("coll A", "A")]]

    # different communicators are different streams: nothing links them
    res = simulate(progs(False, False), comms, latency=1.0)
    assert res.ok and res.makespan == 1.0
    assert simulate(progs(False, True), comms).ok      # the compute stream is empty at the sync
    # wait=True makes the compute stream, and so the next NCCL op, wait for the first coll
    assert not simulate(progs(True, False), comms).ok
    res = simulate(progs(True, True), comms)
    assert not res.ok
    cycle = res.deadlock.cycle
    assert cycle[0] == ("rank 0: coll A on comm A is posted and waits for rank 1 to post its "
                        "coll #1: coll A")
    assert "rank 1: coll A on comm A is not issued yet: the host is blocked at sync" in cycle
    assert "rank 0: coll B on comm B is not issued yet: the host is blocked at sync" in cycle


def test_coll_on_a_sub_communicator_ignores_non_members():
    progs = [[coll("A", "even")], [F("F", 5)], [F("F", 2), coll("A", "even")]]
    res = simulate(progs, {"even": (0, 2)})
    assert res.ok and res.times[0] == [(0.0, 2.0)] and res.finish == {0: 2.0, 1: 5.0, 2: 2.0}


# ---------------------------------------------------------------- timing

def test_three_stage_pipeline_times():
    lat = 0.25
    comms = {"act:0>1": (0, 1), "act:1>2": (1, 2), "grad:2>1": (1, 2), "grad:1>0": (0, 1)}
    progs = {
        0: [F("F", 1), send("send a", "act:0>1", 1), recv("recv g", "grad:1>0", 1), F("B", 6)],
        1: [recv("recv a", "act:0>1", 0), F("F", 2), send("send a", "act:1>2", 2),
            recv("recv g", "grad:2>1", 2), F("B", 5), send("send g", "grad:1>0", 0)],
        2: [recv("recv a", "act:1>2", 1), F("F", 3), F("B", 4), send("send g", "grad:2>1", 1)],
    }
    res = simulate(progs, comms, latency=lat)
    assert res.ok
    # a recv is posted once the compute issued before it is done: rank 1's 'recv g' at 3.25
    assert res.times[1] == [(0.0, 1.25), (1.25, 3.25), (3.25, 3.5), (3.25, 10.75),
                            (10.75, 15.75), (15.75, 16.0)]
    assert res.times[2] == [(0.0, 3.5), (3.5, 6.5), (6.5, 10.5), (10.5, 10.75)]
    assert res.times[0] == [(0.0, 1.0), (1.0, 1.25), (1.0, 16.0), (16.0, 22.0)]
    assert res.finish == {0: 22.0, 1: 16.0, 2: 10.75} and res.makespan == 22.0
    # the same programs as a list, in another key order: same answer
    again = simulate({2: progs[2], 0: progs[0], 1: progs[1]}, comms, latency=lat)
    assert again.times == res.times and again.makespan == res.makespan


def test_empty_programs():
    res = simulate([[], []], {"world": (0, 1)})
    assert res == Result(ok=True, makespan=0.0, finish={0: 0.0, 1: 0.0}, times={0: [], 1: []},
                         deadlock=None)


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("kwargs, match", [
    (dict(kind="allgather"), "unknown op kind"),
    (dict(kind="send", peer=1), "communicator"),
    (dict(kind="recv", comm="world"), "peer"),
    (dict(kind="coll"), "communicator"),
    (dict(kind="compute", wait=True), "wait=True"),
    (dict(kind="compute", cost=-1.0), ">= 0"),
])
def test_bad_ops_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Op(**kwargs)


@pytest.mark.parametrize("program, comms, match", [
    ([coll("A", "world")], {"world": (1, 2)}, "rank 0 is not a member"),
    ([send("s", "world", 5)], {"world": (0, 1)}, "peer 5 is not a member"),
    ([recv("r", "nope", 1)], {"world": (0, 1)}, "unknown communicator"),
    ([], {"world": (0, 0)}, "distinct"),
])
def test_bad_programs_are_refused(program, comms, match):
    with pytest.raises(ValueError, match=match):
        simulate({0: program}, comms)


def test_module_imports_only_the_standard_library():
    tree = ast.parse(open(nccl_model.__file__).read())
    names = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
             for alias in node.names}
    names |= {node.module.split(".")[0] for node in ast.walk(tree)
              if isinstance(node, ast.ImportFrom) and node.module}
    assert names and names <= set(sys.stdlib_module_names) | {"__future__"}


# ---------------------------------------------------------------- scale

def chain(ranks=8, messages=2000):
    """A GPipe-like chain: every rank receives, computes and forwards `messages` activations,
    then the same for gradients backwards, on one communicator per direction and pair."""
    comms, progs = {}, []
    for r in range(ranks):
        p = []
        for k in range(messages):
            if r > 0:
                comms[f"act:{r - 1}>{r}"] = (r - 1, r)
                p.append(recv(f"recv act {k}", f"act:{r - 1}>{r}", r - 1))
            p.append(F(f"F{k}"))
            if r < ranks - 1:
                p.append(send(f"send act {k}", f"act:{r}>{r + 1}", r + 1))
        for k in range(messages):
            if r < ranks - 1:
                comms[f"grad:{r + 1}>{r}"] = (r, r + 1)
                p.append(recv(f"recv grad {k}", f"grad:{r + 1}>{r}", r + 1))
            p.append(F(f"B{k}", 2))
            if r > 0:
                p.append(send(f"send grad {k}", f"grad:{r}>{r - 1}", r - 1))
        progs.append(p)
    return progs, comms


def test_large_chain_completes():
    progs, comms = chain()
    assert sum(map(len, progs)) == 88000
    res = simulate(progs, comms, latency=0.125)
    assert res.ok and all(t is not None for row in res.times.values() for t in row)
    # rank 3 drops its last recv grad, B and send grad: its neighbours hang on the unmatched
    # messages, ranks 0 and 1 behind them; rank 3 itself finished all it issued
    progs[3] = progs[3][:-3]
    res = simulate(progs, comms, latency=0.125)
    assert not res.ok and res.deadlock.cycle == [] and set(res.deadlock.stuck) == {0, 1, 2, 4}
    assert [line.split(" is unmatched")[0] for line in res.deadlock.unmatched] == [
        "rank 2: recv grad 1999 on comm grad:3>2", "rank 4: send grad 1999 on comm grad:4>3"]
