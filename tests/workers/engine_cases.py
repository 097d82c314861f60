"""Runs a list of engine cases inside one launch (starting DeepSpeed costs 10-15 s, a case
well under a second). Launched by the tests as

    deepspeed --num_gpus N tests/workers/engine_cases.py --cases cases.json --out DIR

Every rank writes DIR/<case>/rank<r>.pt with its stage's parameters after training,
the losses it saw and its partition, for the test process to compare.
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import deepspeed  # noqa: E402
from deepspeed.pipe import PipelineModule  # noqa: E402

import toymodel as tm  # noqa: E402
from ds_interlock import InterlockingPipelineModule, initialize  # noqa: E402


def ds_config(case, dp):
    cfg = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": case.get("M", 2),
        "train_batch_size": 2 * case.get("M", 2) * dp,
        "gradient_clipping": case.get("clip", 0.0),   # absent with default_clip: DeepSpeed's 1.0
        "steps_per_print": case.get("steps_per_print", 1000),
        "zero_allow_untested_optimizer": True,
    }
    if case.get("default_clip"):
        del cfg["gradient_clipping"]
    if case.get("zero"):
        cfg["zero_optimization"] = {"stage": case["zero"]}
    if case.get("bf16"):
        cfg["bf16"] = {"enabled": True}
    if case.get("pipeline"):
        cfg["pipeline"] = case["pipeline"]
    if case.get("csv_monitor"):
        cfg["csv_monitor"] = {"enabled": True, "output_path": case["csv_monitor"], "job_name": "job"}
    if not case.get("stock"):
        cfg["interlocking"] = {"k": case.get("k", "global"), "combine": case.get("combine", "furthest"),
                               "aux_loss_weight": case.get("w", 1.0)}
        if case.get("schedule"):
            cfg["interlocking"]["schedule"] = case["schedule"]
        cfg["interlocking"].update(case.get("il", {}))
    cfg.update(case.get("extra_config", {}))
    return cfg


class Dropped(torch.nn.Module):
    """Default initialisation and dropout: both draw from the global random generator."""
    def __init__(self, dim):
        super().__init__()
        self.lin = torch.nn.Linear(dim, dim)
        self.drop = torch.nn.Dropout(0.2)

    def forward(self, x):
        return x + self.drop(torch.tanh(self.lin(x)))


def dropout_specs(dim=8, vocab=11):
    from deepspeed.pipe import LayerSpec
    return ([LayerSpec(torch.nn.Embedding, vocab, dim)] + [LayerSpec(Dropped, dim) for _ in range(4)]
            + [LayerSpec(torch.nn.Linear, dim, vocab)])


HEADS = {
    "toy": lambda: tm.aux_head(),
    "not_module": lambda: (lambda s: 42),
    "none": lambda: (lambda s: None),
    "sized": lambda: (lambda s, out: tm.Head(out.features, 11, 1000 + s)),   # same weights as "toy"
    "lazy": lambda: (lambda s: torch.nn.LazyLinear(11)),
    "wrong": lambda: (lambda s: torch.nn.Linear(9, 11)),
    "default_init": lambda: (lambda s: torch.nn.Linear(8, 11)),
}


def build(case, world):
    S = case["S"]
    torch.manual_seed(case.get("seed", 0))
    if case.get("model") == "dropout":
        specs = dropout_specs()
    elif case.get("model") == "param_free_stage":     # stage 1 of 2 would hold no parameters
        specs = tm.layer_specs(blocks=1)[:2] + [torch.nn.Identity(), torch.nn.Identity()]
    else:
        specs = tm.layer_specs(blocks=case.get("blocks", 4), tied=case.get("tied", False))
    common = dict(num_stages=S, loss_fn=tm.loss_fn, partition_method="uniform",
                  activation_checkpoint_interval=case.get("ckpt_interval", 0),
                  dynamic_shape=case.get("dynamic_shape", False))
    if case.get("stock"):
        return PipelineModule(layers=specs, **common)
    kind = case.get("bad_head") or case.get("head_kind", "toy")
    factory = HEADS[kind]() if case.get("heads", True) or case.get("bad_head") else None
    return InterlockingPipelineModule(layers=specs, aux_head=factory, **common)


def optimizer_for(case, module):
    params = [p for p in module.parameters() if p.requires_grad]
    if case.get("optimizer", "sgd") == "adam":
        return torch.optim.Adam(params, lr=case.get("lr", 1e-2))
    return torch.optim.SGD(params, lr=case.get("lr", 1.0))


def data_iter(case, engine, step):
    M = case.get("M", 2)
    dp_rank = engine.grid.data_parallel_id
    seed = case.get("seed", 0) + (0 if case.get("same_batch") else step)
    seqs = case.get("seq_by_step")
    seq = seqs[step % len(seqs)] if seqs else 5
    return iter([tm.batch(seed, dp_rank, m, seq=seq) for m in range(M)])


class Pairs(torch.utils.data.Dataset):
    """(ids, labels) samples for training_data=; DeepSpeed's sampler shards them over DP."""
    def __init__(self, n, seed):
        self.items = []
        for i in range(n):
            ids, labels = tm.batch(seed, 0, i, micro_batch_size=1)
            self.items.append((ids[0], labels[0]))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def run_case(case, args, world):
    rank = torch.distributed.get_rank()
    out_dir = os.path.join(args.out, case["name"])
    os.makedirs(out_dir, exist_ok=True)
    record = {"losses": [], "stage_losses": [], "eval": None}
    try:
        module = build(case, world)
        cfg = ds_config(case, world // case["S"])
        if case.get("config_file_text") is not None:     # a config file, as --deepspeed_config gives it
            cfg = os.path.join(out_dir, "config.json")
            with open(cfg, "w") as f:
                f.write(case["config_file_text"])
        kwargs = {}
        if case.get("feeding") == "training_data":
            kwargs["training_data"] = Pairs(64, case.get("seed", 0))
        if case.get("layout") == "shared":    # the old layout: the engine must refuse its plan
            import ds_interlock.wire as wire
            wire.channel_layout = lambda *a, **k: wire.SharedLayout()
        init = deepspeed.initialize if case.get("stock") or case.get("init") == "deepspeed" else initialize
        if case.get("optimizer_from_config"):
            cfg["optimizer"] = case["optimizer_from_config"]
            engine, _, _, _ = init(model=module, model_parameters=[p for p in module.parameters()],
                                   config=cfg, **kwargs)
        else:
            engine, _, _, _ = init(model=module, optimizer=optimizer_for(case, module), config=cfg, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the test asserts on the message
        record["init_error"] = f"{type(exc).__name__}: {exc}"
        torch.save(record, os.path.join(out_dir, f"rank{rank}.pt"))
        return
    if case.get("load_dir"):
        try:
            engine.load_checkpoint(case["load_dir"])
        except Exception as exc:  # noqa: BLE001 - the test asserts on the message
            record["load_error"] = f"{type(exc).__name__}: {exc}"
            torch.save(record, os.path.join(out_dir, f"rank{rank}.pt"))
            return
        record["loaded_stock"] = getattr(engine, "loaded_stock_checkpoint", None)
        record["loaded_step"] = engine.global_steps
        record["loaded_facts"] = engine.loaded_checkpoint_facts
    if case.get("crash_stage") is not None and engine.stage_id == case["crash_stage"]:
        inner, calls = engine.module.forward, []

        def failing_forward(x):   # fails inside train_batch, while the other stages wait on this one
            calls.append(1)
            if len(calls) > case.get("M", 2):
                raise RuntimeError(f"deliberate failure on stage {engine.stage_id}")
            return inner(x)
        engine.module.forward = failing_forward
    if case.get("kill_stage") is not None and engine.stage_id == case["kill_stage"]:
        import signal
        inner_fwd, fwd_calls = engine.module.forward, []

        def killed_forward(x):    # SIGKILL in the middle of the second batch: no exception, no cleanup
            fwd_calls.append(1)
            if len(fwd_calls) == case.get("M", 2) + 2:
                print(f"killing stage {engine.stage_id} with SIGKILL", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            return inner_fwd(x)
        engine.module.forward = killed_forward
    if case.get("kill_in_save") is not None and engine.stage_id == case["kill_in_save"]:
        import signal
        inner_save = engine.module.save_state_dict

        def killed_save(save_dir, *a, **k):   # some of this stage's files written, then gone
            inner_save(save_dir, *a, **k)
            if save_dir.endswith(case["kill_tag"]):
                print(f"killing stage {engine.stage_id} during the save of {case['kill_tag']}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
        engine.module.save_state_dict = killed_save
    saves = case.get("saves", {})   # after step n (1-based), save with tag saves[str(n)]
    for step in range(case.get("steps", 1)):
        it = None if case.get("feeding") == "training_data" else data_iter(case, engine, step + case.get("step_offset", 0))
        loss = engine.train_batch(data_iter=it) if it is not None else engine.train_batch()
        record["losses"].append(float(loss))
        record["stage_losses"].append(list(getattr(engine, "stage_losses", []) or []))
        record.setdefault("loss_steps", []).append(getattr(engine, "stage_losses_step", None))
        if str(step + 1) in saves:
            engine.save_checkpoint(case["save_dir"], tag=saves[str(step + 1)])
    if case.get("il", {}).get("report") == "async":
        record["flushed"] = float(engine.flush_losses())
    if case.get("eval"):
        ev = engine.eval_batch(data_iter(case, engine, 999))
        record["eval"] = float(ev)
        record["eval_stage_losses"] = list(engine.eval_stage_losses)
    if case.get("save_dir"):
        engine.save_checkpoint(case["save_dir"], tag=case.get("tag", "ckpt"))
        if case.get("reload"):      # every file DeepSpeed wrote loads back under weights_only
            before = {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}
            engine.load_checkpoint(case["save_dir"])
            record["reload_same"] = all(torch.equal(before[n], p.detach().float())
                                        for n, p in engine.module.named_parameters())
    module = engine.module
    record["params"] = {n: p.detach().float().clone() for n, p in module.named_parameters()}
    record["stage"] = engine.stage_id
    record["dp"] = engine.grid.data_parallel_id
    record["part"] = (module._local_start, module._local_stop)
    torch.save(record, os.path.join(out_dir, f"rank{rank}.pt"))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    world = torch.distributed.get_world_size()
    with open(args.cases) as f:
        cases = json.load(f)
    for case in cases:
        run_case(case, args, world)
        torch.distributed.barrier()


if __name__ == "__main__":
    main()
