"""Planning time for a 126-block model on 64 machines, against a naive baseline.

ewq's planner walks its ladder of promotions down from the top, checks totals
before placing, and places once. The baseline is the same algorithm done the
obvious way: every rung of the ladder built and placed from scratch, bottom up,
keeping the last that fits. Both must return the same plan; times are the median of
repeated runs in this process.

    .venv/bin/python benchmarks/plan_speed.py [--blocks 126] [--machines 64]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from ewq.analysis import decide
from ewq.planning import BlockSpec, Machine, fit
from ewq.planning.ladder import MODES, _ladder, _place
from ewq.types import Precision


def synthetic(n: int, seed: int = 0):
    rng = random.Random(seed)

    def spec(i: int, raw: int) -> BlockSpec:
        return BlockSpec(
            i,
            raw // 2,
            {
                Precision.RAW: raw,
                Precision.Q8: raw * 17 // 32,
                Precision.Q4: raw * 9 // 32,
                Precision.Q3: raw * 7 // 32,
                Precision.Q2: raw * 5 // 32,
                Precision.TERNARY: raw * 27 // 256,
            },
        )

    blocks = [spec(i + 2, 800_000_000 + rng.randrange(10**8)) for i in range(n)]
    emb, head = spec(1, 2 * 10**9), spec(n + 2, 2 * 10**9)
    entropies = {b.exec_index: 17 + rng.random() / 100 for b in blocks}
    return blocks, emb, head, decide(entropies)


def naive(blocks, emb, head, d, machines, mode="8/4"):
    levels = MODES[mode]
    level_of = {p: k for k, p in enumerate(levels)}
    target = {i: level_of[p] for i, p in d.precision.items()}
    start, steps = _ladder(blocks, emb, head, target, d.priority)
    specs = {b.exec_index: b for b in (emb, *blocks, head)}
    order = sorted(specs)
    params = {i: specs[i].num_parameters for i in order}
    best = None
    for rung in range(len(steps) + 1):
        level = dict(start)
        for i, new in steps[:rung]:
            level[i] = new
        sizes = {i: specs[i].bytes[levels[level[i]]] for i in order}
        if _place(order, sizes, params, machines) is not None:
            best = {i: levels[level[i]] for i in order}
    return best


def median_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=126)
    ap.add_argument("--machines", type=int, default=64)
    args = ap.parse_args()
    blocks, emb, head, d = synthetic(args.blocks)
    raw = sum(b.bytes[Precision.RAW] for b in (emb, *blocks, head))
    for label, share, speeds in (
        ("half the raw size, equal speeds", 0.5, False),
        ("half the raw size, mixed speeds", 0.5, True),
        ("raw fits", 1.2, False),
    ):
        cap = int(raw * share / args.machines)
        machines = [
            Machine(f"m{k}", cap, speed=(1.0 + k % 3) if speeds else 1.0)
            for k in range(args.machines)
        ]
        result = fit(blocks, emb, head, d.precision, d.priority, machines)
        ms = median_ms(
            lambda m=machines: fit(blocks, emb, head, d.precision, d.priority, m), 21
        )
        base_ms = median_ms(lambda m=machines: naive(blocks, emb, head, d, m), 3)
        if not speeds:
            assert naive(blocks, emb, head, d, machines) == dict(result.precision)
        used = sum(1 for a in result.assignments if a.exec_indices)
        print(
            f"{args.blocks} blocks, {args.machines} machines, {label}: ewq {ms:.2f} ms "
            f"(fits={result.fits}, {used} machines used); naive {base_ms:.1f} ms; "
            f"naive/ewq {base_ms / ms:.0f}x"
        )


if __name__ == "__main__":
    main()
