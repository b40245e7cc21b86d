"""The data-free ``error`` criterion (and the errors the calibrated ``kl`` criterion
scales): every tensor round-tripped through the real quantizer at every type it can
be written as, in one streaming pass over the model.

Per tensor and type, the relative squared error

    E = sum_ij w_j (W_ij - Q(W)_ij)^2 / sum_ij w_j W_ij^2

with w_j the importance matrix's weight of input column j (per expert for stacked
experts), or 1 without one. With an importance matrix, Q is the quantizer given it,
as llama.cpp's is: E is what the quantizer itself minimises, and, for y = W x,
the error energy of the output relative to the output's own when inputs have the
importance matrix's second moments. Without one, inputs of no preferred direction.

GGUF: ggml's own quantize/dequantize (quant/ggml.py), so every type is what llama.cpp
writes; the source values are the source tensor dequantized by ggml. Hugging Face:
round to nearest with symmetric max-abs scales per group, the rule compressed-tensors'
``calculate_qparams`` applies when `ewq quantize --format hf` packs the weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection

import numpy as np

from ewq.arch import ModelLayout
from ewq.formats import OutputFormat, hook
from ewq.imatrix import Imatrix
from ewq.quant import ggml
from ewq.sampling import Sampling, sampled
from ewq.sensitivity import tensor_candidates
from ewq.sensitivity.probe import expert_weights
from ewq.sources.base import TensorSource
from ewq.types import Container

__all__ = ["relative_errors"]

_CHUNK_ELEMENTS = 1 << 22  # rows per round trip: about 16 MB of float32 at a time


def _sse(
    values: np.ndarray,
    roundtrip: Callable,
    type_name: str,
    weights: np.ndarray,
    threads: int,
    imatrix: np.ndarray | None,
) -> float:
    """The importance-weighted squared error of ``values`` at ``type_name``
    through the format's round trip, a bounded number of rows at a time."""
    rows_per = max(1, _CHUNK_ELEMENTS // values.shape[1])
    sse = 0.0
    for a in range(0, values.shape[0], rows_per):
        part = values[a : a + rows_per]
        back = roundtrip(part, type_name, threads=threads, imatrix=imatrix)
        d = (back - part).astype(np.float64)
        sse += float(np.einsum("ij,ij,j->", d, d, weights))
    return sse


def relative_errors(
    src: TensorSource,
    layout: ModelLayout,
    form: OutputFormat,
    *,
    imatrix: Imatrix | None = None,
    threads: int = 2,
    progress: Callable[[int, int, str], None] | None = None,
    sample: Sampling | None = None,
    intervals: dict[str, dict] | None = None,
    only: Collection[str] | None = None,
) -> dict[str, dict[str, float]]:
    """E per tensor (by name) and type, for every tensor the format can write in more
    than one way (its own type: 0, not listed). With ``sample``, each E is estimated
    from a random sample of the tensor's rows (ewq.sampling), and
    ``intervals`` (if given) receives, per tensor, the rows read and each type's
    relative half width of its 95% interval. ``only``: these tensors alone."""
    cands = tensor_candidates(form, layout, imatrix)
    roundtrip = hook(form.roundtrip)
    gguf_source = (
        src.index.container == Container.GGUF
    )  # values as llama.cpp decodes them
    if only is not None:
        cands = {n: c for n, c in cands.items() if n in only}
    total = sum(info.nbytes for info, _, _ in cands.values()) or 1
    done = 0
    out: dict[str, dict[str, float]] = {}
    weights_of = imatrix.weights() if imatrix is not None else {}
    for name, (info, _key, encs) in cands.items():
        done += info.nbytes
        if sample is not None:
            found = _sampled(
                src, info, encs, roundtrip, weights_of.get(name), threads, sample
            )
            if intervals is not None:
                first = next(iter(found.values()), None)
                intervals[name] = {
                    "rows": first.rows if first else 0,
                    "of": first.total if first else 0,
                    "relative_halfwidth": {t: e.relative for t, e in found.items()},
                }
            if any(e.value > 0 for e in found.values()):
                out[name] = {t: e.value for t, e in found.items()}
            if progress is not None:
                progress(done, total, name)
            continue
        if gguf_source:
            values = ggml.tensor_values(info)
        else:
            values = src.read(info).astype(np.float32).reshape(-1, info.shape[-1])
        matrices = info.shape[0] if len(info.shape) == 3 else 1
        cols = info.shape[-1]
        per = values.shape[0] // matrices
        w_all = weights_of.get(name)
        errs = dict.fromkeys((e.type for e in encs[1:]), 0.0)
        energy = 0.0
        for m in range(matrices):  # experts one at a time: each its own imatrix slice
            part = values[m * per : (m + 1) * per]
            w = expert_weights(w_all, m, cols)
            weights = w.astype(np.float64) if w is not None else np.ones(cols)
            p64 = part.astype(np.float64)
            energy += float(np.einsum("ij,ij,j->", p64, p64, weights))
            for e in encs[1:]:
                errs[e.type] += _sse(part, roundtrip, e.type, weights, threads, w)
        if energy > 0 and math.isfinite(energy):
            out[name] = {t: v / energy for t, v in errs.items()}
        if progress is not None:
            progress(done, total, name)
    return out


def _sampled(src, info, encs, roundtrip, w_all, threads, spec: Sampling):
    """Per type, the sampled estimate of the tensor's E (rows of stacked experts
    are weighed by their expert's importance)."""
    cols = info.shape[-1]
    total = info.num_elements // cols
    matrices = info.shape[0] if len(info.shape) == 3 else 1
    per = total // matrices

    def measure(rows: np.ndarray):
        values = _rows(src, info, rows)
        errs = {e.type: np.zeros(len(rows)) for e in encs[1:]}
        energy = np.zeros(len(rows))
        experts = rows // per
        for m in np.unique(experts):
            at = np.flatnonzero(experts == m)
            part = values[at]
            w = expert_weights(w_all, int(m), cols)
            weights = w.astype(np.float64) if w is not None else np.ones(cols)
            p64 = part.astype(np.float64)
            energy[at] = np.einsum("ij,ij,j->i", p64, p64, weights)
            for e in encs[1:]:
                back = roundtrip(part, e.type, threads=threads, imatrix=w)
                d = (back - part).astype(np.float64)
                errs[e.type][at] = np.einsum("ij,ij,j->i", d, d, weights)
        return errs, energy

    return sampled(info.name, total, measure, spec)


def _rows(src, info, rows: np.ndarray) -> np.ndarray:
    """The float32 values of sorted rows ``rows`` of a tensor, reading only them."""
    src.prefetch(info, rows)
    if src.index.container == Container.GGUF:
        return ggml.tensor_rows(info, rows)
    cols = info.shape[-1]
    out = np.empty((len(rows), cols), dtype=np.float32)
    for k, r in enumerate(rows):
        out[k] = src.read_range(info, int(r) * cols, (int(r) + 1) * cols)
    return out
