"""Jitted row reductions over logits (numba), imported on first use.

Why by hand: numpy's log-softmax of a (tokens x vocabulary) matrix makes four
temporaries of its size in float64 (a 512 x 49,152 window: 200 MB each) and took
as long as the forward pass that produced it; these loops read the float32 logits
once per sum and allocate nothing but the per-row results. Same float64 arithmetic
as before (max, sum of exp(x - max), log), summed in row order.
"""

from __future__ import annotations

import math

import numba
import numpy as np


@numba.njit(nogil=True, cache=True, boundscheck=False)
def row_logsumexp(x):  # pragma: no cover - jitted
    """log(sum(exp(row))) of every row of a 2-D float32 array, in float64."""
    n, v = x.shape
    out = np.empty(n)
    for i in range(n):
        m = -math.inf
        for j in range(v):
            m = max(m, np.float64(x[i, j]))
        s = 0.0
        for j in range(v):
            s += math.exp(np.float64(x[i, j]) - m)
        out[i] = m + math.log(s)
    return out


@numba.njit(nogil=True, cache=True, boundscheck=False)
def kl_rows(x, lse_x, y, lse_y):  # pragma: no cover - jitted
    """KL(softmax(x_i) || softmax(y_i)) of every row, in nats."""
    n, v = x.shape
    out = np.empty(n)
    for i in range(n):
        acc = 0.0
        for j in range(v):
            a = np.float64(x[i, j]) - lse_x[i]
            acc += math.exp(a) * (a - (np.float64(y[i, j]) - lse_y[i]))
        out[i] = acc
    return out


@numba.njit(nogil=True, cache=True, boundscheck=False)
def row_dot(p, y):  # pragma: no cover - jitted
    """sum_j p[i, j] * y[i, j] of every row of two 2-D float32 arrays, in float64."""
    n, v = p.shape
    out = np.empty(n)
    for i in range(n):
        s = 0.0
        for j in range(v):
            s += np.float64(p[i, j]) * np.float64(y[i, j])
        out[i] = s
    return out
