"""Row-sampled error estimates (ewq.sampling): the interval means what
it says, a full sample is exact, and on a real quantizer the estimate agrees with
the full measurement within its interval."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ewq.sampling import Sampling, estimate, row_order, sampled


def test_the_95_percent_interval_covers_the_ratio_about_95_percent_of_the_time():
    """Over 2,000 samples of 100 rows from a skewed population of 5,000 rows, the
    interval holds the population ratio in 93-97% of them (the delta method's
    nominal 95%)."""
    rng = np.random.default_rng(0)
    den = rng.lognormal(0, 1, 5000)
    num = den * rng.lognormal(-3, 0.5, 5000)
    truth = num.sum() / den.sum()
    hits = 0
    for _ in range(2000):
        s = rng.choice(5000, 100, replace=False)
        e = estimate(num[s], den[s], 5000)
        hits += abs(e.value - truth) <= e.halfwidth
    assert 0.93 <= hits / 2000 <= 0.97


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 300), st.integers(0, 10**6))
def test_every_row_read_is_exact(total, seed):
    rng = np.random.default_rng(seed)
    num, den = rng.random(total), rng.random(total) + 0.1
    e = estimate(num, den, total)
    assert e.halfwidth == 0 and e.relative == 0
    assert e.value == pytest.approx(num.sum() / den.sum())


@settings(max_examples=50, deadline=None)
@given(st.integers(2, 2000), st.integers(0, 1000), st.text(max_size=8))
def test_the_row_order_is_a_seeded_permutation(total, seed, name):
    a = row_order(name, total, seed)
    assert sorted(a.tolist()) == list(range(total))
    assert np.array_equal(a, row_order(name, total, seed))


def test_a_sample_grows_until_the_interval_is_narrow_and_only_adds_rows():
    rng = np.random.default_rng(1)
    total = 20_000
    den = rng.lognormal(0, 1, total)
    num = {"A": den * rng.lognormal(-3, 0.8, total), "B": den * 0.01}
    asked: list[np.ndarray] = []

    def measure(rows):
        asked.append(rows)
        return {t: v[rows] for t, v in num.items()}, den[rows]

    spec = Sampling(fraction=0.001, min_rows=32, relative=0.03, seed=5)
    found = sampled("t", total, measure, spec)
    seen = np.concatenate(asked)
    assert len(np.unique(seen)) == len(seen)  # no row read twice
    assert found["A"].relative <= 0.03 and found["A"].rows == len(seen)
    assert len(asked) > 1 and len(seen) < total
    truth = num["A"].sum() / den.sum()
    assert abs(found["A"].value - truth) <= 2 * found["A"].halfwidth
    assert found["B"].value == pytest.approx(0.01)  # a constant ratio: exact
    again = sampled("t", total, measure, spec)
    assert again == found  # the same seed, the same estimate


@pytest.fixture(scope="module")
def f16(tmp_path_factory):
    from models import f16_gguf

    return f16_gguf(tmp_path_factory.mktemp("s") / "m.gguf", 2, hidden=512)


def test_sampled_errors_agree_with_the_full_measurement(f16):
    """On ggml's own quantizer (an F16 Llama, rows of 512), the sampled relative
    error of every tensor and type is within its interval of the full measurement
    for at least 90% of the pairs, within 3 half widths for all; with every row
    sampled it is the full measurement."""
    from ewq.arch import resolve
    from ewq.formats import GGUF
    from ewq.sensitivity.error import relative_errors
    from ewq.sources import open_source

    with open_source(f16) as src:
        layout = resolve(src.index)
        full = relative_errors(src, layout, GGUF)
        intervals: dict = {}
        spec = Sampling(fraction=0.05, min_rows=32, relative=0.2)
        part = relative_errors(src, layout, GGUF, sample=spec, intervals=intervals)
        whole = relative_errors(src, layout, GGUF, sample=Sampling(fraction=1.0))
    pairs = inside = 0
    for name, row in full.items():
        rec = intervals[name]
        assert rec["rows"] < rec["of"]
        for t, exact in row.items():
            rel = rec["relative_halfwidth"][t]
            got = part[name][t]
            pairs += 1
            inside += abs(got - exact) <= rel * got
            assert abs(got - exact) <= 3 * rel * got, (name, t)
            assert whole[name][t] == pytest.approx(exact, rel=1e-9)
    assert inside / pairs >= 0.9


def test_the_budget_rate_lies_between_the_best_upgrade_left_and_the_cheapest_downgrade():
    """The knapsack's marginal rate: every upgrade not taken saves less per byte,
    every downgrade taken would cost more; ewq takes the geometric mean of the
    two edges, and a tensor whose rate lies within its half width of it is the
    one the sample cannot decide."""
    from ewq.api._grow import budget_rate

    edges = [("a", 1, 1.0, 0.1), ("b", 1, 2.0, 0.1), ("a", -1, 8.0, 0.1)]
    edges += [("c", -1, 5.0, 2.0)]
    assert budget_rate(edges) == pytest.approx((2.0 * 5.0) ** 0.5)
    assert budget_rate([("a", 1, 3.0, 0.0)]) == 3.0  # nothing to give back
    # no upgrade left: the budget does not bind, no choice depends on a sample
    assert budget_rate([("a", -1, 8.0, 0.1)]) is None
    assert budget_rate([]) is None


def test_growth_samples_again_only_the_undecided_tensors_up_to_their_rows():
    """The loop: each round the tensors the plan cannot decide get 4x their rows
    (never more than the tensor has), the others none; it stops when none is left
    or none can grow, after at most three rounds."""
    from ewq.api._grow import grow
    from ewq.sensitivity import Sensitivity

    def sens(rows):
        iv = {
            n: {"rows": r, "of": 1000, "relative_halfwidth": {}}
            for n, r in rows.items()
        }
        return Sensitivity("error", {}, intervals=iv)

    asked = []

    def regrow(s, more):
        asked.append(dict(more))
        return sens({n: more.get(n, v["rows"]) for n, v in s.intervals.items()})

    def undecided_of(s, result):  # "b" stays undecided until it has every row
        return [n for n in ("b",) if s.intervals[n]["rows"] < 1000]

    start = sens({"a": 64, "b": 64})
    result, final, rounds = grow(lambda s: "plan", regrow, undecided_of, start)
    assert asked == [{"b": 256}, {"b": 1000}]
    assert final.intervals["a"]["rows"] == 64 and final.intervals["b"]["rows"] == 1000
    assert [r["undecided"] for r in rounds] == [1, 1, 0]
    assert [r["rows_added"] for r in rounds] == [192, 744, 0]


def test_a_sampled_plan_keeps_the_full_measurements_quality(f16):
    """ewq plan --sample on an F16 Llama (ggml's quantizer, rows of 512): scored by
    the full measurement (--sample 1: every row), the sampled plan's damage is within 2% of the full plan's,
    at several budgets; fewer rows are read than the model has, and a round that
    found undecided tensors sampled them again."""
    from ewq import api
    from ewq.planning import Machine
    from ewq.reports.plan_view import plan_table

    machines = [Machine("local", 1 << 62)]
    for bpw in (3.0, 4.5, 6.0):
        full = api.plan(str(f16), machines, bpw=bpw, context=0, anchor=False, sample=1)
        part = api.plan(
            str(f16), machines, bpw=bpw, context=0, anchor=False, sample=0.05
        )
        rec = part.sensitivity.details["sampling"]
        assert rec["rows_read"] < rec["rows_total"]
        assert all(r["rows_added"] > 0 for r in rec["rounds"] if r["undecided"])
        scored = sum(
            full.sensitivity.of(n, o.precision) for n, o in part.result.tensors.items()
        )
        assert scored <= 1.02 * full.result.damage + 1e-12, (bpw, rec["rounds"])
        caption = plan_table(part).caption
        assert (
            f"errors from {rec['rows_read'] / rec['rows_total']:.1%} of the rows"
            in (caption.replace("\n", " "))
        )
        assert "of the rows" not in plan_table(full).caption


def test_a_plan_samples_rows_unless_told_every_row_or_given_a_hub_id(f16):
    """The error pass's rows: 2% of a model on disk by default, every row with
    --sample 1 (no sampling record, no caption), every row of a hub id unless
    --sample is given (its download stays what it was)."""
    from ewq import api
    from ewq.planning import Machine
    from ewq.sampling import DEFAULT_FRACTION, chosen

    assert chosen(None, remote=False).fraction == DEFAULT_FRACTION == 0.02
    assert chosen(None, remote=True) is None and chosen(1.0, remote=False) is None
    assert chosen(0.1, remote=True).fraction == 0.1
    machines = [Machine("local", 1 << 62)]
    default = api.plan(str(f16), machines, bpw=4.5, context=0, anchor=False)
    rec = default.sensitivity.details["sampling"]
    assert rec["fraction"] == DEFAULT_FRACTION and rec["rows_read"] < rec["rows_total"]
    every = api.plan(str(f16), machines, bpw=4.5, context=0, anchor=False, sample=1)
    assert "sampling" not in every.sensitivity.details


def test_the_seconds_a_measurement_states_count_opening_its_source(
    f16, fresh_cache, monkeypatch
):
    """The time an error pass states (`ewq plan` prints "measured in N s") includes
    getting its reader: a Hugging Face checkpoint planned as GGUF is converted there
    first (an opening that takes 100 s of a stand-in clock plays the converter)."""
    import contextlib
    import types

    from ewq import api
    from ewq.api import _measured

    clock = [0.0]
    monkeypatch.setattr(
        _measured, "time", types.SimpleNamespace(perf_counter=lambda: clock[0])
    )
    opening = _measured._error_source

    @contextlib.contextmanager
    def slow(*args):
        clock[0] += 100.0
        with opening(*args) as found:
            yield found

    monkeypatch.setattr(_measured, "_error_source", slow)
    sens = api.sensitivity(str(f16), "error")
    assert sens.seconds == 100.0 and sens.details["cached"] is False
