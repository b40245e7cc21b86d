"""The kl criterion measures a bounded number of tensors and interpolates the rest
(issue: calibrated quantization at any model size, item 2)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ewq import api
from ewq.sensitivity.kl import chosen, interpolated
from ewq.types import BlockKind, ParamKind, Role, TensorKey

ROLES = [Role.ATTN_Q, Role.ATTN_K, Role.ATTN_V, Role.ATTN_O, Role.MLP_DOWN]


def _n(block: int, role: Role) -> str:
    return f"blk.{block}.{role.value}.weight"


def _cands(blocks: int, roles=ROLES) -> dict:
    out = {}
    for b in range(2, blocks + 2):
        for r in roles:
            key = TensorKey(b, r, ParamKind.WEIGHT, BlockKind.TRANSFORMER)
            out[_n(b - 2, r)] = (None, key, [])
    key = TensorKey(1, Role.EMBED, ParamKind.WEIGHT, BlockKind.EMBEDDING)
    out["token_embd.weight"] = (None, key, [])
    return out


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(2, 80), st.integers(1, len(ROLES)))
def test_the_chosen_tensors_are_bounded_and_hold_each_roles_ends(blocks, probes, nr):
    cands = _cands(blocks, ROLES[:nr])
    picked = chosen(cands, probes)
    assert picked == chosen(cands, probes)  # deterministic
    assert len(set(picked)) == len(picked) and set(picked) <= set(cands)
    ends = 1 + nr * min(2, blocks)  # the embedding, and each role's first and last
    assert len(picked) == min(len(cands), max(probes, ends))
    for r in ROLES[:nr]:
        assert _n(0, r) in picked and _n(blocks - 1, r) in picked
    assert chosen(cands, None) == sorted(cands)
    assert chosen(cands, len(cands)) == sorted(cands)


def test_the_chosen_tensors_spread_over_depth():
    """One role over 30 blocks, 5 probes: no gap between measured blocks wider than
    what halving the widest gap again and again leaves (8 of 29)."""
    cands = _cands(30, [Role.MLP_DOWN])
    picked = chosen(cands, 6)  # the embedding and 5 ffn_down
    depths = sorted(cands[n][1].exec_index for n in picked if n != "token_embd.weight")
    assert len(depths) == 5
    assert max(b - a for a, b in zip(depths, depths[1:], strict=False)) <= 8


def test_interpolation_is_log_linear_between_measured_tensors_of_a_role():
    cands = _cands(5, [Role.ATTN_V, Role.MLP_DOWN])
    measured = {
        _n(0, Role.ATTN_V): 0.01,
        _n(4, Role.ATTN_V): 0.04,
        _n(2, Role.MLP_DOWN): 0.5,
    }
    k = interpolated(cands, measured)
    for n, v in measured.items():
        assert k[n] == v
    # a quarter of the way in log space: 0.01 * 4^(1/4)
    assert k[_n(1, Role.ATTN_V)] == pytest.approx(0.01 * 4**0.25)
    assert k[_n(2, Role.ATTN_V)] == pytest.approx(math.sqrt(0.01 * 0.04))
    # past the measured ends: the nearest
    assert k[_n(0, Role.MLP_DOWN)] == k[_n(4, Role.MLP_DOWN)] == 0.5
    assert "token_embd.weight" not in k  # a role with none measured


def test_interpolation_is_linear_where_a_sensitivity_is_zero():
    cands = _cands(3, [Role.ATTN_O])
    k = interpolated(cands, {_n(0, Role.ATTN_O): 0.0, _n(2, Role.ATTN_O): 0.2})
    assert k[_n(1, Role.ATTN_O)] == pytest.approx(0.1)


def test_the_kl_criterion_measures_at_most_its_probes(tmp_path):
    """On a 6-block model: with probes=14, 14 tensors are swapped, the rest
    interpolated; every tensor still gets a damage at every type, and a measured
    tensor's damage is the one measuring every tensor gives it (same windows,
    same importance matrix)."""
    from models import byte_vocab_llama, shared_data

    src = byte_vocab_llama(tmp_path / "m.gguf", n_blocks=6, hidden=256)
    text = tmp_path / "t.txt"
    text.write_text((shared_data() / "wikitext-2" / "valid.txt").read_text()[:4000])
    m = api.imatrix(src, text, ctx=64, chunks=4)
    opts = {"calibration": text, "imatrix": m, "tokens": 64, "ctx": 64}
    part = api.sensitivity(src, "kl", type_probes=0, probes=16, **opts)
    full = api.sensitivity(src, "kl", type_probes=0, probes=None, **opts)
    d = part.details
    assert d["probes_swapped"] == d["tensors_measured"] == 16
    n = len(full.damage)
    assert full.details["tensors_measured"] == n and n > 16
    assert d["tensors_interpolated"] == n - 16
    assert set(part.damage) == set(full.damage)
    for name in d["measured_tensors"]:
        assert part.damage[name] == pytest.approx(full.damage[name])
    others = [x for x in full.damage if x not in d["measured_tensors"]]
    assert others
    for x in others:
        for t, v in full.damage[x].items():
            assert (part.of(x, t) > 0) == (v > 0), (x, t)


def test_type_factors_cost_a_model_per_type_and_zero_reads_the_table(tmp_path):
    """With --type-probes 2 the factors come from one written model per type (not
    one per tensor and type); with 0 nothing is written and a float tensor takes
    the data-free table's factor per type (prior.toml)."""
    from models import byte_vocab_llama, shared_data

    from ewq.sensitivity.prior import factor

    src = byte_vocab_llama(tmp_path / "m.gguf", n_blocks=2, hidden=256)
    text = tmp_path / "t.txt"
    text.write_text((shared_data() / "wikitext-2" / "valid.txt").read_text()[:4000])
    m = api.imatrix(src, text, ctx=64, chunks=4)
    opts = {"calibration": text, "imatrix": m, "tokens": 64, "ctx": 64}
    two = api.sensitivity(src, "kl", type_probes=2, **opts)
    types = {t for row in two.damage.values() for t in row}
    assert two.details["type_files"] == len(two.details["type_factors"]) <= len(types)
    assert len(two.details["type_probes"]) == 2
    assert all(v > 0 for v in two.details["type_factors"].values())
    none = api.sensitivity(src, "kl", type_probes=0, **opts)
    assert none.details["type_files"] == 0 and none.details["type_factors"] == {}
    name = "blk.0.ffn_down.weight"
    errors = api.sensitivity(src, "error", imatrix=m)  # prior x table factor x E
    for t in ("Q8_0", "Q6_K", "Q4_K"):
        ratio = none.of(name, t) / none.of(name, "Q4_K")
        expected = errors.of(name, t) / errors.of(name, "Q4_K")
        assert ratio == pytest.approx(expected, rel=1e-9), t
    assert factor("Q8_0") > 2  # the table holds what it says (IgLM: 4.5)
