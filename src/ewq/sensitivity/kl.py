"""The calibrated ``kl`` criterion: per tensor and type, the KL divergence of the
next-token distributions from the unquantized model's, predicted as

    KL(t, type) = k_t * g(type) * E(t, type)

* E: the tensor's imatrix-weighted relative squared error at that type (error.py),
  what llama.cpp's quantizer minimises, known exactly for every type.
* k_t: the tensor's sensitivity, measured: that tensor alone is stored at a probe
  type (its candidate nearest 4.25 bits per weight) by ggml's quantizer with the
  importance matrix, the model run by llama.cpp on windows of the calibration text
  (probe.py: one loaded working copy, the tensor's bytes swapped in place), and its
  mean KL divided by E at the probe type. Every tensor is probed once (the way
  ExLlamaV2/V3 measure layers, per tensor).
* g: a factor per type, measured on a few tensors (``type_probes``, among those the
  source stores as floats; 1 for every type where there are none) at every type,
  each written by llama.cpp's quantizer and run as written: the median of
  KL / (k_t E). KL does not fall as fast as E at high precision (measured on IgLM:
  2.4x at Q8_0, 1.5x at Q6_K, about 1 from Q5_K down), which one probe per tensor
  cannot see, and a swapped probe runs float weights while llama.cpp multiplies a
  quantized tensor by activations rounded to 8 bits (on the byte Llama's ffn_down at
  IQ4_XS: 4.5% more KL as written), which the factor at the probe type puts back.
  Where a (tensor, type) pair was written and measured, its KL is used as it is.

A plan's predicted KL is the sum over its tensors (first order: small perturbations
of different tensors add up in KL; benchmarks/damage_model.py measures how well,
against measured KL of random mixed plans).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from ewq.arch import ModelLayout
from ewq.errors import EwqError
from ewq.evaluate.backends import LlamaCppModel
from ewq.evaluate.metrics import kl_logits, logsumexp_rows
from ewq.evaluate.windows import readable, text_windows
from ewq.formats import FLOAT_TYPES, GGUF, Encoding
from ewq.imatrix import Imatrix
from ewq.planfile import plan_from_doc
from ewq.quant.gguf import quantize_gguf
from ewq.quant.targets import plan_targets
from ewq.sensitivity import Sensitivity, tensor_candidates
from ewq.sensitivity.probe import Probes
from ewq.types import Container, ModelIndex, Precision

__all__ = ["PROBE_BITS", "Calibration", "kl_sensitivity", "probe_type"]

PROBE_BITS = 4.25  # the probe type: each tensor's candidate nearest this


def probe_type(info, encs: list[Encoding], errors: Mapping[str, float]) -> str | None:
    """The candidate nearest PROBE_BITS bits per weight (ties: the smaller error)."""
    best = None
    for e in encs[1:]:
        if not e.quantizable or errors.get(e.type, 0.0) <= 0:
            continue
        bits = 8.0 * e.nbytes / info.num_elements
        k = (abs(bits - PROBE_BITS), errors[e.type])
        if best is None or k < best[0]:
            best = (k, e.type)
    return None if best is None else best[1]


def _plan(layout: ModelLayout, tensors: dict[str, str]):
    n = layout.num_blocks
    return plan_from_doc(
        {
            "schema_version": 2,
            "num_blocks": n,
            "blocks": [
                {"exec_index": b.exec_index, "precision": Precision.RAW.value}
                for b in layout.transformer_blocks
            ],
            "tensors": [{"name": k, "type": v} for k, v in tensors.items()],
        }
    )


def _sampled(cands: dict, count: int | None) -> list[str]:
    """The tensors probed at every type: ``count`` of them (all: None), the largest
    of those with the most candidates, spread over the depth of the model."""
    names = sorted(
        cands, key=lambda n: (-len(cands[n][2]), -cands[n][0].num_elements, n)
    )
    if count is None or count >= len(names):
        return names
    widest = [n for n in names if len(cands[n][2]) == len(cands[names[0]][2])]
    by_block: dict[int, str] = {}
    for n in widest:
        by_block.setdefault(cands[n][1].exec_index, n)
    blocks = sorted(by_block)
    if len(blocks) >= count:
        step = len(blocks) / count
        return [by_block[blocks[int(i * step + step / 2)]] for i in range(count)]
    return widest[:count]


class Calibration:
    """The unquantized model's logits on the calibration windows (computed once), and
    the mean KL of any per-tensor plan from them: the plan written by llama.cpp's
    quantizer (with the importance matrix), run by llama.cpp. A context manager: the
    written files live in a temporary folder until it closes."""

    def __init__(
        self,
        index: ModelIndex,
        layout: ModelLayout,
        text: str,
        *,
        tokens: int,
        ctx: int,
        documents: str,
    ):
        if index.container != Container.GGUF:
            raise EwqError("plans are measured as GGUF files through llama.cpp")
        self.index, self.layout, self.ctx = index, layout, ctx
        self.path = Path(index.files[0])
        ref = LlamaCppModel(self.path, ctx)
        self.seqs = text_windows(
            ref.tokenize, ref.bos, text, ctx, documents, max_tokens=tokens
        )
        if not self.seqs:
            raise EwqError("the calibration text is too short for one window")
        readable(self.seqs, ref.unknown, "calibration text")
        self.tokens = int(sum(len(s) for s in self.seqs))
        self.reference = [ref.logits(s) for s in self.seqs]
        self.lse = [logsumexp_rows(x) for x in self.reference]
        del ref
        self._tmp: tempfile.TemporaryDirectory | None = None

    def __enter__(self) -> Calibration:
        self._tmp = tempfile.TemporaryDirectory(prefix="ewq-kl-")
        return self

    def __exit__(self, *exc) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def kl(self, types: Mapping[str, str], imatrix: Imatrix | None) -> float:
        """Mean KL of the model with ``types`` (tensor -> type; the rest as it is)."""
        assert self._tmp is not None, "use Calibration as a context manager"
        out = Path(self._tmp.name) / "probe.gguf"
        plan = _plan(self.layout, dict(types))
        targets = plan_targets(GGUF, self.index, self.layout, plan)
        quantize_gguf(self.path, targets, out, imatrix=imatrix)
        model = LlamaCppModel(out, self.ctx)
        kls = []
        for p, lp, s in zip(self.reference, self.lse, self.seqs, strict=True):
            q = model.logits(s, copy=False)
            kls.append(kl_logits(p, lp, q, logsumexp_rows(q)))
        del model
        return max(0.0, float(np.concatenate(kls).mean()))


def kl_sensitivity(
    index: ModelIndex,
    layout: ModelLayout,
    text: str,
    errors: Mapping[str, Mapping[str, float]],
    *,
    imatrix: Imatrix | None,
    tokens: int = 1024,
    ctx: int = 256,
    documents: str = "stream",
    type_probes: int | None = 4,
    progress: Callable[[int, int, str], None] | None = None,
) -> Sensitivity:
    """Measure the ``kl`` criterion for every tensor of a GGUF model, on windows of
    ``ctx`` tokens of ``text`` holding ``tokens`` tokens in all; ``errors`` are the
    imatrix-weighted relative errors (error.relative_errors with ``imatrix``)."""
    started = time.perf_counter()
    cands = tensor_candidates(GGUF, layout, imatrix)
    swaps, files, sampled = _probes(cands, errors, type_probes)
    window = {"tokens": tokens, "ctx": ctx, "documents": documents}
    swapped, written, bench = _measure(
        index, layout, text, swaps, files, imatrix, window, progress
    )
    slope = {n: swapped[n, t] / errors[n][t] for n, t in swaps}
    median_slope = statistics.median(slope.values()) if slope else 0.0
    factor = _type_factors(written, slope, errors, sampled)
    damage = {
        name: {
            e.type: written.get(
                (name, e.type),
                slope.get(name, median_slope)
                * factor.get(e.type, 1.0)
                * errors.get(name, {}).get(e.type, 0.0),
            )
            for e in encs[1:]
        }
        for name, (_info, _key, encs) in cands.items()
    }
    return Sensitivity(
        "kl",
        damage,
        time.perf_counter() - started,
        {
            "windows": len(bench.seqs),
            "ctx": ctx,
            "documents": str(documents),
            "tokens": bench.tokens,
            "probes": len(swaps) + len(files),
            "probes_swapped": len(swaps),
            "type_probes": sampled,
            "type_factors": {t: round(v, 4) for t, v in sorted(factor.items())},
            "median_sensitivity": median_slope,
        },
    )


def _probes(cands, errors, type_probes: int | None):
    """What is measured: one type swapped into each tensor (its sensitivity), and
    every type of a few float tensors written whole (the types' factors)."""
    probes = {
        n: probe_type(info, encs, errors.get(n, {}))
        for n, (info, _, encs) in cands.items()
    }
    # type factors are measured on tensors the source stores as floats only: against
    # a quantized source the written model's KL adds the change of llama.cpp's
    # kernels (SmolLM2's Q4_1 ffn_down written as Q5_1, the same values: 0.004 nats),
    # which does not add up over tensors (every tensor as Q8_0: 0.0057), and the
    # factors fitted from it broke the ranking of plans (Spearman 0.08 against 0.997
    # without them, benchmarks/damage_model.py)
    sampled = _sampled(
        {n: c for n, c in cands.items() if probes[n] and c[0].dtype in FLOAT_TYPES},
        type_probes,
    )
    swaps = [(n, t) for n, t in probes.items() if t is not None]
    files = [
        (n, e.type)
        for n in sampled
        for e in cands[n][2][1:]
        if errors.get(n, {}).get(e.type, 0) > 0
    ]
    return swaps, files, sampled


def _type_factors(
    written: Mapping[tuple[str, str], float],
    slope: Mapping[str, float],
    errors: Mapping[str, Mapping[str, float]],
    sampled: list[str],
) -> dict[str, float]:
    """Per type, the median over the probed tensors of the written model's KL over
    what the swapped slope predicts (a type's kernel costs more or less than its
    error says)."""
    factor: dict[str, float] = {}
    for type_name in {t for _, t in written}:
        ratios = [
            written[n, type_name] / (slope[n] * errors[n][type_name])
            for n in sampled
            if (n, type_name) in written and slope.get(n, 0) > 0
        ]
        if ratios:
            factor[type_name] = statistics.median(ratios)
    return factor


def _measure(index, layout, text, swaps, files, imatrix, window, progress):
    """The KL of each swap (one tensor's values replaced in memory) and of each
    file (the model written with one tensor at a type), in that order."""
    total = len(swaps) + len(files)

    def step(k: int, what: str) -> None:
        if progress is not None:
            progress(k, total, what)

    bench = Probes(
        index, layout, sorted({n for n, _ in swaps}), text, imatrix=imatrix, **window
    )
    swapped: dict[tuple[str, str], float] = {}
    with bench:
        for k, (name, type_name) in enumerate(swaps):
            swapped[name, type_name] = bench.kl({name: type_name})
            step(k + 1, f"{name} as {type_name}")
    written: dict[tuple[str, str], float] = {}
    with Calibration(index, layout, text, **window) as calib:
        for k, (name, type_name) in enumerate(files):
            written[name, type_name] = calib.kl({name: type_name}, imatrix)
            step(len(swaps) + k + 1, f"{name} as {type_name}, written")
    return swapped, written, bench
