"""Train a decoder-only Transformer LM on One Billion Word with interlocking backpropagation.

    deepspeed --num_gpus 4 examples/train_lm.py --deepspeed_config ds_configs/3wise.json

On CPU set OMP_NUM_THREADS=1 and pass --master_port; --num_gpus is the number of
processes there. Every pipeline stage gets an aux head and loss; the config's
"interlocking" block decides how far each loss's gradient travels (ds_configs/
holds local, pairwise, 3wise and global, identical apart from that block).
More processes than --num_stages add data-parallel replicas.

Data: --data_dir is the raw release directory (or its parent, or the tarball) or a
directory of parquet/arrow files; without it a synthetic sample corpus in the same
layout is generated (once) in --cache_dir, so the script runs with no download.

bf16: DeepSpeed 0.19.8 has no "auto" for bf16, so the configs say
"bf16": {"enabled": false} and --bf16 decides: auto (default) turns it on when CUDA
with bf16 support is present, on/off force it.

Learning rate: the configs carry the paper's schedule (InverseSqrtWarmup, 4000 warm-up
steps, d_model 1024: peak 4.9e-4 at step 4000). A run shorter than 10x the warm-up
would hardly move at that rate, so --warmup_steps auto (default) uses
min(config warm-up, max_steps // 10) and scales the schedule so the peak rate stays
the same: lr(step) = peak * min(step / W, sqrt(W / step)). --warmup_steps N forces N;
--peak_lr X rescales the schedule to peak at X. A resumed run keeps the schedule saved
in its checkpoint.

Checkpoints: --save_dir DIR saves every --save_interval steps and at the end; a launch
that finds DIR/latest resumes from it and skips the micro-batches already consumed, so
it sees the same data as an uninterrupted run (same --seed and process count).

Metrics (--metrics_file, JSON lines, global rank 0, appended to; see Metrics):
    start: {"event": "run_start", "time", "resume_step", "argv"}   (first, at every launch)
    train: {"step", "loss", "aux_losses": [S-1], "lr", "tokens_per_s", "elapsed_s"}
    eval:  {"step", "eval_loss", "eval_stage_loss": [S], "eval_word_ppl", "eval_s"}
"""
import argparse
import json
import math
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESET_NAMES = ("tiny", "small", "paper")   # ds_interlock.models.PRESETS; not imported to keep --help fast


