"""Entropy sums straight from GGML's K-quant blocks (Q2_K to Q6_K), 256 values per
block in 16 or 8 sub-blocks with 6- or 8-bit sub-scales: the method and the helpers
are those of ``_quant_kernels`` (see its docstring)."""

from __future__ import annotations

import math

import numba
import numpy as np

from ewq.analysis._quant_kernels import (
    _F32,
    _JIT,
    TINY,
    _bits,
    _counted,
    _neg,
    _powers2,
    _rpow,
    _signed,
)


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


# Over 60 lines, kept whole: one jitted loop over the file's blocks that decodes each
# as ggml lays Q6_K out (ggml-quants.c, dequantize_row_q6_K) and reduces it in place;
# its steps read the same local buffers, which helper calls would pass back and forth.
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
