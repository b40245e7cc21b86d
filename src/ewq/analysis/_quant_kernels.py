"""Entropy sums straight from GGML quant blocks (numba), without dequantizing.

Every supported type stores a sub-block's values as ``w(c) = A * (c + off) + B`` for
an integer code c, a float32 scale A and offset B built from the block's float16
fields (ggml's layouts, ``ggml/src/ggml-common.h``; the float32 operations in the
order gguf-py's dequantizers do them, so w(c) is bit for bit gguf-py's value). The
sums the entropy needs, S = sum exp(w) and T = sum exp(w) w, depend on the multiset
of codes of each sub-block only, so element order inside a block does not matter.

exp(w(c)) without an exponential per element: with a and b the exact (float64)
scale and offset, exp(a c + b) = exp(b) * exp(a)^c, where exp of a float16 value is
a lookup in a table over all 65,536 float16s and integer powers come from
multiplications. The float32 rounding of w(c) is then put back exactly enough:
exp(w32) = exp(a c + b) * exp(delta) with delta = w32 - (a c + b) ~ 1e-7 |w|, and
exp(delta) = 1 + delta + delta^2 / 2 to well under 1e-16.

* up to 32 codes per sub-block: count the sub-block's codes, then one pass over the
  codes with a running power (Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K);
* more (Q6_K: 64; Q8_0 and IQ4_NL: 256): per element, exp(b) * lo[c & 15] *
  hi[c >> 4] from two tables of powers per sub-block.

No shift by the maximum: weights are small, exp(w) for |w| < 700 is finite in
float64; a sum that is not finite sends the caller to the float path. Branch-free
where the data decide (mispredicted branches cost more than the arithmetic).
Each kernel adds (S, T) to out[0:2] and sets out[2] = 0 when a scale is NaN or Inf.
"""

from __future__ import annotations

import math

import numba
import numpy as np

_JIT = {"nogil": True, "cache": True, "boundscheck": False, "fastmath": False}

