"""Quality kept by the row-sampled error criterion: at every llama.cpp preset's exact
bytes, the data-free plan from sampled rows against the plan from every row, both
measured by llama.cpp (KL from the source on an evaluation text), in one run.

Two sampled rules: ``width`` (the rule before decision-driven growth, as a
baseline: rows doubled while a type's interval is wider than 5%, no growth) and
``decision`` (ewq's: wider than 25%, then the tensors the plan cannot decide
sampled again, ewq.api._grow). A plan identical to the full one is not measured
again (ratio 1 by construction). Printed per size and rule: the rows read, whether
the plan differs from the full one, the KLs and the ratio; and each rule's seconds
of planning summed over the sizes, from an empty cache.

    .venv/bin/python benchmarks/sampled_plans.py MODEL.gguf EVAL.txt \
        [--fraction 0.02] [--ctx 64 --windows 512 --documents lines] [--json OUT]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
from pathlib import Path

from ewq import api
from ewq.config import PRESETS
from ewq.evaluate.backends import LlamaCppModel
from ewq.evaluate.data import load_text
from ewq.evaluate.reference import Reference, text_metrics
from ewq.formats import tensor_bytes
from ewq.planning import Machine
from ewq.quant.gguf import preset_recipes
from ewq.reports.plan import plan_json
from ewq.sources.gguf import read_header

MODES = ("full", "width", "decision")


@contextlib.contextmanager
def _rule(mode: str, fraction: float):
    """The sample for ``mode``; ``width`` is the rule before decision-driven growth
    (intervals to 5%, no growth rounds), reproduced by patching the two knobs."""
    from ewq.api import _grow, _plan
    from ewq.sampling import Sampling

    if mode != "width":
        yield None if mode == "full" else fraction
        return
    rounds, sampling = _grow.ROUNDS, _plan._sampling
    _grow.ROUNDS = 0
    _plan._sampling = lambda cfg: Sampling(fraction=cfg.sample, relative=0.05)
    try:
        yield fraction
    finally:
        _grow.ROUNDS, _plan._sampling = rounds, sampling


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("text")
    ap.add_argument("--fraction", type=float, default=0.02)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--documents", default="stream")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    import gguf

    os.environ.setdefault("EWQ_CACHE", tempfile.mkdtemp(prefix="ewq-sampled-"))
    shapes = {n: s for n, s, _, _ in read_header(args.model).tensors}
    recipes = preset_recipes(args.model, PRESETS)
    ref = Reference(
        Path(args.model),
        load_text(args.text),
        ctx=args.ctx,
        windows=args.windows,
        documents=args.documents,
    )
    del ref.model
    rows = []
    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        for preset, recipe in recipes.items():
            budget = sum(
                tensor_bytes(shapes[n], gguf.GGMLQuantizationType[t])
                for n, t in recipe.items()
            )
            plans, took_by = {}, {}
            for mode in MODES:
                with _rule(mode, args.fraction) as sample:
                    started = time.perf_counter()
                    p = api.plan(
                        args.model, [Machine("m", budget)], context=0, sample=sample
                    )
                    took = time.perf_counter() - started
                    seconds[mode] = seconds.get(mode, 0.0) + took
                plans[mode] = p
                took_by[mode] = took
            kls, measured = {}, {}
            for mode, p in plans.items():
                types = {n: str(o.precision) for n, o in p.result.tensors.items()}
                key = tuple(sorted(types.items()))
                if key not in measured:
                    out = Path(tmp) / f"{mode}.gguf"
                    api.quantize(args.model, plan_json(p, "bench"), out)
                    model = LlamaCppModel(out, args.ctx)
                    measured[key] = text_metrics(model, ref)["kl_mean"]
                kls[mode] = (measured[key], types)
            full_kl, full_types = kls["full"]
            for mode in MODES[1:]:
                rec = plans[mode].sensitivity.details["sampling"]
                kl, types = kls[mode]
                row = {
                    "size_of": preset,
                    "rule": mode,
                    "bytes": budget,
                    "rows_read": rec["rows_read"] / max(1, rec["rows_total"]),
                    "rounds": rec.get("rounds"),
                    "undecided_left": len(rec.get("undecided") or ()),
                    "same_plan": types == full_types,
                    "kl_full": full_kl,
                    "kl_sampled": kl,
                    "ratio": kl / full_kl if full_kl > 0 else 1.0,
                    "seconds": took_by[mode],
                    "seconds_full": took_by["full"],
                }
                rows.append(row)
                print(
                    f"{preset:8s} {mode:8s} rows {row['rows_read']:6.1%}  same plan "
                    f"{row['same_plan']!s:5s} KL full {full_kl:.5f} sampled {kl:.5f} "
                    f"ratio {row['ratio']:.3f}  undecided left {row['undecided_left']}  "
                    f"plan {took_by[mode]:.1f} s (full {took_by['full']:.1f} s)"
                )
    print(
        "planning seconds over every size, from an empty cache: "
        + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items())
    )
    if args.json:
        doc = {
            "model": Path(args.model).name,
            "fraction": args.fraction,
            "seconds": seconds,
            "rows": rows,
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
