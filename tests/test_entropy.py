"""The entropy kernel: exact against a float64 reference, and its defining properties."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ewq.analysis.entropy import EntropyStats, entropy, entropy_reference
from ewq.sources import open_source

DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16, np.float64]
finite = st.floats(-8, 8, allow_nan=False, allow_infinity=False, width=32)
tensors = arrays(np.float32, st.integers(1, 3000), elements=finite)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eps", [0.0, 0.01])
@pytest.mark.parametrize("scale", [0.02, 1.0, 30.0])
def test_matches_reference(dtype, eps, scale):
    rng = np.random.default_rng(7)
    x = (rng.standard_normal(2_500_001) * scale).astype(dtype)  # spans several chunks
    assert entropy(x, eps) == pytest.approx(entropy_reference(x, eps), rel=1e-9)


def test_real_tensors_of_the_default_model():
    with open_source("default") as src:
        for i, (info, array) in enumerate(src.iter_tensors()):
            if i % 25 == 0:  # the embedding, norms, Q4_1 and every other kind
                ref = entropy_reference(array)
                assert entropy(array) == pytest.approx(ref, rel=1e-9), info.name


@settings(max_examples=60, deadline=None)
@given(tensors, st.randoms())
def test_permutation_invariant(x, rnd):
    y = x.copy()
    rnd.shuffle(y)
    assert entropy(y) == pytest.approx(entropy(x), rel=1e-12)


@settings(max_examples=60, deadline=None)
@given(tensors)
def test_bounded_by_log_n(x):
    assert entropy(x) <= math.log(x.size) * (1 + 1e-12)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 5000), finite, st.sampled_from(DTYPES))
def test_constant_tensor_is_log_n(n, value, dtype):
    x = np.full(n, value, dtype=dtype)
    assert entropy(x) == pytest.approx(math.log(n), rel=1e-12, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(tensors)
def test_scaling_up_lowers_entropy(x):
    if np.ptp(x) < 1e-3:
        return  # constant tensors keep ln(n) at every scale
    assert entropy(2 * x) < entropy(x)


def test_stats_merge_is_order_free():
    rng = np.random.default_rng(3)
    parts = [rng.standard_normal(n) * s for n, s in [(10, 1), (1000, 5), (7, 0.1)]]
    whole = np.concatenate(parts)

    def stats(a):
        m = a.max()
        e = np.exp(a - m)
        return EntropyStats(a.size, m, e.sum(), np.dot(e, a - m))

    a = stats(parts[0]).merge(stats(parts[1])).merge(stats(parts[2]))
    b = stats(parts[2]).merge(stats(parts[0]).merge(stats(parts[1])))
    assert a.entropy == pytest.approx(entropy_reference(whole), rel=1e-12)
    assert b.entropy == pytest.approx(a.entropy, rel=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bad_input(dtype):
    x = np.ones(8, dtype)
    x[3] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        entropy(x)
    with pytest.raises(ValueError, match="empty"):
        entropy(np.zeros(0, dtype))
    with pytest.raises(ValueError, match="eps must be >= 0"):
        entropy(np.ones(3, dtype), eps=-1)
