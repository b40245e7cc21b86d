"""Fit a model to a machine or a cluster: the paper's Algorithm 1 as a ladder.

Pure: numbers in, a plan out; O(n log n) in the number of blocks.

Every block has four levels per mode: 1.58-bit < aggressive < moderate < raw
(mode 8/4: 4-bit and 8-bit; 4/3: 3-bit and 4-bit; 4/2: 2-bit and 4-bit). The planner
builds one fixed sequence of single-level promotions, the *ladder*, from the smallest
model to the unquantized one, and keeps the longest prefix that fits:

1. every transformer block starts at 1.58-bit, the embedding and head at aggressive;
2. blocks leave 1.58-bit for aggressive, highest entropy first (read backwards, this
   is Algorithm 1's step 4: the lowest-entropy blocks are pushed to 1.58-bit first);
3. the embedding and head go to moderate, then the blocks that the decision puts at
   moderate or raw go to moderate, highest entropy first;
4. the embedding and head go raw, then the blocks the decision keeps raw go raw,
   highest entropy first. This state *is* the decision (Algorithm 1's step 2);
5. the remaining blocks are promoted, highest entropy first: moderate blocks to raw,
   then aggressive blocks to moderate, then to raw. The top is the unquantized model
   (step 1: if it fits, nothing is quantized).

Where this departs from the paper's text: when the decision does not fit, Algorithm 1
restarts from uniform 8-bit and promotes; the ladder instead takes back the decision's
raw blocks one by one, lowest entropy first, keeping its 4-bit blocks at 4-bit. The
paper's order is not monotone (a budget just above the decision's size would give the
lowest-entropy blocks 4-bit, a budget just below it 8-bit); the ladder is, so more
memory never lowers any block's precision. For the paper's "8bit mixed" variant (no
aggressive blocks) the two coincide.

Placement (which machine runs which blocks) is planning/placement.py's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ewq.planning.budget import Machine
from ewq.planning.placement import Placement, Route, place
from ewq.types import Precision

__all__ = [
    "MODES",
    "Assignment",
    "BlockSpec",
    "FitResult",
    "fit",
]

MODES: dict[str, tuple[Precision, Precision, Precision, Precision]] = {
    "8/4": (Precision.TERNARY, Precision.Q4, Precision.Q8, Precision.RAW),
    "4/3": (Precision.TERNARY, Precision.Q3, Precision.Q4, Precision.RAW),
    "4/2": (Precision.TERNARY, Precision.Q2, Precision.Q4, Precision.RAW),
}


@dataclass(frozen=True)
class BlockSpec:
    """One block as the planner sees it: exact bytes at every precision."""

    exec_index: int
    num_parameters: int
    bytes: Mapping[Precision, int]
    entropy: float | None = None  # for the report only; the order comes from priority


@dataclass(frozen=True)
class Assignment:
    name: str
    capacity_bytes: int
    exec_indices: tuple[int, ...]
    bytes: int  # its blocks, and the copy below
    copy_bytes: int = 0  # a tied head's own copy of the embedding (planning/placement)


@dataclass(frozen=True)
class FitResult:
    fits: bool
    #: the ladder's precision pair (8/4, 4/3, 4/2); None from the optimal allocator
    mode: str | None
    precision: Mapping[int, Precision]  # every block, embedding and head included
    bytes: Mapping[int, int]
    machine: Mapping[int, str | None]
    total_bytes: int
    capacity_bytes: int
    smallest_bytes: int  # the bottom of the ladder: the least this model can take
    assignments: tuple[Assignment, ...]  # per machine of the budget: its blocks
    rung: int  # how many promotions of the ladder were kept (ladder only)
    rungs: int  # how many there are
    damage: float | None = None  # estimated damage (optimal allocator only)
    seconds_per_token: float | None = None  # modelled, when the cluster has a network
    tensors: Mapping[str, Any] = field(default_factory=dict)  # per tensor: its Option
    bound: float | None = None  # no choice within the budget has less damage


def _ladder(
    blocks: Sequence[BlockSpec],
    embedding: BlockSpec,
    head: BlockSpec,
    decision: Mapping[int, int],
    priority: Sequence[int],
) -> tuple[dict[int, int], list[tuple[int, int]]]:
    """The starting levels and the promotions (exec_index, new level) in order."""
    start = {b.exec_index: 0 for b in blocks}
    start[embedding.exec_index] = start[head.exec_index] = 1
    down = list(reversed(priority))  # highest entropy first
    side = [embedding.exec_index, head.exec_index]
    steps = [(i, 1) for i in down]
    steps += [(i, 2) for i in side] + [(i, 2) for i in down if decision[i] >= 2]
    steps += [(i, 3) for i in side] + [(i, 3) for i in down if decision[i] == 3]
    steps += [(i, 3) for i in down if decision[i] == 2]
    steps += [(i, 2) for i in down if decision[i] == 1]
    steps += [(i, 3) for i in down if decision[i] == 1]
    return start, steps


def assign(
    order: Sequence[int],
    sizes: Mapping[int, int],
    machines: Sequence[Machine],
    placement: Placement | None,
) -> tuple[dict[int, str | None], tuple[Assignment, ...]]:
    """Each block's machine (None when nothing was placed) and each machine's share,
    the pipeline's stages first, in their order, then the machines left out."""
    machine_of: dict[int, str | None] = dict.fromkeys(order)
    stages = placement.stages if placement is not None else ()
    extra = placement.extra if placement is not None else {}
    used = [k for k, _ in stages]
    assignments = []
    for k, idxs in (*stages, *((k, ()) for k in range(len(machines)) if k not in used)):
        m = machines[k]
        for i in idxs:
            machine_of[i] = m.name
        copy = extra.get(k, 0)
        assignments.append(
            Assignment(
                m.name,
                m.capacity,
                tuple(idxs),
                sum(sizes[i] for i in idxs) + copy,
                copy,
            )
        )
    return machine_of, tuple(assignments)


