"""The runtime's own recipe as a plan's anchor.

llama.cpp's presets are per-tensor mixtures its authors tuned by measurement
(attn_v, ffn_down and the output kept higher). ewq's damage model adds one number
per tensor; where two plans differ by a few tensors, measured KL does not add up
per tensor (IgLM, data-free: the embedding as F32 and attn_output.0 as Q6_K moved
KL by -0.00006 and +0.00015 alone and by +0.00045 together), so a plan predicted a
few percent better than a preset can measure worse. The anchor makes the preset the
plan to beat:

* the recipe of every preset, as `llama-quantize --dry-run` decides it (no byte
  written); of those that fit, the one of least predicted damage (what a user
  picks: the best quant that fits), with the bytes it leaves spent on upgrades
  only (each tensor at its recipe's type or one of no more damage and no fewer
  bytes), by the same optimal allocator, is the anchor;
* the damage model's own plan replaces
  it only when its predicted damage is at most ``RESOLUTION`` times the anchor's
  (without calibration) or when it measures better on the calibration text (with
  it: the anchor is one of the plans the measured selection measures).

``RESOLUTION`` is fitted on IgLM's ten preset sizes (benchmarks/iglm_compare.sh,
data-free, the exact allocator): the plans that measured worse than the preset had
been predicted at 0.96-1.00 of its damage, those that measured better at 0.38-0.92.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from ewq.cache import code_digest, key, load_entry, runtime_id, store_entry
from ewq.config import ANCHOR_PRESETS
from ewq.formats import OutputFormat, hook
from ewq.types import ModelIndex

__all__ = ["RESOLUTION", "anchor_for", "anchored", "recipes"]

RESOLUTION = 0.94


def recipes(source, index: ModelIndex, layout, form: OutputFormat, imatrix) -> dict:
    """The output format's own recipes for ``source`` ({} for a format without),
    by preset: {tensor name: type}. Cached by the model's content, the importance
    matrix's presence (some of llama.cpp's rules look at it) and the code."""
    from ewq.quant.convert import as_gguf as _as_gguf

    if form.recipes is None:
        return {}
    params = {
        "format": form.name,
        "presets": list(ANCHOR_PRESETS),
        "imatrix": imatrix.digest() if imatrix is not None else None,
    }
    k = key(
        {
            "kind": "recipes",
            "params": params,
            "code": code_digest(form.recipes.partition(":")[0], __name__),
            "runtime": runtime_id(),
        },
        [] if index.metadata_only else index.files,
    )
    doc = load_entry("recipes", k)
    if isinstance(doc, dict) and all(isinstance(v, dict) for v in doc.values()):
        return doc
    with _as_gguf(source, index, layout) as (g_index, _):
        found = hook(form.recipes)(g_index.files[0], ANCHOR_PRESETS, imatrix=imatrix)
    store_entry("recipes", k, found)
    return found


def upgrades_of(recipe: Mapping[str, str], floor: Mapping[str, int], sens) -> Callable:
    """The options a tensor may take above a recipe: its recipe's type, or one of
    no fewer bytes (``floor``: the recipe type's bytes) and no more damage."""

    def allow(info, e) -> bool:
        own = recipe.get(info.name)
        if e.type == own:
            return True
        return e.nbytes >= floor[info.name] and sens.of(info.name, e.type) <= sens.of(
            info.name, own
        )

    return allow


def anchored(recipes_: Mapping[str, Mapping[str, str]], fit, candidates, sens):
    """(preset, result): the preset whose own recipe fits with the least damage,
    its recipe upgraded with the bytes it leaves; or None. ``fit(allow)`` runs the
    allocator restricted to what ``allow(info, encoding)`` admits; ``candidates``
    are the tensors the plan chooses types for ({name: (info, key, encodings)}). A
    recipe that gives some tensor a type ewq cannot write it as is skipped."""
    best = None
    for preset, recipe in recipes_.items():
        floor = {}
        for name, (_, _, encs) in candidates.items():
            own = next((e for e in encs if e.type == recipe.get(name)), None)
            if own is None:
                break
            floor[name] = own.nbytes
        else:
            exact = fit(lambda info, e, r=recipe: e.type == r.get(info.name))
            rank = (exact.damage, -exact.total_bytes)
            if exact.fits and (best is None or rank < best[0]):
                best = (rank, preset, upgrades_of(recipe, floor, sens))
    if best is None:
        return None
    return best[1], fit(best[2])


def anchor_for(source, index, layout, form, out_layout, sens, im, fit_with):
    """The runtime's own recipe that fits, upgraded with the bytes left
    (ewq.api._anchor), as (preset, result), or None."""
    from ewq.sensitivity import tensor_candidates

    found = recipes(source, index, layout, form, im)
    if not found:
        return None
    return anchored(found, fit_with, tensor_candidates(form, out_layout, im), sens)
