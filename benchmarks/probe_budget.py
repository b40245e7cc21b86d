"""What measuring fewer tensors costs the kl criterion's plans (issue: calibrated
quantization at any model size, item 2).

The kl criterion measures a tensor's sensitivity with a pass over the probe tokens;
with ``probes`` P it measures at most P tensors (the first and last of each role, then
those that halve the widest depth gaps) and interpolates the others over depth. For a
model, a calibration text and an evaluation text neither saw, per P (``all``: every
tensor, the criterion as it was; ``32@0.02``: 32 tensors, and the imatrix-weighted
errors from 2% of each tensor's rows, as `ewq plan --sample 0.02`; ``32@1``: from
every row; no ``@``: ewq's default), each against the first setting given:

* the criterion's cost: seconds, passes (swapped tensors + written type files);
* agreement with ``all`` on the tensors P did not measure: Spearman's rho of their
  damage at every type, and the median and largest factor between the two at the
  tensor's probe type;
* at each preset's exact bytes (llama.cpp's own file of that preset, from the source):
  `ewq plan` (kl, --context 0, selection and anchor as by default) then `ewq quantize`
  with GPTQ rounding, the written model's mean KL from the source on the evaluation
  text, and its ratio to the first setting's (target: <= 1.10).

    python benchmarks/probe_budget.py MODEL EVAL CALIBRATION [--probes all,32,32@0.02]
        [--presets IQ4_XS,Q3_K_M,Q3_K_S,Q2_K] [--documents lines --ctx 64
        --windows 512 --calib-ctx 64] [--json OUT]

Run alone: llama.cpp's threads spin, and the figures are times too.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("eval_text", type=Path)
    ap.add_argument("calibration", type=Path)
    ap.add_argument("--probes", default="all,32,16")
    ap.add_argument("--presets", default="IQ4_XS,Q3_K_M,Q3_K_S,Q2_K")
    ap.add_argument("--documents", default="stream")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--calib-ctx", type=int, default=256)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()

    from gguf import GGMLQuantizationType, quant_shape_to_byte_shape
    from scipy.stats import spearmanr

    from ewq import api
    from ewq.config import IMATRIX_PRESETS, PlanConfig
    from ewq.evaluate.backends import LlamaCppModel
    from ewq.evaluate.data import load_text
    from ewq.evaluate.reference import Reference, text_metrics
    from ewq.planfile import plan_doc
    from ewq.planning import Machine
    from ewq.quant.gguf import quantize_preset
    from ewq.sources.gguf import read_header
    from ewq.types import Precision

    model = str(api.inspect(a.model).index.files[0])
    layout = api.inspect(a.model).layout
    calib = {
        "calibration": a.calibration,
        "calibration_ctx": a.calib_ctx,
        "documents": a.documents,
    }
    ref = Reference(
        Path(model),
        load_text(a.eval_text),
        ctx=a.ctx,
        windows=a.windows,
        documents=a.documents,
    )
    settings = [_setting(p) for p in a.probes.split(",")]
    probes_known = "probes" in PlanConfig.model_fields
    presets = a.presets.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="ewq-probe-budget-"))
    budget = {}
    for p in presets:  # llama.cpp's own file of the preset, without an imatrix
        out = tmp / "preset.gguf"
        if p in IMATRIX_PRESETS:  # needs one: ewq's, on the calibration text
            im = api.imatrix(a.model, a.calibration, ctx=a.calib_ctx)
            quantize_preset(model, p, out, imatrix=im)
        else:
            quantize_preset(model, p, out, imatrix=None)
        budget[p] = sum(
            math.prod(quant_shape_to_byte_shape(shape, GGMLQuantizationType(q)))
            for _, shape, q, _ in read_header(out).tensors
        )
    print("preset bytes:", budget, flush=True)

    rows, sens = [], {}
    for name, (setting, sample) in zip(a.probes.split(","), settings, strict=True):
        row: dict = {"probes": name, "sizes": {}}
        for k, p in enumerate(presets):
            t = time.perf_counter()
            planned = api.plan(
                a.model,
                [Machine("m", budget[p])],
                criterion="kl",
                context=0,
                sample=sample,
                # an ewq from before --probes measured every tensor: the script
                # runs against it too (the criterion as it was)
                **({"probes": setting} if probes_known else {}),
                **calib,
            )
            if k == 0:  # the first plan measures, the others read the cache
                s = sens[name] = planned.sensitivity
                row |= {
                    "plan_seconds": time.perf_counter() - t,
                    "kl_seconds": s.seconds,
                    "passes": s.details["probes"],
                    "tensors_measured": s.details.get("tensors_measured"),
                    "tensors_interpolated": s.details.get("tensors_interpolated"),
                    "cached": s.details.get("cached"),
                }
                if rows:
                    row |= _agreement(sens[rows[0]["probes"]], s, spearmanr)
            types = {n: str(o.precision) for n, o in planned.result.tensors.items()}
            raw = {b.exec_index: Precision.RAW for b in layout.transformer_blocks}
            doc = plan_doc(layout.num_blocks, raw, tensors=types)
            out = tmp / f"ewq-{name}-{p}.gguf"
            t = time.perf_counter()
            api.quantize(a.model, doc, out, rounding="gptq", **calib)
            seconds = time.perf_counter() - t
            m = LlamaCppModel(out, ref.ctx)
            kl = text_metrics(m, ref)["kl_mean"]
            del m
            out.unlink()
            size = {"bytes": planned.result.total_bytes, "kl": kl}
            if k == 0:
                row["quantize_seconds"] = seconds
            if rows:
                base = rows[0]["sizes"][p]["kl"]
                size[f"ratio_to_{rows[0]['probes']}"] = kl / base if base > 0 else None
            row["sizes"][p] = size
            print(f"probes {name} at {p}: {json.dumps(size)}", flush=True)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "sizes"}), flush=True)
    doc = {
        "model": a.model,
        "eval": {"text": a.eval_text.name, "ctx": a.ctx, "windows": a.windows},
        "calibration": {
            "text": a.calibration.name,
            "ctx": a.calib_ctx,
            "documents": a.documents,
            "probe_tokens": 1024,
        },
        "preset_bytes": budget,
        "rows": rows,
    }
    print(json.dumps(doc["rows"], indent=1))
    if a.json:
        a.json.write_text(json.dumps(doc, indent=1) + "\n")


def _setting(text: str) -> tuple[int | None, float | None]:
    """``all``, ``32`` (probes), or ``32@0.02`` (and errors from 2% of the rows;
    none: ewq's default share)."""
    probes, _, sample = text.partition("@")
    return (None if probes == "all" else int(probes)), (
        float(sample) if sample else None
    )


def _agreement(full, part, spearmanr) -> dict:
    """On the tensors ``part`` interpolated: Spearman of the two criteria's damages
    at every type, and the factor between them (the median, the largest)."""
    measured = set(part.details["measured_tensors"])
    xs, ys, factors = [], [], []
    for n, row in full.damage.items():
        if n in measured:
            continue
        for t, v in row.items():
            w = part.of(n, t)
            if v > 0 and w > 0:
                xs.append(v)
                ys.append(w)
                factors.append(max(v / w, w / v))
    return {
        "spearman_interpolated": float(spearmanr(xs, ys)[0]) if xs else None,
        "median_factor": statistics.median(factors) if factors else None,
        "largest_factor": max(factors) if factors else None,
    }


if __name__ == "__main__":
    main()
