"""Why a plan does not fit, or leaves a machine without blocks, machine by machine.

A cluster's memory is not one pool: the placement keeps each machine's blocks
contiguous, every machine holds the runtime's buffers, the machine holding the
output head also holds the logits and its compute buffers (and, for a tied
embedding, llama.cpp's copy of it), and llama.cpp keeps the input embedding in the
serving process (the first machine listed). So a sum of capacities can exceed what
the weights need and still not fit; these checks say which machine falls short, by
how much, and what would fix it.
"""

from __future__ import annotations

from typing import Any

from ewq.planning.placement import has_network
from ewq.planning.runtime import route_for
from ewq.reports.inspect import human_bytes

__all__ = ["idle_reasons", "unfit_reason"]


def _parts(planned: Any) -> dict[str, Any]:
    r, rt, layout = planned.result, planned.runtime, planned.layout
    kv = dict(rt.kv_bytes) if rt is not None else {}
    size = {i: b + kv.get(i, 0) for i, b in r.bytes.items()}
    route = route_for(planned.index, layout, planned.format, rt)
    emb, head = layout.blocks[0].exec_index, layout.blocks[-1].exec_index
    copy = size[emb] if route.tied else 0
    return {
        "size": size,
        "emb": emb,
        "head": head,
        "copy": copy,
        "head_buffers": rt.head_bytes if rt is not None else 0,
        "stage": rt.stage_bytes if rt is not None else 0,
        "relay": route.relay,
    }


def _room(m: Any, stage: int) -> str:
    room = m.memory if m.disk is None else min(m.memory, m.disk)
    own = f" less {human_bytes(stage)} of its own runtime buffers" if stage else ""
    return f"{human_bytes(m.capacity)} ({human_bytes(room)}{own})"


def unfit_reason(planned: Any) -> str | None:
    """The first per-machine limit the smallest plan breaks, in words, or None."""
    machines = planned.machines
    if len(machines) < 2:
        return None
    p = _parts(planned)
    size, stage = p["size"], p["stage"]
    first = machines[0]
    if p["relay"] and not has_network(machines) and size[p["emb"]] > first.capacity:
        short = size[p["emb"]] - first.capacity
        return (
            f"llama.cpp keeps the input embedding in the memory of the process that "
            f"serves, {first.name}: it needs {human_bytes(size[p['emb']])} there, "
            f"and {first.name} has {_room(first, stage)}: give {first.name} "
            f"{human_bytes(short)} more, or list a larger machine first"
        )
    head_need = size[p["head"]] + p["head_buffers"] + p["copy"]
    best = max(machines, key=lambda m: m.capacity)
    if head_need > best.capacity:
        pieces = [f"weights {human_bytes(size[p['head']])}"]
        if p["copy"]:
            pieces.append(f"a copy of the tied embedding {human_bytes(p['copy'])}")
        if p["head_buffers"]:
            pieces.append(
                f"logits and compute buffers {human_bytes(p['head_buffers'])}"
            )
        fix = ", plan a shorter --context" if p["head_buffers"] else ""
        return (
            f"no machine can hold the output head: it needs {human_bytes(head_need)} "
            f"({', '.join(pieces)}), and the most room is {best.name}'s, "
            f"{_room(best, stage)}: give {best.name} "
            f"{human_bytes(head_need - best.capacity)} more{fix}, or add a machine "
            "that large"
        )
    block = max(
        (i for i in size if i not in (p["emb"], p["head"])),
        key=lambda i: size[i],
        default=None,
    )
    if block is not None and size[block] > best.capacity:
        return (
            f"block {block} needs {human_bytes(size[block])} at its smallest "
            "(weights and KV cache), more than any machine has: the most is "
            f"{best.name}'s, {_room(best, stage)}"
        )
    need = sum(size.values()) + p["head_buffers"] + p["copy"]
    have = sum(m.capacity for m in machines)
    if need > have:
        return (
            f"the machines have {human_bytes(have)} after their own runtime buffers "
            f"({human_bytes(stage)} each), the smallest plan needs {human_bytes(need)}"
            f" (weights, KV cache, the head's buffers{' and embedding copy' if p['copy'] else ''}): "
            f"{human_bytes(need - have)} short in all"
        )
    return (
        "the blocks do not split at block boundaries into the machines' room "
        f"({', '.join(f'{m.name} {human_bytes(m.capacity)}' for m in machines)} "
        "after their own runtime buffers): a machine with more room, or fewer "
        "smaller ones, would"
    )


def idle_reasons(planned: Any) -> dict[str, str]:
    """Why each machine the plan gives no block has none (machine -> reason)."""
    r = planned.result
    if not r.fits or len(r.assignments) < 2:
        return {}
    assigned = {a.name: a for a in r.assignments}
    listed = [assigned[m.name] for m in planned.machines if m.name in assigned]
    used = [k for k, a in enumerate(listed) if a.exec_indices]
    if not used:
        return {}
    p = _parts(planned)
    network = has_network(planned.machines)
    out = {}
    for k, m in enumerate(listed):
        if m.exec_indices:
            continue
        if network:
            out[m.name] = (
                "left out: the pipeline without it has the least modelled time "
                "per token"
            )
            continue
        later = [u for u in used if u > k]
        if not later:
            out[m.name] = "not needed: the machines before it hold the whole model"
            continue
        nxt = listed[later[0]].exec_indices[0]
        need = p["size"][nxt]
        what = f"block {nxt} ({human_bytes(need)}"
        if nxt == p["head"]:
            need += p["head_buffers"] + p["copy"]
            what = (
                f"the output head ({human_bytes(need)} with the logits and compute "
                "buffers" + (" and its copy of the tied embedding" if p["copy"] else "")
            )
        out[m.name] = (
            f"the next block to place, {what}), does not fit its "
            f"{human_bytes(m.capacity_bytes)} of room (blocks run in the order "
            "the machines are listed)"
        )
    return out
