"""Self-calibration head to head (issue: self-calibration, items 2 and 4, a first
cut): at each preset's exact tensor bytes, on an evaluation text none of them saw,
the mean KL from the source of

* ewq with the model's own text (`ewq quantize MODEL --memory B --context 0
  --calibration self`: plan, GPTQ rounding, one command),
* ewq with a real calibration text (`--calibration TEXT`),
* ewq data-free (no text: the error criterion, llama.cpp's rounding),
* llama.cpp's preset with an importance matrix from the real text, and without,

and the ratios of ewq's rows to the better preset. Each ewq row runs from ewq's
cache as it stands (run once first for timings from an empty cache: see
calibrated_cost.py). Say the regime: a quantized source measures re-quantization.

    python benchmarks/self_calibration.py MODEL EVAL CALIBRATION
        [--presets Q3_K_M,IQ4_XS] [--ctx 512] [--windows 8] [--json OUT]

Run alone: llama.cpp's threads spin.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from gptq_memory import tensor_bytes as each_tensor  # noqa: E402


def tensor_bytes(path: Path) -> int:
    """The tensor data bytes of a GGUF file."""
    return sum(each_tensor(path).values())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("eval_text", type=Path)
    ap.add_argument("calibration", type=Path)
    ap.add_argument("--presets", default="Q3_K_M,IQ4_XS")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()

    from ewq import api
    from ewq.evaluate.backends import LlamaCppModel
    from ewq.evaluate.data import load_text
    from ewq.evaluate.reference import Reference, text_metrics
    from ewq.quant.gguf import quantize_preset

    model = Path(api.inspect(a.model).index.files[0])
    ref = Reference(model, load_text(a.eval_text), ctx=a.ctx, windows=a.windows)
    tmp = Path(tempfile.mkdtemp(prefix="ewq-self-calibration-"))
    ewq = [sys.executable, "-m", "ewq"]
    im = api.imatrix(a.model, a.calibration, ctx=512)

    def kl(path: Path) -> float:
        return text_metrics(LlamaCppModel(path, a.ctx), ref)["kl_mean"]

    rows = {}
    for p in a.presets.split(","):
        row: dict = {}
        for label, imatrix in (("preset+imatrix", im), ("preset", None)):
            out = tmp / f"{p}-{label}.gguf"
            quantize_preset(str(model), p, out, imatrix=imatrix)
            row[label] = {"bytes": tensor_bytes(out), "kl": kl(out)}
        budget = row["preset"]["bytes"]
        for label, extra in (
            ("ewq self", ["--calibration", "self"]),
            ("ewq text", ["--calibration", str(a.calibration)]),
            ("ewq data-free", []),
        ):
            out = tmp / f"{p}-{label.replace(' ', '-')}.gguf"
            cmd = [*ewq, "quantize", a.model, "--memory", f"{budget}B"]
            cmd += ["--context", "0", *extra, "--out", str(out)]
            t = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(done.stderr[-2000:])
            row[label] = {
                "bytes": tensor_bytes(out),
                "kl": kl(out),
                "seconds": time.perf_counter() - t,
            }
        best = min(row["preset+imatrix"]["kl"], row["preset"]["kl"])
        for label in ("ewq self", "ewq text", "ewq data-free"):
            row[label]["ratio_to_better_preset"] = row[label]["kl"] / best
        row["self_over_text"] = row["ewq self"]["kl"] / row["ewq text"]["kl"]
        rows[p] = row
        print(p, json.dumps(row), flush=True)
    if a.json:
        doc = {
            "model": a.model,
            "eval": {"text": a.eval_text.name, "ctx": a.ctx, "windows": a.windows},
            "calibration": a.calibration.name,
            "sizes": rows,
        }
        a.json.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
