"""Does ewq's damage model predict measured KL? (issue: calibrated per-tensor
quantization, item 3)

For a model and texts: the calibrated criterion (kl: imatrix-weighted error x
per-tensor sensitivity) and the data-free one (error) are computed as `ewq plan`
computes them; then N random mixed plans are drawn (per plan a random target bit
width; per tensor a random candidate type within 1.5 bits of it), each written by
ewq's quantizer and measured by llama.cpp on an evaluation text neither criterion
saw (mean KL from the source). Printed: Spearman's rho between each criterion's
predicted KL and the measured KL, and the measured / predicted ratio.

    python benchmarks/damage_model.py MODEL.gguf EVAL.txt CALIBRATION.txt \\
        [--documents lines --ctx 64 --windows 512 --calib-ctx 64 --calib-tokens 8192]
        [--type-probes 4] [--probes 32|all] [--plans 20] [--json OUT.json]

Run alone: llama.cpp's threads spin, and the figures are times too.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("eval_text", type=Path)
    ap.add_argument("calibration", type=Path)
    ap.add_argument("--documents", default="stream")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--calib-ctx", type=int, default=256)
    ap.add_argument("--calib-tokens", type=int, default=1024)
    ap.add_argument("--type-probes", type=int, default=4)
    ap.add_argument("--probes", default="32", help="tensors measured (all: every one)")
    ap.add_argument("--plans", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()

    from ewq import api
    from ewq.evaluate.backends import LlamaCppModel
    from ewq.evaluate.data import load_text
    from ewq.evaluate.reference import Reference, text_metrics
    from ewq.formats import GGUF
    from ewq.imatrix import write_imatrix
    from ewq.sensitivity import tensor_candidates

    t0 = time.perf_counter()
    m = api.imatrix(a.model, a.calibration, documents=a.documents)
    t_imatrix = time.perf_counter() - t0
    kl = api.sensitivity(
        a.model,
        "kl",
        calibration=a.calibration,
        imatrix=m,
        tokens=a.calib_tokens,
        ctx=a.calib_ctx,
        documents=a.documents,
        type_probes=a.type_probes,
        probes=None if a.probes == "all" else int(a.probes),
    )
    free = api.sensitivity(a.model, "error")
    weighted = api.sensitivity(a.model, "error", imatrix=m)
    layout = api.inspect(a.model).layout
    cands = tensor_candidates(GGUF, layout, m)
    ref = Reference(
        Path(api.inspect(a.model).index.files[0]),
        load_text(a.eval_text),
        ctx=a.ctx,
        windows=a.windows,
        documents=a.documents,
    )
    forward = time.perf_counter()
    text_metrics(ref.model, ref)
    forward = time.perf_counter() - forward
    rng = random.Random(a.seed)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        mpath = write_imatrix(m, Path(tmp) / "m.gguf")
        for k in range(a.plans):
            target = rng.uniform(2.0, 8.5)
            types = {}
            for name, (info, _, encs) in cands.items():
                near = [
                    e
                    for e in encs[1:]
                    if abs(8 * e.nbytes / info.num_elements - target) <= 1.5
                ]
                if near:
                    types[name] = rng.choice(near).type
            plan = {
                "schema_version": 2,
                "num_blocks": layout.num_blocks,
                "blocks": [
                    {"exec_index": b.exec_index, "precision": "raw"}
                    for b in layout.transformer_blocks
                ],
                "tensors": [{"name": n, "type": t} for n, t in types.items()],
            }
            out = Path(tmp) / "p.gguf"
            q = api.quantize(a.model, plan, out, imatrix=mpath)
            measured = text_metrics(LlamaCppModel(out, a.ctx), ref)["kl_mean"]
            pk = sum(kl.of(n, t) for n, t in types.items())
            pf = sum(free.of(n, t) for n, t in types.items())
            rows.append(
                {
                    "target_bits": target,
                    "bytes": q.predicted_bytes,
                    "measured_kl": measured,
                    "kl_predicted": pk,
                    "error_predicted": pf,
                    "types": types,
                }
            )
            print(
                f"plan {k + 1}: {target:.2f} bits, {q.predicted_bytes / 1e6:.2f} MB, "
                f"measured {measured:.5f}, kl {pk:.5f}, error {pf:.5f}",
                flush=True,
            )
    meas = [r["measured_kl"] for r in rows]
    out = {
        "model": a.model,
        "plans": rows,
        "spearman_kl": spearmanr([r["kl_predicted"] for r in rows], meas).statistic,
        "spearman_error": spearmanr(
            [r["error_predicted"] for r in rows], meas
        ).statistic,
        "imatrix_seconds": t_imatrix,
        "kl_seconds": kl.seconds,
        "kl_probes": kl.details.get("probes"),
        "kl_probes_swapped": kl.details.get("probes_swapped"),
        "kl_tensors_interpolated": kl.details.get("tensors_interpolated"),
        "kl_tokens": kl.details.get("tokens"),
        "forward_seconds_eval": forward,
        "eval_tokens": sum(len(s) for s in ref.seqs),
    }
    for crit in ("kl", "error"):
        # measured ~ a x predicted^b (least squares in log-log): how KL compounds
        # beyond a sum of per-tensor damages; ewq.sensitivity.compounded uses it
        xs = [
            math.log(r[f"{crit}_predicted"]) for r in rows if r[f"{crit}_predicted"] > 0
        ]
        ys = [math.log(r["measured_kl"]) for r in rows if r[f"{crit}_predicted"] > 0]
        if len(xs) >= 2:
            b, loga = np.polyfit(xs, ys, 1)
            out[f"fit_{crit}"] = {"a": math.exp(loga), "b": b}
        from ewq.sensitivity import compounded

        out[f"ratio_{crit}_compounded"] = [
            r["measured_kl"] / compounded(r[f"{crit}_predicted"], crit)
            for r in rows
            if r[f"{crit}_predicted"] > 0
        ]
    # each tensor's measured sensitivity, for benchmarks/fit_prior.py: what the kl
    # criterion measured, and the relative errors unweighted and imatrix-weighted
    # (the error criterion's damage over its prior and type factor)
    from ewq.sensitivity.prior import damage, family

    def per_unit(sens, weighted: bool) -> dict:  # the damage of a unit error
        ones = {n: dict.fromkeys(row, 1.0) for n, row in sens.damage.items()}
        return damage(layout, ones, weighted)

    u_free, u_weighted = per_unit(free, False), per_unit(weighted, True)
    out["type_factors"] = kl.details.get("type_factors")
    out["source_float"] = all(
        info.dtype in ("F32", "F16", "BF16") for info, _, _ in cands.values()
    )
    blocks = [b.exec_index for b in layout.transformer_blocks]
    tied = not any(k.role.value == "lm_head" for b in layout.blocks for k in b.keys)
    out["tensors"] = {
        name: {
            "family": family(key.role, tied),
            "depth": (key.exec_index - blocks[0]) / max(1, blocks[-1] - blocks[0]),
            "block_kind": key.block_kind.value,
            "kl": dict(kl.damage.get(name, {})),
            "error_free": {
                t: v / u_free[name][t] for t, v in free.damage.get(name, {}).items()
            },
            "error_imatrix": {
                t: v / u_weighted[name][t]
                for t, v in weighted.damage.get(name, {}).items()
            },
        }
        for name, (_, key, _) in cands.items()
    }
    per_token = forward / max(1, out["eval_tokens"])
    out["kl_forward_passes"] = kl.seconds / max(
        1e-9, per_token * (kl.details.get("tokens") or 1)
    )
    print(
        json.dumps(
            {k: v for k, v in out.items() if k not in ("plans", "tensors")}, indent=1
        )
    )
    if a.json:
        a.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
