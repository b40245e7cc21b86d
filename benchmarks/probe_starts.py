"""What starting the kl criterion's probes from the residual stream saves (issue:
calibrated quantization at any model size, item 2).

A probe changes one tensor of block b and measures the model's KL on the probe
windows; everything before block b is the unquantized model's. With slices
(ewq.sensitivity.probe.Probes, the default), a probe runs the working copy's slice
from the last of a few starts at or before b, fed the stream the reference pass
copied out there; without, the whole working copy. Same model, text and probes
(the kl criterion's own: `ewq plan`'s defaults), in one run, each setting in its
own process after a warm-up:

* seconds of the kl criterion (errors and importance matrix from ewq's cache: run
  `ewq plan ... --calibration TEXT` once first), and their ratio;
* whether every measured sensitivity is the same number both ways (it must be:
  a slice computes the whole model's logits bit for bit);
* the starts used and how many probes ran from each.

    python benchmarks/probe_starts.py MODEL CALIBRATION [--ctx 256] [--tokens 1024]
        [--probes 32] [--json OUT]

Run alone: llama.cpp's threads spin.
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import time
from pathlib import Path


def measure(model: str, text: str, ctx: int, tokens: int, probes: int, slices: bool):
    """The kl criterion over MODEL with or without slices: seconds and details."""
    from ewq import api
    from ewq.api._measured import measured_errors
    from ewq.arch import resolve
    from ewq.calibration.text import calibration_text
    from ewq.formats import GGUF
    from ewq.sampling import chosen
    from ewq.sensitivity import kl
    from ewq.sensitivity.probe import Probes
    from ewq.sources import open_source

    calib = calibration_text(text)
    with open_source(model) as src:
        index = src.index
    layout = resolve(index)
    imatrix = api.imatrix(model, text, ctx=ctx)
    errors, *_ = measured_errors(
        model, index, layout, GGUF, imatrix, None, None, chosen(None, False)
    )
    kl.Probes = functools.partial(Probes, slices=slices)
    started = time.perf_counter()
    sens = kl.kl_sensitivity(
        index,
        layout,
        calib.text,
        errors,
        imatrix=imatrix,
        tokens=tokens,
        ctx=ctx,
        probes=probes,
        type_probes=0,
    )
    seconds = time.perf_counter() - started
    measured = {
        n: min(sens.damage[n].values()) for n in sens.details["measured_tensors"]
    }
    return {
        "seconds": seconds,
        "starts": sens.details["probe_starts"],
        "measured": measured,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("calibration")
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--probes", type=int, default=32)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--one", choices=["slices", "whole"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        out = measure(
            a.model, a.calibration, a.ctx, a.tokens, a.probes, a.one == "slices"
        )
        print(json.dumps(out))
        return
    runs = {}
    for one in ("whole", "slices"):
        cmd = [sys.executable, __file__, a.model, a.calibration, "--one", one]
        cmd += ["--ctx", str(a.ctx), "--tokens", str(a.tokens)]
        cmd += ["--probes", str(a.probes)]
        done = subprocess.run(cmd, check=True, capture_output=True, text=True)
        runs[one] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{one}: {runs[one]['seconds']:.1f} s, starts {runs[one]['starts']}")
    same = runs["whole"]["measured"] == runs["slices"]["measured"]
    ratio = runs["slices"]["seconds"] / runs["whole"]["seconds"]
    print(f"slices / whole: {ratio:.3f}; every sensitivity the same: {same}")
    if a.json:
        record = {
            "model": a.model,
            "calibration": a.calibration,
            "ctx": a.ctx,
            "probe_tokens": a.tokens,
            "probes": a.probes,
            "whole_seconds": runs["whole"]["seconds"],
            "slices_seconds": runs["slices"]["seconds"],
            "ratio": ratio,
            "starts": runs["slices"]["starts"],
            "same_sensitivities": same,
        }
        a.json.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
