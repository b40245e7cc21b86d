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


@numba.njit(**_JIT)
def stats_q2_k(raw, nblocks, out, f16, exp16):  # pragma: no cover - jitted
    counts = np.zeros(16 * 4, np.int64)
    acc = np.zeros(2)
    fd, cd, fm, cm = np.empty(4), np.empty(4), np.empty(4), np.empty(4)
    for k in range(nblocks):
        p = k * 84
        d, rd = f16[_bits(raw, p + 80)], exp16[_bits(raw, p + 80)]
        dmin, rm = f16[_bits(raw, p + 82)], exp16[_neg(_bits(raw, p + 82))]
        if not (math.isfinite(d) and math.isfinite(dmin)):
            out[2] = 0.0
            return
        for h in range(2):  # 128 elements: 32 bytes, four 2-bit codes each
            for i in range(32):
                q = np.int64(raw[p + 16 + h * 32 + i])
                j = 8 * h + i // 16  # sub-block of 16 of the code at shift 0
                counts[j * 4 + (q & 3)] += 1
                counts[(j + 2) * 4 + ((q >> 2) & 3)] += 1
                counts[(j + 4) * 4 + ((q >> 4) & 3)] += 1
                counts[(j + 6) * 4 + (q >> 6)] += 1
        _powers2(rd, fd, cd)
        _powers2(rm, fm, cm)
        d32, m32 = _F32(d), _F32(dmin)
        for j in range(16):
            sc, mn = np.int64(raw[p + j] & 15), np.int64(raw[p + j] >> 4)
            big_a = _F32(d32 * _F32(sc))
            big_b = -_F32(m32 * _F32(mn))
            _counted(
                counts,
                j * 4,
                4,
                d * sc,
                -dmin * mn,
                _rpow(fm, cm, mn),
                _rpow(fd, cd, sc),
                big_a,
                0,
                big_b,
                acc,
            )
    out[0] += acc[0]
    out[1] += acc[1]


