"""Entropy statistics of GGML block-quantized data, read from the blocks themselves
(see _quant_kernels): exact sums without a float copy of the tensor, on threads that
run without the GIL."""

from __future__ import annotations

import math

import gguf
import numpy as np

from ewq.analysis.entropy import EntropyStats

__all__ = ["BLOCK", "quant_stats", "supported"]

#: the GGML types whose blocks the kernels read
KERNELS = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL")
KERNELS += ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

#: GGML type -> (elements, bytes) of one block, as gguf-py states them
BLOCK = {t: gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t]] for t in KERNELS}


_TABLES: tuple[np.ndarray, np.ndarray] | None = None


def supported(qtype: str) -> bool:
    return qtype in BLOCK


def quant_stats(qtype: str, raw: np.ndarray) -> EntropyStats | None:
    """(S, T) of the values in ``raw`` (whole blocks of ``qtype``) as EntropyStats
    with shift 0; None when a sum is not finite (a scale is NaN or Inf, or a value
    too large for exp without a shift): the caller then takes the float path."""
    from ewq.analysis import _kquant_kernels as kk
    from ewq.analysis import _quant_kernels as k

    global _TABLES
    if _TABLES is None:
        _TABLES = k.tables()
    f16, exp16 = _TABLES
    per, size = BLOCK[qtype]
    nblocks = raw.size // size
    out = np.array([0.0, 0.0, 1.0])
    if qtype == "IQ4_NL":
        k.stats_iq4_nl(raw, nblocks, out, f16, exp16, k.IQ4_NL_VALUES)
    else:
        kernels = kk if qtype.endswith("_K") else k
        getattr(kernels, f"stats_{qtype.lower()}")(raw, nblocks, out, f16, exp16)
    s, t, ok = out
    if not (ok and math.isfinite(s) and math.isfinite(t) and s > 0):
        return None
    return EntropyStats(nblocks * per, 0.0, float(s), float(t))
