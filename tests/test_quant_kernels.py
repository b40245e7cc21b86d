"""Entropy sums from GGML quant blocks: equal to the float64 reference over gguf-py's
dequantized values, for every supported type."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ewq.analysis import scan as scan_mod
from ewq.analysis.quantized import BLOCK, quant_stats

TYPES = sorted(BLOCK)


def reference(raw: np.ndarray, qtype: str) -> tuple[float, float]:
    """Entropy of gguf-py's values (float64 sums, shifted by the max)."""
    q = gguf.GGMLQuantizationType[qtype]
    values = gguf.quants.dequantize(raw.reshape(-1, BLOCK[qtype][1]), q)
    w = values.astype(np.float64).ravel()
    m = w.max()
    e = np.exp(w - m)
    s = e.sum()
    return float(np.log(s) - (e * (w - m)).sum() / s), float(m)


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from(TYPES),
    st.integers(1, 6),
    st.floats(1e-3, 3.0),
    st.integers(0, 2**32 - 1),
)
def test_blocks_quantized_by_llama_cpp(qtype, rows, scale, seed):
    """Realistic blocks: random weights quantized by ggml itself (heavy tails too)."""
    from ewq.quant import ggml

    rng = np.random.default_rng(seed)
    x = rng.standard_t(3, size=(rows, 512)).astype(np.float32) * np.float32(scale / 10)
    raw = ggml.quantize(x, gguf.GGMLQuantizationType[qtype]).view(np.uint8).ravel()
    got = quant_stats(qtype, raw)
    want, top = reference(raw, qtype)
    assert got is not None
    assert got.n == rows * 512
    # the sums are not shifted by the maximum: where one huge weight holds all the
    # mass (H near 0, never a real matrix) log S - T/S cancels to ~1e-13 * max w
    assert abs(got.entropy - want) <= 1e-9 * want + 1e-12 * (1 + abs(top))


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(TYPES), st.integers(1, 4), st.integers(0, 2**32 - 1))
def test_random_bytes_with_small_scales(qtype, nblocks, seed):
    """Any code pattern and any scale bits: every float16 field is drawn among
    finite values small enough for exp (the kernels decode them as gguf-py does)."""
    per, size = BLOCK[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=nblocks * size, dtype=np.uint8)
    blocks = raw.reshape(nblocks, size)
    # float16 fields (d, dmin, m) sit at these byte offsets in each block
    fields = {
        "Q4_0": [0],
        "Q4_1": [0, 2],
        "Q5_0": [0],
        "Q5_1": [0, 2],
        "Q8_0": [0],
        "IQ4_NL": [0],
        "Q2_K": [80, 82],
        "Q3_K": [108],
        "Q4_K": [0, 2],
        "Q5_K": [0, 2],
        "Q6_K": [208],
    }[qtype]
    for at in fields:
        f = rng.uniform(-0.02, 0.02, nblocks).astype(np.float16)
        blocks[:, at : at + 2] = f.view(np.uint8).reshape(nblocks, 2)
    got = quant_stats(qtype, raw)
    want, _ = reference(raw, qtype)
    assert got is not None and got.n == nblocks * per
    # an entropy near 0 (one element holds almost all the mass) is the difference
    # log S - T / S of terms near 1: float64 holds it to about 1e-12 absolute
    assert got.entropy == pytest.approx(want, rel=1e-9, abs=1e-11)


@pytest.mark.parametrize("qtype", TYPES)
def test_a_nan_scale_is_left_to_the_float_path(qtype):
    per, size = BLOCK[qtype]
    raw = np.zeros(size, dtype=np.uint8)
    at = {"Q2_K": 80, "Q3_K": 108, "Q6_K": 208}.get(qtype, 0)
    raw[at : at + 2] = np.array([np.nan], dtype=np.float16).view(np.uint8)
    assert quant_stats(qtype, raw) is None


def test_real_models_equal_the_dequantizing_path(monkeypatch):
    """The default model (Q4_1, with Q8_0 embedding): every matrix's entropy from the
    blocks equals the one through gguf-py's dequantizer, to 1e-9 relative."""
    from ewq import api

    fast = api.analyze("default").profile.tensors
    monkeypatch.setattr(scan_mod, "FAST", False)
    slow = api.analyze("default").profile.tensors
    assert fast.keys() == slow.keys()
    for name in slow:
        for a, b in zip(fast[name], slow[name], strict=True):
            assert a == pytest.approx(b, rel=1e-9, abs=0)
