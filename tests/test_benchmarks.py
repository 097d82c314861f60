"""The benchmark scripts run end to end (numbers are for people, not asserted against targets)."""
import json
import subprocess
import sys

from ds_interlock.launching import ROOT


def test_throughput_benchmark_runs(tmp_path):
    out, costs = tmp_path / "tp.json", tmp_path / "costs.json"
    proc = subprocess.run([sys.executable, "benchmarks/throughput.py", "--stages", "2", "--modes", "stock,3wise",
                           "--repeats", "1", "--steps", "1", "--warmup", "1", "--micro_batches", "4",
                           "--json", str(out), "--costs_out", str(costs)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    for mode in ("stock", "3wise"):
        r = data["modes"][mode]
        assert r["tokens_per_s"][0] > 0
        stages = r["stages"][0]
        assert len(stages) == 2
        for st in stages:
            assert st["busy_per_step"] > 0 and st["idle_per_step"] >= 0
            assert st["peak_activation_bytes"] > 0
    measured = json.loads(costs.read_text())
    assert set(measured["per_stage"]) == {"0", "1"}
    assert measured["per_stage"]["1"]["weight_grad"] > 0 and measured["per_stage"]["0"]["forward"] > 0
    assert measured["message_bytes"] == 4 * 64 * 64 * 4      # micro-batch x sequence x d_model x fp32
    # the aux head is measured apart from the stage's forward
    assert measured["per_stage"]["0"]["aux_head"] > 0
    # the simulator predicts each mode's step time from that mode's own measured costs
    pred = {row["mode"]: row for row in data["prediction"]}
    assert set(pred) == {"stock", "3wise"}
    for row in pred.values():
        assert row["measured_s"] > 0 and 0.2 < row["predicted_over_measured"] < 5
    # the simulator accepts the measured costs
    from ds_interlock.simulate import cost_from_json
    cost = cost_from_json(str(costs))
    from ds_interlock.schedule import Action
    assert cost(0, Action("forward", 0)) == measured["per_stage"]["0"]["forward"]


def test_aux_head_cost_benchmark_runs(tmp_path):
    out = tmp_path / "aux.json"
    proc = subprocess.run([sys.executable, "benchmarks/aux_head_cost.py", "--d_model", "32", "--heads", "2", "--vocab",
                           "500", "--seq", "8", "--batch", "1", "--ranks", "4", "--repeats", "1", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["part"] for r in rows] == ["decoder layer", "aux head, full", "aux head, rank 4"]
    assert rows[2]["params"] == 4 * (32 + 500) + 2 * 32 < rows[1]["params"]   # projection + LayerNorm
    assert all(r["seconds"] > 0 for r in rows)


def test_quality_study_harness_runs_and_resumes(tmp_path):
    """Two rules x two seeds, a low-rank arm and the shallow baseline, 2 steps each, on the sample corpus,
    two runs at a time in their own processes. A second call trains nothing (every run complete) and
    rebuilds the same table; a run trained again in this process gives the same numbers as before."""
    from ds_interlock.data.sample import write_sample_corpus
    corpus = write_sample_corpus(tmp_path / "corpus", num_train_shards=1, sentences_per_shard=1500)
    args = [sys.executable, "benchmarks/quality.py", "--data_dir", str(corpus), "--out", str(tmp_path / "q"),
            "--cache_dir", str(tmp_path / "cache"), "--rules", "local", "global", "--combine", "furthest",
            "--weights", "1.0", "--seeds", "0", "1", "--steps", "2", "--eval_interval", "2", "--eval_batches", "2",
            "--model", "tiny", "--num_layers", "4", "--num_stages", "2", "--vocab_size", "200", "--seq_len", "16",
            "--rank_arm", "4"]
    proc = subprocess.run(args + ["--jobs", "2"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "8 to train" in proc.stdout and proc.stdout.count(": done in") == 8
    data = json.loads((tmp_path / "q" / "quality.json").read_text())
    assert set(data["aggregate"]) == {"local_furthest_w1.0", "global_furthest_w1.0", "local_furthest_w1.0_r4",
                                      "shallow_global"}
    assert all(a["seeds"] == 2 and a["word_ppl_mean"] > 0 for a in data["aggregate"].values())
    assert all(len(r["stage_loss"]) == 2 for r in data["runs"])
    assert (tmp_path / "q" / "quality_time_S8.png").stat().st_size > 0
    again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "0 to train" in again.stdout and ": training" not in again.stdout
    assert json.loads((tmp_path / "q" / "quality.json").read_text())["aggregate"] == data["aggregate"]
    (tmp_path / "q" / "runs" / "local_furthest_w1.0_r4_s1.jsonl").unlink()
    third = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0 and "1 to train" in third.stdout
    assert json.loads((tmp_path / "q" / "quality.json").read_text())["aggregate"] == data["aggregate"]
