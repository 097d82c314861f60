"""A model of how NCCL point-to-point and collective ops run on GPUs: deadlock checker and timer.

Input: for every rank, the ops its host (CPU thread) issues, in issue order. Output: either
every op completed (with start/end times), or a deadlock whose wait-for cycle is spelled out.

The rules modelled, and why they hold on real hardware:

* Each rank has one *compute stream* and one *stream per communicator* (torch's ProcessGroupNCCL
  gives every communicator its own NCCL stream). A stream runs its entries strictly in order.
* The host issues ops without blocking: CUDA kernel launches and NCCL calls are asynchronous.
  Only ``host_sync`` (``.item()``, ``.tolist()``: waits for the compute stream) and
  ``device_sync`` (``torch.cuda.synchronize()``: waits for every stream) stop the host.
* Before every NCCL op torch makes the NCCL stream wait on the current (compute) stream, so a
  send/recv/coll cannot be *posted* before all compute work enqueued before it has finished.
* NCCL send/recv kernels block their stream until the peer's matching call runs (rendezvous);
  there are no tags: the n-th send a->b on a communicator meets the n-th recv at b from a.
  A small send may complete into NCCL's internal buffer (``eager_bytes``); a checker must not
  count on that, so it is off by default.
* ``work.wait()`` (and ``dist.recv``) under NCCL makes the *compute stream* wait for the op; the
  host does not wait. A later ``host_sync`` does, through the compute stream.

The simulation is a worklist over a dependency graph (every entry knows how many prerequisites
are still missing), so it runs in O(total ops). Ops never compete for a resource other than
their stream, so completion times are max-plus formulas and processing order does not matter.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass, field

KINDS = ("compute", "send", "recv", "coll", "host_sync", "device_sync")
_COMM_KINDS = frozenset(("send", "recv", "coll"))

# Entry kinds, as small ints for the hot loop. Kinds < _SEND finish at ready + cost.
_COMPUTE, _WAIT, _SYNC, _SEND, _RECV, _COLL = range(6)
_CODE = {"compute": _COMPUTE, "send": _SEND, "recv": _RECV, "coll": _COLL,
         "host_sync": _SYNC, "device_sync": _SYNC}
_COMPUTE_STREAM = ""      # stream key of the compute stream (communicator names are non-empty)
_MAX_LISTED = 20          # unmatched ops listed in a Deadlock


@dataclass(frozen=True)
class Op:
    """One op as a rank's host issues it: compute, send/recv/coll on a communicator, or a sync."""
    kind: str          # "compute", "send", "recv", "coll", "host_sync", "device_sync"
    label: str = ""    # human text, e.g. "forward(3)" or "send act mb3 tensor0"
    comm: str = ""     # communicator name for send/recv/coll (e.g. "world", "act:0>1", "0:1")
    peer: int = -1     # send: destination global rank; recv: source global rank
    cost: float = 0.0  # compute: duration; send/recv/coll: ignored (see latency)
    wait: bool = False # send/recv/coll: the compute stream waits for this op's completion
                       # (torch's work.wait() under NCCL: a stream wait, not a host wait)
    nbytes: int = 0    # message size, used only with eager_bytes

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown op kind {self.kind!r} (expected one of {', '.join(KINDS)})")
        if self.kind in _COMM_KINDS and not self.comm:
            raise ValueError(f"{self.kind} {self.label!r} needs a communicator (comm)")
        if self.kind in ("send", "recv") and (not isinstance(self.peer, int) or self.peer < 0):
            raise ValueError(f"{self.kind} {self.label!r} needs a peer rank >= 0, "
                             f"got {self.peer!r}")
        if self.wait and self.kind not in _COMM_KINDS:
            # only an NCCL op has a work handle whose wait() enqueues a stream wait
            raise ValueError(f"wait=True is meaningless on a {self.kind} op ({self.label!r})")
        if self.cost < 0 or self.nbytes < 0:
            raise ValueError(f"op {self.label!r}: cost and nbytes must be >= 0")


