"""What ewq's calibrated path costs against llama.cpp's imatrix quant, stage by stage
(issue: calibrated quantization at any model size, item 5 and its first target).

For a GGUF model and a calibration text, in one run, each command in its own
process and, for ewq, from an empty cache:

* llama.cpp: ``llama-imatrix`` over the text (``-c CTX``, as many chunks as ewq's
  default ``--calibration-tokens`` cap lets ewq read), then ``llama-quantize
  --imatrix ... PRESET`` (benchmarks/llama_tools.sh builds them);
* ewq: ``ewq plan MODEL --calibration TEXT --memory <the preset's tensor bytes>
  --context 0`` (the kl criterion, selection and anchor as by default), then ``ewq
  quantize --plan ... --calibration TEXT`` (GPTQ rounding); the text is streamed
  in windows of CTX tokens as llama-imatrix reads it (``--documents stream``).

Printed: wall seconds and peak RSS of each command, the ratio of ewq's plan +
quantize to llama.cpp's imatrix + quantize (target <= 3x), and every stage ewq
logged (its ``[ewq] NAME: done in T`` lines) as seconds and as a multiple of one
llama-imatrix pass. Run alone: llama.cpp's threads spin.

    python benchmarks/calibrated_cost.py MODEL CALIBRATION [--ctx 512]
        [--preset Q4_K_M] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from gptq_memory import ROOT, llama_tools, tensor_bytes, timed  # noqa: E402

_DONE = re.compile(r"\[ewq\] (.+?): done in (.+)$")


def seconds(text: str) -> float:
    """ewq.stages' duration ('12.3 s', '4 min 05 s', '1 h 02 min') in seconds."""
    total = 0.0
    for value, unit in re.findall(r"([\d.]+) (h|min|s)\b", text):
        total += float(value) * {"h": 3600, "min": 60, "s": 1}[unit]
    return total


def stages(log: Path, start: int) -> list[dict]:
    """The stages ewq logged after byte ``start`` of ``log``, in order."""
    with open(log, encoding="utf-8", errors="replace") as fh:
        fh.seek(start)
        lines = fh.read().splitlines()
    return [
        {"stage": m.group(1), "seconds": seconds(m.group(2))}
        for m in map(_DONE.search, lines)
        if m
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("calibration", type=Path)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--preset", default="Q4_K_M")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()

    tools = llama_tools()
    work = Path(tempfile.mkdtemp(prefix="ewq-calibrated-cost-"))
    log = work / "log.txt"
    threads = str(os.cpu_count())
    im, preset = work / "imatrix.gguf", work / "preset.gguf"
    from ewq import api
    from ewq.calibration.text import token_cap

    cap = token_cap(None, api.inspect(a.model).index)
    chunks = ["--chunks", str(cap // a.ctx)] if cap else []
    theirs_im = timed(
        [str(tools / "llama-imatrix"), "-m", str(a.model), "-f", str(a.calibration)]
        + ["-c", str(a.ctx), "-o", str(im), "-t", threads, *chunks],
        log,
    )
    theirs_q = timed(
        [str(tools / "llama-quantize"), "--allow-requantize", "--imatrix", str(im)]
        + [str(a.model)]
        + [str(preset), a.preset, threads],
        log,
    )
    budget = sum(tensor_bytes(preset).values())
    imatrix_s = theirs_im["seconds"]
    print(
        f"llama.cpp: imatrix {imatrix_s:.1f} s, quantize {theirs_q['seconds']:.1f} s "
        f"({a.preset}, {budget:,} tensor bytes)",
        flush=True,
    )

    os.environ["EWQ_CACHE"] = str(work / "cache")  # from an empty cache
    ewq = str(ROOT / ".venv" / "bin" / "ewq")
    calib = ["--calibration", str(a.calibration), "--calibration-ctx", str(a.ctx)]
    calib += ["--documents", "stream"]
    plan, out = work / "plan.json", work / "ewq.gguf"
    runs = {}
    for name, cmd in (
        (
            "plan",
            [ewq, "plan", str(a.model), "--memory", f"{budget}B", "--context", "0"]
            + ["--json", str(plan), *calib],
        ),
        (
            "quantize",
            [ewq, "quantize", str(a.model), "--plan", str(plan), "--out", str(out)]
            + calib,
        ),
    ):
        start = log.stat().st_size
        runs[name] = timed(cmd, log) | {"stages": stages(log, start)}
        for s in runs[name]["stages"]:
            s["imatrix_passes"] = s["seconds"] / imatrix_s
        print(f"ewq {name}: {runs[name]['seconds']:.1f} s", flush=True)
        for s in runs[name]["stages"]:
            print(
                f"  {s['stage']}: {s['seconds']:.1f} s "
                f"({s['imatrix_passes']:.2f}x llama-imatrix)",
                flush=True,
            )
    ours = runs["plan"]["seconds"] + runs["quantize"]["seconds"]
    theirs = imatrix_s + theirs_q["seconds"]
    record = json.loads(Path(str(out) + ".ewq.json").read_text())
    doc = {
        "model": str(a.model),
        "calibration": str(a.calibration),
        "ctx": a.ctx,
        "preset": a.preset,
        "preset_tensor_bytes": budget,
        "ewq_tensor_bytes": sum(tensor_bytes(out).values()),
        "llama_imatrix_chunks": cap // a.ctx if cap else None,
        "calibration_tokens": record.get("rounding", {}).get("calibration_tokens"),
        "llama_imatrix": theirs_im,
        "llama_quantize": theirs_q,
        "ewq": runs,
        "ratio": ours / theirs,
    }
    print(
        f"ewq plan + quantize {ours:.0f} s against llama.cpp {theirs:.0f} s: "
        f"{doc['ratio']:.2f}x; peak RSS {max(r['peak_rss'] for r in runs.values()) / 2**30:.2f} "
        f"against {max(theirs_im['peak_rss'], theirs_q['peak_rss']) / 2**30:.2f} GiB",
        flush=True,
    )
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
