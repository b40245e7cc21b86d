"""How much damage each type does to each tensor, by a criterion, and the
importance matrices the calibrated criteria rest on."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path

from ewq.api._measured import cache_key, damage_of, measured_errors
from ewq.api._model import analyze
from ewq.arch import ModelLayout, resolve
from ewq.cache import load_entry, store_entry
from ewq.calibration.generate import is_self, own_text_file
from ewq.calibration.imatrix import cached_imatrix, checked_imatrix
from ewq.calibration.text import calibration_text
from ewq.config import DEFAULT_PROBES
from ewq.errors import EwqError
from ewq.evaluate.backends import offload
from ewq.formats import GGUF, OutputFormat, format_for, output_format
from ewq.imatrix import Imatrix
from ewq.quant.convert import as_gguf, measured_layout
from ewq.records import Analysis
from ewq.sampling import Sampling
from ewq.sensitivity import Sensitivity, modelled
from ewq.sensitivity import criterion as criterion_spec
from ewq.sensitivity.prior import damage as error_damage
from ewq.sensitivity.prior import table
from ewq.sources import open_source
from ewq.stages import reused, stage
from ewq.types import ModelIndex, Progress

__all__ = ["imatrix", "load_imatrix", "own_text", "sensitivity"]


def sensitivity(
    source: str | Path,
    criterion: str,
    *,
    format: OutputFormat | str | None = None,
    calibration: str | Path | None = None,
    imatrix: Imatrix | None = None,
    tokens: int = 1024,
    ctx: int = 256,
    documents: str = "stream",
    type_probes: int | None = 4,
    probes: int | None = DEFAULT_PROBES,
    seed: int = 0,
    analysis: Analysis | None = None,
    revision: str | None = None,
    progress: Progress | None = None,
    sample: Sampling | None = None,
    threads: int | None = None,
) -> Sensitivity:
    """Estimated damage per tensor and type by ``criterion`` (ewq.sensitivity).

    ``sample``: the error criterion estimates each tensor's error from a random
    sample of its rows (ewq.sampling), with intervals in its details; the kl
    criterion its imatrix-weighted errors.

    ``format``: the output format whose types are measured (an entry of
    ewq.formats.FORMATS or its name; default: the one the source is written in).

    error and kl are measured once per model content and setting, then cached (the
    key: ewq.cache). error is weighted by ``imatrix`` when one is given; kl needs
    ``calibration`` (any text `ewq eval` reads) and computes an importance matrix
    from it unless ``imatrix`` is given.
    """
    form = output_format(format) if format is not None else None
    spec = criterion_spec(criterion)
    # a sampled error pass over a hub model reads only the rows it samples
    ranged = criterion == "error" and sample is not None
    download = spec.reads_weights and not ranged
    with open_source(source, download=download, revision=revision) as src:
        index = src.index
        layout = resolve(index)
        form = form or format_for(index.container)
        if criterion in ("random", "position"):
            return modelled(criterion, form, layout, seed=seed)
        if criterion == "entropy":
            a = analysis or analyze(source, progress=progress)
            h = {b.exec_index: b.entropy for b in a.profile.transformer}
            return modelled("entropy", form, layout, h)
    if criterion == "error":
        return _error(
            source, index, layout, form, imatrix, revision, progress, sample, threads
        )
    if calibration is None:
        raise EwqError("the kl criterion needs a calibration text (--calibration FILE)")
    if not form.calibrated:
        raise EwqError(
            "the kl criterion measures GGUF output through llama.cpp; for --format "
            f"{form.name} use --criterion error"
        )
    text = calibration_text(calibration)
    if imatrix is None:
        imatrix = cached_imatrix(
            source, index, layout, text, documents=documents, progress=progress
        )
    setting = {
        "tokens": tokens,
        "ctx": ctx,
        "documents": documents,
        "type_probes": type_probes,
        "probes": probes,
    }
    return _kl(
        source, index, layout, text, imatrix, setting, revision, progress, sample
    )


def own_text(cfg, source, progress: Progress | None = None):
    """``cfg`` (a PlanConfig or QuantizeConfig) with ``--calibration self`` made the
    file of the model's own sampled text (ewq.calibration.generate, cached)."""
    if not is_self(cfg.calibration):
        return cfg
    path = own_text_file(
        source,
        tokens=cfg.calibration_tokens,
        documents=cfg.documents,
        revision=cfg.revision,
        threads=cfg.threads,
        progress=progress,
    )
    return cfg.model_copy(update={"calibration": path})


def _error(
    source, index, layout, form, imatrix, revision, progress, sample, threads
) -> Sensitivity:
    """The error criterion: relative squared errors (sampled or whole), cached."""
    if imatrix is not None and not form.calibrated:
        raise EwqError("an importance matrix weighs GGUF output (--format gguf)")
    share = "every row" if sample is None else f"{sample.fraction:.0%} of the rows"
    size = f"{len(index.tensors)} tensors, {share}, each type's round trip"
    with stage("error criterion", size):
        errors, seconds, cached, intervals = measured_errors(
            source, index, layout, form, imatrix, revision, progress, sample, threads
        )
    damage = error_damage(
        measured_layout(source, index, layout, form), errors, imatrix is not None
    )
    details = {
        "measure": "prior x type factor x relative squared error"
        + (", weighted by the importance matrix" if imatrix else ""),
        "prior": table()["fitted"],
        "cached": cached,
    }
    if sample is None:
        return Sensitivity("error", damage, seconds, details)
    details["sampling"] = sampling_record(sample, intervals)
    return Sensitivity("error", damage, seconds, details, intervals)


