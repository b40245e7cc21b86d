"""The per-tensor allocator at the scale of a 70B-class model: 1,000 tensors x 20
GGML types (sizes of real types, convex damage curves of random scale), against
scipy's MILP solver (HiGHS) on the same instance in the same run.

Printed: seconds of each, ewq's damage against HiGHS (optimal to its default
relative MIP gap of 1e-4, so ewq can come out slightly below it), and the gap
ewq's own linear-programming bound proves without the solver.

    .venv/bin/python benchmarks/allocate_speed.py [--tensors 1000] [--types 20]
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np

from ewq.planning.allocate import Option, allocation

BITS = [
    16,
    8.5,
    6.5625,
    6.0,
    5.5,
    5.5,
    5.0,
    4.5,
    4.5,
    4.5,
    4.25,
    3.4375,
    3.4375,
    3.0625,
    2.625,
    2.5625,
    2.3125,
    2.0625,
    1.75,
    1.6875,
]


def instance(n: int, k: int, seed: int = 0):
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        size = rng.choice([4096 * 4096, 4096 * 1024, 4096 * 14336, 8192 * 28672])
        s = rng.lognormvariate(0, 1)
        items.append(
            [
                Option(
                    f"t{j}",
                    int(size * b / 8),
                    s * 2 ** (-2 * b) * (1 + 0.2 * rng.random()),
                )
                for j, b in enumerate(BITS[:k])
            ]
        )
    return items


def milp(items, budget):
    from scipy.optimize import Bounds, LinearConstraint
    from scipy.optimize import milp as solve
    from scipy.sparse import lil_matrix

    widths = [len(o) for o in items]
    nv = sum(widths)
    c = np.array([o.damage for opts in items for o in opts])
    a = lil_matrix((len(items) + 1, nv))
    col = 0
    for i, opts in enumerate(items):
        for o in opts:
            a[i, col] = 1
            a[len(items), col] = o.bytes
            col += 1
    lo = np.r_[np.ones(len(items)), -np.inf]
    hi = np.r_[np.ones(len(items)), budget]
    r = solve(
        c,
        constraints=LinearConstraint(a.tocsr(), lo, hi),
        integrality=np.ones(nv),
        bounds=Bounds(0, 1),
        options={"time_limit": 600},
    )
    return r.fun


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tensors", type=int, default=1000)
    ap.add_argument("--types", type=int, default=20)
    a = ap.parse_args()
    items = instance(a.tensors, a.types)
    floor = sum(min(o.bytes for o in opts) for opts in items)
    top = sum(max(o.bytes for o in opts) for opts in items)
    for frac in (0.1, 0.3, 0.6):
        budget = int(floor + (top - floor) * frac)
        t = time.perf_counter()
        found = allocation(items, budget)
        ours = time.perf_counter() - t
        t = time.perf_counter()
        best = milp(items, budget)
        theirs = time.perf_counter() - t
        print(
            f"budget at {frac:.0%} of the range: ewq {ours:.3f} s, HiGHS {theirs:.2f} s "
            f"({theirs / ours:.0f}x); damage ewq / HiGHS {found.damage / best:.6f}, "
            f"proven gap (damage - bound) / damage {(found.damage - found.bound) / found.damage:.2e}"
        )


if __name__ == "__main__":
    main()
