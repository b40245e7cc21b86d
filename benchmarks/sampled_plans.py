"""Quality kept by the row-sampled error criterion: at every llama.cpp preset's exact
bytes, the data-free plan from sampled rows against the plan from every row, both
measured by llama.cpp (KL from the source on an evaluation text), in one run.

A plan identical to the full one is not measured again (ratio 1 by construction).
Printed per size: the rows read, the widest interval, whether the plans differ,
both KLs and their ratio; and the seconds of each criterion from an empty cache.

    .venv/bin/python benchmarks/sampled_plans.py MODEL.gguf EVAL.txt \
        [--fraction 0.02] [--ctx 64 --windows 512 --documents lines] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
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
            plans = {}
            for mode, sample in (("full", None), ("sampled", args.fraction)):
                p = api.plan(
                    args.model, [Machine("m", budget)], context=0, sample=sample
                )
                seconds.setdefault(mode, p.sensitivity.seconds)
                plans[mode] = p
            kls = {}
            for mode, p in plans.items():
                types = {n: str(o.precision) for n, o in p.result.tensors.items()}
                if mode == "sampled" and types == kls.get("full_types"):
                    kls["sampled"] = kls["full"]
                    continue
                out = Path(tmp) / f"{mode}.gguf"
                api.quantize(args.model, plan_json(p, "bench"), out)
                kls[mode] = text_metrics(LlamaCppModel(out, args.ctx), ref)["kl_mean"]
                kls[f"{mode}_types"] = types
            rec = plans["sampled"].sensitivity.details["sampling"]
            widths = [
                t["widest_relative_halfwidth"] or 0.0 for t in rec["tensors"].values()
            ]
            row = {
                "size_of": preset,
                "bytes": budget,
                "rows_read": rec["rows_read"] / max(1, rec["rows_total"]),
                "widest_halfwidth": max(widths, default=0.0),
                "same_plan": kls["sampled_types"] == kls["full_types"]
                if "sampled_types" in kls
                else True,
                "kl_full": kls["full"],
                "kl_sampled": kls["sampled"],
                "ratio": kls["sampled"] / kls["full"] if kls["full"] > 0 else 1.0,
            }
            rows.append(row)
            print(
                f"{preset:8s} rows {row['rows_read']:6.1%}  widest +-"
                f"{row['widest_halfwidth']:5.1%}  same plan {row['same_plan']!s:5s} "
                f"KL full {row['kl_full']:.5f} sampled {row['kl_sampled']:.5f} "
                f"ratio {row['ratio']:.3f}"
            )
    print(
        "criterion seconds from an empty cache: "
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
