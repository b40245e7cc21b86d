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


def test_a_whole_sample_is_the_analysis():
    """--sample 1 reads every unit: the same entropies (to rounding) and the same
    decision as the exact analysis, nothing undecided."""
    from ewq import api

    full = api.analyze("default")
    whole = api.analyze("default", sample=1.0)
    assert whole.sampling["bytes_read"] == whole.sampling["bytes_total"]
    assert whole.sampling["undecided"] == [] and whole.sampling["open_pairs"] == []
    for a, b in zip(full.profile.transformer, whole.profile.transformer, strict=True):
        assert b.entropy == pytest.approx(a.entropy, rel=1e-9)
    assert whole.decision.precision == full.decision.precision


def test_blocks_whose_interval_holds_a_boundary_are_undecided():
    from ewq.analysis.decision import decide
    from ewq.analysis.sampled import BlockEstimate, open_pairs, undecided
    from ewq.config import Variant
    from ewq.types import BlockKind

    h = {1: 1.0, 2: 2.0, 3: 3.0, 4: 4.0, 5: 4.05}
    se = {1: 0.0, 2: 0.01, 3: 0.2, 4: 0.01, 5: 0.01}
    blocks = [
        BlockEstimate(i, BlockKind.TRANSFORMER, 10, 10, h[i], se[i], 1, 2) for i in h
    ]
    d = decide(h, alpha=1.0, variant=Variant.MIXED_4_8)
    assert d.mean == pytest.approx(2.81)
    # block 3's interval, 3 +- 2.576 * 0.2, holds the mean; block 1 is exact
    assert undecided(blocks, d) == (3,)
    assert open_pairs(blocks, d) == ((4, 5),)


def test_analyze_with_a_sample_reports_what_it_read(monkeypatch, capsys, tmp_path):
    import json

    from test_cli import run

    out = tmp_path / "a.json"
    code, stdout, err = run(
        monkeypatch,
        capsys,
        "analyze",
        "default",
        "--sample",
        "0.05",
        "--json",
        str(out),
    )
    assert code == 0, err
    rec = json.loads(out.read_text())["sampling"]
    assert 0 < rec["bytes_read"] < rec["bytes_total"]
    assert rec["halfwidth"] and all(v >= 0 for v in rec["halfwidth"].values())
    assert "sampled:" in stdout
    code, _, err = run(
        monkeypatch, capsys, "analyze", "default", "--sample", "0.05", "--eps", "0.01"
    )
    assert code != 0 and "eps 0" in err and "Traceback" not in err


def test_how_units_are_read_does_not_change_the_estimate(monkeypatch):
    """On the default model (Q4_1, Q8_0): units read in runs of one unit, or one
    float value at a time instead of from the quant blocks, or grown from an earlier
    round's units, give the estimates one plain read per unit gives."""
    import ewq.analysis.sampled as sampled

    with open_source("default") as src:
        layout = resolve(src.index)
        first = sample_profile(src, layout, fraction=0.05, seed=3)
        memo: dict = {}
        sample_profile(src, layout, fraction=0.01, seed=3, memo=memo)
        grown = sample_profile(src, layout, fraction=0.05, seed=3, memo=memo)
        monkeypatch.setattr(sampled, "RUN_ELEMENTS", 1)  # every run one unit
        monkeypatch.setattr(sampled, "FAST", False)  # dequantized floats
        plain = sample_profile(src, layout, fraction=0.05, seed=3)
    for x, y, z in zip(first.blocks, grown.blocks, plain.blocks, strict=True):
        if x.entropy is None:
            continue
        assert x.entropy == pytest.approx(z.entropy, rel=1e-12)
        assert x.stderr == pytest.approx(z.stderr, rel=1e-6, abs=1e-15)
        assert (y.entropy, y.stderr) == (x.entropy, x.stderr)
    assert first.bytes_read == grown.bytes_read == plain.bytes_read