@numba.njit(**_JIT)
def stats_q3_k(raw, nblocks, out, f16, exp16):  # pragma: no cover - jitted
    counts = np.zeros(16 * 8, np.int64)
    acc = np.zeros(2)
    fd, cd, fn, cn = np.empty(8), np.empty(5), np.empty(8), np.empty(5)
    for k in range(nblocks):
        p = k * 110
        d, rd = f16[_bits(raw, p + 108)], exp16[_bits(raw, p + 108)]
        rn = exp16[_neg(_bits(raw, p + 108))]
        if not math.isfinite(d):
            out[2] = 0.0
            return
        for h in range(2):  # 128 elements: four 2-bit codes per byte, a high bit each
            for i in range(32):
                q = np.int64(raw[p + 32 + h * 32 + i])
                hm = np.int64(raw[p + i])
                j = 8 * h + i // 16
                for s in range(4):  # code = q + 4 in 0..7; the high bit is bit 4h + s
                    c = ((q >> (2 * s)) & 3) + 4 * ((hm >> (4 * h + s)) & 1)
                    counts[(j + 2 * s) * 8 + c] += 1
        _powers2(rd, fd, cd)
        _powers2(rn, fn, cn)
        d32 = _F32(d)
        for j in range(16):
            lo4 = (np.int64(raw[p + 96 + j % 8]) >> (4 * (j // 8))) & 15
            hi2 = (np.int64(raw[p + 104 + j % 4]) >> (2 * (j // 4))) & 3
            sc = (lo4 | (hi2 << 4)) - 32
            r, rinv = _signed(fd, cd, fn, cn, sc)
            dl = d * sc
            big_a = _F32(d32 * _F32(sc))
            _counted(
                counts,
                j * 8,
                8,
                dl,
                -4.0 * dl,
                (rinv * rinv) * (rinv * rinv),  # exp(-4 dl)
                r,
                big_a,
                -4,
                _F32(0.0),
                acc,
            )
    out[0] += acc[0]
    out[1] += acc[1]


@numba.njit(inline="always", **_JIT)
def _scale_min_k4(raw, at, j):  # pragma: no cover - jitted
    """Q4_K / Q5_K: the 6-bit scale and min of sub-block j from the 12 bytes at ``at``."""
    if j < 4:
        return np.int64(raw[at + j] & 63), np.int64(raw[at + 4 + j] & 63)
    sc = (np.int64(raw[at + 4 + j]) & 15) | ((np.int64(raw[at + j - 4]) >> 2) & 48)
    mn = (np.int64(raw[at + 4 + j]) >> 4) | ((np.int64(raw[at + j]) >> 2) & 48)
    return sc, mn


@numba.njit(**_JIT)
def _qk(raw, nblocks, out, f16, exp16, size, qh_at, qs_at, five):  # pragma: no cover
    ncodes = 32 if five else 16
    counts = np.zeros(8 * ncodes, np.int64)
    acc = np.zeros(2)
    fd, cd, fm, cm = np.empty(8), np.empty(8), np.empty(8), np.empty(8)
    for k in range(nblocks):
        p = k * size
        d, rd = f16[_bits(raw, p)], exp16[_bits(raw, p)]
        dmin, rm = f16[_bits(raw, p + 2)], exp16[_neg(_bits(raw, p + 2))]
        if not (math.isfinite(d) and math.isfinite(dmin)):
            out[2] = 0.0
            return
        for chunk in range(4):  # 64 elements: sub-blocks 2 chunk (low), 2 chunk + 1
            lo_at = (2 * chunk) * ncodes
            hi_at = lo_at + ncodes
            for i in range(32):
                q = np.int64(raw[p + qs_at + chunk * 32 + i])
                c0 = q & 15
                c1 = q >> 4
                if five:
                    h = np.int64(raw[p + qh_at + i])
                    c0 |= ((h >> (2 * chunk)) & 1) << 4
                    c1 |= ((h >> (2 * chunk + 1)) & 1) << 4
                counts[lo_at + c0] += 1
                counts[hi_at + c1] += 1
        _powers2(rd, fd, cd)
        _powers2(rm, fm, cm)
        d32, m32 = _F32(d), _F32(dmin)
        for j in range(8):
            sc, mn = _scale_min_k4(raw, p + 4, j)
            _counted(
                counts,
                j * ncodes,
                ncodes,
                d * sc,
                -dmin * mn,
                _rpow(fm, cm, mn),  # rm = exp(-dmin)
                _rpow(fd, cd, sc),
                _F32(d32 * _F32(sc)),
                0,
                -_F32(m32 * _F32(mn)),
                acc,
            )
    out[0] += acc[0]
    out[1] += acc[1]


@numba.njit(**_JIT)
def stats_q4_k(raw, nblocks, out, f16, exp16):  # pragma: no cover - jitted
    _qk(raw, nblocks, out, f16, exp16, 144, 0, 16, False)


@numba.njit(**_JIT)
def stats_q5_k(raw, nblocks, out, f16, exp16):  # pragma: no cover - jitted
    _qk(raw, nblocks, out, f16, exp16, 176, 16, 48, True)


@numba.njit(**_JIT)
def stats_q6_k(raw, nblocks, out, f16, exp16):  # pragma: no cover - jitted
    """Q6_K: 16 sub-blocks of 16 elements, 6-bit codes (low 4 bits in ql, high 2 in
    qh), int8 scales. Sub-block j = 8 h + 2 m + i // 16 holds, for i in its 16, the
    code of nibble m // 2 of ql[64 h + 32 (m % 2) + i] and bits 2m of qh[32 h + i]."""
    s_all = 0.0
    t_all = 0.0
    fd, cd, fn, cn = np.empty(16), np.empty(9), np.empty(16), np.empty(9)
    lo = np.empty(16)
    hi = np.empty(4)
    for k in range(nblocks):
        p = k * 210
        d, rd = f16[_bits(raw, p + 208)], exp16[_bits(raw, p + 208)]
        if not math.isfinite(d):
            out[2] = 0.0
            return
        _powers2(rd, fd, cd)
        _powers2(exp16[_neg(_bits(raw, p + 208))], fn, cn)
        d32 = _F32(d)
        for h in range(2):
            for m in range(4):
                for ih in range(2):
                    j = 8 * h + 2 * m + ih
                    sc = np.int64(raw[p + 192 + j])
                    sc = sc - 256 if sc > 127 else sc
                    r, rinv = _signed(fd, cd, fn, cn, sc)
                    a = d * sc
                    big = np.float64(_F32(d32 * _F32(sc)))
                    r2 = r * r  # lo[i] = r^i, hi[i] = r^(16 i)
                    r4 = r2 * r2
                    r8 = r4 * r4
                    lo[0] = 1.0
                    lo[1] = r
                    lo[2] = r2
                    lo[3] = r2 * r
                    for i in range(4, 16):
                        lo[i] = lo[i & 3] * (
                            r4 if i < 8 else (r8 if i < 12 else r8 * r4)
                        )
                    r16 = r8 * r8
                    hi[0] = 1.0
                    hi[1] = r16
                    hi[2] = r16 * r16
                    hi[3] = hi[2] * r16
                    correct = abs(a) * 32 > TINY
                    s0 = s1 = t0 = t1 = 0.0  # two chains: even and odd elements
                    ql_at = p + 64 * h + 32 * (m % 2) + 16 * ih
                    qh_at = p + 128 + 32 * h + 16 * ih
                    shl = 4 * (m // 2)
                    shh = 2 * m
                    for i in range(0, 16, 2):
                        c0 = ((np.int64(raw[ql_at + i]) >> shl) & 15) | (
                            ((np.int64(raw[qh_at + i]) >> shh) & 3) << 4
                        )
                        c1 = ((np.int64(raw[ql_at + i + 1]) >> shl) & 15) | (
                            ((np.int64(raw[qh_at + i + 1]) >> shh) & 3) << 4
                        )
                        x0 = lo[c0 & 15] * hi[c0 >> 4]
                        x1 = lo[c1 & 15] * hi[c1 >> 4]
                        w0 = a * (c0 - 32)
                        w1 = a * (c1 - 32)
                        if correct:
                            v0 = np.float64(_F32(big * (c0 - 32)))
                            v1 = np.float64(_F32(big * (c1 - 32)))
                            x0 *= 1.0 + (v0 - w0)
                            x1 *= 1.0 + (v1 - w1)
                            w0, w1 = v0, v1
                        s0 += x0
                        s1 += x1
                        t0 += x0 * w0
                        t1 += x1 * w1
                    s0 += s1
                    t0 += t1
                    e = rinv * rinv  # exp(b) = exp(-32 a) = rinv^32
                    e *= e
                    e *= e
                    e *= e
                    e *= e
                    s_all += e * s0
                    t_all += e * t0
    out[0] += s_all
    out[1] += t_all