def build_parser():
    p = argparse.ArgumentParser(
        description="Train a Transformer LM with interlocking backpropagation (DeepSpeed pipeline).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--deepspeed_config", required=True,
                   help="DeepSpeed JSON config with an 'interlocking' block (see ds_configs/)")
    p.add_argument("--deepspeed", action="store_true", help="accepted for compatibility; ignored")
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)),
                   help="set by the launcher")
    p.add_argument("--single_process", action="store_true",
                   help="run every stage in this one process (plain `python`, no launcher): same model, "
                        "schedule, losses and checkpoints format of its own; one device")
    p.add_argument("--device", default="auto",
                   help="--single_process only: cuda, cuda:1, cpu; auto = cuda when available")
    d = p.add_argument_group("data")
    d.add_argument("--data_dir", default=None,
                   help="One Billion Word: raw release dir, its parent or tarball, or a parquet/arrow "
                        "directory. None = a synthetic sample corpus generated in --cache_dir")
    d.add_argument("--cache_dir", default=None,
                   help="tokenizer, token files and sample corpus are cached here; default: $DS_INTERLOCK_CACHE, "
                        "else $XDG_CACHE_HOME/ds_interlock, else ~/.cache/ds_interlock (each keyed by its inputs)")
    d.add_argument("--vocab_size", type=int, default=32000,
                   help="requested sentencepiece vocabulary (a small corpus may give fewer)")
    d.add_argument("--seq_len", type=int, default=None, help="tokens per sequence; None = the preset's")
    m = p.add_argument_group("model")
    m.add_argument("--model", default="tiny", choices=PRESET_NAMES,
                   help="size preset: tiny (d 64, 4 layers; CPU smoke runs), small (d 256, 8 layers; "
                        "CPU experiments), paper (d 1024, 12 layers; GPUs)")
    m.add_argument("--arch", default="gpt2", choices=("gpt2", "llama"))
    m.add_argument("--num_layers", type=int, default=None, help="decoder layers; None = the preset's")
    m.add_argument("--tie_embeddings", action="store_true",
                   help="tie the output projection to the token embedding (aux heads keep their own)")
    m.add_argument("--aux_head_rank", type=int, default=None,
                   help="aux heads with a low-rank vocabulary projection d -> R -> V (about d/R times cheaper than "
                        "the full d x V one); None = full projection")
    m.add_argument("--num_stages", type=int, default=4,
                   help="pipeline stages; world size must be a multiple (the rest is data parallel)")
    t = p.add_argument_group("training")
    t.add_argument("--max_steps", type=int, default=None,
                   help="optimizer steps; None = one epoch of the training data, as in the paper")
    t.add_argument("--warmup_steps", default="auto",
                   help="'auto' = min(config warm-up, max_steps // 10), or an integer >= 1; "
                        "the peak learning rate stays the config's")
    t.add_argument("--peak_lr", type=float, default=None,
                   help="scale the InverseSqrtWarmup schedule to peak at this rate; None = the config's "
                        "peak (4.9e-4 for the paper's d_model 1024 and 4000 warm-up steps)")
    t.add_argument("--bf16", default="auto", choices=("auto", "on", "off"),
                   help="auto = on when CUDA with bf16 support is available")
    t.add_argument("--seed", type=int, default=1234, help="model init and data order")
    t.add_argument("--eval_interval", type=int, default=500,
                   help="evaluate every N steps and at the end; 0 = never")
    t.add_argument("--eval_batches", type=int, default=None,
                   help="held-out micro-batches per data-parallel rank per evaluation "
                        "(None = all of held-out shard 00000; a subset's per-word perplexity uses the "
                        "whole shard's tokens-per-word ratio)")
    t.add_argument("--save_dir", default=None,
                   help="checkpoint directory; a run resumes from its latest checkpoint")
    t.add_argument("--save_interval", type=int, default=1000, help="save every N steps (and at the end)")
    t.add_argument("--timeout_s", type=float, default=300,
                   help="seconds any rank waits for another (collectives, and pipeline receives unless the config "
                        "sets interlocking.p2p_timeout_s) before the job fails naming who stopped answering; "
                        "raise it for steps or checkpoint saves that take longer")
    t.add_argument("--keep_checkpoints", type=int, default=3,
                   help="keep the N newest complete checkpoints; older ones are removed once a newer one is complete")
    t.add_argument("--allow_run_change", action="store_true",
                   help="resume even if process count, stages, k, seed or data differ from the checkpoint's "
                        "(each difference is printed); without it such a resume is refused")
    t.add_argument("--log_interval", type=int, default=1, help="write a train metrics line every N steps")
    t.add_argument("--metrics_file", default=None, help="JSON-lines metrics file (rank 0 appends; a run_start record first)")
    return p


