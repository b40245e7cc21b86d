"""A matrix's row units for sampled entropy (ewq.analysis.sampled): how rows group
into units, runs of consecutive units read at once, and each unit's entropy sums
(max, S = sum exp(w - max), T = sum exp(w - max)(w - max)), from float values or
straight from GGML quant blocks."""

from __future__ import annotations

import numpy as np

from ewq.analysis.quantized import BLOCK, quant_stats
from ewq.analysis.scan import matrices_of
from ewq.types import TensorInfo

__all__ = [
    "RUN_ELEMENTS",
    "UNIT_BYTES",
    "block_stats",
    "run_stats",
    "runs",
    "unit_shape",
]

UNIT_BYTES = 64 << 10
RUN_ELEMENTS = 1 << 22  # 16 MB of float32 at most in one read

Stats = tuple[float, float, float]


def unit_shape(info: TensorInfo, granule: int) -> tuple[int, int, int, int]:
    """(rows per matrix, row elements, rows per unit, units per matrix)."""
    cols = max(info.shape[-1], granule) if info.shape else 1
    n_mat = matrices_of(info)
    rows = info.num_elements // n_mat // cols
    row_bytes = max(1, info.nbytes // max(1, n_mat * rows))
    b = max(1, min(UNIT_BYTES // row_bytes, rows // 256))
    return rows, cols, b, -(-rows // b)


def _unit_stats(values: np.ndarray) -> tuple[float, float, float]:
    """(max, sum exp(w - max), sum exp(w - max)(w - max)) of one unit, in float64."""
    w = np.asarray(values, dtype=np.float64)
    m = float(w.max())
    d = w - m
    e = np.exp(d)
    return m, float(e.sum()), float(np.einsum("i,i->", e, d))


def run_stats(values: np.ndarray, unit: int) -> list[tuple[float, float, float]]:
    """:func:`_unit_stats` of consecutive units of ``unit`` values each (the last
    may be shorter: a matrix's last unit), computed for all full units at once."""
    full = len(values) // unit
    w = values[: full * unit].reshape(full, unit).astype(np.float64)
    m = w.max(axis=1)
    w -= m[:, None]
    e = np.exp(w)
    sums, terms = e.sum(axis=1), np.einsum("ij,ij->i", e, w)
    out = list(zip(m.tolist(), sums.tolist(), terms.tolist(), strict=True))
    if full * unit < len(values):
        out.append(_unit_stats(values[full * unit :]))
    return out


def block_stats(
    qtype: str, raw: np.ndarray, unit: int
) -> list[tuple[float, float, float]] | None:
    """The units' statistics from their quant blocks (shift 0: S and T themselves);
    None when a sum is not finite (the float path then says where and why)."""
    per, size = BLOCK[qtype]
    step = unit // per * size
    out = []
    for a in range(0, len(raw), step):
        part = quant_stats(qtype, raw[a : a + step])
        if part is None:
            return None
        out.append((part.m, part.s, part.t))
    return out


def runs(numbers, longest: int) -> list[tuple[int, int]]:
    """Sorted unit numbers as runs of consecutive units [first, stop), at most
    ``longest`` units each: one read per run (a unit alone is tiny on a small model,
    where per-read overhead dominated: 51,501 reads for a 5% analysis of SmolLM2,
    8x the time of reading it whole), and a run's values never exceed
    ``RUN_ELEMENTS`` floats whatever the model's size."""
    runs: list[tuple[int, int]] = []
    for u in numbers:
        u = int(u)
        if runs and runs[-1][1] == u and u - runs[-1][0] < longest:
            runs[-1] = (runs[-1][0], u + 1)
        else:
            runs.append((u, u + 1))
    return runs