@dataclass(frozen=True)
class Deadlock:
    """Why not every op completed: a wait-for cycle (one line per hop) and where each rank is stuck.

    ``cycle`` is empty when nothing waits in a circle and ops are left only because their
    match is never issued; ``unmatched`` then names those ops (it may also be non-empty
    alongside a cycle).
    """
    cycle: list[str]
    stuck: dict[int, str]
    unmatched: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = []
        if self.cycle:
            ranks = sorted({int(line.split(":", 1)[0].split()[1]) for line in self.cycle})
            who = (f"ranks {', '.join(map(str, ranks))} wait for each other" if len(ranks) > 1
                   else f"rank {ranks[0]} waits for itself")
            lines.append(f"NCCL deadlock: {who} in a cycle:")
            lines += [f"  {line}" for line in self.cycle]
            lines.append("  ... and so back to the first line: none of these can ever complete.")
        else:
            lines.append("not every NCCL op can complete (no wait-for cycle): some ops are "
                         "unmatched, their peer never issues the matching op")
        if self.unmatched:
            lines.append("unmatched ops:")
            lines += [f"  {line}" for line in self.unmatched]
        if self.stuck:
            lines.append("where each rank is stuck:")
            for r, text in sorted(self.stuck.items()):
                head = f"  rank {r}: "
                lines.append(head + text.replace("\n", "\n" + " " * len(head)))
        return "\n".join(lines)


@dataclass(frozen=True)
class Result:
    """Outcome of ``simulate``: times per op (None where it never completed) and any deadlock."""
    ok: bool
    makespan: float                                # max end over all completed ops
    finish: dict[int, float]                       # per rank: when its last completed op ended
    times: dict[int, list[tuple[float, float] | None]]  # per rank, per op index: (start, end)
    deadlock: Deadlock | None = None


def simulate(programs: dict[int, list[Op]] | list[list[Op]], comms: dict[str, tuple[int, ...]],
             latency: float = 0.0, eager_bytes: int = 0) -> Result:
    """Run every rank's host program under the NCCL/CUDA stream rules of this module.

    ``programs[r]``: rank r's ops in host issue order (a list means ranks 0..n-1).
    ``comms[name]``: the member ranks of each communicator. Ranks that are members of a
    communicator but have no program issue nothing. ``latency``: time a send/recv/coll
    takes after its rendezvous. ``eager_bytes``: sends with 0 < nbytes <= eager_bytes
    complete without their receiver (0: every send is a rendezvous, as a checker must assume).

    Times: a compute entry starts when its stream predecessor and its host issue are done;
    a send/recv/coll "starts" when posted; a host_sync/device_sync starts when the host
    reaches it and ends when the host is released.
    """
    if isinstance(programs, (list, tuple)):
        programs = dict(enumerate(programs))
    members = {}
    for name, ranks in comms.items():
        ranks = tuple(ranks)
        if not name or not ranks or len(set(ranks)) != len(ranks):
            raise ValueError(f"communicator {name!r} needs a non-empty name and distinct "
                             f"member ranks, got {ranks!r}")
        members[name] = frozenset(ranks)

    # The graph is ~10 small objects per op and has no reference cycles: pausing the cyclic
    # garbage collector (which would rescan it repeatedly while it grows) saves ~20%.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        g = _build(programs, members, eager_bytes)
        _run(g, latency)
        return _result(g)
    finally:
        if was_enabled:
            gc.enable()


# ---------------------------------------------------------------- building the dependency graph

