"""Launch real multi-process DeepSpeed jobs on CPU from tests, and clean up after them."""
import glob
import json
import os
import socket
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKERS = os.path.join(ROOT, "tests", "workers")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def remove_shm(port):
    """DeepSpeed's CPU comm op leaves one /dev/shm file per rank and launch (ALGORITHM.md §5)."""
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"):
        try:
            os.remove(path)
        except OSError:
            pass


def deepspeed_launch(num_procs, script, script_args, timeout=600, env=None):
    """Run ``deepspeed --num_gpus N script args``; returns (returncode, combined output)."""
    port = free_port()
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_procs),
           "--master_port", str(port), script, *script_args]
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    full_env["PYTHONPATH"] = os.pathsep.join([ROOT, full_env.get("PYTHONPATH", "")])
    full_env.update(env or {})
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
        return proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return None, out + f"\n<timed out after {timeout}s>"
    finally:
        remove_shm(port)


def run_cases(num_procs, cases, out_dir, timeout=600):
    """Run engine cases (see workers/engine_cases.py) in one launch; returns
    {case name: [record of rank 0, rank 1, ...]}."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "cases.json")
    with open(path, "w") as f:
        json.dump(cases, f)
    code, log = deepspeed_launch(num_procs, os.path.join(WORKERS, "engine_cases.py"),
                                 ["--cases", path, "--out", out_dir], timeout=timeout)
    if code != 0:
        raise RuntimeError(f"launch failed (exit {code}):\n{log[-6000:]}")
    results = {}
    for case in cases:
        results[case["name"]] = [torch.load(os.path.join(out_dir, case["name"], f"rank{r}.pt"))
                                 for r in range(num_procs)]
    return results
