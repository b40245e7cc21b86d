"""The sampled entropy estimator (issue 17's study): exact when it reads everything,
honest intervals where the blocks differ in the bulk of their weights."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ewq.analysis.entropy import entropy_reference
from ewq.analysis.sampled import Z, estimate, sample_profile
from ewq.arch import resolve
from ewq.sources import open_source


def test_estimate_is_exact_when_every_unit_is_read():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((40, 16)) * 0.5
    stats = []
    for row in w:
        m = row.max()
        e = np.exp(row - m)
        stats.append((m, e.sum(), (e * (row - m)).sum()))
    h, var = estimate(stats, units=40)
    assert var == 0.0
    assert h == pytest.approx(entropy_reference(w.ravel()), abs=1e-12)


def test_intervals_cover_on_gaussian_rows():
    """400 rows of Gaussian weights, 40 sampled: over 200 draws the exact entropy
    lies inside the 99% interval about 99% of the time (>= 95% asserted)."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((400, 64)) * 0.3
    exact = entropy_reference(w.ravel())
    stats = []
    for row in w:
        m = row.max()
        e = np.exp(row - m)
        stats.append((m, e.sum(), (e * (row - m)).sum()))
    inside = 0
    for _ in range(200):
        pick = rng.choice(400, 40, replace=False)
        h, var = estimate([stats[i] for i in pick], units=400)
        inside += abs(h - exact) <= Z * math.sqrt(var)
    assert inside >= 190


def test_sample_profile_reads_a_share_and_is_deterministic(tmp_path):
    from models import build_hf

    folder = build_hf("llama", tmp_path / "m", seed=3)
    with open_source(folder) as src:
        layout = resolve(src.index)
        a = sample_profile(src, layout, fraction=0.05, seed=7)
        b = sample_profile(src, layout, fraction=0.05, seed=7)
        full = sample_profile(src, layout, fraction=1.0)
    assert a == b
    assert 0 < a.bytes_read < a.bytes_total == full.bytes_read
    assert all(x.stderr == 0 for x in full.blocks)
    with open_source(folder) as src:
        from ewq.analysis.profile import profile

        exact = profile(src, resolve(src.index))
    for x, y in zip(full.blocks, exact.blocks, strict=True):
        assert (x.entropy is None) == (y.entropy is None)
        if x.entropy is not None:
            assert x.entropy == pytest.approx(y.entropy, abs=1e-9)
