"""What GPTQ rounding (ewq.quant.gptq) gains over llama.cpp's own rounding at the
same types: each llama.cpp preset, made by llama.cpp's quantizer with the importance
matrix of the calibration text, against the same per-tensor types written by `ewq
quantize --calibration` (every quantized blk.* matrix re-rounded against its inputs'
second moments on that text). KL from the source on an evaluation text neither saw.

    python benchmarks/gptq_gain.py MODEL.gguf EVAL.txt CALIBRATION.txt \\
        [--presets IQ4_XS,Q5_K_S,Q4_K_M,Q3_K_S] [--documents lines --ctx 64
        --windows 512 --calib-ctx 64] [--json OUT.json]

Run alone: llama.cpp's threads spin.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("eval_text", type=Path)
    ap.add_argument("calibration", type=Path)
    ap.add_argument("--presets", default="IQ4_XS,Q5_K_S,Q4_K_M,Q3_K_S")
    ap.add_argument("--documents", default="stream")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--calib-ctx", type=int, default=512)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()

    from ewq import api
    from ewq.evaluate.backends import LlamaCppModel
    from ewq.evaluate.data import load_text
    from ewq.evaluate.reference import Reference, text_metrics
    from ewq.imatrix import write_imatrix
    from ewq.quant.gguf import quantize_preset

    layout = api.inspect(a.model).layout
    ref = Reference(
        a.model,
        load_text(a.eval_text),
        ctx=a.ctx,
        windows=a.windows,
        documents=a.documents,
    )
    m = api.imatrix(a.model, a.calibration, ctx=a.calib_ctx, documents=a.documents)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        mpath = write_imatrix(m, Path(tmp) / "m.imatrix.gguf")
        for preset in a.presets.split(","):
            base = Path(tmp) / f"{preset}.gguf"
            types = quantize_preset(a.model, preset, base, imatrix=m)
            kl_base = text_metrics(LlamaCppModel(base, a.ctx), ref)["kl_mean"]
            plan = {
                "schema_version": 2,
                "num_blocks": layout.num_blocks,
                "blocks": [
                    {"exec_index": b.exec_index, "precision": "raw"}
                    for b in layout.transformer_blocks
                ],
                "tensors": [{"name": n, "type": t} for n, t in types.items()],
            }
            out = Path(tmp) / f"{preset}.gptq.gguf"
            started = time.perf_counter()
            q = api.quantize(
                a.model,
                plan,
                out,
                imatrix=mpath,
                calibration=a.calibration,
                documents=a.documents,
                calibration_ctx=a.calib_ctx,
            )
            seconds = time.perf_counter() - started
            kl_gptq = text_metrics(LlamaCppModel(out, a.ctx), ref)["kl_mean"]
            rows.append(
                {
                    "preset": preset,
                    "bytes": q.predicted_bytes,
                    "kl_llama_cpp_imatrix": kl_base,
                    "kl_gptq": kl_gptq,
                    "ratio": kl_gptq / kl_base,
                    "tensors_rounded": q.rounding.get("tensors"),
                    "quantize_seconds": seconds,
                }
            )
            print(
                f"{preset}: llama.cpp + imatrix {kl_base:.5f}, GPTQ {kl_gptq:.5f}, "
                f"{kl_gptq / kl_base:.2f}x ({seconds:.0f} s)",
                flush=True,
            )
    doc = {"model": str(a.model), "eval_tokens": sum(map(len, ref.seqs)), "rows": rows}
    if a.json:
        a.json.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
