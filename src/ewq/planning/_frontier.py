"""The exact multiple-choice knapsack where the programme over bytes is too fine:
a branch and bound over Pareto frontiers, for instances of a few dozen items.

Why written here: the dynamic programme over cells of bytes (allocate.py) is exact
only at the greatest common divisor of the sizes, which for real GGML types is a
few bytes (IgLM's 17 tensors: 2 million cells); the Lagrangian greedy stops up to
one upgrade short (5% above the optimum at IgLM's IQ4_XS bytes). scipy's HiGHS
solves it, but measured here it took 0.09-1.3 s for 17-350 items, printed to
stdout and, at 350 and 1,000 items, returned choices over the budget (its
feasibility tolerance).

Method (Nemhauser-Ullmann with a bound): items are added one at a time; the
states are the partial choices on the Pareto frontier of (bytes, damage). A state
is dropped when the smallest bytes of the items still to come cannot fit, or when
its damage plus the linear-programming bound of the items still to come, at the
bytes left, is no less than an incumbent (the greedy's choice). What survives the
last item is optimal. Deterministic; stops (returns None) above ``max_states``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["frontier_optimum"]

#: states kept at once before the search gives up (the caller keeps its greedy)
MAX_STATES = 1 << 20


def _lp_curves(items) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """Per suffix of items: (least bytes, extra bytes, damage) of the linear
    relaxation's curve: every hull upgrade of those items, dearest saving last."""
    from ewq.planning.allocate import _hull

    curves = []
    steps: list[tuple[float, int, float]] = []
    floor, base = 0, 0.0
    for opts in reversed(items):
        h = _hull(opts)
        floor += opts[h[0]].bytes
        base += opts[h[0]].damage
        for a, b in zip(h, h[1:], strict=False):
            add = opts[b].bytes - opts[a].bytes
            save = opts[a].damage - opts[b].damage
            steps.append((save / add, add, save))
        steps.sort(key=lambda s: -s[0])
        xs = np.concatenate(([0], np.cumsum([s[1] for s in steps], dtype=np.int64)))
        ys = base - np.concatenate(([0.0], np.cumsum([s[2] for s in steps])))
        curves.append((floor, xs, ys))
    curves.reverse()
    curves.append((0, np.zeros(1, dtype=np.int64), np.zeros(1)))
    return curves


def frontier_optimum(
    items: Sequence[Sequence], budget: int, incumbent: float, max_states=MAX_STATES
) -> tuple[list[int] | None, bool]:
    """(the least-damage choice within ``budget`` if one is below ``incumbent``,
    the damage of a known feasible choice, else None; whether the search finished,
    so that the answer is proven). It gives up when the frontier grows past
    ``max_states``."""
    curves = _lp_curves(items)
    tol = 1e-12 * max(abs(incumbent), 1e-300)
    nbytes = np.zeros(1, dtype=np.int64)
    damage = np.zeros(1)
    trail: list[tuple[np.ndarray, np.ndarray]] = []
    for i, opts in enumerate(items):
        ob = np.array([o.bytes for o in opts], dtype=np.int64)
        od = np.array([o.damage for o in opts])
        cb = (nbytes[:, None] + ob[None, :]).ravel()
        cd = (damage[:, None] + od[None, :]).ravel()
        parent = np.repeat(np.arange(len(nbytes)), len(opts))
        pick = np.tile(np.arange(len(opts)), len(nbytes))
        floor, xs, ys = curves[i + 1]
        room = budget - cb - floor
        ok = room >= 0
        cb, cd, parent, pick, room = cb[ok], cd[ok], parent[ok], pick[ok], room[ok]
        bound = cd + np.interp(room, xs, ys)
        ok = bound < incumbent - tol
        cb, cd, parent, pick = cb[ok], cd[ok], parent[ok], pick[ok]
        if not len(cb):
            return None, True  # nothing beats the incumbent: it is optimal
        # the Pareto frontier: by bytes, then damage; keep strictly falling damage
        order = np.lexsort((pick, cd, cb))
        cb, cd, parent, pick = cb[order], cd[order], parent[order], pick[order]
        prev = np.concatenate(([np.inf], np.minimum.accumulate(cd)[:-1]))
        keep = cd < prev
        nbytes, damage = cb[keep], cd[keep]
        trail.append((parent[keep], pick[keep]))
        if len(nbytes) > max_states:
            return None, False
    s = int(np.argmin(damage))  # the first of equal damage: the fewest bytes
    choice = [0] * len(items)
    for i in range(len(items) - 1, -1, -1):
        parent, pick = trail[i]
        choice[i] = int(pick[s])
        s = int(parent[s])
    return choice, True
