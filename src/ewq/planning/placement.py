"""Placement: which machine runs which blocks, in which order of machines.

Pure: sizes and machines in, a pipeline out. Blocks go in execution order onto a
sequence of machines (the pipeline), each machine a contiguous range; the first
machine of the pipeline holds the embedding and takes the prompt, the last holds the
head.

Two ways, chosen by what the cluster file says:

* No network declared: the machines in the order given. Each is filled before the
  next is used (fewest machines, fewest hops); when machines declare different
  ``speed``s the ranges are balanced instead, so that the slowest machine's share
  (parameters / speed) is as small as capacity allows.
* A network declared (links between machines, or each machine's link to a switch):
  the order of machines, which of them to use, and the ranges are chosen together to
  make the time of one generated token least. That time is the compute, each
  machine reading its weights and KV cache once (bytes / memory bandwidth: decoding
  is bound by memory bandwidth), plus every hop: the link's latency plus the bytes
  sent over its bandwidth. Between consecutive stages travels one token's hidden
  state (n_embd float32); from the last stage back to the first what the runtime
  sends: llama.cpp the float32 logits (n_vocab x 4 bytes), vLLM the sampled token.
  llama.cpp's RPC backend relays every transfer through its main machine (the
  first): a tensor moves from one server to the next by being read back to the
  main process and sent on (``ggml_backend_tensor_copy`` between two RPC buffers
  falls back to get + set in the bundled ``ggml/src/ggml-backend.cpp``), so a hop
  between two remote machines costs their two links to the first.

  The search is exact: a dynamic programme over (machines used, last machine,
  blocks placed), with a sliding minimum over each machine's feasible ranges;
  O(k^2 2^k n) for k machines and n blocks. Up to ``MAX_SEARCH`` machines; beyond,
  the order given is kept and only the ranges and the machines left out are chosen.

Tied embeddings: the runtimes compute the head from the embedding matrix, and when
the head's machine is not the embedding's, that machine loads its own copy
(llama.cpp creates the output tensor as a ``TENSOR_DUPLICATED`` token embedding on
the output layer's device, ``src/llama-model.cpp``); ``Route.tied`` charges it.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ewq.planning.budget import BudgetError, Link, Machine

__all__ = ["MAX_SEARCH", "Placement", "Route", "hop_seconds", "place", "token_seconds"]

MAX_SEARCH = 8  # machines searched over every order; more keep the order given


@dataclass(frozen=True)
class Route:
    """What the runtime sends per generated token, and how."""

    hop_bytes: int = 0  # one token's hidden state, stage to stage
    return_bytes: int = 0  # last stage back to the first (logits or a token id)
    relay: bool = False  # every transfer goes through the first machine (llama.cpp)
    tied: bool = False  # the head's machine holds a copy of the embedding
    last_bytes: int = 0  # more runtime memory on the head's machine (logits)


@dataclass(frozen=True)
class Placement:
    """Machines in pipeline order (indices into the machines given), each with its
    blocks; ``extra`` the bytes a stage holds beside its blocks (a tied head's copy of
    the embedding); ``seconds`` the modelled time per token (with a network)."""

    stages: tuple[tuple[int, tuple[int, ...]], ...]
    extra: Mapping[int, int]
    seconds: float | None = None


def has_network(machines: Sequence[Machine]) -> bool:
    return any(m.network is not None or m.links for m in machines)


def link(a: Machine, b: Machine) -> Link | None:
    """The link between two machines: a declared pair link, else both to a switch."""
    for name, lk in a.links:
        if name == b.name:
            return lk
    for name, lk in b.links:
        if name == a.name:
            return lk
    if a.network is not None and b.network is not None:
        return Link(
            min(a.network.bandwidth, b.network.bandwidth),
            a.network.latency + b.network.latency,
        )
    return None


def hop_seconds(
    machines: Sequence[Machine], a: int, b: int, nbytes: int, route: Route, first: int
) -> float:
    """Seconds to send ``nbytes`` from machine ``a`` to ``b`` (inf: no link)."""
    if a == b:
        return 0.0
    if route.relay and first not in (a, b):
        return hop_seconds(machines, a, first, nbytes, route, first) + hop_seconds(
            machines, first, b, nbytes, route, first
        )
    lk = link(machines[a], machines[b])
    if lk is None:
        return math.inf
    return lk.latency + nbytes / lk.bandwidth


def token_seconds(
    stages: Sequence[tuple[int, Sequence[int]]],
    sizes: Mapping[int, int],
    machines: Sequence[Machine],
    route: Route,
) -> float:
    """The modelled time of one token through a pipeline (see the module text)."""
    first = stages[0][0]
    t = 0.0
    for m, idxs in stages:
        t += sum(sizes[i] for i in idxs) / _rate(machines[m])
    for (a, _), (b, _) in itertools.pairwise(stages):
        t += hop_seconds(machines, a, b, route.hop_bytes, route, first)
    if len(stages) > 1:
        t += hop_seconds(
            machines, stages[-1][0], first, route.return_bytes, route, first
        )
    return t


def _rate(m: Machine) -> float:
    if m.memory_bandwidth is None:
        raise BudgetError(
            f"machine {m.name} needs a memory_bandwidth: the cluster declares a network"
        )
    return m.memory_bandwidth


def place(
    order: Sequence[int],
    sizes: Mapping[int, int],
    params: Mapping[int, int],
    machines: Sequence[Machine],
    route: Route | None = None,
) -> Placement | None:
    """Where every block of ``order`` (execution order) runs; None if they do not fit."""
    route = route or Route()
    if has_network(machines):
        return _search(order, sizes, machines, route)
    ranges = _place(order, sizes, params, machines, route)
    if ranges is None:
        return None
    if len({m.speed for m in machines}) > 1:
        ranges = _balanced(order, sizes, params, machines, route) or ranges
    stages = tuple((k, tuple(r)) for k, r in enumerate(ranges) if r)
    return Placement(stages, _extra(stages, sizes, order, route))


def _extra(stages, sizes, order, route) -> dict[int, int]:
    if route.tied and len(stages) > 1 and order:
        return {stages[-1][0]: sizes[order[0]]}
    return {}


def _place(
    order: Sequence[int],
    sizes: Mapping[int, int],
    params: Mapping[int, int],
    machines: Sequence[Machine],
    route: Route,
    time_limit: float = float("inf"),
) -> list[list[int]] | None:
    """Contiguous ranges in machine order, each machine filled before the next."""
    out: list[list[int]] = [[] for _ in machines]
    m, used, work = 0, 0, 0.0
    last = order[-1] if order else None
    for idx in order:
        size, load = sizes[idx], params[idx]
        while m < len(machines):
            extra = 0  # a tied head away from the embedding loads its own copy
            if idx == last:
                extra = route.last_bytes
                if route.tied and order[0] not in out[m]:
                    extra += sizes[order[0]]
            if used + size + extra > machines[m].capacity or (
                out[m] and work + load / machines[m].speed > time_limit
            ):
                m, used, work = m + 1, 0, 0.0
                continue
            break
        if m == len(machines):
            return None
        if m and idx == order[0] and route.relay:
            # llama.cpp keeps the input embedding in the serving process's memory
            # (the first machine listed): it cannot go to a worker
            return None
        if load / machines[m].speed > time_limit and not out[m]:
            return None
        out[m].append(idx)
        used += size
        work += load / machines[m].speed
    return out


def _balanced(
    order: Sequence[int],
    sizes: Mapping[int, int],
    params: Mapping[int, int],
    machines: Sequence[Machine],
    route: Route,
) -> list[list[int]] | None:
    """Ranges minimising the largest parameters/speed share, within capacity."""
    plain = _place(order, sizes, params, machines, route)
    if plain is None:
        return None
    lo = max(params[i] for i in order) / max(m.speed for m in machines)
    hi = sum(params[i] for i in order) / min(m.speed for m in machines)
    best = plain
    for _ in range(40):  # bisection on the largest share
        mid = (lo + hi) / 2
        placed = _place(order, sizes, params, machines, route, mid)
        if placed is None:
            lo = mid
        else:
            best, hi = placed, mid
    return best


def _search(
    order: Sequence[int],
    sizes: Mapping[int, int],
    machines: Sequence[Machine],
    route: Route,
) -> Placement | None:
    """The pipeline of least modelled time per token (exact; see the module text)."""
    for m in machines:
        _rate(m)  # every machine needs its memory bandwidth
    n, k = len(order), len(machines)
    if n == 0:
        return None
    prefix = [0]
    for i in order:
        prefix.append(prefix[-1] + sizes[i])
    dup = (sizes[order[0]] if route.tied else 0) + route.last_bytes
    firsts = range(k) if k <= MAX_SEARCH else range(1)
    best: tuple[float, Placement] | None = None
    for first in firsts:
        found = _from(first, n, k, prefix, machines, route, dup)
        if found is not None and (best is None or found[0] < best[0]):
            best = found
    if best is None:
        return None
    seconds, stages_idx = best
    stages = []
    for m, (a, b) in stages_idx:
        stages.append((m, tuple(order[a:b])))
    stages_t = tuple(stages)
    return Placement(stages_t, _extra(stages_t, sizes, order, route), seconds)


def _from(first, n, k, prefix, machines, route, dup):
    """Least time with ``first`` as the first stage: (seconds, [(machine, (a, b))]).

    A state is (machines used, last machine), or (-, last machine) when the order
    given is kept; its value is the least time per count of blocks placed.
    """
    inf = math.inf
    caps = [m.capacity for m in machines]
    rates = [_rate(m) for m in machines]
    search = k <= MAX_SEARCH
    # the first stage holds blocks [0, j) (the embedding first), no copy of it needed
    f0 = [
        prefix[j] / rates[first]
        if prefix[j] + (route.last_bytes if j == n else 0) <= caps[first]
        else inf
        for j in range(n + 1)
    ]
    f0[0] = inf
    start = (1 << first if search else 0, first)
    states = {start: (f0, [None] * (n + 1))}  # key -> (costs, back pointers)
    frontier = [start]
    finals = []
    while frontier:
        nxt = []
        for key in frontier:
            mask, last = key
            f = states[key][0]
            if f[n] < inf:
                close = 0.0
                if key != start:
                    close = hop_seconds(
                        machines, last, first, route.return_bytes, route, first
                    )
                if f[n] + close < inf:  # no way back to the first machine: no pipeline
                    finals.append((f[n] + close, key))
            if search:
                candidates = [m for m in range(k) if not mask >> m & 1]
            else:
                candidates = [m for m in range(last + 1, k) if m != first]
            for m2 in candidates:
                hop = hop_seconds(machines, last, m2, route.hop_bytes, route, first)
                if hop == inf:
                    continue
                g, starts = _extend(f, prefix, caps[m2], rates[m2], hop, n, dup)
                key2 = (mask | 1 << m2 if search else 0, m2)
                if key2 not in states:
                    states[key2] = ([inf] * (n + 1), [None] * (n + 1))
                    nxt.append(key2)
                old, back = states[key2]
                for j in range(n + 1):
                    if g[j] < old[j]:
                        old[j], back[j] = g[j], (key, starts[j])
        frontier = nxt
    if not finals:
        return None
    seconds, key = min(finals, key=lambda t: t[0])
    stages, j = [], n
    while key != start:  # walk the back pointers to the first stage
        prev, begin = states[key][1][j]
        stages.append((key[1], (begin, j)))
        key, j = prev, begin
    stages.append((first, (0, j)))
    stages.reverse()
    return seconds, stages


def _extend(f, prefix, cap, rate, hop, n, dup):
    """One more stage on a machine of ``cap`` bytes: g[j'] = min over feasible j of
    f[j] + hop + bytes(j..j')/rate, by a sliding-window minimum (the feasible j form
    a window that moves right with j')."""
    inf = math.inf
    g = [inf] * (n + 1)
    back: list[int | None] = [None] * (n + 1)
    window: deque[int] = deque()  # candidate starts, increasing f[j] - prefix[j]/rate
    lo = 0
    for j2 in range(1, n + 1):
        j = j2 - 1  # newest start: [j, j2) holds at least one block
        if f[j] < inf:
            val = f[j] - prefix[j] / rate
            while window and f[window[-1]] - prefix[window[-1]] / rate >= val:
                window.pop()
            window.append(j)
        need = dup if j2 == n else 0
        while lo < j2 and prefix[j2] - prefix[lo] + need > cap:
            lo += 1
        while window and window[0] < lo:
            window.popleft()
        if window:
            s = window[0]
            g[j2] = f[s] + hop + (prefix[j2] - prefix[s]) / rate
            back[j2] = s
    return g, back
