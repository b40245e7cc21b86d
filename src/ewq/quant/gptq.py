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
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ewq.errors import EwqError
from ewq.formats import FLOAT_TYPES
from ewq.quant import ggml

__all__ = ["BATCH", "DAMP", "WORK", "Factor", "patch", "rounded", "rounded_with"]

#: H is damped by this share of its mean diagonal before inversion (GPTQ's 1%)
DAMP = 0.01


def _inverse_factor(hessian: np.ndarray) -> np.ndarray:
    """U, upper triangular, with U^T U = H^-1 (H damped), in FACTOR's precision
    (float64 where float32 cannot factor it).

    With J the reversal of the columns: H^-1 = J (J H J)^-1 J, and for the Cholesky
    factor L of J H J, U = J L^-1 J is upper triangular with U^T U = H^-1. One
    Cholesky and one triangular inverse (2n^3/3 operations), where inverting H
    and factoring the inverse take about 3n^3."""
    u = _factor_in(hessian, np.float32) if FACTOR is np.float32 else None
    if u is None:
        u = _factor_in(hessian, np.float64)
    if u is None:
        raise EwqError("the inputs' second moments are not positive definite")
    return u


def _factor_in(hessian: np.ndarray, dtype) -> np.ndarray | None:
    """:func:`_inverse_factor` computed in ``dtype``, or None where it cannot be
    (past the type's range, or not positive definite once damped)."""
    from scipy.linalg import get_lapack_funcs

    cols = hessian.shape[0]
    with np.errstate(over="ignore"):
        h = np.array(hessian[::-1, ::-1], dtype=dtype, order="F")
    if not np.isfinite(h).all():
        return None
    diag = np.diag(h).astype(np.float64)
    dead = diag <= 0  # columns no input reached: nothing to keep there
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    diag[dead] = 1.0
    diag += DAMP * float(np.mean(diag))
    h[np.diag_indices(cols)] = diag
    potrf, trtri = get_lapack_funcs(("potrf", "trtri"), (h,))
    low, info = potrf(h, lower=1, clean=1, overwrite_a=1)
    if info != 0:
        return None
    inv, info = trtri(low, lower=1, overwrite_c=1)
    if info != 0 or not np.isfinite(inv).all() or not (np.diag(inv) > 0).all():
        return None
    return inv[::-1, ::-1]


#: the precision H^-1's factor is computed in (float32 falls back to float64 where
#: float32 cannot factor it), as GPTQ's reference code computes it.
#: benchmarks/gptq_memory.py precision: each tensor's held-out output error with a
#: float32 factor within 0.7% of a float64 one's on IgLM (32 tensor-dampings) and
#: the default model (210 tensors), geometric means equal to 4 digits; 4096 x
#: 11008's input (11,008 columns): 6.8 s instead of 11.6 s
FACTOR = np.float32


#: columns rounded between two updates of the columns beyond them (GPTQ's lazy
#: batches: the same result, the big update done as one product per batch)
BATCH = 256


def rounded(
    values: np.ndarray, hessian: np.ndarray, qtype: int, threads: int = 1
) -> np.ndarray:
    """The bytes of ``values`` (rows x cols float32) stored as ``qtype``, rounded
    block by block against ``hessian`` (cols x cols, any float type)."""
    return rounded_with(values, Factor(hessian), qtype, threads)