class _Graph:
    """Flat per-entry arrays. An entry is one op on a stream (or a sync on the host); an op
    with wait=True has a second entry right after it: the wait it enqueues on the compute
    stream. Entry ids follow each rank's issue order, so they are also stream order."""

    def __init__(self):
        self.kind = []      # _COMPUTE ... _COLL
        self.cost = []      # compute: duration, else 0
        self.pending = []   # prerequisites not yet complete
        self.ready = []     # max end time over completed prerequisites (= start / post time)
        self.succ = []      # entries that have this one as a prerequisite
        self.partner = []   # p2p: matching entry or -1; coll: group id
        self.eager = set()  # sends that complete into NCCL's buffer
        # the prerequisites by role, to explain deadlocks:
        self.gate = []      # the host sync that must finish before this entry is issued, or -1
        self.prev = []      # predecessor on the same stream, or -1
        self.cdep = []      # comm op: last compute entry at issue; wait: its op; host_sync: last
        self.dev_lasts = {}     # device_sync entry -> {stream key: last entry} at issue
        self.op_entry = {}      # rank -> entry id per op index
        self.p2p = ({}, {})     # (sends, recvs): (comm, src, dst) -> entries in order
        self.colls = {}         # comm -> rank -> coll entries in order
        self.groups = []        # coll group -> (comm, n, member entries, missing ranks)
        self.programs = None
        self.end = []           # completion time, None while incomplete (set by _run)
        self.posted = []        # send/recv/coll posted on its stream (set by _run)


def _build(programs, members, eager_bytes):
    g = _Graph()
    g.programs = programs
    kind, cost, pending, succ = g.kind, g.cost, g.pending, g.succ
    gate_of, prev_of, cdep_of = g.gate, g.prev, g.cdep
    sends, recvs = g.p2p
    colls, eager = g.colls, g.eager
    # This loop is the bulk of a simulation's time, hence the inlined appends.
    k_app, c_app, p_app, s_app = kind.append, cost.append, pending.append, succ.append
    g_app, v_app, d_app = gate_of.append, prev_of.append, cdep_of.append
    e = 0
    for r, prog in programs.items():
        if not isinstance(r, int):
            raise ValueError(f"rank keys must be ints, got {r!r}")
        gate = -1        # last host sync: nothing after it is issued before it completes
        lastc = -1       # last entry enqueued on the compute stream
        last_on = {}     # comm -> last entry enqueued on its stream
        entries = g.op_entry[r] = []
        e_app = entries.append
        for i, op in enumerate(prog):
            k = op.kind
            if k == "compute":
                k_app(_COMPUTE); c_app(op.cost); s_app([])
                g_app(gate); v_app(lastc); d_app(-1)
                n = 0
                if lastc >= 0:
                    succ[lastc].append(e); n = 1
                if gate > lastc:     # else lastc was issued after the gate: already behind it
                    succ[gate].append(e); n += 1
                p_app(n)
                lastc = e
            elif k in _COMM_KINDS:
                c = op.comm
                mem = members.get(c)
                if mem is None:
                    raise ValueError(f"rank {r} op {i} ({op.label or k}): unknown "
                                     f"communicator {c!r}")
                if r not in mem:
                    raise ValueError(f"rank {r} op {i} ({op.label or k}): rank {r} is not a "
                                     f"member of communicator {c!r} {sorted(mem)}")
                prev = last_on.get(c, -1)
                k_app(_CODE[k]); c_app(0.0); s_app([])
                g_app(gate); v_app(prev); d_app(lastc)
                n = 0
                if prev >= 0:
                    succ[prev].append(e); n = 1
                if lastc >= 0:       # torch makes the NCCL stream wait for the compute stream
                    succ[lastc].append(e); n += 1
                if gate > prev and gate > lastc:
                    succ[gate].append(e); n += 1
                p_app(n)
                last_on[c] = e
                if k == "coll":
                    per = colls.get(c)
                    if per is None:
                        per = colls[c] = {}
                    lst = per.get(r)
                    if lst is None:
                        per[r] = [e]
                    else:
                        lst.append(e)
                else:
                    peer = op.peer
                    if peer not in mem:
                        raise ValueError(f"rank {r} op {i} ({op.label or k}): peer {peer} is not "
                                         f"a member of communicator {c!r} {sorted(mem)}")
                    key, table = ((c, r, peer), sends) if k == "send" else ((c, peer, r), recvs)
                    lst = table.get(key)
                    if lst is None:
                        table[key] = [e]
                    else:
                        lst.append(e)
                    if k == "send" and 0 < op.nbytes <= eager_bytes:
                        eager.add(e)
                e_app(e)
                if op.wait:
                    # work.wait(): the compute stream waits for this op, the host does not
                    w = e + 1
                    k_app(_WAIT); c_app(0.0); s_app([])
                    g_app(gate); v_app(lastc); d_app(e)
                    succ[e].append(w)
                    if lastc >= 0:
                        succ[lastc].append(w); p_app(2)
                    else:
                        p_app(1)
                    lastc = e = w
                e += 1
                continue
            else:
                deps = [lastc, gate if gate > lastc else -1]
                if k == "device_sync":
                    lasts = dict(last_on)
                    deps += lasts.values()
                    lasts[_COMPUTE_STREAM] = lastc
                    g.dev_lasts[e] = lasts
                k_app(_SYNC); c_app(0.0); s_app([])
                g_app(gate); v_app(-1); d_app(lastc)
                n = 0
                for d in deps:
                    if d >= 0:
                        succ[d].append(e); n += 1
                p_app(n)
                gate = e
            e_app(e)
            e += 1

    # NCCL has no tags: the n-th send a->b on a communicator meets the n-th recv at b from a
    partner = g.partner = [-1] * e
    for key, ss in sends.items():
        for s, rv in zip(ss, recvs.get(key, ())):
            partner[s] = rv
            partner[rv] = s
    for c, per_rank in colls.items():
        ranks = sorted(members[c])
        for n in range(max(len(v) for v in per_rank.values())):
            gid = len(g.groups)
            ents = [per_rank[r][n] for r in ranks if len(per_rank.get(r, ())) > n]
            missing = [r for r in ranks if len(per_rank.get(r, ())) <= n]
            g.groups.append((c, n, ents, missing))
            for x in ents:
                partner[x] = gid
    return g


