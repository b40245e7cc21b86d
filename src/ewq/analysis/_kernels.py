"""Jitted loops (numba), imported on first use so that `import ewq` stays light."""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(nogil=True, cache=True, boundscheck=False)
def count16(bits: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - jitted
    """out[b] += 1 for every 16-bit pattern b in ``bits`` (1-D uint16)."""
    for i in range(bits.size):
        out[bits[i]] += 1
