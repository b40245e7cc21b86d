"""Why a sampled GGUF error pass is bound by ggml's quantizers: each type's round
trip rate, and the highest marginal throughput a pass that measures every candidate
type on a share of each tensor's rows could reach, in one run.

A tile of rows (width 2048, as sensitivity_speed.py's synthetic Llama) is round
tripped through every GGML type ewq offers (ewq.formats.GGML_TYPES; with and without
an importance matrix, since some types need one), single-threaded, repeated. Printed
per type: milliseconds per tile, million elements per second, and its share of the
whole candidate set's time. Then the ceiling: with every type measured on a share f
of the rows and the work spread over ``--threads`` cores, the pass covers at most
threads / (f * seconds per element over all types) parameters per second, before
reading, growth rounds or the planner. A plain read of the tile (a copy) is the
floor the ratio is given against.

    .venv/bin/python benchmarks/quantizer_ceiling.py [--rows 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def rate(fn, repeats: int) -> float:
    fn()  # ggml builds its IQ grids on first use
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shares", default="0.031,0.01,0.002")
    args = ap.parse_args()

    from ewq.formats import GGML_TYPES
    from ewq.quant import ggml

    rng = np.random.default_rng(0)
    tile = rng.standard_normal((args.rows, args.width)).astype(np.float32)
    imatrix = (rng.random(args.width) + 0.1).astype(np.float32)
    elements = tile.size
    copy = rate(lambda: tile.copy(), 50)
    table = []
    for spec in GGML_TYPES.values():
        seconds = rate(
            lambda s=spec: ggml.roundtrip(tile, s.qtype, imatrix=imatrix), args.repeats
        )
        table.append((spec.name, spec.needs_imatrix, seconds))
    out = {"rows": args.rows, "width": args.width, "threads": args.threads}
    for label, with_imatrix in (("data-free", False), ("with imatrix", True)):
        chosen = [(n, s) for n, needs, s in table if with_imatrix or not needs]
        total = sum(s for _, s in chosen)
        per_element = total / elements
        print(f"\n{label}: {len(chosen)} types, {total * 1e3:.0f} ms per tile")
        print(f"{'type':9s} {'ms/tile':>8s} {'Melem/s':>8s} {'share':>6s}")
        for n, s in sorted(chosen, key=lambda x: -x[1]):
            share = s / total
            print(f"{n:9s} {s * 1e3:8.1f} {elements / s / 1e6:8.2f} {share:6.1%}")
        ceilings = {}
        for f in (float(x) for x in args.shares.split(",")):
            ceiling = args.threads / (f * per_element) / 1e9
            ceilings[f] = ceiling
            print(
                f"ceiling at {f:.1%} of the rows on {args.threads} cores: "
                f"{ceiling:.3f} Gparam/s ({ceiling * 1e9 * copy / elements:.4f}x a copy"
                f" at {elements / copy / 1e9:.1f} Gparam/s)"
            )
        out[label] = {
            "types": {n: s for n, s in chosen},
            "seconds_per_element": per_element,
            "ceilings": ceilings,
            "share_for_half_gparam": args.threads / (0.5e9 * per_element),
        }
        print(
            f"a 0.5 Gparam/s pass could read {out[label]['share_for_half_gparam']:.2%} "
            f"of each tensor's rows ({out[label]['share_for_half_gparam'] * 2048:.1f} "
            "of 2048)"
        )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
