"""llama.cpp's own recipes as a plan's anchor: the recipes are what llama.cpp's
quantizer writes, a plan keeps the recipe unless its damage model is clearly better,
and the measured selection measures the recipe too."""

from __future__ import annotations

import gguf
import pytest
from models import byte_vocab_llama, shared_data

from ewq import api
from ewq.api._anchor import RESOLUTION
from ewq.formats import GGUF, tensor_bytes
from ewq.planning import Machine
from ewq.sensitivity import tensor_candidates
from ewq.sources.gguf import read_header

pytest.importorskip("llama_cpp")

PRESETS = ["Q6_K", "Q5_K_S", "Q4_K_M", "IQ4_XS", "Q3_K_S", "Q2_K"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return byte_vocab_llama(tmp_path_factory.mktemp("anchor") / "m.gguf")


@pytest.fixture(scope="module")
def recipes(llama):
    from ewq.quant.gguf import preset_recipes

    return preset_recipes(llama, PRESETS)


def _bytes(path, types: dict[str, str]) -> int:
    shapes = {n: s for n, s, _, _ in read_header(path).tensors}
    return sum(
        tensor_bytes(shapes[n], gguf.GGMLQuantizationType[t]) for n, t in types.items()
    )


@pytest.mark.parametrize("preset", ["Q4_K_M", "Q3_K_S", "IQ4_XS"])
def test_dry_run_recipes_are_what_llama_cpp_writes(llama, recipes, tmp_path, preset):
    """The recipe read from `--dry-run` is, tensor for tensor, what llama.cpp's
    quantizer then writes for the preset (the GGUF it makes, read back)."""
    from ewq.quant.gguf import quantize_preset

    written = quantize_preset(llama, preset, tmp_path / "p.gguf")
    assert recipes[preset] == written
    assert len(set(written.values())) > 1  # a mixture, not one type


def test_a_preset_that_needs_an_importance_matrix_is_left_out_without_one(llama):
    from ewq.quant.gguf import preset_recipes

    assert "IQ2_M" not in preset_recipes(llama, ["IQ2_M"])


@pytest.mark.parametrize("preset", PRESETS)
def test_at_a_presets_bytes_the_recipe_stays_unless_clearly_beaten(
    llama, recipes, preset
):
    """With the preset's exact bytes, the plan is the preset's recipe, or the damage
    model's own plan predicted at most RESOLUTION x its damage; without the anchor
    the damage model's optimum, never more damage than the anchored plan."""
    budget = _bytes(llama, recipes[preset])
    p = api.plan(llama, [Machine("m", budget)], context=0)
    free = api.plan(llama, [Machine("m", budget)], context=0, anchor=False)
    a = p.anchor
    assert a is not None and a["resolution"] == RESOLUTION
    assert free.anchor is None
    assert free.result.damage <= p.result.damage + 1e-15
    assert a["model_damage"] == pytest.approx(free.result.damage)
    types = {n: str(o.precision) for n, o in p.result.tensors.items()}
    if a["chosen"]:
        assert a["model_damage"] > RESOLUTION * a["recipe_damage"]
        recipe = recipes[a["preset"]]
        cands = tensor_candidates(GGUF, p.layout)
        sens = p.sensitivity
        for name, t in types.items():  # the recipe's type, or a better, bigger one
            if t == recipe[name]:
                continue
            nbytes = {e.type: e.nbytes for e in cands[name][2]}
            assert nbytes[t] >= nbytes[recipe[name]]
            assert sens.of(name, t) <= sens.of(name, recipe[name])
        if a["preset"] == preset:  # no byte left to upgrade with
            assert types == {n: recipe[n] for n in types}
    else:
        assert a["model_damage"] <= RESOLUTION * a["recipe_damage"]
        assert types == {n: str(o.precision) for n, o in free.result.tensors.items()}
    assert p.result.total_bytes <= budget


def test_below_every_preset_there_is_no_anchor(llama, recipes):
    least = min(_bytes(llama, r) for r in recipes.values())
    p = api.plan(llama, [Machine("m", least - 1)], context=0)
    assert p.result.fits and p.anchor is None


@pytest.mark.slow
def test_the_measured_selection_measures_the_recipe(llama, tmp_path):
    """With calibration text, llama.cpp's recipe is one of the plans measured, and
    the plan kept is the one of least measured KL."""
    text = tmp_path / "t.txt"
    text.write_text((shared_data() / "wikitext-2" / "valid.txt").read_text()[:6000])
    from ewq.quant.gguf import preset_recipes

    recipe = preset_recipes(llama, ["Q4_K_M"])["Q4_K_M"]
    p = api.plan(
        llama,
        [Machine("m", _bytes(llama, recipe) + 4096)],
        context=0,
        calibration=text,
        probe_tokens=64,
        calibration_ctx=64,
        type_probes=1,
    )
    cands = p.selection["candidates"]
    labels = [c["plan"] for c in cands]
    assert any(label.startswith("llama.cpp's ") for label in labels)
    best = min(cands, key=lambda c: c["measured_kl"])
    assert p.selection["chosen"] == best["plan"]
    assert p.anchor["resolution"] is None
    assert p.anchor["chosen"] == best["plan"].startswith("llama.cpp's ")
