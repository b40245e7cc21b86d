"""The measured selection: the damage model's plan, the plans it makes under a few
restrictions and the runtime's own recipe, measured on the calibration text by
llama.cpp; the least KL kept."""

from __future__ import annotations

from ewq.formats import FLOAT_TYPES, GGUF
from ewq.stages import stage

__all__ = ["MODEL_PLAN", "recipe_label", "select"]

MODEL_PLAN = "the damage model's plan"


def recipe_label(preset: str) -> str:
    return f"llama.cpp's {preset} recipe, upgraded with the bytes left"


def _key(r) -> tuple:
    return tuple(sorted((n, str(o.precision)) for n, o in r.tensors.items()))


def _restrictions(layout, imatrix_) -> list[tuple[str, object]]:
    """The restrictions the measured selection tries beside the model's own plan:
    no type below a floor of bits per weight, and every float tensor quantized
    (llama.cpp's presets quantize every tensor they may; measured on IgLM, a Q8_0
    token embedding beat an F32 one under Q6_K blocks by 35%, which no sum of
    per-tensor damages can see)."""
    from ewq.sensitivity import tensor_candidates

    cands = tensor_candidates(GGUF, layout, imatrix_)
    levels = sorted(
        {
            round(8 * e.nbytes / i.num_elements, 4)
            for i, _, encs in cands.values()
            for e in encs[1:]
        }
    )

    def bits(info, e) -> float:
        return 8 * e.nbytes / info.num_elements

    def make(floor, quantize_all):
        def allow(info, e) -> bool:
            own = e.type == info.dtype
            if own:
                return not (quantize_all and info.dtype in FLOAT_TYPES)
            return floor is None or bits(info, e) >= floor - 1e-9

        return allow

    out = []
    for quantize_all in (False, True):
        for floor in (None, *levels):
            if floor is None and not quantize_all:
                continue  # the model's own plan
            label = ("every float tensor quantized" if quantize_all else "") + (
                f"{', ' if quantize_all else ''}no type below {floor:g} bits"
                if floor is not None
                else ""
            )
            out.append((label, make(floor, quantize_all)))
    return out


def select(
    cfg, source, index, layout, out_layout, imatrix_, fit, result, anchor, progress
):
    """Measure the model's plan, the runtime's recipe (``anchor``: (preset, result)
    or None) and the plan's restrictions (``_restrictions``; ``fit(allow)`` plans each) on
    the calibration text with llama.cpp, and keep the one of least measured KL: a
    sum of per-tensor damages ranks plans well but misses how tensors interact."""
    from ewq.evaluate.data import load_text
    from ewq.quant.convert import as_gguf as _as_gguf
    from ewq.sensitivity.kl import Calibration

    found = [(MODEL_PLAN, result)]
    if anchor is not None:
        found.append((recipe_label(anchor[0]), anchor[1]))
    found += [
        (label, fit(allow)) for label, allow in _restrictions(out_layout, imatrix_)
    ]
    seen: set[tuple] = set()
    kept = []
    for label, r in found:  # each plan once, the first label it came by
        if r.fits and _key(r) not in seen:
            seen.add(_key(r))
            kept.append((label, r))
    found = kept
    found = found[: cfg.select_candidates]
    measured = []
    with (
        _as_gguf(source, index, layout) as (g_index, g_layout),
        Calibration(
            g_index,
            g_layout,
            load_text(cfg.calibration),
            tokens=cfg.probe_tokens,
            ctx=cfg.calibration_ctx,
            documents=cfg.documents.value,
        ) as bench,
        stage("selection", f"{len(found)} plans measured on the calibration text"),
    ):
        for k, (label, r) in enumerate(found):
            types = {n: str(o.precision) for n, o in r.tensors.items()}
            measured.append(bench.kl(types, imatrix_))
            if progress is not None:
                progress(k + 1, len(found), f"measured {label}")
    best = min(range(len(found)), key=lambda k: (measured[k], k))
    selection = {
        "measured_on": f"{bench.tokens} calibration tokens",
        "candidates": [
            {
                "plan": label,
                "predicted_kl": r.damage,
                "measured_kl": m,
                "bytes": r.total_bytes,
            }
            for (label, r), m in zip(found, measured, strict=True)
        ],
        "chosen": found[best][0],
    }
    return found[best][1], selection
