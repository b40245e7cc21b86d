"""Calibrated rounding (GPTQ, Frantar et al. 2022) inside llama.cpp's own types.

llama.cpp's quantizer rounds each row on its own, given at most the diagonal of the
inputs' second moments (the importance matrix); a tensor's output error is
||(W - Q) X||^2 = tr((W - Q) H (W - Q)^T) with H = X^T X, whose off-diagonal terms it
cannot see. Here each row is quantized one ggml block of columns at a time, left to
right, by ggml's own quantizer (given the block's diagonal of H as its importance
matrix), and the block's rounding error is pushed onto the columns not yet
quantized through the Cholesky factor of H^-1 (the block form of GPTQ's update:
the error E of the block, whitened by its diagonal block U_bb of that factor,
moves the rest by -E U_bb^-1 U_b,rest). Intra-block feedback is left out: the
block's scales are ggml's to choose. The result is the same type, the same bytes
per row, written where llama.cpp's bytes were (``patch``): any llama.cpp reads it.

Measured on IgLM (benchmarks/gptq_gain.py): llama.cpp's own presets with the same
importance matrix, their tensors re-rounded so, have 0.33-0.59x the KL on held-out
text.

Why by hand: no library rounds into ggml's block formats with a Hessian (GPTQ's
implementations write their own integer layouts); the block quantizer itself is
ggml's (quant/ggml.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from ewq.errors import EwqError
from ewq.formats import FLOAT_TYPES
from ewq.quant import ggml

__all__ = ["DAMP", "hessian_bytes", "patch", "rounded"]

#: H is damped by this share of its mean diagonal before inversion (GPTQ's 1%)
DAMP = 0.01


def hessian_bytes(cols: Mapping[str, int]) -> int:
    """Memory the second moments of tensors with these column counts take."""
    return sum(8 * c * c for c in cols.values())


def rounded(values: np.ndarray, hessian: np.ndarray, qtype: int) -> np.ndarray:
    """The bytes of ``values`` (rows x cols float32) stored as ``qtype``, rounded
    block by block against ``hessian`` (cols x cols)."""
    rows, cols = values.shape
    group = ggml.block_size(qtype)
    if cols % group:
        raise EwqError(f"rows of {cols} are not whole blocks of {group}")
    h = np.array(hessian, dtype=np.float64)
    dead = np.diag(h) <= 0  # columns no input reached: nothing to keep there
    h[dead, dead] = 1.0
    h[np.diag_indices(cols)] += DAMP * float(np.mean(np.diag(h)))
    try:
        u = np.linalg.cholesky(np.linalg.inv(h)).T  # H^-1 = U^T U, U upper
    except np.linalg.LinAlgError:
        raise EwqError("the inputs' second moments are not positive definite") from None
    w = values.astype(np.float64)
    diag = np.diag(h).astype(np.float32)
    parts = []
    for a in range(0, cols, group):
        b = a + group
        block = np.ascontiguousarray(w[:, a:b], dtype=np.float32)
        packed = ggml.quantize(block, qtype, imatrix=diag[a:b])
        parts.append(packed.reshape(rows, -1))
        if b < cols:
            back = ggml.dequantize(packed, qtype, block.size).reshape(block.shape)
            err = np.linalg.solve(u[a:b, a:b].T, (w[:, a:b] - back).T).T
            w[:, b:] -= err @ u[a:b, b:]
    return np.concatenate(parts, axis=1).reshape(-1)


def patch(
    path: Path,
    source_values: Callable[[str], np.ndarray | None],
    hessians: Mapping[str, np.ndarray],
    progress: Callable[[int, int, str], None] | None = None,
) -> list[str]:
    """Re-round, in the GGUF at ``path`` (llama.cpp's quantizer wrote it; not yet
    committed), every quantized tensor with a second moment in ``hessians``, from its
    source values; return the names re-rounded."""
    import gguf

    from ewq.sources.gguf import GGUFSource

    with GGUFSource(path) as out:
        infos = [
            i
            for i in out.index.tensors
            if i.name in hessians and i.dtype not in FLOAT_TYPES and len(i.shape) == 2
        ]
    done = []
    fd = os.open(path, os.O_RDWR)
    try:
        for k, info in enumerate(infos):
            values = source_values(info.name)
            h = hessians[info.name]
            if values is None or h.shape != (values.shape[1],) * 2:
                continue
            data = rounded(values, h, int(gguf.GGMLQuantizationType[info.dtype]))
            if data.nbytes != info.nbytes:
                raise EwqError(f"{info.name}: re-rounded to {data.nbytes} bytes")
            os.pwrite(fd, data.tobytes(), info.offset)
            done.append(info.name)
            if progress is not None:
                progress(k + 1, len(infos), info.name)
        os.fsync(fd)
    finally:
        os.close(fd)
    return done
