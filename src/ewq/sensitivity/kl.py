"""The calibrated ``kl`` criterion: quantize one block at a time to each candidate
precision with llama.cpp's quantizer and measure the mean KL divergence of the
next-token distributions from the unquantized model's, on windows of a calibration
text (the way ExLlamaV2 measures layers, or llama.cpp's imatrix gathers statistics).

The reference log-probs are computed once. Candidates whose tensors would be written
with the same types as another candidate of the same block (a fallback: 6-bit rows
of 576 become Q8_0, as 8-bit does) are measured once. The damage of a plan is then
taken as the sum of its blocks' damages (first order: small perturbations of
different blocks add up in KL).

Measuring every block at every precision costs one quantization and one evaluation
per pair (SmolLM2-135M: 213 probes, about 28 minutes here). By default only one
precision per block is measured (``probe``, 4-bit), and the other precisions are
scaled from it by the ``error`` criterion's ratios: KL(b, p) = KL(b, probe) *
err(b, p) / err(b, probe). KL's first-order term is the noise each block injects
weighted by how much the output cares about that block; the probe measures the
weight, the round trip the noise. ``probe=None`` measures every pair.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ewq.arch import ModelLayout
from ewq.errors import EwqError
from ewq.evaluate import tasks
from ewq.evaluate.backends import LlamaCppModel
from ewq.evaluate.metrics import kl_logits, logsumexp_rows
from ewq.formats import encoding, offered
from ewq.planfile import plan_from_doc
from ewq.quant.gguf import quantize_gguf
from ewq.quant.targets import gguf_targets
from ewq.sensitivity import Sensitivity
from ewq.types import ModelIndex, Precision

__all__ = ["kl_sensitivity"]


def _plan(layout: ModelLayout, exec_index: int, p: Precision):
    n = layout.num_blocks
    side = {1: "embedding", n + 2: "head"}
    doc = {
        "schema_version": 1,
        "num_blocks": n,
        "blocks": [
            {
                "exec_index": b.exec_index,
                "precision": (p if b.exec_index == exec_index else Precision.RAW).value,
            }
            for b in layout.transformer_blocks
        ],
    }
    if exec_index in side:
        doc[side[exec_index]] = {"precision": p.value}
    return plan_from_doc(doc)


def kl_sensitivity(
    index: ModelIndex,
    layout: ModelLayout,
    text: str,
    *,
    windows: int = 4,
    ctx: int = 256,
    probe: Precision | None = Precision.Q4,
    error: Sensitivity | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> Sensitivity:
    """Measure the ``kl`` criterion for every block of a GGUF model (with ``probe``,
    at that precision only, scaled by ``error``, which is then required)."""
    if probe is not None and error is None:
        raise ValueError("a probed kl criterion scales by the error criterion")
    if index.format != "gguf":
        raise EwqError(
            "the kl criterion runs GGUF models through llama.cpp; for Hugging Face "
            "folders use --criterion error"
        )
    started = time.perf_counter()
    path = Path(index.files[0])
    ref = LlamaCppModel(path, ctx)
    tokens = ref.tokenize(text)
    size = ctx - (ref.bos is not None)
    spans = tasks.windows(len(tokens), size, size, windows)
    if not spans or spans[0][1] - spans[0][0] < 2:
        raise EwqError("the calibration text is too short for one window")
    seqs = [
        ([ref.bos] if ref.bos is not None else []) + tokens[a:b] for a, b, _ in spans
    ]
    # float32 logits as llama.cpp gives them (four windows of a 262k vocabulary:
    # 1 GB), and their log-sum-exps
    reference = [ref.logits(s) for s in seqs]
    ref_lse = [logsumexp_rows(x) for x in reference]
    del ref
    jobs = []  # (exec_index, precisions sharing one set of written types)
    for block in layout.blocks:
        groups: dict[tuple[str, ...], list[Precision]] = {}
        for p in offered("gguf"):
            if p is Precision.RAW or (probe is not None and p is not probe):
                continue
            sig = tuple(
                t.type if t is not None else ""
                for t in (
                    encoding("gguf", info, key, p)
                    for info, key in zip(block.tensors, block.keys, strict=True)
                )
            )
            if sig == tuple(i.dtype for i in block.tensors):
                continue  # written as it is: no change, no damage
            groups.setdefault(sig, []).append(p)
        jobs += [(block.exec_index, ps) for ps in groups.values()]
    damage = {b.exec_index: dict.fromkeys(offered("gguf"), 0.0) for b in layout.blocks}
    with tempfile.TemporaryDirectory(prefix="ewq-kl-") as tmp:
        out = Path(tmp) / "probe.gguf"
        for k, (exec_index, ps) in enumerate(jobs):
            targets = gguf_targets(index, layout, _plan(layout, exec_index, ps[0]))
            quantize_gguf(path, targets, out)
            model = LlamaCppModel(out, ctx)
            kls = []
            for p, lp, s in zip(reference, ref_lse, seqs, strict=True):
                q = model.logits(s, copy=False)
                kls.append(kl_logits(p, lp, q, logsumexp_rows(q)))
            del model
            value = float(np.concatenate(kls).mean())
            for p in ps:
                damage[exec_index][p] = max(0.0, value)
            if progress is not None:
                progress(k + 1, len(jobs), f"block {exec_index} at {ps[0].value}")
    if probe is not None:
        damage = _scaled(damage, error, probe)
    return Sensitivity(
        "kl",
        damage,
        time.perf_counter() - started,
        {
            "windows": len(seqs),
            "ctx": ctx,
            "tokens": int(sum(len(s) for s in seqs)),
            "probes": len(jobs),
            "probe": probe.value if probe is not None else "all",
        },
    )


def _scaled(
    measured: dict[int, dict[Precision, float]], error: Sensitivity, probe: Precision
) -> dict[int, dict[Precision, float]]:
    """Every precision's KL from the probe's, by the error criterion's ratios.

    A block whose probe changed nothing (error 0 at the probe) but that other
    precisions do change takes the median KL-per-error of the other blocks."""
    ratios = [
        measured[i][probe] / error.damage[i][probe]
        for i in measured
        if error.damage[i][probe] > 0
    ]
    median = sorted(ratios)[len(ratios) // 2] if ratios else 0.0
    out = {}
    for i, row in measured.items():
        err = error.damage[i]
        k = row[probe] / err[probe] if err[probe] > 0 else median
        out[i] = {p: max(0.0, k * err[p]) for p in row}
    return out
