"""examples/train_lm.py under an operator's hand: preemption (SIGTERM to the `deepspeed` command,
the launcher killed), checks that fail in the first minute, and resumes of a different run.
Real 2-process launches on CPU where it is about processes; one process where it is not."""
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from ds_interlock import checkpoints
from ds_interlock.launching import ROOT, free_port, remove_shm

SCRIPT = os.path.join(ROOT, "examples", "train_lm.py")
CONFIG = os.path.join(ROOT, "ds_configs", "pairwise.json")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from ds_interlock.data.sample import write_sample_corpus
    root = tmp_path_factory.mktemp("corpus")
    return str(write_sample_corpus(root, num_train_shards=1, sentences_per_shard=2000))


def args_for(tmp_path, corpus, save_dir, max_steps=100000, extra=()):
    return ["--deepspeed_config", CONFIG, "--data_dir", corpus, "--cache_dir", str(tmp_path.parent / "cache"),
            "--num_stages", "2", "--model", "tiny", "--vocab_size", "300", "--seq_len", "32",
            "--max_steps", str(max_steps), "--eval_interval", "0", "--save_dir", str(save_dir),
            "--save_interval", "100000", *extra]


def ranks_of(marker):
    out = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()
    return [p for p in out if int(p) != os.getpid()]


def start_job(tmp_path, corpus, save_dir, extra=()):
    port = free_port()
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port),
           SCRIPT, *args_for(tmp_path, corpus, save_dir, extra=extra)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, reached = [], threading.Event()

    def read():
        for line in proc.stdout:          # ends when every process holding the pipe has exited
            lines.append(line)
            if line.startswith("step 3/"):
                reached.set()
        reached.set()
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return proc, lines, reached, reader, port


@pytest.mark.parametrize("how", ["sigterm_command", "sigterm_launcher", "sigkill_launcher"])
def test_preemption_saves_and_ends_every_rank(tmp_path, corpus, how):
    """SIGTERM to the `deepspeed` command (which alone dies), SIGTERM to DeepSpeed's launch.py (which
    forwards it to one rank at a time) or SIGKILL to launch.py: every rank notices, finishes its
    step, the job saves a complete checkpoint and the ranks exit."""
    save_dir = tmp_path / "save"
    proc, lines, reached, reader, port = start_job(tmp_path, corpus, save_dir)
    try:
        assert reached.wait(240), "".join(lines)[-3000:]
        assert proc.poll() is None, "".join(lines)[-3000:]
        if how == "sigterm_command":
            proc.send_signal(signal.SIGTERM)
        else:
            launcher = subprocess.run(["pgrep", "-f", "deepspeed.launcher.launch"], capture_output=True,
                                      text=True).stdout.split()
            launcher = [p for p in launcher if str(port) in open(f"/proc/{p}/cmdline").read()]
            assert len(launcher) == 1
            os.kill(int(launcher[0]), signal.SIGKILL if how == "sigkill_launcher" else signal.SIGTERM)
        start = time.time()
        reader.join(90)
        assert not reader.is_alive(), "ranks still running 90 s after the signal:\n" + "".join(lines)[-3000:]
        took = time.time() - start
    finally:
        for pid in ranks_of(str(save_dir)):
            os.kill(int(pid), signal.SIGKILL)
        remove_shm(port)
    log = "".join(lines)
    assert "preempted at step" in log and "exiting with 143" in log, log[-3000:]
    step = int(log.split("preempted at step ")[1].split()[0])
    tag, note = checkpoints.resolve(str(save_dir))
    assert tag == f"global_step{step}" and note is None
    assert step >= 3 and took < 60
    assert not ranks_of(str(save_dir))