def regrown(
    source: str | Path,
    index: ModelIndex,
    layout: ModelLayout,
    sens: Sensitivity,
    rows: Mapping[str, int],
    *,
    form: OutputFormat,
    imatrix: Imatrix | None,
    sample: Sampling,
    revision: str | None = None,
    threads: int | None = None,
) -> Sensitivity:
    """A sampled error criterion with the tensors of ``rows`` measured again from
    that many rows each (the same rows first: a sample grows as a prefix of its
    tensor's fixed order); the others as they were. ``index`` and ``layout`` are
    the source's, as the first measurement opened it."""
    grown = dataclasses.replace(sample, rows=tuple(sorted(rows.items())))
    errors, seconds, _, intervals = measured_errors(
        source, index, layout, form, imatrix, revision, None, grown, threads, set(rows)
    )
    damage = dict(sens.damage)
    damage.update(
        error_damage(
            measured_layout(source, index, layout, form), errors, imatrix is not None
        )
    )
    merged = {**(sens.intervals or {}), **intervals}
    details = dict(sens.details)
    details["sampling"] = sampling_record(sample, merged)
    return Sensitivity("error", damage, sens.seconds + seconds, details, merged)


def _kl(
    source, index, layout, text, imatrix, setting, revision, progress, sample=None
) -> Sensitivity:
    """The kl criterion: measured once per model, text and setting, then cached.
    ``sample``: the imatrix-weighted errors from a sample of each tensor's rows (a
    measured tensor's damage at its probe type is its measured KL all the same)."""
    share = "every row" if sample is None else f"{sample.fraction:.0%} of the rows"
    size = f"{len(index.tensors)} tensors, {share}, each type's round trip"
    with stage("errors weighted by the importance matrix", size):
        errors, _, _, _ = measured_errors(
            source, index, layout, GGUF, imatrix, revision, progress, sample
        )
    params = {
        "text": text.sha256,
        "imatrix": imatrix.digest(),
        **setting,
        "documents": str(setting["documents"]),
    }
    if sample is not None:  # (every row: the key it always had)
        params["sample"] = dataclasses.asdict(sample)
    k = cache_key(index, "kl", params)
    doc = load_entry("kl", k)
    if doc is not None:
        try:
            found = Sensitivity(
                "kl",
                damage_of(doc["damage"]),
                float(doc["seconds"]),
                {**doc["details"], "cached": True},
            )
        except (KeyError, TypeError, ValueError):
            pass
        else:
            reused("kl criterion", found.seconds)
            return found
    from ewq.sensitivity.kl import kl_sensitivity

    size = (
        f"a pass over {setting['tokens']:,} tokens for each of at most "
        f"{setting['probes'] or 'every'} tensors, {setting['type_probes']} "
        "tensors at every type"
    )
    with (
        stage("kl criterion", size),
        as_gguf(source, index, layout) as (g_index, g_layout),
    ):
        result = kl_sensitivity(
            g_index,
            g_layout,
            text.text,
            errors,
            imatrix=imatrix,
            progress=progress,
            **setting,
        )
    entry = {"damage": result.damage, "seconds": result.seconds}
    store_entry("kl", k, entry | {"details": dict(result.details)})
    return Sensitivity(
        "kl", result.damage, result.seconds, {**result.details, "cached": False}
    )


def sampling_record(sample: Sampling, intervals: dict[str, dict]) -> dict:
    """What a plan records of a sampled error criterion: the rule, the rows read of
    every tensor, and per tensor the widest relative half width of a type's 95%
    interval."""
    rows = sum(v["rows"] for v in intervals.values())
    total = sum(v["of"] for v in intervals.values())
    return {
        **dataclasses.asdict(sample),
        "rows_read": rows,
        "rows_total": total,
        "tensors": {
            n: {
                "rows": v["rows"],
                "of": v["of"],
                "widest_relative_halfwidth": _finite(
                    max(v["relative_halfwidth"].values(), default=0.0)
                ),
            }
            for n, v in intervals.items()
        },
    }


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None  # JSON has no Infinity


def load_imatrix(
    path: str | Path, index: ModelIndex, layout: ModelLayout, source
) -> Imatrix:
    """An importance matrix file, checked against the model (ewq.calibration)."""
    return checked_imatrix(path, index, layout, source)


def imatrix(
    source: str | Path,
    calibration: str | Path,
    *,
    ctx: int = 512,
    documents: str = "stream",
    chunks: int | None = None,
    tokens: int | None = None,
    revision: str | None = None,
    gpu_layers: int | None = None,
    progress: Progress | None = None,
) -> Imatrix:
    """The importance matrix of ``source`` (a GGUF file, or a Hugging Face checkpoint
    through llama.cpp's converter) on the text ``calibration``, computed in-process
    by llama.cpp as its llama-imatrix tool computes one (ewq.calibration.collect),
    cached by the content of model and text; at most ``chunks`` windows holding at
    most ``tokens`` tokens; ``gpu_layers`` as
    ewq.evaluate.backends.offload takes them."""
    if is_self(calibration):
        calibration = own_text_file(
            source,
            tokens=tokens,
            documents=documents,
            revision=revision,
            progress=progress,
        )
    text = calibration_text(calibration)
    with open_source(source, download=True, revision=revision) as src:
        index = src.index
        layout = resolve(index)
    with offload(gpu_layers):
        return cached_imatrix(
            source,
            index,
            layout,
            text,
            documents=documents,
            ctx=ctx,
            chunks=chunks,
            tokens=tokens,
            progress=progress,
        )