class Factor:
    """What rounding against one second moment needs, computed once for every weight
    that shares it (q, k and v; gate and up): the inverse factor U, H's diagonal
    (the importance ggml's quantizer is given) and, per block width, the inverses of
    U's diagonal blocks (the whitening of each block's error)."""

    def __init__(self, hessian: np.ndarray):
        self.hessian = hessian  # the matrix it factors (not a copy)
        self.u = _inverse_factor(hessian).astype(WORK)
        self.diag = np.diag(hessian).astype(np.float32)
        self.cols = hessian.shape[0]
        self._whiten: dict[int, list[np.ndarray]] = {}

    def whitening(self, group: int) -> list[np.ndarray]:
        """U_bb^-1 of each block of ``group`` columns (upper triangular, inverted
        in float64)."""
        if group not in self._whiten:
            from scipy.linalg import lapack

            blocks = []
            for a in range(0, self.cols, group):
                ub = np.array(
                    self.u[a : a + group, a : a + group], dtype=np.float64, order="F"
                )
                inv, info = lapack.dtrtri(ub, lower=0, overwrite_c=1)
                if info != 0:
                    raise EwqError(
                        "the inputs' second moments are not positive definite"
                    )
                blocks.append(inv.astype(WORK))
            self._whiten[group] = blocks
        return self._whiten[group]


#: the precision of GPTQ's column updates (as GPTQ's reference code and AutoGPTQ
#: run them); U is factored first (FACTOR). Measured on IgLM against float64
#: updates: benchmarks/gptq_memory.py quality.
WORK = np.float32


def rounded_with(
    values: np.ndarray, factor: Factor, qtype: int, threads: int = 1
) -> np.ndarray:
    """:func:`rounded` with the second moment's factor computed already; ggml's
    quantizer on ``threads`` threads (its rows are independent)."""
    from concurrent.futures import ThreadPoolExecutor

    rows, cols = values.shape
    group = ggml.block_size(qtype)
    if cols % group:
        raise EwqError(f"rows of {cols} are not whole blocks of {group}")
    u, diag, whiten = factor.u, factor.diag, factor.whitening(group)
    w = values.astype(WORK)  # a copy: the columns ahead are updated in place
    packed = np.empty((rows, ggml.row_bytes(qtype, cols)), dtype=np.uint8)
    per_block = ggml.row_bytes(qtype, group)
    step = max(group, BATCH // group * group)
    threads = max(1, min(threads, rows // 64 or 1))
    with ThreadPoolExecutor(threads) as pool:
        for start in range(0, cols, step):
            stop = min(cols, start + step)
            errs = []
            for a in range(start, stop, group):
                b = a + group
                code, back = ggml.quantize_and_back(
                    w[:, a:b], qtype, diag[a:b], threads, pool
                )
                k = a // group
                packed[:, k * per_block : (k + 1) * per_block] = code
                err = (w[:, a:b] - back) @ whiten[k]
                errs.append(err)
                if b < stop:  # within the batch at once
                    w[:, b:stop] -= err @ u[a:b, b:stop]
            if stop < cols:  # beyond the batch, once per batch
                w[:, stop:] -= np.concatenate(errs, axis=1) @ u[start:stop, stop:]
    return packed.reshape(-1)


def patch(
    path: Path,
    source_values: Callable[[str], np.ndarray | None],
    moments,
    progress: Callable[[int, int, str], None] | None = None,
    threads: int = 1,
) -> list[str]:
    """Re-round, in the GGUF at ``path`` (llama.cpp's quantizer wrote it; not yet
    committed), every quantized tensor whose inputs' second moment ``moments.of``
    gives, from its source values; return the names re-rounded."""
    import gguf

    from ewq.sources.gguf import GGUFSource

    with GGUFSource(path) as out:
        infos = [
            i
            for i in out.index.tensors
            if i.dtype not in FLOAT_TYPES
            and len(i.shape) == 2
            and moments.of(i.name) is not None
        ]
    # the weights that share a second moment one after another: its factor once
    infos.sort(key=lambda i: (id(moments.of(i.name)), i.offset))
    done = []
    fd = os.open(path, os.O_RDWR)
    factor: Factor | None = None
    try:
        for k, info in enumerate(infos):
            values = source_values(info.name)
            h = moments.of(info.name)
            if values is None or h.shape != (values.shape[1],) * 2:
                continue
            if factor is None or factor.hessian is not h:
                factor = None  # the previous one's memory first
                factor = Factor(h)
            qtype = int(gguf.GGMLQuantizationType[info.dtype])
            data = rounded_with(values, factor, qtype, threads)
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
