import importlib.util
import json
import os
import subprocess
import sys

import pytest

from ds_interlock.routing import Routing
from ds_interlock.schedule import interlocked, one_f_one_b
from ds_interlock.simulate import (COMPUTE, chrome_trace, cost_from_json, format_table, replicate_stages,
                                   simulate, stage_work, timeline_png)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = ("forward", "input_grad", "weight_grad", "send_act", "recv_act", "send_grad", "recv_grad")


def glob(S=4, M=8):
    return one_f_one_b(Routing(S, S, "furthest"), M)


def local(S=4, M=8):
    return interlocked(Routing(S, 1, "furthest"), M)


def uniform(S, **override):
    ops = {"forward": 1.0, "input_grad": 1.0, "weight_grad": 2.0, **override}
    return {"per_stage": {str(s): dict(ops) for s in range(S)}}


def test_unit_costs_known_case():
    one = simulate(glob(), batches=1, flush=True)
    assert one.makespan == 33 and one.step_time == 33 and not one.steady
    assert one.peak_live == [4, 3, 2, 1]
    res = simulate(glob(), batches=5, flush=True)
    assert res.steady and res.step_time == 33
    assert res.makespan == 5 * 33              # a flush makes batches simply add up
    assert res.lower_bound == 24 and res.bound_ratio == pytest.approx(33 / 24)
    loc = simulate(local(), batches=5, flush=False)
    assert loc.step_time == 24 and loc.lower_bound == 24 and loc.bound_ratio == 1
    assert loc.peak_live[0] <= 2
    # without the flush, fill/drain only once: the whole run is shorter than 5 flushed batches
    assert loc.makespan < 5 * simulate(local(), batches=1, flush=True).makespan


def test_lower_bound_is_busiest_stage_work():
    r = Routing(4, 3, "furthest")
    res = simulate(interlocked(r, 8), batches=3, flush=False)
    assert res.work == [24, 32, 32, 24]        # docs/algorithm.md: stages 1, 2 do 4F per micro-batch
    assert res.lower_bound == 32
    assert res.step_time >= res.lower_bound


def test_measured_costs_match_unit_costs_and_scale(tmp_path):
    path = tmp_path / "costs.json"
    path.write_text(json.dumps(uniform(4)))
    cost = cost_from_json(str(path))
    same = simulate(glob(), cost=cost, batches=4, flush=True)
    assert same.step_time == 33 and same.unit == "s"
    # doubling every forward: 1F1B-global = (M+S-1) * (F + W) = 11 * (2 + 2) with a flush
    double = simulate(glob(), cost=cost_from_json(uniform(4, forward=2.0)), batches=4, flush=True)
    assert double.step_time == (8 + 3) * 4
    assert double.lower_bound == 8 * 4
    # one slow stage: local learning is bounded by that stage alone
    slow = uniform(4)
    slow["per_stage"]["2"]["forward"] = 3.0
    res = simulate(local(), cost=cost_from_json(slow), batches=5, flush=False)
    assert res.lower_bound == 8 * 5 and res.step_time == pytest.approx(40)
    assert res.work[2] == 40 and res.work[0] == 24


def test_measured_costs_missing_ops_cost_nothing_but_missing_stages_fail():
    cost = cost_from_json({"per_stage": {"0": {"forward": 0.5, "step": 0.25}, "1": {}}})
    s = one_f_one_b(Routing(2, 2, "furthest"), 2)
    assert stage_work(s, cost) == [2 * 0.5 + 0.25, 0.0]
    with pytest.raises(ValueError, match="no entry for stage"):
        simulate(glob(), cost=cost)
    with pytest.raises(ValueError, match="per_stage"):
        cost_from_json({"0": {"forward": 1.0}})


def test_message_costs_delay_the_pipeline():
    free = simulate(glob(), cost=cost_from_json(uniform(4)), batches=3, flush=True)
    slow = simulate(glob(), cost=cost_from_json(uniform(4, send_act=0.5, recv_grad=0.5)),
                    batches=3, flush=True)
    assert slow.step_time > free.step_time


