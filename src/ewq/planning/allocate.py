"""The optimal allocator: one precision per block, least total estimated damage
within a budget (a multiple-choice knapsack).

Pure: numbers in, choices out. Every block (the embedding and head included) offers
options (precision, exact bytes, estimated damage); the allocator picks one option
per block so that the bytes fit and the summed damage is least.

Why written here: no maintained Python library solves the multiple-choice knapsack
(OR-Tools' knapsack solver is 0-1 only; a MILP through scipy's HiGHS is exact but
takes seconds and gives no budget-monotone guarantee). The method is the textbook
dynamic programme over the budget:

* Bytes above each block's smallest option are counted in *cells* of ``grain``
  bytes. The grain is the greatest common divisor of every such extra size, so the
  programme is exact, unless that would need more than ``max_cells`` cells; then the
  grain is coarser and every extra size is rounded *up* (never over budget, at most
  one grain per block of budget left unused, which the fill step then spends).
* ``best[c]`` is the least damage with at most ``c`` cells of extra bytes; each
  block updates it with a minimum over its options (vectorised over cells).
* The grain depends on the options only, not on the budget, so more budget never
  gives more damage (monotone), and with the exact grain the result is optimal
  (tested against brute force).
* Fill: while some single change of one block lowers the damage and fits into the
  bytes still unused, the best such change is made. After it, what is unused is
  smaller than any single improving change.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import reduce

import numpy as np

from ewq.planning.budget import Machine
from ewq.planning.ladder import FitResult, assign
from ewq.planning.placement import Route, place
from ewq.types import Precision

__all__ = ["MAX_CELLS", "Option", "allocate", "fit_optimal", "total"]

MAX_CELLS = 1 << 18


@dataclass(frozen=True)
class Option:
    """One way to store a block: its precision, exact bytes and estimated damage."""

    precision: Precision
    bytes: int
    damage: float


def total(
    items: Sequence[Sequence[Option]], choice: Sequence[int]
) -> tuple[int, float]:
    """(bytes, damage) of a choice of one option per item."""
    nbytes = sum(items[i][k].bytes for i, k in enumerate(choice))
    return nbytes, math.fsum(items[i][k].damage for i, k in enumerate(choice))


def _check(items: Sequence[Sequence[Option]]) -> None:
    for i, opts in enumerate(items):
        if not opts:
            raise ValueError(f"item {i} has no option")
        for o in opts:
            if o.bytes < 0 or not math.isfinite(o.damage):
                raise ValueError(
                    f"item {i}: option {o} has negative bytes or no damage"
                )


def allocate(
    items: Sequence[Sequence[Option]],
    budget: int,
    *,
    max_cells: int = MAX_CELLS,
) -> list[int] | None:
    """Index of the chosen option per item, or None when even the smallest choice
    exceeds ``budget``. Ties go to the smaller option, then to the earlier one."""
    _check(items)
    base = [min(range(len(opts)), key=lambda k: (opts[k].bytes, k)) for opts in items]
    floor = sum(items[i][k].bytes for i, k in enumerate(base))
    if floor > budget:
        return None
    extra = [
        [o.bytes - opts[b].bytes for o in opts]
        for opts, b in zip(items, base, strict=True)
    ]
    span = sum(max(e) for e in extra)
    slack = min(budget - floor, span)
    positive = [x for e in extra for x in e if x > 0]
    if not positive:
        choice = [_least(opts) for opts in items]
        return _fill(items, choice, budget)
    grain = reduce(math.gcd, positive)
    if span // grain > max_cells:
        grain = -(-span // max_cells)
    cells = slack // grain
    best = np.zeros(cells + 1)
    picks = np.zeros((len(items), cells + 1), dtype=np.int16)
    for i, opts in enumerate(items):
        new = np.full(cells + 1, np.inf)
        pick = np.zeros(cells + 1, dtype=np.int16)
        order = sorted(range(len(opts)), key=lambda k: (opts[k].bytes, k))
        for k in order:
            w = -(-extra[i][k] // grain)  # rounded up: never over budget
            if w > cells:
                continue
            cand = np.full(cells + 1, np.inf)
            cand[w:] = best[: cells + 1 - w] + opts[k].damage
            better = cand < new  # strict: the smaller option keeps a tie
            new[better] = cand[better]
            pick[better] = k
        best, picks[i] = new, pick
    choice = [0] * len(items)
    c = cells
    for i in range(len(items) - 1, -1, -1):
        k = int(picks[i, c])
        choice[i] = k
        c -= -(-extra[i][k] // grain)
    return _fill(items, choice, budget)


def _least(opts: Sequence[Option]) -> int:
    return min(range(len(opts)), key=lambda k: (opts[k].damage, opts[k].bytes, k))


def _fill(
    items: Sequence[Sequence[Option]], choice: list[int], budget: int
) -> list[int]:
    """Spend what the rounding left: the best single improving change that fits,
    until none does."""
    used, _ = total(items, choice)
    while True:
        best = None  # (damage gained, -bytes added, item, option)
        for i, opts in enumerate(items):
            cur = opts[choice[i]]
            for k, o in enumerate(opts):
                gain = cur.damage - o.damage
                add = o.bytes - cur.bytes
                if gain > 0 and used + add <= budget:
                    key = (gain, -add, -i, -k)
                    if best is None or key > best[0]:
                        best = (key, i, k, add)
        if best is None:
            return choice
        _, i, k, add = best
        choice[i] = k
        used += add


def fit_optimal(
    options: Mapping[int, Sequence[Option]],
    params: Mapping[int, int],
    machines: Sequence[Machine],
    *,
    mode: str = "optimal",
    route: Route | None = None,
) -> FitResult:
    """The least-damage plan that fits ``machines`` (every block of ``options``,
    keyed by exec_index, placed in execution order as contiguous ranges).

    One machine: the budget is its capacity. Several: the knapsack is solved for
    their summed capacity and the result placed; when the ranges do not fall on the
    machine boundaries (a block cannot be split), the budget is lowered by an eighth
    of the largest block until they do.
    """
    order = sorted(options)
    items = [list(options[i]) for i in order]
    capacity = sum(m.capacity for m in machines)
    smallest = sum(min(o.bytes for o in opts) for opts in items)
    step = max(1, max(max(o.bytes for o in opts) for opts in items) // 8)
    # the head's machine needs more runtime memory than the others (its logits)
    budget = capacity - (route.last_bytes if route else 0)
    choice, placement = None, None
    while budget >= smallest:
        choice = allocate(items, budget)
        if choice is None:
            break
        sizes = {i: items[n][choice[n]].bytes for n, i in enumerate(order)}
        placement = place(order, sizes, params, machines, route)
        if placement is not None:
            break
        budget -= step
    if placement is None:  # report the smallest choice
        choice = [
            min(range(len(opts)), key=lambda k: (opts[k].bytes, k)) for opts in items
        ]
    chosen = {i: items[n][choice[n]] for n, i in enumerate(order)}
    sizes = {i: o.bytes for i, o in chosen.items()}
    machine_of, assignments = assign(order, sizes, machines, placement)
    return FitResult(
        fits=placement is not None,
        mode=mode,
        precision={i: o.precision for i, o in chosen.items()},
        bytes=sizes,
        machine=machine_of,
        total_bytes=sum(sizes.values()),
        capacity_bytes=capacity,
        smallest_bytes=smallest,
        machines=assignments,
        rung=0,
        rungs=0,
        damage=math.fsum(o.damage for o in chosen.values()),
        seconds_per_token=placement.seconds if placement is not None else None,
    )
