"""Row-sampled estimates with stated intervals (issue: planning a 70B-class model at
the speed of reading it).

ggml quantizes rows independently (every block lies within a row; the importance
matrix weighs columns), so a tensor's squared error at a type is a sum over its
rows, and so is its energy. A tensor's relative error E = sum_r e_r / sum_r w_r is
then a ratio of two population totals, estimated from a simple random sample of
rows by the ratio estimator R = sum_s e_r / sum_s w_r, whose variance (Cochran,
Sampling Techniques, 6.9, with the finite population correction) is

    var(R) ~= (1 - n/N) / (n * mean_s(w)^2) * s^2(e_r - R w_r)

with s^2 the sample variance. The 95% interval is R +- 1.96 sqrt(var(R)). Rows come
in one fixed random order per tensor (a seed and the tensor's name), and the sample
is its first n rows: growing a sample only adds rows, and the same seed gives the
same estimate.

Pure: numbers in, numbers out; reading the rows is the caller's.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Estimate",
    "DEFAULT_FRACTION",
    "Sampling",
    "chosen",
    "estimate",
    "row_order",
    "sampled",
]

Z95 = 1.959963984540054

#: the share of rows a plan's error pass reads unless told otherwise: measured to
#: keep the plans (results/*/sampled_plans.json, results/*/probe_budget.json)
DEFAULT_FRACTION = 0.02


@dataclass(frozen=True)
class Sampling:
    """How many rows to read of each tensor: ``fraction`` of them, at least
    ``min_rows`` (and at least what ``rows`` names for it), doubled while some
    type's 95% interval is wider than ``relative`` of its estimate (up to every
    row)."""

    fraction: float = DEFAULT_FRACTION
    min_rows: int = 64
    relative: float = 0.25
    seed: int = 0
    #: tensors sampled further than the rule gives: (name, rows) pairs
    rows: tuple[tuple[str, int], ...] = ()

    def first(self, total: int, name: str = "") -> int:
        more = dict(self.rows).get(name, 0)
        return min(total, max(self.min_rows, math.ceil(self.fraction * total), more))


@dataclass(frozen=True)
class Estimate:
    """A ratio of row totals from ``rows`` of ``total`` rows: its value and the
    half width of its 95% interval (0 when every row was read)."""

    value: float
    halfwidth: float
    rows: int
    total: int

    @property
    def relative(self) -> float:
        """The half width as a share of the value (0 for an exact one)."""
        if self.halfwidth == 0:
            return 0.0
        return self.halfwidth / self.value if self.value > 0 else math.inf


def chosen(fraction: float | None, remote: bool) -> Sampling | None:
    """The row sample of a plan's error pass for ``--sample``'s ``fraction``: that
    share of the rows; 1, every row (exact); unset, DEFAULT_FRACTION for a model
    on disk, and every row for a hub id: a plan's entropy analysis downloads it
    whole unless ``--sample`` is given, which then reads only the sampled rows of
    both passes by range requests (a choice left to the user: sampled entropies
    decide fewer blocks right, results/sampled/report.md)."""
    if fraction is None:
        return None if remote else Sampling(fraction=DEFAULT_FRACTION)
    return None if fraction >= 1 else Sampling(fraction=fraction)


def row_order(name: str, total: int, seed: int) -> np.ndarray:
    """The fixed random order of a tensor's rows, for ``seed`` and its name."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    return rng.permutation(total)


def estimate(num: np.ndarray, den: np.ndarray, total: int) -> Estimate:
    """The ratio estimator of sum(num) / sum(den) over ``total`` rows from the
    sampled rows' values (module docstring)."""
    n = len(num)
    s_num, s_den = float(np.sum(num)), float(np.sum(den))
    value = s_num / s_den if s_den > 0 else 0.0
    if n >= total or n < 2 or s_den <= 0:
        return Estimate(value, 0.0 if n >= total else math.inf, n, total)
    resid = np.asarray(num, dtype=np.float64) - value * np.asarray(den, np.float64)
    mean_den = s_den / n
    var = (1 - n / total) / (n * mean_den**2) * float(np.var(resid, ddof=1))
    return Estimate(value, Z95 * math.sqrt(max(var, 0.0)), n, total)


def sampled(
    name: str,
    total: int,
    measure: Callable[[np.ndarray], tuple[Mapping[str, np.ndarray], np.ndarray]],
    spec: Sampling,
) -> dict[str, Estimate]:
    """Per type, the estimate of a tensor's relative error from sampled rows.

    ``measure(rows)`` gives, for row indices ``rows``, each type's per-row squared
    error and the per-row energy. Rows are added in the tensor's fixed order until
    every type's interval is within ``spec.relative`` of its estimate, or every row
    is read."""
    order = row_order(name, total, spec.seed)
    n, done = spec.first(total, name), 0
    errs: dict[str, list[np.ndarray]] = {}
    energy: list[np.ndarray] = []
    while True:
        rows = np.sort(order[done:n])
        e, w = measure(rows)
        for t, v in e.items():
            errs.setdefault(t, []).append(np.asarray(v, dtype=np.float64))
        energy.append(np.asarray(w, dtype=np.float64))
        done = n
        den = np.concatenate(energy)
        found = {t: estimate(np.concatenate(v), den, total) for t, v in errs.items()}
        wide = any(x.relative > spec.relative for x in found.values())
        if not wide or n >= total:
            return found
        n = min(total, 2 * n)