@pytest.mark.parametrize("k, flush", [(1, False), (2, False), (3, True), (4, False)])
def test_idle_fractions_consistent(k, flush):
    res = simulate(interlocked(Routing(4, k, "sum"), 8), batches=4, flush=flush)
    for s in range(4):
        assert 0 <= res.idle_fraction[s] <= 1 and 0 <= res.steady_idle[s] <= 1
        assert res.idle_fraction[s] == pytest.approx(1 - res.busy[s] / res.makespan)
        assert res.busy[s] == pytest.approx(4 * res.work[s])
        assert res.steady_idle[s] == pytest.approx(1 - res.work[s] / res.step_time)
    assert min(res.steady_idle) == pytest.approx(1 - res.lower_bound / res.step_time)


def test_simulate_rejects_bad_input():
    with pytest.raises(ValueError):
        simulate(glob(), batches=0)
    with pytest.raises(ValueError):
        simulate(glob().repeat(2), batches=2)


def test_chrome_trace(tmp_path):
    res = simulate(interlocked(Routing(4, 3, "furthest"), 8), batches=2, flush=False)
    path = tmp_path / "trace.json"
    chrome_trace(res, str(path))
    data = json.loads(path.read_text())
    xs = [e for e in data["traceEvents"] if e["ph"] == "X"]
    compute = [a for acts in res.trace.schedule.stages for a in acts if a.op in COMPUTE]
    assert len([e for e in xs if e["cat"] in COMPUTE]) == len(compute)
    assert len(xs) == len(compute)             # unit costs: messages take no time, no events
    assert {e["tid"] for e in xs} == {0, 1, 2, 3}
    for e in xs:
        assert set(e) >= {"name", "ph", "ts", "dur", "pid", "tid", "args"}
        if e["cat"] == "forward":
            assert e["dur"] == 1000            # one unit = 1000 us
        if e["cat"] == "weight_grad":
            assert e["dur"] == 2000
    for tid in range(4):
        mine = sorted((e["ts"], e["dur"]) for e in xs if e["tid"] == tid)
        for (t0, d0), (t1, _) in zip(mine, mine[1:]):
            assert t0 + d0 <= t1 + 1e-6
    assert max(e["ts"] + e["dur"] for e in xs) == res.makespan * 1000


def test_chrome_trace_measured_seconds(tmp_path):
    res = simulate(local(2, 2), cost=cost_from_json(uniform(2, send_act=0.5)), flush=True)
    path = tmp_path / "trace.json"
    chrome_trace(res, str(path))
    xs = [e for e in json.loads(path.read_text())["traceEvents"] if e["ph"] == "X"]
    assert {e["dur"] for e in xs if e["cat"] == "forward"} == {1e6}
    assert len([e for e in xs if e["cat"] == "send_act"]) == 2   # messages that take time show
    assert max(e["ts"] + e["dur"] for e in xs) == pytest.approx(res.makespan * 1e6)


def test_timeline_png(tmp_path):
    import matplotlib.image as mpimg
    a = simulate(glob(), batches=3, flush=True)
    b = simulate(interlocked(Routing(4, 3, "furthest"), 8), batches=3, flush=False)
    path = tmp_path / "t.png"
    timeline_png([a, b.trace], str(path), titles=["1f1b", "3-wise"])
    assert path.stat().st_size > 20_000
    img = mpimg.imread(str(path))
    assert img.shape[0] > 300 and img.shape[1] > 1000
    assert img[..., :3].std() > 0.05           # not a blank canvas


def test_format_table():
    rows = [{"name": "a", "t": 33.0, "r": 1.0}, {"name": "longer", "t": 24.5, "r": 0.7272}]
    text = format_table(rows, ["name", ("t", "time"), "r"])
    lines = text.splitlines()
    assert lines[0].split() == ["name", "time", "r"]
    assert len({len(line) for line in lines[:2]}) == 1
    assert "33" in lines[2] and "0.727" in lines[3]
    assert lines[2].index("33") + 2 == lines[3].index("24.5") + 4   # numbers right-aligned
    md = format_table([["x", 1]], ["a", "b"], markdown=True).splitlines()
    assert md[0].startswith("| a") and md[1].startswith("|---") and md[1].endswith(":|")


