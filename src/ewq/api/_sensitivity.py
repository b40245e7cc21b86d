"""How much damage each precision does to each block, by a criterion."""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

from ewq.api._model import analyze
from ewq.arch import ModelLayout, resolve
from ewq.errors import EwqError
from ewq.records import Analysis
from ewq.sensitivity import CRITERIA, Sensitivity, modelled
from ewq.sources import open_source
from ewq.types import ModelIndex, Precision, Progress

__all__ = ["sensitivity"]


def sensitivity(
    source: str | Path,
    criterion: str,
    *,
    fmt: str | None = None,
    calibration: str | Path | None = None,
    windows: int = 4,
    ctx: int = 256,
    probe: Precision | None = Precision.Q4,
    seed: int = 0,
    analysis: Analysis | None = None,
    revision: str | None = None,
    progress: Progress | None = None,
) -> Sensitivity:
    """Estimated damage per block and precision by ``criterion`` (ewq.sensitivity).

    error and kl are measured once per model file and setting, then cached
    (sensitivity/cache.py); kl reads ``calibration`` (any text `ewq eval` reads).
    """
    from ewq.sensitivity.cache import cached

    if criterion not in CRITERIA:
        raise EwqError(
            f"unknown criterion '{criterion}' (one of {', '.join(CRITERIA)})"
        )
    measured = criterion in ("error", "kl")  # these read weights: a hub id downloads
    with open_source(source, download=measured, revision=revision) as src:
        index = src.index
        layout = resolve(index)
        fmt = fmt or ("gguf" if index.format == "gguf" else "hf")
        if criterion in ("random", "position"):
            return modelled(criterion, fmt, layout, seed=seed)
        if criterion == "entropy":
            a = analysis or analyze(source, progress=progress)
            h = {b.exec_index: b.entropy for b in a.profile.transformer}
            return modelled("entropy", fmt, layout, h)
        if criterion == "error":
            from ewq.sensitivity.error import error_sensitivity

            if index.format != "gguf" and fmt == "gguf":

                def measure() -> Sensitivity:
                    # measured on the file quantize will start from: the converted
                    # GGUF, in a scratch file that is removed afterwards
                    with (
                        _as_gguf(source, index, layout) as (conv, conv_layout),
                        open_source(conv.files[0]) as gsrc,
                    ):
                        return error_sensitivity(
                            gsrc, conv_layout, "gguf", progress=progress
                        )

                return cached(index, "error", fmt, {}, measure)
            return cached(
                index,
                "error",
                fmt,
                {},
                lambda: error_sensitivity(src, layout, fmt, progress=progress),
            )
    from ewq.evaluate.data import load_text
    from ewq.sensitivity.kl import kl_sensitivity

    if calibration is None:
        raise EwqError("the kl criterion needs a calibration text")
    text = load_text(calibration)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]

    def measure_kl(index: ModelIndex, layout: ModelLayout) -> Sensitivity:
        return kl_sensitivity(
            index,
            layout,
            text,
            windows=windows,
            ctx=ctx,
            probe=probe,
            # measured (or read from the cache) only when kl itself is measured
            error=(
                sensitivity(source, "error", fmt="gguf", revision=revision)
                if probe
                else None
            ),
            progress=progress,
        )

    def measure() -> Sensitivity:
        if index.format == "gguf" or fmt != "gguf":  # the second: a clear error
            return measure_kl(index, layout)
        with _as_gguf(source, index, layout) as (conv, conv_layout):
            return measure_kl(conv, conv_layout)

    return cached(
        index,
        "kl",
        "gguf",
        {
            "text": digest,
            "windows": windows,
            "ctx": ctx,
            "probe": probe.value if probe is not None else "all",
        },
        measure,
    )


@contextlib.contextmanager
def _as_gguf(source, index: ModelIndex, layout: ModelLayout):
    """A Hugging Face checkpoint converted to a scratch GGUF in ewq's cache folder,
    for the criteria that measure the GGUF itself (removed afterwards)."""
    from ewq.quant.convert import converted
    from ewq.sensitivity.cache import cache_dir

    with converted(source, index, layout, cache_dir() / "scratch") as found:
        yield found