def _highest_rung(
    order, steps, before, totals, level, size, room, params, machines, route
):
    """Walk the ladder down from its top (``level`` is the top's levels; promotions
    undone in place) to the highest rung whose total fits ``room`` and whose blocks
    place on the machines: (rung, placement), or (0, None)."""
    for rung in range(len(steps), -1, -1):
        if rung < len(steps):
            level[steps[rung][0]] = before[rung]  # undo promotion `rung`
        if totals[rung] > room:
            continue
        sizes = {i: size(i, level[i]) for i in order}
        placed = place(order, sizes, params, machines, route)
        if placed is not None:
            return rung, placed
    return 0, None


def fit(
    blocks: Sequence[BlockSpec],
    embedding: BlockSpec,
    head: BlockSpec,
    decision: Mapping[int, Precision],
    priority: Sequence[int],
    machines: Sequence[Machine],
    *,
    mode: str = "8/4",
    route: Route | None = None,
) -> FitResult:
    """Algorithm 1 (see the module docstring) for ``machines``.

    ``blocks`` are the transformer blocks in execution order; ``decision`` gives each
    its EWQ precision (in the mode's terms); ``priority`` lists them in quantization
    order (lowest entropy first).
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r} (one of {', '.join(MODES)})")
    levels = MODES[mode]
    level_of = {p: k for k, p in enumerate(levels)}
    try:
        target = {i: level_of[p] for i, p in decision.items()}
    except KeyError as exc:
        raise ValueError(f"precision {exc} is not a level of mode {mode}") from None
    specs = {b.exec_index: b for b in (embedding, *blocks, head)}
    order = sorted(specs)
    start, steps = _ladder(blocks, embedding, head, target, priority)

    def size(i: int, level: int) -> int:
        return specs[i].bytes[levels[level]]

    # totals along the ladder, then the highest rung that fits (totals first: cheap)
    level = dict(start)
    totals = [sum(size(i, level[i]) for i in order)]
    before = []  # each promotion's previous level, to walk the ladder back down
    for i, new in steps:
        before.append(level[i])
        totals.append(totals[-1] + size(i, new) - size(i, level[i]))
        level[i] = new
    capacity = sum(m.capacity for m in machines)
    params = {i: specs[i].num_parameters for i in order}
    room = capacity - (route.last_bytes if route else 0)
    chosen, placement = _highest_rung(
        order, steps, before, totals, level, size, room, params, machines, route
    )
    if placement is None:
        level = dict(start)
        chosen = 0
    sizes = {i: size(i, level[i]) for i in order}
    machine_of, assignments = assign(order, sizes, machines, placement)
    return FitResult(
        fits=placement is not None,
        mode=mode,
        precision={i: levels[level[i]] for i in order},
        bytes=sizes,
        machine=machine_of,
        total_bytes=sum(sizes.values()),
        capacity_bytes=capacity,
        smallest_bytes=min(totals),  # sizes need not grow along the ladder when the
        # source is quantized already (a Q4_1 "raw" block is smaller than its Q8_0)
        assignments=assignments,
        rung=chosen,
        rungs=len(steps),
        seconds_per_token=placement.seconds if placement is not None else None,
    )