def test_a_hung_rank_ends_the_job_naming_it(tmp_path, corpus):
    """A rank stopped with SIGSTOP: its neighbour gives up after --timeout_s, names the rank and stage
    that stopped answering, and the job ends instead of stalling for DeepSpeed's 10 minutes."""
    save_dir = tmp_path / "save"
    proc, lines, reached, reader, port = start_job(tmp_path, corpus, save_dir, extra=["--timeout_s", "5"])
    stopped = None
    try:
        assert reached.wait(240), "".join(lines)[-3000:]
        ranks = [p for p in ranks_of(str(save_dir)) if "RANK=1" in open(f"/proc/{p}/environ").read().split("\0")]
        assert len(ranks) == 1, ranks
        stopped = int(ranks[0])
        os.kill(stopped, signal.SIGSTOP)
        start = time.time()
        while time.time() - start < 60 and not any("stopped answering" in line for line in lines):
            time.sleep(0.5)
        took = time.time() - start
        # the rest is DeepSpeed's launcher: it ends the other ranks, giving a stopped one 30 s to answer
        # SIGTERM before SIGKILL; spare the test that wait
        os.kill(stopped, signal.SIGKILL)
        reader.join(60)
        assert not reader.is_alive(), "the job stalled:\n" + "".join(lines)[-3000:]
    finally:
        if stopped is not None:
            try:
                os.kill(stopped, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in ranks_of(str(save_dir)):
            os.kill(int(pid), signal.SIGKILL)
        remove_shm(port)
    log = "".join(lines)
    assert "rank 1 (stage 1) stopped answering" in log, log[-3000:]
    assert took < 60, took
    assert proc.wait(30) != 0


def run_main(argv):
    import importlib.util
    spec = importlib.util.spec_from_file_location("train_lm", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as err:
        module.main(argv)
    return str(err.value)


def test_bad_configs_fail_before_data_preparation(tmp_path, corpus):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"train_micro_batch_size_per_gpu": 2,\n "interlocking": {"k": 2,}}')
    msg = run_main(["--deepspeed_config", str(bad_json), "--single_process"])
    assert str(bad_json) in msg and "line 2" in msg
    bad_block = tmp_path / "block.json"
    bad_block.write_text('{"train_micro_batch_size_per_gpu": 2, "interlocking": {"k": "fourwise"}}')
    assert '"interlocking.k"' in run_main(["--deepspeed_config", str(bad_block), "--single_process"])
    zero = tmp_path / "zero.json"
    zero.write_text('{"train_micro_batch_size_per_gpu": 0}')
    assert '"train_micro_batch_size_per_gpu" must be an integer >= 1' in run_main(
        ["--deepspeed_config", str(zero), "--single_process"])
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o500)
    if os.access(locked, os.W_OK):      # running as root: permissions do not bind
        locked = tmp_path / "a_file"
        locked.write_text("x")
    assert "--save_dir" in run_main(["--deepspeed_config", CONFIG, "--single_process", "--save_dir",
                                     str(locked / "ckpt")])


def test_train_batch_size_alone_is_enough():
    import importlib.util
    spec = importlib.util.spec_from_file_location("train_lm", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.batch_shape({"train_batch_size": 32}, "c.json", 2) == (16, 1)
    assert module.batch_shape({"train_batch_size": 32, "gradient_accumulation_steps": 4}, "c.json", 2) == (4, 4)
    assert module.batch_shape({"train_micro_batch_size_per_gpu": 4, "train_batch_size": 32}, "c.json", 2) == (4, 4)
    with pytest.raises(SystemExit, match="not a multiple"):
        module.batch_shape({"train_batch_size": 30, "gradient_accumulation_steps": 4}, "c.json", 2)


def test_a_resume_of_a_different_run_is_refused(tmp_path, corpus):
    save_dir = tmp_path / "save"
    common = ["--single_process", "--device", "cpu", "--data_dir", corpus, "--cache_dir", str(tmp_path.parent / "cache"),
              "--model", "tiny", "--vocab_size", "300", "--seq_len", "32", "--eval_interval", "0",
              "--save_dir", str(save_dir), "--num_stages", "2"]
    import importlib.util
    spec = importlib.util.spec_from_file_location("train_lm", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--deepspeed_config", CONFIG, "--max_steps", "2", *common])
    msg = run_main(["--deepspeed_config", CONFIG, "--max_steps", "3", "--seed", "7", *common])
    assert "was written by a different run" in msg and "seed: checkpoint 1234, now 7" in msg
    msg = run_main(["--deepspeed_config", os.path.join(ROOT, "ds_configs", "local.json"), "--max_steps", "3", *common])
    assert "k: checkpoint 2, now 1" in msg
    module.main(["--deepspeed_config", CONFIG, "--max_steps", "3", "--seed", "7", "--allow_run_change", *common])
    assert checkpoints.resolve(str(save_dir))[0] == "global_step3"