def parse_args(argv=None):
    """Parse and check everything that can fail before any process group exists."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.data_dir is not None and not os.path.exists(os.path.expanduser(args.data_dir)):
        parser.error(f"--data_dir not found: {args.data_dir}")
    if not os.path.isfile(args.deepspeed_config):
        parser.error(f"--deepspeed_config not found: {args.deepspeed_config}")
    if args.warmup_steps != "auto":
        try:
            args.warmup_steps = int(args.warmup_steps)
        except ValueError:
            parser.error(f"--warmup_steps must be 'auto' or an integer, got {args.warmup_steps!r}")
        if args.warmup_steps < 1:
            parser.error("--warmup_steps must be >= 1")
    for name in ("num_stages", "log_interval", "save_interval", "vocab_size", "keep_checkpoints"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    for name in ("max_steps", "seq_len", "eval_batches", "num_layers", "aux_head_rank"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1")
    if not args.timeout_s > 0:
        parser.error("--timeout_s must be > 0")
    if args.peak_lr is not None and not args.peak_lr > 0:
        parser.error("--peak_lr must be > 0")
    if args.eval_interval < 0:
        parser.error("--eval_interval must be >= 0")
    return args


def bf16_wanted(mode, device="auto"):
    """auto: on when the job runs on a CUDA device with bf16 (a --device cpu job on a GPU machine stays
    in float32: DeepSpeed's bf16 optimizer would keep its copies on the GPU)."""
    if mode == "auto":
        on_gpu = device == "auto" or str(device).startswith("cuda")
        return on_gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return mode == "on"


def set_warmup(cfg, warmup_arg, max_steps, peak_lr=None):
    """Apply --warmup_steps to an InverseSqrtWarmup block, keeping its peak rate (or setting it
    to peak_lr). Returns a line describing the schedule, or None for another scheduler."""
    from ds_interlock.lr_schedules import DEFAULT_PARAMS, INVERSE_SQRT_TYPE

    block = cfg.get("scheduler")
    if not (isinstance(block, dict) and block.get("type") == INVERSE_SQRT_TYPE):
        if warmup_arg != "auto" or peak_lr is not None:
            raise SystemExit(f"--warmup_steps and --peak_lr need an {INVERSE_SQRT_TYPE} scheduler in the config")
        return None
    params = {**DEFAULT_PARAMS, **block.get("params", {})}
    base = params["warmup_num_steps"]
    w = min(base, max(1, max_steps // 10)) if warmup_arg == "auto" else warmup_arg
    if base > 0 and w != base:
        # lr = scale * d^-0.5 * min(step^-0.5, step * W^-1.5) peaks at scale * (d W)^-0.5.
        params["scale"] *= math.sqrt(w / base)
    params["warmup_num_steps"] = w
    peak = params["scale"] * (params["d_model"] * max(w, 1)) ** -0.5
    if peak_lr is not None:
        params["scale"] *= peak_lr / peak
        peak = peak_lr
    block["params"] = params
    return (f"lr schedule: {INVERSE_SQRT_TYPE} warm-up {w} steps (config {base}), peak {peak:.3g}"
            + (f", rescaled from the config's warm-up (--warmup_steps {warmup_arg})" if w != base else "")
            + (" (--peak_lr)" if peak_lr is not None else ""))


def read_config(path):
    """The DeepSpeed JSON, its errors naming the file and line; the interlocking block checked."""
    from ds_interlock.config import InterlockingConfigError, from_ds_config
    try:
        with open(path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"{path}: not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None
    if not isinstance(cfg, dict):
        raise SystemExit(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    try:
        from_ds_config(cfg)
    except InterlockingConfigError as exc:
        raise SystemExit(f"{path}: {exc}") from None
    return cfg


def batch_shape(cfg, path, dp_size):
    """(micro-batch size, gradient accumulation steps) as DeepSpeed derives them from any two of
    train_batch_size, train_micro_batch_size_per_gpu and gradient_accumulation_steps."""
    total, micro, gas = (cfg.get(k) for k in ("train_batch_size", "train_micro_batch_size_per_gpu",
                                              "gradient_accumulation_steps"))
    for key, value in (("train_batch_size", total), ("train_micro_batch_size_per_gpu", micro),
                       ("gradient_accumulation_steps", gas)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise SystemExit(f'{path}: "{key}" must be an integer >= 1, got {value!r}')
    if micro is None and total is not None:
        gas = gas or 1
        if total % (gas * dp_size):
            raise SystemExit(f'{path}: "train_batch_size" {total} is not a multiple of gradient_accumulation_steps '
                             f"{gas} x {dp_size} data-parallel replicas")
        micro = total // (gas * dp_size)
    if micro is None:
        raise SystemExit(f'{path}: set "train_micro_batch_size_per_gpu" (or "train_batch_size")')
    if gas is None:
        gas = total // (micro * dp_size) if total is not None else 1
        if gas < 1 or (total is not None and total != micro * gas * dp_size):
            raise SystemExit(f'{path}: "train_batch_size" {total} is not micro-batch {micro} x {dp_size} replicas '
                             "x some gradient_accumulation_steps")
    return micro, gas


def check_writable(directory, what):
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as exc:
        raise SystemExit(f"{what} {directory} is not writable: {exc}") from None


RESUME_FACTS = ("world_size", "num_stages", "data_parallel", "k", "combine", "micro_batches", "seed", "data",
                "train_sequences", "vocab_size", "seq_len", "model", "arch", "num_layers", "micro_batch",
                "aux_head_rank")


def run_changes(saved, now):
    """What differs between the checkpoint's run and this one, as lines."""
    return [f"{key}: checkpoint {saved[key]!r}, now {now[key]!r}" for key in RESUME_FACTS
            if key in saved and key in now and saved[key] != now[key]]


def load_config(args, max_steps):
    cfg = read_config(args.deepspeed_config)
    cfg.setdefault("interlocking", {}).setdefault("p2p_timeout_s", args.timeout_s)
    cfg.setdefault("bf16", {})
    cfg["bf16"]["enabled"] = bf16_wanted(args.bf16, args.device if args.single_process else "auto")
    schedule_note = set_warmup(cfg, args.warmup_steps, max_steps, args.peak_lr)
    return cfg, schedule_note


def prepare_data(args, dist_ready):
    """Build the data caches on local rank 0 first; the others then only open them."""
    from ds_interlock.data import prepare_lm_data

    def build(progress):
        return prepare_lm_data(args.data_dir, args.cache_dir, vocab_size=args.vocab_size,
                               seq_len=args.seq_len, progress=progress)

    if not dist_ready:
        return build(True)
    # the first build can take far longer than --timeout_s: wait for it on a group of its own
    from datetime import timedelta
    patient = torch.distributed.new_group(backend="gloo", timeout=timedelta(days=1))
    if args.local_rank == 0:
        data = build(torch.distributed.get_rank() == 0)
    torch.distributed.barrier(group=patient)
    if args.local_rank != 0:
        data = build(False)
    return data


def check_checkpoint_kind(tag_dir, single_process):
    """A pipeline launch and --single_process write different checkpoint layouts: say so plainly."""
    if not os.path.isdir(tag_dir):
        return   # DeepSpeed's own loader reports a missing tag
    pipeline = any(name.startswith("layer_") for name in os.listdir(tag_dir))
    if pipeline == single_process:
        made = "a multi-process pipeline launch" if pipeline else "--single_process"
        raise SystemExit(f"{tag_dir} was written by {made}; resume it the same way, or use another --save_dir")


def parse_metrics_line(line):
    """The record on one metrics line, or None if it is not a JSON object (e.g. cut short by a kill)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def is_run_start(record, fresh=False):
    """A run marker; with fresh=True only one that starts a new run (not a resume)."""
    return (isinstance(record, dict) and record.get("event") == "run_start"
            and (not fresh or not record.get("resume_step")))


def drop_records_after(path, step):
    """Remove the records of the file's last run (from its last fresh run_start on) with a step
    beyond ``step``: the run resumed from ``step`` writes them again. Earlier runs, markers and
    lines that are not JSON are kept. Rewritten by temp file + rename, so a kill loses nothing."""
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        lines = f.readlines()
    records = [parse_metrics_line(line) for line in lines]
    start = max((i for i, r in enumerate(records) if is_run_start(r, fresh=True)), default=0)
    keep = [line for i, (line, r) in enumerate(zip(lines, records))
            if i < start or r is None or "event" in r
            or not (isinstance(r.get("step"), (int, float)) and r["step"] > step)]
    if len(keep) == len(lines):
        return
    from ds_interlock.files import atomic_write_bytes
    atomic_write_bytes(path, "".join(keep).encode("utf-8", errors="surrogateescape"))


def ends_in_newline(path):
    with open(path, "rb") as f:
        if f.seek(0, os.SEEK_END) == 0:
            return True
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


class Metrics:
    """JSON lines, written and flushed by global rank 0 only.

    The file is appended to, never truncated: every launch first writes a run marker
    {"event": "run_start", "time", "resume_step", "argv"}, so that a file can hold several runs
    and they can be told apart (examples/plot_metrics.py plots the last one; a marker with
    resume_step 0 starts a new run, a resumed launch's continues it). A resumed launch removes
    its run's records from beyond the checkpoint (:func:`drop_records_after`). A last line cut
    short by a kill is left for the readers to skip, and the next record starts on a new line.
    """

    def __init__(self, path, rank, resume_step, argv=None):
        self.f = None
        if path is None or rank != 0:
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if resume_step > 0 and os.path.exists(path):
            drop_records_after(path, resume_step)
        partial = os.path.exists(path) and not ends_in_newline(path)
        self.f = open(path, "a", encoding="utf-8")
        if partial:
            self.f.write("\n")
        self.write({"event": "run_start", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "resume_step": resume_step, "argv": list(sys.argv[1:] if argv is None else argv)})

    def write(self, record):
        if self.f is not None:
            self.f.write(json.dumps(record) + "\n")
            self.f.flush()


def evaluate(engine, data, args, dp_rank, dp_size, show):
    """Mean loss of every head over the held-out set (or --eval_batches micro-batches per rank)."""
    from ds_interlock.data import batch_iterator, batches_per_epoch
    from tqdm import tqdm

    micro = engine.train_micro_batch_size_per_gpu()
    total = batches_per_epoch(len(data.heldout), micro, dp_size)
    if total == 0:
        raise SystemExit(f"held-out set of {len(data.heldout)} sequences is too small for "
                         f"micro-batch {micro} x {dp_size} replicas")
    n = min(args.eval_batches or total, total)
    it = batch_iterator(data.heldout, micro, dp_rank, dp_size, seed=args.seed, epochs=1, shuffle=False)
    # Several eval_batch calls instead of one, so that progress can be shown.
    chunk = max(engine.gradient_accumulation_steps(), engine.num_stages)
    sums = torch.zeros(engine.num_stages, dtype=torch.float64)
    done = 0
    start = time.time()
    with tqdm(total=n, desc="eval", unit="mb", disable=not (show and sys.stdout.isatty()), leave=False) as bar:
        while done < n:
            m = min(chunk, n - done)
            engine.eval_batch(it, num_micro_batches=m)
            # Every micro-batch holds the same number of tokens: a mean of means is the token mean.
            sums += m * torch.tensor(engine.eval_stage_losses, dtype=torch.float64)
            done += m
            bar.update(m)
    stage = (sums / n).tolist()
    return {"eval_loss": stage[-1], "eval_stage_loss": stage,
            "eval_word_ppl": data.word_perplexity(stage[-1]), "eval_s": round(time.time() - start, 3)}


def main(argv=None):
    args = parse_args(argv)
    import deepspeed
    from ds_interlock import InterlockingPipelineModule, initialize
    from ds_interlock.data import batch_iterator, batches_per_epoch
    from ds_interlock.models import PRESETS, build_lm
    from tqdm import tqdm

    if args.single_process:
        rank, world = 0, 1
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise SystemExit("--single_process runs every stage in this one process; launch it with plain "
                             "`python`, not with a launcher that starts several processes")
    else:
        from datetime import timedelta
        deepspeed.init_distributed(timeout=timedelta(seconds=args.timeout_s))
        rank = torch.distributed.get_rank()
        world = torch.distributed.get_world_size()
    if not args.single_process and world % args.num_stages:
        raise SystemExit(f"world size {world} is not a multiple of --num_stages {args.num_stages}")
    dp_size = 1 if args.single_process else world // args.num_stages
    torch.manual_seed(args.seed)
    if args.seq_len is None:
        args.seq_len = PRESETS[args.model].seq_len
    # what can fail, fails now, before data preparation and training
    raw_cfg = read_config(args.deepspeed_config)
    micro, gas = batch_shape(raw_cfg, args.deepspeed_config, dp_size)
    if args.save_dir:
        check_writable(args.save_dir, "--save_dir")

    data = prepare_data(args, world > 1)
    if rank == 0:
        print(data.summary(), flush=True)
    if args.eval_interval and batches_per_epoch(len(data.heldout), micro, dp_size) == 0:
        raise SystemExit(f"the held-out set ({len(data.heldout)} sequences of {data.heldout.seq_len} tokens) is too "
                         f"small for one micro-batch of {micro} x {dp_size} replicas: evaluation would fail; "
                         "use more held-out data, a smaller micro-batch, or --eval_interval 0")
    if args.eval_batches and args.eval_interval and rank == 0:
        have = batches_per_epoch(len(data.heldout), micro, dp_size)
        if args.eval_batches > have:
            print(f"note: --eval_batches {args.eval_batches} > the {have} micro-batches the held-out set holds "
                  "per replica; evaluating on all of them", flush=True)
    steps_per_epoch = batches_per_epoch(len(data.train), micro, dp_size) // gas
    max_steps = args.max_steps or steps_per_epoch
    cfg, schedule_note = load_config(args, max_steps)

    parts = build_lm(args.model, arch=args.arch, vocab_size=data.vocab_size, seq_len=args.seq_len,
                     tie_embeddings=args.tie_embeddings, num_layers=args.num_layers, init_seed=args.seed,
                     aux_head_rank=args.aux_head_rank)
    seq_len = data.train.seq_len
    if args.single_process:
        from ds_interlock import InProcessPipeline
        device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
        engine = InProcessPipeline(layers=parts.layers, num_stages=args.num_stages, loss_fn=parts.loss_fn,
                                   aux_head=parts.aux_head, partition_method=parts.partition_method,
                                   config=cfg, devices=device)
        params = [p for p in engine.model.stages[0].parameters() if p.requires_grad]
        dp_rank = 0
    else:
        module = InterlockingPipelineModule(layers=parts.layers, num_stages=args.num_stages,
                                            loss_fn=parts.loss_fn, aux_head=parts.aux_head,
                                            partition_method=parts.partition_method)
        params = [p for p in module.parameters() if p.requires_grad]
        engine, _, _, _ = initialize(model=module, model_parameters=params, config=cfg)
        dp_rank = engine.grid.data_parallel_id
    S = engine.num_stages

    from ds_interlock import checkpoints
    run = {"seed": args.seed, "data": os.path.realpath(str(data.data_dir)), "train_sequences": len(data.train),
           "aux_head_rank": args.aux_head_rank,
           "vocab_size": data.vocab_size, "seq_len": seq_len, "model": args.model, "arch": parts.arch,
           "num_layers": parts.num_decoder_layers, "micro_batch": micro}
    consumed, elapsed_before = 0, 0.0
    try:
        plan = checkpoints.plan_load(args.save_dir) if args.save_dir else None
    except checkpoints.CheckpointError as exc:
        raise SystemExit(str(exc)) from None
    if plan is not None:
        tag, note, saved = plan
        if note and rank == 0:
            print(f"ds_interlock: {note}", flush=True)
        check_checkpoint_kind(os.path.join(args.save_dir, tag), args.single_process)
        changes = run_changes(saved or {}, {**engine.run_facts(), **run})
        if changes and not args.allow_run_change:
            raise SystemExit(f"{os.path.join(args.save_dir, tag)} was written by a different run:\n  "
                             + "\n  ".join(changes) + "\nresume with the same settings, use another --save_dir, or "
                             "pass --allow_run_change to continue anyway")
        if changes and rank == 0:
            print("warning: resuming a different run (--allow_run_change):\n  " + "\n  ".join(changes), flush=True)
        try:
            path, client = engine.load_checkpoint(args.save_dir, tag=tag)
        except checkpoints.CheckpointError as exc:
            raise SystemExit(str(exc)) from None
        if path is None:
            raise SystemExit(f"could not load the latest checkpoint in {args.save_dir}")
        client = client or {}
        consumed = client.get("micro_batches_consumed", engine.global_steps * gas)
        elapsed_before = client.get("elapsed_s", 0.0)
        if rank == 0:
            print(f"resumed from {path} at step {engine.global_steps}", flush=True)
    start_step = engine.global_steps

    if rank == 0:
        n_params = sum(p.numel() for p in params)
        il = cfg.get("interlocking", {})
        print(f"model: {args.model} {parts.arch}, {parts.num_decoder_layers} layers, vocab {data.vocab_size}, "
              f"seq {seq_len}; stages {S} x data-parallel {dp_size}; stage 0 holds {n_params:,} parameters",
              flush=True)
        print(f"interlocking: {il}; micro-batch {micro} x {gas} x {dp_size} replicas; bf16 "
              f"{cfg['bf16']['enabled']}; steps {start_step}->{max_steps} "
              f"(one epoch = {steps_per_epoch} steps)", flush=True)
        if schedule_note:
            print(schedule_note, flush=True)

    metrics = Metrics(args.metrics_file, rank, start_step, argv)
    train_iter = batch_iterator(data.train, micro, dp_rank, dp_size, seed=args.seed, skip_batches=consumed)
    tokens_per_step = micro * gas * dp_size * seq_len
    show_bar = rank == 0 and sys.stdout.isatty()

    def save(step):
        engine.save_checkpoint(args.save_dir, client_state={
            "micro_batches_consumed": consumed, "elapsed_s": elapsed_before + time.time() - t0, "run": run})
        if rank == 0:
            checkpoints.prune(args.save_dir, args.keep_checkpoints, protect=f"global_step{engine.global_steps}")

    def run_eval(step):
        result = evaluate(engine, data, args, dp_rank, dp_size, show_bar)
        metrics.write({"step": step, **result})
        if rank == 0:
            stages = " ".join(f"{v:.4f}" for v in result["eval_stage_loss"])
            msg = (f"eval step {step}: loss {result['eval_loss']:.4f} word ppl {result['eval_word_ppl']:.2f} "
                   f"stage losses [{stages}] ({result['eval_s']:.1f} s)")
            (bar.write(msg) if show_bar else print(msg, flush=True))

    from ds_interlock.preemption import EXIT_CODE, Preemption
    distributed = not args.single_process and world > 1
    # one process has no launcher to lose (a shell that exits under nohup is not a preemption)
    preemption = Preemption(distributed=distributed, watch_launcher=distributed, timeout_s=args.timeout_s)
    t0 = time.time()
    last_log_time, last_log_step = t0, start_step
    step = start_step
    with tqdm(total=max_steps, initial=start_step, desc="train", unit="step", disable=not show_bar) as bar:
        while step < max_steps:
            lr = engine.get_lr()[0]
            loss = engine.train_batch(train_iter)
            consumed += gas
            step = engine.global_steps
            bar.update(1)
            if step % args.log_interval == 0 or step == max_steps:
                now = time.time()
                tps = tokens_per_step * (step - last_log_step) / max(now - last_log_time, 1e-9)
                record = {"step": step, "loss": float(loss), "aux_losses": (engine.stage_losses or [])[:-1],
                          "lr": lr, "tokens_per_s": round(tps, 1),
                          "elapsed_s": round(elapsed_before + now - t0, 3)}
                if engine.stage_losses_step != step:    # "report": "async": losses of an earlier step
                    record["loss_step"] = engine.stage_losses_step
                metrics.write(record)
                bar.set_postfix(loss=f"{float(loss):.4f}")
                if rank == 0 and not show_bar:
                    aux = " ".join(f"{v:.4f}" for v in record["aux_losses"])
                    print(f"step {step}/{max_steps} loss {float(loss):.4f} aux [{aux}] lr {lr:.3g} "
                          f"{tps:,.0f} tokens/s", flush=True)
                last_log_time, last_log_step = now, step
            # with "report": "async" the loss is one batch late (NaN after the first step)
            if engine.stage_losses_step is not None and not math.isfinite(float(loss)):
                raise SystemExit(f"loss is {float(loss)} at step {engine.stage_losses_step}")
            if args.eval_interval and (step % args.eval_interval == 0 or step == max_steps):
                run_eval(step)
                last_log_time = time.time()   # tokens/s counts training time only
            stop = preemption.stop_reason()     # every rank, every step: they stop after the same step
            if args.save_dir and (step % args.save_interval == 0 or step == max_steps or stop):
                save(step)
                last_log_time = time.time()
            if stop:
                if rank == 0:
                    where = f"; checkpoint saved in {args.save_dir}" if args.save_dir else " (no --save_dir: nothing saved)"
                    print(f"preempted at step {step} ({stop}){where}; exiting with {EXIT_CODE}", flush=True)
                sys.stdout.flush()
                sys.exit(EXIT_CODE)
    preemption.close()
    if rank == 0:
        print(f"done: {step} steps, {time.time() - t0:.1f} s in this launch", flush=True)


if __name__ == "__main__":
    main()
