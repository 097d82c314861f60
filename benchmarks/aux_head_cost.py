"""What an aux head costs next to a decoder layer: forward + backward time of one stage's
Transformer layer, the full vocabulary head, and low-rank heads, measured side by side.

    python benchmarks/aux_head_cost.py --d_model 1024 --vocab 32000 --seq 128 --batch 2 --ranks 64 128 256

Prints a table and writes JSON (--json). Times are medians of --repeats runs after a warm-up,
on whatever device this process has (CPU threads as set by OMP_NUM_THREADS / --threads).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def fwd_bwd(module, make_input, loss_of):
    def run():
        x = make_input()
        loss_of(module(x)).backward()
        module.zero_grad(set_to_none=True)
    return run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d_model", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--ranks", type=int, nargs="*", default=[64, 128, 256])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from ds_interlock.models import build_lm

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    from transformers import GPT2Config as Cfg
    config = Cfg(n_embd=args.d_model, n_head=args.heads, n_layer=1, vocab_size=args.vocab, n_positions=args.seq,
                 bos_token_id=0, eos_token_id=0)
    parts = build_lm(config, aux_head_rank=None)
    from deepspeed.pipe import LayerSpec
    decoder = next(spec for spec in parts.layers if isinstance(spec, LayerSpec)
                   and "Decoder" in spec.typename.__name__).build().to(device, dtype)
    hidden = lambda: torch.randn(args.batch, args.seq, args.d_model, device=device, dtype=dtype,  # noqa: E731
                                 requires_grad=True)
    labels = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    layer_s = timed(fwd_bwd(decoder, hidden, lambda y: y.float().square().mean()), args.repeats)
    rows = [{"part": "decoder layer", "params": sum(q.numel() for q in decoder.parameters()), "seconds": layer_s}]
    for rank in [None, *args.ranks]:
        head = build_lm(config, aux_head_rank=rank).aux_head(0).to(device, dtype)
        params = sum(q.numel() for q in head.parameters())
        secs = timed(fwd_bwd(head, hidden, lambda logits: parts.loss_fn(logits, labels)), args.repeats)
        rows.append({"part": "aux head, full" if rank is None else f"aux head, rank {rank}", "rank": rank,
                     "params": params, "seconds": secs})
    layer = rows[0]["seconds"]
    print(f"forward+backward, d_model {args.d_model}, vocab {args.vocab}, {args.batch} x {args.seq} tokens, "
          f"{args.dtype} on {device} ({torch.get_num_threads()} threads), median of {args.repeats}")
    print(f"{'part':<22}{'params':>12}{'ms':>10}{'x layer':>9}")
    for r in rows:
        r["vs_layer"] = r["seconds"] / layer
        print(f"{r['part']:<22}{r.get('params', 0):>12,}{1000 * r['seconds']:>10.1f}{r['vs_layer']:>9.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": device, "threads": torch.get_num_threads(), "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
