"""How many calibration tokens the importance matrix and GPTQ's second moments need
(`--calibration-tokens`): the default is the smallest count whose output's KL is
within 5% of the output made from 4x as many tokens.

    python benchmarks/calibration_tokens.py MODEL.gguf EVAL CALIBRATION \\
        [--caps 1024,4096,16384,65536] [--preset Q4_K_M] [--documents lines] \\
        [--ctx 64] [--calib-ctx 64] [--windows 64] [--json OUT]

For each cap: `ewq quantize --calibration CALIBRATION --calibration-tokens CAP` at
llama.cpp's own recipe for ``--preset`` (the same types for every cap, so that only
the calibration differs), its KL from the source on EVAL (text the calibration never
saw), its wall seconds, and the seconds of one importance-matrix pass over the same
tokens (from an empty cache): what each token costs. A cap larger than the text
uses all of it (the row says how many tokens it held).

Run alone: llama.cpp's threads spin.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

WITHIN = 1.05  # the default's KL against 4x as many tokens'


def measure(a) -> dict:
    from ewq import api
    from ewq.evaluate.backends import LlamaCppModel
    from ewq.evaluate.data import load_text
    from ewq.evaluate.reference import Reference, text_metrics
    from ewq.planfile import plan_doc
    from ewq.quant.gguf import quantize_preset
    from ewq.types import Precision

    layout = api.inspect(a.model).layout
    ref = Reference(
        a.model,
        load_text(a.eval_text),
        ctx=a.ctx,
        windows=a.windows,
        documents=a.documents,
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["EWQ_CACHE"] = tmp  # every importance matrix from an empty cache
        types = quantize_preset(a.model, a.preset, Path(tmp) / "p.gguf")
        plan = plan_doc(
            layout.num_blocks,
            {b.exec_index: Precision.RAW for b in layout.transformer_blocks},
            tensors=types,
        )
        for cap in (int(c) for c in a.caps.split(",")):
            started = time.perf_counter()
            api.imatrix(
                a.model,
                a.calibration,
                ctx=a.calib_ctx,
                documents=a.documents,
                tokens=cap,
            )
            imatrix_seconds = time.perf_counter() - started
            out = Path(tmp) / f"cap{cap}.gguf"
            started = time.perf_counter()
            q = api.quantize(
                a.model,
                plan,
                out,
                calibration=a.calibration,
                documents=a.documents,
                calibration_ctx=a.calib_ctx,
                calibration_tokens=cap,
            )
            seconds = time.perf_counter() - started
            kl = text_metrics(LlamaCppModel(out, a.ctx), ref)["kl_mean"]
            row = {
                "cap": cap,
                "tokens": q.rounding.get("tokens"),
                "kl": kl,
                "quantize_seconds": seconds,
                "imatrix_seconds": imatrix_seconds,
            }
            rows.append(row)
            print(
                f"cap {cap}: {row['tokens']} tokens, KL {kl:.6f}, quantize "
                f"{seconds:.1f} s, imatrix pass {imatrix_seconds:.1f} s",
                flush=True,
            )
            out.unlink()
    by_cap = {r["cap"]: r for r in rows}
    chosen = None
    for r in rows:
        bigger = by_cap.get(4 * r["cap"])
        if bigger is None:
            continue
        r["kl_over_4x"] = r["kl"] / bigger["kl"]
        print(f"cap {r['cap']}: KL / KL at 4x = {r['kl_over_4x']:.3f}")
        if chosen is None and r["kl_over_4x"] <= WITHIN:
            chosen = r["cap"]
    print(f"smallest cap within {WITHIN:.2f}x of 4x as many tokens: {chosen}")
    return {
        "model": str(a.model),
        "preset": a.preset,
        "eval_tokens": sum(map(len, ref.seqs)),
        "rows": rows,
        "chosen": chosen,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("eval_text", type=Path)
    ap.add_argument("calibration", type=Path)
    ap.add_argument("--caps", default="1024,4096,16384,65536")
    ap.add_argument("--preset", default="Q4_K_M")
    ap.add_argument("--documents", default="stream")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--calib-ctx", type=int, default=512)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    doc = measure(a)
    if a.json:
        a.json.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
