"""The optimal allocator's choice placed on machines: the least-damage choice
(planning/allocate.py) that also splits into contiguous ranges of blocks, one per
machine (planning/placement.py)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ewq.planning.allocate import Allocation, Option, allocation, total
from ewq.planning.budget import Machine
from ewq.planning.ladder import FitResult, assign
from ewq.planning.placement import Placement, Route, place
from ewq.types import Precision

__all__ = ["fit_optimal"]


def fit_optimal(
    options: Mapping[Any, Sequence[Option]],
    params: Mapping[int, int],
    machines: Sequence[Machine],
    *,
    route: Route | None = None,
    block_of: Mapping[Any, int] | None = None,
    fixed: Mapping[int, int] | None = None,
    view: Callable[[Option], Precision] | None = None,
    cap: int | None = None,
) -> FitResult:
    """The least-damage choice that fits ``machines``, placed in execution order as
    contiguous ranges of blocks.

    Items are blocks (``options`` keyed by exec_index) or tensors (keyed by name,
    with ``block_of`` giving each one's block and ``fixed`` the bytes every block
    holds whatever is chosen: tensors with one way to be written, its KV cache).
    ``params`` lists every block. Per-tensor results carry each tensor's chosen
    option in ``tensors`` and, per block, the precision ``view`` gives the option
    holding most of its chosen bytes (the per-block view). ``cap`` bounds the total
    bytes on top of the machines' capacity (a bits-per-weight budget).

    One machine: the budget is its capacity. Several: the knapsack is solved for
    their summed capacity and the result placed; when the ranges do not fall on the
    machine boundaries (a block cannot be split), the budget is lowered by an eighth
    of the largest block until they do.
    """
    keys = list(options)
    problem = _Problem(
        keys,
        [list(options[k]) for k in keys],
        dict(block_of or {k: k for k in keys}),
        dict(fixed or {}),
        sorted(params),
    )
    capacity = sum(m.capacity for m in machines)
    # the head's machine needs more runtime memory than the others (its logits)
    budget = capacity - (route.last_bytes if route else 0)
    if cap is not None:  # a bits-per-weight budget on top of the machines'
        budget = min(budget, cap)
    found, placement = _search(problem, budget, params, machines, route)
    if placement is None or found is None:  # report the smallest choice
        choice = [
            min(range(len(opts)), key=lambda k: (opts[k].bytes, k))
            for opts in problem.items
        ]
        nbytes, damage = total(problem.items, choice)
        found = Allocation(choice, nbytes, damage, damage, True)
    chosen = {k: problem.items[n][found.choice[n]] for n, k in enumerate(keys)}
    sizes = problem.block_sizes(found.choice)
    machine_of, assignments = assign(problem.order, sizes, machines, placement)
    precision, tensors = _views(chosen, problem, view)
    return FitResult(
        fits=placement is not None,
        mode=None,  # a ladder's precision pair; this is no ladder
        precision=precision,
        bytes=sizes,
        machine=machine_of,
        total_bytes=sum(sizes.values()),
        capacity_bytes=capacity,
        smallest_bytes=problem.smallest,
        assignments=assignments,
        rung=0,
        rungs=0,
        damage=math.fsum(o.damage for o in chosen.values()),
        seconds_per_token=placement.seconds if placement is not None else None,
        tensors=tensors,
        bound=found.bound,
    )


def _views(chosen, problem, view):
    """Per block its precision, and per tensor its option (tensor items only): a
    block item's precision is its option's; a block of tensors shows the
    precision ``view`` gives the option holding most of its bytes."""
    if view is None:
        precision = {problem.block_of[k]: o.precision for k, o in chosen.items()}
        return precision, {}
    precision = _dominant(chosen, problem.block_of, problem.order, view)
    return precision, {str(k): o for k, o in chosen.items()}


class _Problem:
    """The items (blocks or tensors), the block each belongs to, and the bytes
    each block holds whatever is chosen."""

    def __init__(self, keys, items, block_of, fixed, order) -> None:
        self.keys, self.items, self.order = keys, items, order
        self.block_of, self.fixed = block_of, fixed
        self.base = sum(fixed.values())
        self.smallest = self.base + sum(min(o.bytes for o in opts) for opts in items)

    def block_sizes(self, choice: Sequence[int]) -> dict[int, int]:
        sizes = {i: self.fixed.get(i, 0) for i in self.order}
        for n, k in enumerate(self.keys):
            sizes[self.block_of[k]] += self.items[n][choice[n]].bytes
        return sizes

    def largest_block(self) -> int:
        top: dict[int, int] = dict(self.fixed)
        for k, opts in zip(self.keys, self.items, strict=True):
            b = self.block_of[k]
            top[b] = top.get(b, 0) + max(o.bytes for o in opts)
        return max(top.values(), default=1)


def _search(
    problem: _Problem,
    budget: int,
    params: Mapping[int, int],
    machines: Sequence[Machine],
    route: Route | None,
) -> tuple[Allocation | None, Placement | None]:
    """The allocation at the largest budget whose blocks fall on the machines'
    boundaries: an eighth of the largest block less each time they do not."""
    step = max(1, problem.largest_block() // 8)
    found, placement = None, None
    while budget >= problem.smallest:
        found = allocation(problem.items, budget - problem.base)
        if found is None:
            break
        sizes = problem.block_sizes(found.choice)
        placement = place(problem.order, sizes, params, machines, route)
        if placement is not None:
            break
        budget -= step
    return found, placement


def _dominant(chosen, block_of, order, view) -> dict[int, Precision]:
    """Per block, the precision of the chosen options holding most of its bytes
    (raw for a block with no choice)."""
    held: dict[int, dict[Precision, int]] = {i: {} for i in order}
    for k, o in chosen.items():
        p = view(o)
        row = held[block_of[k]]
        row[p] = row.get(p, 0) + o.bytes
    return {
        i: max(row, key=lambda p: (row[p], p.rank)) if row else Precision.RAW
        for i, row in held.items()
    }
