"""Single-process reference for docs/algorithm.md, written with plain autograd and no
pipeline code: every loss L_j is computed on a forward whose input to stage j-k+1 is
detached, and differentiated w.r.t. each stage's own copy of its parameters."""
import torch

import toymodel as tm


def build_stage(specs, start, stop, stage_id, num_stages, aux_head):
    """name -> module for the layers of one stage (own copies), plus the forward function."""
    mods, funcs = {}, []
    for idx in range(start, stop):
        spec = specs[idx]
        key = getattr(spec, "key", None)
        name = f"tied_modules.{key}" if key else str(idx)
        mod = mods.get(name) or spec.build()
        mods[name] = mod
        fwd = getattr(spec, "forward_fn", None)
        funcs.append((lambda x, m=mod, f=fwd: f(m, x)) if fwd else mod)
    head = aux_head(stage_id) if aux_head is not None and stage_id < num_stages - 1 else None

    def forward(x):
        for f in funcs:
            x = f(x)
        return x
    return mods, forward, head


def reference_step(specs, parts, k, combine, weight, batches, heads=True, lr=1.0, vocab=11, dim=8, start=None):
    """(initial, updated) parameters around one SGD(lr) step, as {name: tensor}.

    ``batches[r][m]`` is micro-batch m of data-parallel replica r. Tied modules get the
    sum of their stages' gradients (DeepSpeed's tied-gradient all-reduce)."""
    S = len(parts)
    aux = tm.aux_head(dim, vocab) if heads else None
    stages = [build_stage(specs, a, b, s, S, aux) for s, (a, b) in enumerate(parts)]
    params = {}                       # (stage, name) -> Parameter
    for s, (mods, _, head) in enumerate(stages):
        for mname, mod in mods.items():
            for pname, p in mod.named_parameters():
                params[(s, f"{mname}.{pname}")] = p
        if head is not None:
            for pname, p in head.named_parameters():
                params[(s, f"aux_heads.{s}.{pname}")] = p
    if start is not None:               # continue from given parameters (several steps)
        with torch.no_grad():
            for (s, name), p in params.items():
                p.copy_(start[name])
    grads = {key: torch.zeros_like(p) for key, p in params.items()}

    def trained_by(j):
        if combine == "furthest":
            return [s for s in range(S) if min(s + k - 1, S - 1) == j]
        return [s for s in range(max(0, j - k + 1), j + 1)]

    scale = 1.0 / sum(len(b) for b in batches)
    for replica in batches:
        for ids, labels in replica:
            for j in range(S):
                x = ids
                for s in range(j + 1):
                    if s == j - k + 1 and torch.is_tensor(x) and x.is_floating_point():
                        x = x.detach()      # L_j reaches stages j-k+1 .. j only
                    x = stages[s][1](x)
                head = stages[j][2]
                if j == S - 1:
                    loss, w = tm.loss_fn(x, labels), 1.0
                elif head is not None:
                    loss, w = tm.loss_fn(head(x), labels), weight
                else:
                    continue
                keys = [key for key in params if key[0] in trained_by(j)
                        and not key[1].startswith("aux_heads.")]
                keys += [key for key in params if key[0] == j and key[1].startswith("aux_heads.")]
                got = torch.autograd.grad(loss * w * scale, [params[key] for key in keys], allow_unused=True)
                for key, g in zip(keys, got):
                    if g is not None:
                        grads[key] += g
    total = {}
    for (s, name), g in grads.items():
        total[name] = total.get(name, 0) + g
    init = {name: params[next(key for key in params if key[1] == name)].detach().clone() for name in total}
    return init, {name: init[name] - lr * total[name] for name in total}


def stage_losses(specs, parts, params, batches, vocab=11, dim=8):
    """Mean loss of every head (aux heads, then the true loss) with the given parameters."""
    S = len(parts)
    stages = [build_stage(specs, a, b, s, S, tm.aux_head(dim, vocab)) for s, (a, b) in enumerate(parts)]
    for s, (mods, _, head) in enumerate(stages):
        named = {f"{m}.{p}": t for m, mod in mods.items() for p, t in mod.named_parameters()}
        if head is not None:
            named.update({f"aux_heads.{s}.{p}": t for p, t in head.named_parameters()})
        with torch.no_grad():
            for name, t in named.items():
                t.copy_(params[name])
    totals, n = [0.0] * S, 0
    with torch.no_grad():
        for replica in batches:
            for ids, labels in replica:
                x, n = ids, n + 1
                for s in range(S):
                    x = stages[s][1](x)
                    out = x if s == S - 1 else stages[s][2](x)
                    totals[s] += tm.loss_fn(out, labels).item()
    return [t / n for t in totals]
