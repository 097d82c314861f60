"""Launch real multi-process DeepSpeed jobs on CPU from tests, and clean up after them."""
import json
import os

import torch

from ds_interlock.launching import ROOT, deepspeed_launch, free_port, remove_shm  # noqa: F401 (re-exported)

WORKERS = os.path.join(ROOT, "tests", "workers")


def run_cases(num_procs, cases, out_dir, timeout=600):
    """Run engine cases (see workers/engine_cases.py) in one launch; returns
    {case name: [record of rank 0, rank 1, ...]}."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "cases.json")
    with open(path, "w") as f:
        json.dump(cases, f)
    code, log = deepspeed_launch(num_procs, os.path.join(WORKERS, "engine_cases.py"),
                                 ["--cases", path, "--out", out_dir], timeout=timeout)
    with open(os.path.join(out_dir, "launch.log"), "w") as f:
        f.write(log)
    if code != 0:
        raise RuntimeError(f"launch failed (exit {code}):\n{log[-6000:]}")
    results = {}
    for case in cases:
        results[case["name"]] = [torch.load(os.path.join(out_dir, case["name"], f"rank{r}.pt"))
                                 for r in range(num_procs)]
    return results