# ---------------------------------------------------------------- the worklist

def _run(g, latency):
    kind, cost, pending, ready, succ, partner, eager = (g.kind, g.cost, g.pending, g.ready,
                                                        g.succ, g.partner, g.eager)
    n = len(kind)
    ready.extend([0.0] * n)
    end = g.end = [None] * n
    posted = g.posted = [False] * n
    gposted = [0] * len(g.groups)
    gmax = [0.0] * len(g.groups)
    # a group with a missing member can never complete: it needs more posts than it has entries
    gneed = [len(ents) + len(missing) for _, _, ents, missing in g.groups]
    gents = [ents for _, _, ents, _ in g.groups]
    stack = [e for e in range(n) if not pending[e]]
    push, pop = stack.append, stack.pop

    def finish(e, t):
        end[e] = t
        for s in succ[e]:
            if ready[s] < t:
                ready[s] = t
            pending[s] -= 1
            if not pending[s]:
                push(s)

    while stack:
        e = pop()
        k = kind[e]
        t = ready[e]
        if k < _SEND:                       # compute, wait entry, host sync
            finish(e, t + cost[e])
        elif k == _COLL:
            gid = partner[e]
            posted[e] = True
            gposted[gid] += 1
            if t > gmax[gid]:
                gmax[gid] = t
            if gposted[gid] == gneed[gid]:
                t = gmax[gid] + latency
                for m in gents[gid]:
                    finish(m, t)
        else:
            posted[e] = True
            p = partner[e]
            if e in eager:
                # buffered send: done without the receiver; a posted recv can now finish too
                t += latency
                finish(e, t)
                if p >= 0 and posted[p] and end[p] is None:
                    finish(p, max(ready[p], t))
            elif p < 0:
                pass                        # unmatched: waits forever
            elif p in eager:
                if end[p] is not None:
                    finish(e, max(t, end[p]))
            elif posted[p]:
                t = max(t, ready[p]) + latency
                finish(e, t)
                finish(p, t)


def _result(g):
    end, ready, gate = g.end, g.ready, g.gate
    times, finish = {}, {}
    makespan = 0.0
    for r, entries in g.op_entry.items():
        row = []
        last = 0.0
        for e in entries:
            t = end[e]
            if t is None:
                row.append(None)
                continue
            if g.kind[e] == _SYNC:
                start = end[gate[e]] if gate[e] >= 0 else 0.0   # when the host reached it
            else:
                start = ready[e]
            row.append((start, t))
            if t > last:
                last = t
        times[r] = row
        finish[r] = last
        if last > makespan:
            makespan = last
    ok = all(t is not None for t in end)
    return Result(ok=ok, makespan=makespan, finish=finish, times=times,
                  deadlock=None if ok else _diagnose(g))