def test_benchmark_script_quick(tmp_path):
    out = tmp_path / "bench.json"
    md = tmp_path / "bench.md"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "schedule.py"), "--quick",
                           "--batches", "3", "--json", str(out), "--markdown", str(md)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert set(data) >= {"parameters", "rows", "targets", "all_targets_pass"}
    assert data["parameters"]["stages"] == [4] and data["parameters"]["micro_batches"] == [8]
    rows = data["rows"]
    for r in rows:
        assert set(r) >= {"schedule", "S", "M", "k", "combine", "table", "latency", "step", "vs_1f1b",
                          "vs_best_global", "best_global", "live_s0"}
    assert {r["table"] for r in rows} == {"main", "equal_memory", "latency"}
    main = {r["schedule"]: r for r in rows if r["table"] == "main"}
    assert {"DeepSpeed 1F1B", "torch ZB1P", "torch ZBV", "torch DualPipeV", "DeepSpeed DualPipeV",
            "interlocked k=1", "interlocked k=3 sum", "1f1b-order k=3"} <= set(main)
    base = main["DeepSpeed 1F1B"]
    assert base["step"] == 33 and base["vs_1f1b"] == 1 and base["live_s0"] == 4
    best = min(r["step"] for r in main.values() if r["kind"] == "global")
    assert all(r["best_global"] == next(n for n, x in main.items() if x["kind"] == "global" and x["step"] == best)
               for r in main.values())
    assert main["interlocked k=1"]["vs_best_global"] == pytest.approx(24 / best)
    eq = [r for r in rows if r["table"] == "equal_memory" and r["kind"] == "global" and r["k"] == 2
          and r["combine"] == "furthest"]
    assert eq and all(r["schedule"].endswith("+recompute") for r in eq)
    assert {r["latency"] for r in rows if r["table"] == "latency"} == {0.0, 0.1, 0.5, 1.0}
    lat1 = {r["schedule"]: r for r in rows if r["table"] == "latency" and r["latency"] == 1.0}
    assert lat1["DeepSpeed 1F1B"]["step"] > 33                  # latency slows the global order
    assert lat1["interlocked k=1"]["step"] == 24                # local sends no gradients
    assert lat1["interlocked k=2 replanned"]["nccl_checked"]
    assert data["targets"] == []                                # goals need S = 8, M = 8
    assert "S = 4, M = 8" in md.read_text()


def test_benchmark_script_with_measured_costs(tmp_path):
    """A profile of one stage, replicated to S = 4, with an aux-head entry."""
    one = uniform(1, forward=2.0)
    one["per_stage"]["0"]["aux_head"] = 1.0
    costs = tmp_path / "costs.json"
    costs.write_text(json.dumps(one))
    out = tmp_path / "bench.json"
    # in-process (the subprocess test above covers the command line; this saves an import)
    spec = importlib.util.spec_from_file_location("bench_schedule",
                                                  os.path.join(ROOT, "benchmarks", "schedule.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--quick", "--batches", "3", "--costs", str(costs), "--replicate_stages", "4",
                       "--no_nccl_check", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["parameters"]["unit"] == "s" and data["parameters"]["stages"] == [4]
    main = {r["schedule"]: r for r in data["rows"] if r["table"] == "main"}
    assert main["DeepSpeed 1F1B"]["step"] == (8 + 3) * 4           # (M + S - 1)(F + B), no heads
    assert main["interlocked k=1"]["step"] == 8 * (2 + 2 + 1)        # forward, weight chain, aux head
    lat = [r for r in data["rows"] if r["table"] == "latency" and r["latency"] == 1.0]
    assert {r["latency_abs"] for r in lat} == {2.0}                  # latency in forwards


def test_replicate_stages():
    data = {"per_stage": {"1": {"forward": 0.5}, "2": {"forward": 0.7}}}
    with pytest.raises(ValueError, match="name the one"):
        replicate_stages(data, 4)
    rep = replicate_stages(data, 4, stage=2)
    assert set(rep["per_stage"]) == {"0", "1", "2", "3"} and rep["per_stage"]["3"]["forward"] == 0.7
    assert cost_from_json(rep).num_stages == 4
