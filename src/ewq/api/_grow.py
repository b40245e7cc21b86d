"""A sampled error criterion grown where the plan depends on it (issue 27 item 1).

The allocator keeps a tensor's type while upgrading it saves less damage per byte
than the budget's marginal rate, and downgrading it costs more. Near the budget's
edge the rate lambda lies between the best upgrade not taken and the cheapest
downgrade taken (the multiple-choice knapsack's Lagrangian: every decided tensor
has its upgrade rate below lambda and its downgrade rate above). A sampled estimate
moves those rates by its interval: a tensor whose upgrade or downgrade rate lies
within its interval of lambda has a type the sample cannot decide, and only those
tensors are sampled again (4x the rows, the same rows first), then the plan made
again, up to three rounds. Tensors far from the edge keep their first sample: how
many rows a tensor needs depends on how close its choice is, not on how wide its
interval is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from ewq.sensitivity import Sensitivity, tensor_candidates

__all__ = ["GROWTH", "ROUNDS", "budget_rate", "grow", "undecided"]

ROUNDS = 3
GROWTH = 4


def _edges(form, layout, sens: Sensitivity, imatrix_, result):
    """Per chosen tensor, its upgrade and downgrade along the options no cheaper
    option beats: (name, +1 up / -1 down, damage per byte, half width)."""
    cands = tensor_candidates(form, layout, imatrix_)
    intervals = sens.intervals or {}
    out = []
    for name, chosen in result.tensors.items():
        if name not in cands:
            continue
        opts = sorted((e.nbytes, sens.of(name, e.type), e.type) for e in cands[name][2])
        frontier = []
        for b, d, t in opts:  # bytes up, damage strictly down
            if not frontier or d < frontier[-1][1]:
                frontier.append((b, d, t))
        at = next((k for k, o in enumerate(frontier) if o[2] == chosen.precision), None)
        if at is None:
            continue
        rel = intervals.get(name, {}).get("relative_halfwidth", {})

        def hw(d: float, t: str, rel=rel) -> float:
            r = rel.get(t, 0.0)
            return d * r if r is not None and math.isfinite(r) else math.inf

        b, d, t = frontier[at]
        for side, k in ((1, at + 1), (-1, at - 1)):
            if 0 <= k < len(frontier):
                b2, d2, t2 = frontier[k]
                step = abs(b2 - b)
                out.append(
                    (name, side, abs(d - d2) / step, (hw(d, t) + hw(d2, t2)) / step)
                )
    return out


def budget_rate(edges) -> float | None:
    """The budget's marginal damage per byte: between the best upgrade not taken
    and the cheapest downgrade taken (their geometric mean). None when no upgrade
    is left (every tensor at its least damage: the budget does not bind, a byte
    more buys nothing, and no choice depends on an estimate)."""
    ups = [r for _, side, r, _ in edges if side > 0]
    downs = [r for _, side, r, _ in edges if side < 0]
    lo, hi = max(ups, default=0.0), min(downs, default=math.inf)
    if lo <= 0:
        return None
    return math.sqrt(lo * hi) if math.isfinite(hi) else lo


def undecided(form, layout, sens: Sensitivity, imatrix_, result) -> list[str]:
    """The tensors whose chosen type the sample cannot decide (module docstring)."""
    edges = _edges(form, layout, sens, imatrix_, result)
    rate = budget_rate(edges)
    if rate is None:
        return []
    return sorted({n for n, _, r, h in edges if abs(r - rate) <= h})


def grow(
    fit: Callable[[Sensitivity], Any],
    regrow: Callable[[Sensitivity, Mapping[str, int]], Sensitivity],
    undecided_of: Callable[[Sensitivity, Any], list[str]],
    sens: Sensitivity,
) -> tuple[Any, Sensitivity, list[dict]]:
    """Plan, sample again the tensors the plan cannot decide, plan again: up to
    ``ROUNDS`` rounds. ``fit(criterion)`` plans; ``regrow(criterion,
    {tensor: rows})`` returns it grown; ``undecided_of(criterion, plan)`` names the
    tensors the plan cannot decide. Returns the last plan, its
    criterion and per round the tensors undecided and the rows added."""
    result, rounds = fit(sens), []
    for _ in range(ROUNDS):
        names = undecided_of(sens, result)
        intervals = sens.intervals or {}
        rows = {
            n: min(intervals[n]["of"], GROWTH * intervals[n]["rows"])
            for n in names
            if n in intervals and intervals[n]["rows"] < intervals[n]["of"]
        }
        rounds.append(
            {
                "undecided": len(names),
                "rows_added": sum(r - intervals[n]["rows"] for n, r in rows.items()),
            }
        )
        if not rows:
            break
        sens = regrow(sens, rows)
        result = fit(sens)
    return result, sens, rounds
