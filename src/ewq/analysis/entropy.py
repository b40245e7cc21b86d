"""Exact Shannon entropy of softmax(weights), the quantity EWQ ranks blocks by.

For a tensor w of n elements and p = softmax(w):

    H = -sum_i p_i * log(p_i + eps)

With eps = 0 this is exactly ``H = log S - sum_i e_i (w_i - m) / S`` where
m = max(w), e_i = exp(w_i - m) and S = sum_i e_i: no logarithm of a tiny p is ever
taken. Blocks of one model differ only in the 4th-6th significant digit of H
(H ~ ln n - Var(w)/2), so every sum is accumulated in float64.

Two exact paths, both pure (arrays in, numbers out):

* 16-bit tensors (bf16, fp16) have at most 65,536 distinct values: a histogram of
  the raw bit patterns gives the same sums from 65,536 terms.
* Everything else is reduced in chunks to the mergeable triple (m, S, T) with
  T = sum e_i (w_i - m), so a tensor never needs a float64 copy of itself.

eps > 0 (the paper's variant, eps = 0.01) needs log S before the per-element sum,
hence a second pass over the data.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

__all__ = ["EntropyStats", "entropy", "entropy_from_histogram", "entropy_reference"]

_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class EntropyStats:
    """Sufficient statistics of softmax entropy, mergeable across chunks.

    ``m`` is the running max, ``s`` = sum exp(w - m), ``t`` = sum exp(w - m) (w - m).
    """

    n: int
    m: float
    s: float
    t: float

    def merge(self, other: EntropyStats) -> EntropyStats:
        if self.n == 0:
            return other
        if other.n == 0:
            return self
        m = max(self.m, other.m)
        s = t = 0.0
        for part in (self, other):
            shift = part.m - m  # <= 0
            scale = math.exp(shift)
            s += part.s * scale
            t += (part.t + shift * part.s) * scale
        return EntropyStats(self.n + other.n, m, s, t)

    @property
    def entropy(self) -> float:
        return math.log(self.s) - self.t / self.s

    @property
    def logsumexp(self) -> float:
        return self.m + math.log(self.s)


def _stats(values: np.ndarray, weights: np.ndarray | None = None) -> EntropyStats:
    """Stats of float64 ``values`` (each counted ``weights`` times, if given)."""
    m = float(values.max())
    d = values - m
    e = np.exp(d)
    if weights is not None:
        e *= weights
    n = int(values.size if weights is None else weights.sum())
    return EntropyStats(n, m, float(e.sum()), float(np.dot(e, d)))


@functools.cache
def _bit_values(dtype: np.dtype) -> np.ndarray:
    """All 65,536 values of a 16-bit float type, as float64 (NaN/Inf included)."""
    with np.errstate(invalid="ignore"):
        values = np.arange(1 << 16, dtype=np.uint16).view(dtype).astype(np.float64)
    values.flags.writeable = False
    return values


def entropy_from_histogram(
    counts: np.ndarray, dtype: np.dtype, eps: float = 0.0
) -> float:
    """Entropy of a 16-bit float tensor given the count of each of its bit patterns."""
    values = _bit_values(np.dtype(dtype))
    used = counts > 0
    v, c = values[used], counts[used].astype(np.float64)
    if not np.isfinite(v).all():
        raise ValueError("tensor holds NaN or Inf")
    stats = _stats(v, c)
    if eps == 0.0:
        return stats.entropy
    p = np.exp(v - stats.logsumexp)
    return float(-np.dot(c * p, np.log(p + eps)))


def _histogram(bits: np.ndarray) -> np.ndarray:
    counts = np.zeros(1 << 16, dtype=np.int64)
    flat = bits.reshape(-1)
    # bincount widens its input to intp: chunking bounds that copy.
    for start in range(0, flat.size, _CHUNK):
        counts += np.bincount(flat[start : start + _CHUNK], minlength=1 << 16)
    return counts


def entropy(array: np.ndarray, eps: float = 0.0) -> float:
    """Exact entropy of softmax(array.ravel()), for any float dtype.

    Example:
        >>> round(entropy(np.zeros(1000, np.float32)), 12) == round(math.log(1000), 12)
        True
    """
    if array.size == 0:
        raise ValueError("entropy of an empty tensor")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if array.dtype.itemsize == 2 and array.dtype.kind in "fV":  # fp16, bf16
        return entropy_from_histogram(
            _histogram(array.view(np.uint16)), array.dtype, eps
        )
    flat = array.reshape(-1)
    stats = EntropyStats(0, 0.0, 0.0, 0.0)
    for start in range(0, flat.size, _CHUNK):
        chunk = flat[start : start + _CHUNK].astype(np.float64)
        if not np.isfinite(chunk).all():
            raise ValueError("tensor holds NaN or Inf")
        stats = stats.merge(_stats(chunk))
    if eps == 0.0:
        return stats.entropy
    lse, total = stats.logsumexp, 0.0
    for start in range(0, flat.size, _CHUNK):
        p = np.exp(flat[start : start + _CHUNK].astype(np.float64) - lse)
        total -= float(np.dot(p, np.log(p + eps)))
    return total


def entropy_reference(array: np.ndarray, eps: float = 0.0) -> float:
    """The definition, literally, in float64: for tests and benchmarks only."""
    w = np.asarray(array, dtype=np.float64).reshape(-1)
    p = np.exp(w - w.max())
    p /= p.sum()
    if eps == 0.0:
        nz = p > 0
        return float(-np.sum(p[nz] * np.log(p[nz])))
    return float(-np.sum(p * np.log(p + eps)))