# ---------------------------------------------------------------- explaining a deadlock

def _diagnose(g):
    kind, end, posted, partner = g.kind, g.end, g.posted, g.partner
    programs = g.programs
    rank_of, op_of = [0] * len(kind), [0] * len(kind)
    for r, entries in g.op_entry.items():
        for i, e in enumerate(entries):
            rank_of[e], op_of[e] = r, i
            if kind[e] != _SYNC and programs[r][i].wait:
                rank_of[e + 1], op_of[e + 1] = r, i
    sends, recvs = g.p2p
    nth = {e: j for lists in (sends, recvs) for ents in lists.values() for j, e in enumerate(ents)}

    def op(e):
        return programs[rank_of[e]][op_of[e]]

    def name(e):
        o = op(e)
        if kind[e] == _WAIT:
            return f"wait({o.label or _auto(o, op_of[e])})"
        return o.label or _auto(o, op_of[e])

    def long(e):
        o = op(e)
        return f"{name(e)} on comm {o.comm}" if kind[e] >= _SEND else name(e)

    def stream(e):
        return _COMPUTE_STREAM if kind[e] <= _WAIT else (op(e).comm if kind[e] >= _SEND else None)

    def issued(e):
        return g.gate[e] < 0 or end[g.gate[e]] is not None

    # the head of a stream: its first issued, incomplete entry; everything behind it is queued
    heads = {}
    for e in range(len(kind)):
        if end[e] is None and kind[e] != _SYNC and issued(e):
            heads.setdefault((rank_of[e], stream(e)), e)

    def sname(key):
        return "compute" if key == _COMPUTE_STREAM else key

    def unmatched(e):
        """Why e's match never comes, or None if it has one (or is a coll group complete)."""
        r, o, k = rank_of[e], op(e), kind[e]
        if k == _COLL:
            c, n, _, missing = g.groups[partner[e]]
            if not missing:
                return None
            p = missing[0]
            have = len(g.colls[c].get(p, ()))
            return (f"{long(e)} is unmatched: rank {p} issues only {have} coll(s) on comm {c}, "
                    f"this is coll #{n + 1}")
        if partner[e] >= 0:
            return None
        if k == _SEND:
            have = len(recvs.get((o.comm, r, o.peer), ()))
            what = f"recv(s) from rank {r}"
        else:
            have = len(sends.get((o.comm, o.peer, r), ()))
            what = f"send(s) to rank {r}"
        return (f"{long(e)} is unmatched: rank {o.peer} issues only {have} {what} on comm "
                f"{o.comm}, this is #{nth[e] + 1}")

    edges_cache = {}

    def edges(u):
        """(v, text) for everything incomplete that u waits for; v None: waits for nothing
        that exists (unmatched). text reads after 'rank r: '."""
        if u in edges_cache:
            return edges_cache[u]
        out = []
        k, gt = kind[u], g.gate[u]
        if gt >= 0 and end[gt] is None:
            out.append((gt, f"{long(u)} is not issued yet: the host is blocked at {name(gt)}"))
        elif k == _SYNC:
            lasts = g.dev_lasts.get(u, {_COMPUTE_STREAM: g.cdep[u]})
            for key, last in lasts.items():
                if last >= 0 and end[last] is None:
                    h = heads[(rank_of[u], key)]
                    out.append((h, f"the host is blocked at {name(u)}, waiting for the "
                                   f"{sname(key)} stream, which is stuck at {name(h)}"))
        elif not posted[u]:                 # waits for a prerequisite
            pv, cd = g.prev[u], g.cdep[u]
            if pv >= 0 and end[pv] is None:
                h = heads[(rank_of[u], stream(u))]
                out.append((h, f"{long(u)} is queued behind {name(h)} (stream {sname(stream(u))})"))
            if k == _WAIT:
                if end[cd] is None:
                    out.append((cd, f"{name(u)} on the compute stream (wait=True) waits for "
                                    f"{long(cd)} to complete"))
            elif cd >= 0 and end[cd] is None:
                h = heads[(rank_of[u], _COMPUTE_STREAM)]
                out.append((h, f"{long(u)} cannot be posted before earlier compute-stream work "
                               f"completes; the compute stream is at {name(h)}"))
        elif k == _COLL:
            c, n, ents, missing = g.groups[partner[u]]
            for v in ents:
                if not posted[v]:
                    out.append((v, f"{long(u)} is posted and waits for rank {rank_of[v]} to post "
                                   f"its coll #{n + 1}: {name(v)}"))
            if missing:
                out.append((None, unmatched(u)))
        elif k >= _SEND:
            p = partner[u]
            if p < 0:
                out.append((None, unmatched(u)))
            else:
                out.append((p, f"{long(u)} is posted and waits for its match on rank "
                               f"{rank_of[p]}: {name(p)}"))
        edges_cache[u] = out
        return out

    stuck_entries = [e for e in range(len(kind)) if end[e] is None]

    # find a cycle with an iterative depth-first search (the graph is small: stuck entries)
    color, pos, cycle_nodes, cycle_text = {}, {}, None, None
    for s in stuck_entries:
        if s in color or cycle_nodes:
            continue
        color[s] = 1
        pos[s] = 0
        path = [[s, edges(s), 0]]
        while path and not cycle_nodes:
            frame = path[-1]
            u, es, i = frame
            if i == len(es):
                color[u] = 2
                path.pop()
                continue
            frame[2] += 1
            v = es[i][0]
            if v is None:
                continue
            c = color.get(v)
            if c is None:
                color[v] = 1
                pos[v] = len(path)
                path.append([v, edges(v), 0])
            elif c == 1:
                hops = path[pos[v]:]
                cycle_nodes = [f[0] for f in hops]
                cycle_text = [f"rank {rank_of[f[0]]}: {f[1][f[2] - 1][1]}" for f in hops]
    cycle = []
    if cycle_nodes:
        first = min(range(len(cycle_nodes)), key=lambda j: (rank_of[cycle_nodes[j]],
                                                            cycle_nodes[j]))
        cycle = cycle_text[first:] + cycle_text[:first]

    unmatched_lines = []
    for e in stuck_entries:
        if kind[e] >= _SEND:
            why = unmatched(e)
            if why is not None:
                unmatched_lines.append(f"rank {rank_of[e]}: {why}")
    if len(unmatched_lines) > _MAX_LISTED:
        extra = len(unmatched_lines) - _MAX_LISTED
        unmatched_lines = unmatched_lines[:_MAX_LISTED] + [f"... and {extra} more"]

    stuck = {}
    for r, entries in g.op_entry.items():
        if all(end[e] is not None for e in entries):
            continue
        parts = []
        blocked = next((e for e in entries if kind[e] == _SYNC and end[e] is None), None)
        if blocked is not None:
            why = edges(blocked)
            parts.append(f"host stopped at op {op_of[blocked]} of {len(entries)}: "
                         + (why[0][1] if why else f"blocked at {name(blocked)}"))
        else:
            parts.append(f"host issued all {len(entries)} ops")
        keys = sorted((key for (rr, key) in heads if rr == r), key=lambda key: heads[(r, key)])
        for key in keys:
            h = heads[(r, key)]
            why = edges(h)
            parts.append(f"stream {sname(key)}: " + (why[0][1] if why else name(h)))
        stuck[r] = "\n".join(parts)
    return Deadlock(cycle=cycle, stuck=stuck, unmatched=unmatched_lines)


def _auto(o, i):
    if o.kind == "send":
        return f"send to rank {o.peer} (op {i})"
    if o.kind == "recv":
        return f"recv from rank {o.peer} (op {i})"
    return f"{o.kind} (op {i})"