IQ4_NL_VALUES = np.array(
    [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
    dtype=np.int64,
)
_F32 = np.float32


def tables() -> tuple[np.ndarray, np.ndarray]:
    """float16 bit pattern -> its value, and -> exp(value), as float64."""
    values = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        return values, np.exp(values)


@numba.njit(**_JIT)
def _bits(raw, i):  # pragma: no cover - jitted
    return np.int64(raw[i]) | (np.int64(raw[i + 1]) << 8)


@numba.njit(inline="always", **_JIT)
def _neg(bits):  # pragma: no cover - jitted
    """The float16 bit pattern of minus the value: exp16[_neg(b)] = exp(-value)."""
    return bits ^ 0x8000


@numba.njit(inline="always", **_JIT)
def _powers2(r, fine, coarse):  # pragma: no cover - jitted
    """fine[i] = r**i, coarse[i] = r**(len(fine) i): r**k = fine[k % f] * coarse[k // f]
    with two short chains of multiplications instead of one long one."""
    x = 1.0
    for i in range(fine.size):
        fine[i] = x
        x *= r
    y = 1.0
    for i in range(coarse.size):
        coarse[i] = y
        y *= x


@numba.njit(inline="always", **_JIT)
def _rpow(fine, coarse, k):  # pragma: no cover - jitted
    """r**k for 0 <= k < len(fine) * len(coarse), from _powers2's tables."""
    return fine[k % fine.size] * coarse[k // fine.size]


@numba.njit(inline="always", **_JIT)
def _signed(fp, cp, fn, cn, k):  # pragma: no cover - jitted
    """(exp(k d), exp(-k d)) for an integer k of any sign, from the power tables of
    exp(d) (fp, cp) and exp(-d) (fn, cn); branch-free (the sign is data)."""
    neg = np.int64(k < 0)
    m = -k if k < 0 else k
    up = _rpow(fp, cp, m)
    down = _rpow(fn, cn, m)
    return (1 - neg) * up + neg * down, (1 - neg) * down + neg * up


@numba.njit(**_JIT)
def _pow(r, n):  # pragma: no cover - jitted
    """r**n for an integer |n| < 256 by squaring, branch-free: for a bit b in {0, 1},
    (1 - b) + b * y is exactly 1 or y."""
    neg = np.int64(n < 0)
    m = -n if n < 0 else n
    x = 1.0
    for i in range(8):
        bit = (m >> i) & 1
        x *= (1 - bit) + bit * r
        r *= r
    return (1 - neg) * x + neg * (1.0 / x)


#: below this largest |w| of a sub-block, the float32 rounding of w is left out: its
#: effect on the entropy is at most 2^-24 * 2 TINY^2 = 1.9e-9 absolute (each term's
#: relative error is at most 2^-24 |w|, weighted by |w - mean|), under 3e-10 of any
#: matrix's entropy (ln 512 or more)
TINY = 0.125


@numba.njit(inline="always", **_JIT)
def _counted(
    counts, at, ncodes, a, b, e, r, big_a, off, big_b, acc
):  # pragma: no cover
    """Add the sub-block's codes counted in counts[at:at + ncodes] to acc = [S, T] and
    zero them. a, b: the exact scale and offset of w = a c + b; e = exp(b),
    r = exp(a). Where |w| can exceed TINY, each term is corrected to gguf-py's
    float32 value w32 = float32(float32(A (c + off)) + B): exp(w32) = exp(w)(1 + w32 - w)."""
    s0 = s1 = t0 = t1 = 0.0
    r2 = r * r
    h = e
    if max(abs(b), abs(a * (ncodes - 1) + b)) <= TINY:
        for c in range(0, ncodes, 2):  # two chains: even and odd codes
            x0 = counts[at + c] * h
            x1 = counts[at + c + 1] * (h * r)
            s0 += x0
            s1 += x1
            t0 += x0 * c
            t1 += x1 * (c + 1)
            counts[at + c] = 0
            counts[at + c + 1] = 0
            h *= r2
        s = s0 + s1
        acc[0] += s
        acc[1] += a * (t0 + t1) + b * s
        return
    ba = np.float64(big_a)
    bb = np.float64(big_b)
    for c in range(0, ncodes, 2):
        # float32(A * (c + off)) then + B: the products and sums of two float32s
        # are exact in float64, so one rounding each, as float32 arithmetic does
        w0 = np.float64(_F32(np.float64(_F32(ba * (c + off))) + bb))
        w1 = np.float64(_F32(np.float64(_F32(ba * (c + 1 + off))) + bb))
        x0 = counts[at + c] * h * (1.0 + (w0 - (a * c + b)))
        x1 = counts[at + c + 1] * (h * r) * (1.0 + (w1 - (a * (c + 1) + b)))
        s0 += x0
        s1 += x1
        t0 += x0 * w0
        t1 += x1 * w1
        counts[at + c] = 0
        counts[at + c + 1] = 0
        h *= r2
    acc[0] += s0 + s1
    acc[1] += t0 + t1


@numba.njit(**_JIT)
def _tables(r, e, lo, hi):  # pragma: no cover - jitted
    """lo[i] = r**i, hi[i] = e * r**(16 i): exp(a c + b) = hi[c >> 4] * lo[c & 15]."""
    x = 1.0
    for i in range(16):
        lo[i] = x
        x *= r
    r16 = x
    x = e
    for i in range(16):
        hi[i] = x
        x *= r16


@numba.njit(inline="always", **_JIT)
def _term(lo, hi, c, a, b, w):  # pragma: no cover - jitted
    """exp(w) for code c (from the tables of exp(a c + b)), corrected to w."""
    return hi[c >> 4] * lo[c & 15] * (1.0 + (w - (a * c + b)))


@numba.njit(inline="always", **_JIT)
def _nibbles(raw, p, counts, at):  # pragma: no cover - jitted
    """Count the 32 4-bit codes of 16 bytes at raw[p + at]."""
    for j in range(16):
        q = np.int64(raw[p + at + j])
        counts[q & 15] += 1
        counts[q >> 4] += 1


@numba.njit(**_JIT)
def stats_q4_0(raw, nblocks, out, f16, exp16):  # pragma: no cover - jitted
    counts = np.zeros(16, np.int64)
    acc = np.zeros(2)
    for k in range(nblocks):
        p = k * 18
        bits = _bits(raw, p)
        d, r = f16[bits], exp16[bits]
        if not math.isfinite(d):
            out[2] = 0.0
            return
        _nibbles(raw, p, counts, 2)
        e = _pow(exp16[_neg(bits)], 8)  # exp(-8 d)
        _counted(counts, 0, 16, d, -8.0 * d, e, r, _F32(d), -8, _F32(0.0), acc)
    out[0] += acc[0]
    out[1] += acc[1]


@numba.njit(**_JIT)
def stats_q4_1(raw, nblocks, out, f16, exp16):  # pragma: no cover - jitted
    counts = np.zeros(16, np.int64)
    acc = np.zeros(2)
    for k in range(nblocks):
        p = k * 20
        d, m = f16[_bits(raw, p)], f16[_bits(raw, p + 2)]
        if not (math.isfinite(d) and math.isfinite(m)):
            out[2] = 0.0
            return
        _nibbles(raw, p, counts, 4)
        e, r = exp16[_bits(raw, p + 2)], exp16[_bits(raw, p)]
        _counted(counts, 0, 16, d, m, e, r, _F32(d), 0, _F32(m), acc)
    out[0] += acc[0]
    out[1] += acc[1]


@numba.njit(**_JIT)
def _q5(raw, nblocks, out, f16, exp16, size, qh_at, qs_at, has_min):  # pragma: no cover
    counts = np.zeros(32, np.int64)
    acc = np.zeros(2)
    for k in range(nblocks):
        p = k * size
        d, r = f16[_bits(raw, p)], exp16[_bits(raw, p)]
        m = f16[_bits(raw, p + 2)] if has_min else 0.0
        if not (math.isfinite(d) and math.isfinite(m)):
            out[2] = 0.0
            return
        qh = (
            np.int64(raw[p + qh_at])
            | (np.int64(raw[p + qh_at + 1]) << 8)
            | (np.int64(raw[p + qh_at + 2]) << 16)
            | (np.int64(raw[p + qh_at + 3]) << 24)
        )
        for j in range(16):
            q = np.int64(raw[p + qs_at + j])
            counts[(q & 15) | (((qh >> j) & 1) << 4)] += 1
            counts[(q >> 4) | (((qh >> (j + 16)) & 1) << 4)] += 1
        if has_min:
            e = exp16[_bits(raw, p + 2)]
            _counted(counts, 0, 32, d, m, e, r, _F32(d), 0, _F32(m), acc)
        else:
            e = _pow(exp16[_neg(_bits(raw, p))], 16)  # exp(-16 d)
            _counted(counts, 0, 32, d, -16.0 * d, e, r, _F32(d), -16, _F32(0.0), acc)
    out[0] += acc[0]
    out[1] += acc[1]


@numba.njit(**_JIT)
def stats_q5_0(raw, nblocks, out, f16, exp16):  # pragma: no cover - jitted
    _q5(raw, nblocks, out, f16, exp16, 22, 2, 6, False)


@numba.njit(**_JIT)
def stats_q5_1(raw, nblocks, out, f16, exp16):  # pragma: no cover - jitted
    _q5(raw, nblocks, out, f16, exp16, 24, 4, 8, True)


@numba.njit(**_JIT)
def stats_q8_0(raw, nblocks, out, f16, exp16):  # pragma: no cover - jitted
    lo = np.empty(16)
    hi = np.empty(16)
    acc = np.zeros(2)
    for k in range(nblocks):
        p = k * 34
        d, r = f16[_bits(raw, p)], exp16[_bits(raw, p)]
        if not math.isfinite(d):
            out[2] = 0.0
            return
        b = -128.0 * d
        _tables(r, _pow(exp16[_neg(_bits(raw, p))], 128), lo, hi)
        d32 = np.float64(_F32(d))
        correct = abs(d) * 128 > TINY
        s0 = s1 = t0 = t1 = 0.0
        for j in range(0, 32, 2):
            x0 = np.int64(raw[p + 2 + j])
            x0 = x0 - 256 if x0 > 127 else x0  # int8
            x1 = np.int64(raw[p + 3 + j])
            x1 = x1 - 256 if x1 > 127 else x1
            w0 = np.float64(_F32(d32 * x0)) if correct else d * x0
            w1 = np.float64(_F32(d32 * x1)) if correct else d * x1
            e0 = _term(lo, hi, x0 + 128, d, b, w0)
            e1 = _term(lo, hi, x1 + 128, d, b, w1)
            s0 += e0
            s1 += e1
            t0 += e0 * w0
            t1 += e1 * w1
        acc[0] += s0 + s1
        acc[1] += t0 + t1
    out[0] += acc[0]
    out[1] += acc[1]


@numba.njit(**_JIT)
def stats_iq4_nl(raw, nblocks, out, f16, exp16, values):  # pragma: no cover - jitted
    lo = np.empty(16)
    hi = np.empty(16)
    acc = np.zeros(2)
    for k in range(nblocks):
        p = k * 18
        d, r = f16[_bits(raw, p)], exp16[_bits(raw, p)]
        if not math.isfinite(d):
            out[2] = 0.0
            return
        b = -128.0 * d
        _tables(r, _pow(exp16[_neg(_bits(raw, p))], 128), lo, hi)
        d32 = np.float64(_F32(d))
        correct = abs(d) * 127 > TINY
        s0 = s1 = t0 = t1 = 0.0
        for j in range(16):
            q = np.int64(raw[p + 2 + j])
            v0 = values[q & 15]
            v1 = values[q >> 4]
            w0 = np.float64(_F32(d32 * v0)) if correct else d * v0
            w1 = np.float64(_F32(d32 * v1)) if correct else d * v1
            e0 = _term(lo, hi, v0 + 128, d, b, w0)
            e1 = _term(lo, hi, v1 + 128, d, b, w1)
            s0 += e0
            s1 += e1
            t0 += e0 * w0
            t1 += e1 * w1
        acc[0] += s0 + s1
        acc[1] += t0 + t1
    out[0] += acc[0]
    out[1] += acc[1]
