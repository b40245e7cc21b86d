"""The Hugging Face output's quantizer rule, without torch: round to nearest with
symmetric max-abs scales per group, as compressed-tensors' ``calculate_qparams``
gives them and `ewq quantize --format hf` packs the weights (ewq.quant.hf), for the
error criterion's round trip."""

from __future__ import annotations

import numpy as np

from ewq.formats import hf_group_size

__all__ = ["bits_of", "roundtrip"]


def bits_of(type_name: str) -> int:
    """``int4/g128`` -> 4."""
    return int(type_name[3 : type_name.index("/")])


def roundtrip(
    rows: np.ndarray,
    type_name: str,
    *,
    threads: int = 1,
    imatrix: np.ndarray | None = None,
) -> np.ndarray:
    """``rows`` (2-D) at ``type_name`` (``int4/g128``...) and back (float32
    arithmetic, returned as float64).
    ``threads`` and ``imatrix`` are the GGUF round trip's: this rule takes neither."""
    del threads
    if imatrix is not None:
        raise ValueError(
            "the Hugging Face output's quantizer takes no importance matrix"
        )
    bits = bits_of(type_name)
    cols = rows.shape[1]
    group = hf_group_size(cols) or cols
    # float32 throughout, as compressed-tensors computes: in float64 a group's
    # largest value can land a hair inside the half-way point its float32 quotient
    # sits on, and round the other way
    g = rows.reshape(rows.shape[0], cols // group, group).astype(np.float32)
    qmax, qmin = 2 ** (bits - 1) - 1, -(2 ** (bits - 1))
    scale = np.abs(g).max(axis=2, keepdims=True) / np.float32((qmax - qmin) / 2)
    scale[scale == 0] = 1.0
    q = np.clip(np.round(g / scale), qmin, qmax)
    return (q * scale).reshape(rows.shape).astype(np.float64)
