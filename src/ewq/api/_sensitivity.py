"""How much damage each type does to each tensor, by a criterion, and the
importance matrices the calibrated criteria rest on."""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Mapping
from pathlib import Path

from ewq.api._measured import as_gguf, cache_key, damage_of, measured_errors
from ewq.api._model import analyze
from ewq.arch import ModelLayout, resolve
from ewq.cache import load_entry, store_entry
from ewq.errors import EwqError
from ewq.formats import format_for, output_format
from ewq.imatrix import Imatrix, read_imatrix
from ewq.records import Analysis
from ewq.sampling import Sampling
from ewq.sensitivity import Sensitivity, modelled
from ewq.sensitivity import criterion as criterion_spec
from ewq.sensitivity.prior import damage as error_damage
from ewq.sensitivity.prior import table
from ewq.sources import open_source
from ewq.types import ModelIndex, Progress

__all__ = ["imatrix", "load_imatrix", "sensitivity"]


def sensitivity(
    source: str | Path,
    criterion: str,
    *,
    fmt: str | None = None,
    calibration: str | Path | None = None,
    imatrix: Imatrix | None = None,
    tokens: int = 1024,
    ctx: int = 256,
    documents: str = "stream",
    type_probes: int | None = 4,
    seed: int = 0,
    analysis: Analysis | None = None,
    revision: str | None = None,
    progress: Progress | None = None,
    sample: Sampling | None = None,
    threads: int | None = None,
) -> Sensitivity:
    """Estimated damage per tensor and type by ``criterion`` (ewq.sensitivity).

    ``sample``: the error criterion estimates each tensor's error from a random
    sample of its rows (ewq.sampling), with intervals in its details.

    error and kl are measured once per model content and setting, then cached (the
    key: ewq.cache). error is weighted by ``imatrix`` when one is given; kl needs
    ``calibration`` (any text `ewq eval` reads) and computes an importance matrix
    from it unless ``imatrix`` is given.
    """
    spec = criterion_spec(criterion)
    # a sampled error pass over a hub model reads only the rows it samples
    ranged = criterion == "error" and sample is not None
    download = spec.reads_weights and not ranged
    with open_source(source, download=download, revision=revision) as src:
        index = src.index
        layout = resolve(index)
        fmt = fmt or format_for(index.container)
        if criterion in ("random", "position"):
            return modelled(criterion, fmt, layout, seed=seed)
        if criterion == "entropy":
            a = analysis or analyze(source, progress=progress)
            h = {b.exec_index: b.entropy for b in a.profile.transformer}
            return modelled("entropy", fmt, layout, h)
    if criterion == "error":
        return _error(
            source, index, layout, fmt, imatrix, revision, progress, sample, threads
        )
    if calibration is None:
        raise EwqError("the kl criterion needs a calibration text (--calibration FILE)")
    if not output_format(fmt).calibrated:
        raise EwqError(
            "the kl criterion measures GGUF output through llama.cpp; for --format "
            f"{fmt} use --criterion error"
        )
    from ewq.evaluate.data import load_text

    text = load_text(calibration)
    if imatrix is None:
        imatrix = _imatrix_for(
            source, index, layout, text, calibration, documents, revision, progress
        )
    setting = {
        "tokens": tokens,
        "ctx": ctx,
        "documents": documents,
        "type_probes": type_probes,
    }
    return _kl(source, index, layout, text, imatrix, setting, revision, progress)


def _error(
    source, index, layout, fmt, imatrix, revision, progress, sample, threads
) -> Sensitivity:
    """The error criterion: relative squared errors (sampled or whole), cached."""
    if imatrix is not None and not output_format(fmt).calibrated:
        raise EwqError("an importance matrix weighs GGUF output (--format gguf)")
    errors, seconds, cached, intervals = measured_errors(
        source, index, layout, fmt, imatrix, revision, progress, sample, threads
    )
    damage = error_damage(
        _gguf_layout(source, index, layout, fmt), errors, imatrix is not None
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
    fmt: str,
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
        source, index, layout, fmt, imatrix, revision, None, grown, threads, set(rows)
    )
    damage = dict(sens.damage)
    damage.update(
        error_damage(
            _gguf_layout(source, index, layout, fmt), errors, imatrix is not None
        )
    )
    merged = {**(sens.intervals or {}), **intervals}
    details = dict(sens.details)
    details["sampling"] = sampling_record(sample, merged)
    return Sensitivity("error", damage, sens.seconds + seconds, details, merged)


def _kl(
    source, index, layout, text, imatrix, setting, revision, progress
) -> Sensitivity:
    """The kl criterion: measured once per model, text and setting, then cached."""
    errors, _, _, _ = measured_errors(
        source, index, layout, "gguf", imatrix, revision, progress
    )
    params = {
        "text": hashlib.sha256(text.encode()).hexdigest(),
        "imatrix": imatrix.digest(),
        **setting,
        "documents": str(setting["documents"]),
    }
    k = cache_key(index, "kl", params)
    doc = load_entry("kl", k)
    if doc is not None:
        try:
            return Sensitivity(
                "kl",
                damage_of(doc["damage"]),
                float(doc["seconds"]),
                {**doc["details"], "cached": True},
            )
        except (KeyError, TypeError, ValueError):
            pass
    from ewq.sensitivity.kl import kl_sensitivity

    with as_gguf(source, index, layout) as (g_index, g_layout):
        result = kl_sensitivity(
            g_index,
            g_layout,
            text,
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


def _gguf_layout(source, index, layout, fmt: str) -> ModelLayout:
    """The layout the errors are measured on (for GGUF from a checkpoint: the file
    llama.cpp's converter writes)."""
    if output_format(fmt).needs_conversion(index.container):
        from ewq.quant.convert import gguf_layout

        return gguf_layout(source, index, layout)[1]
    return layout


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
    """An importance matrix file, checked against the GGUF ``source`` is (or, for a
    Hugging Face checkpoint, the GGUF llama.cpp's converter will write)."""
    m = read_imatrix(path)
    if index.container != "gguf":
        from ewq.quant.convert import gguf_layout

        index, _ = gguf_layout(source, index, layout)
    m.check({t.name: t.shape for t in index.tensors}, str(path))
    return m


def _imatrix_for(
    source,
    index,
    layout,
    text,
    calibration,
    documents,
    revision,
    progress,
    ctx: int = 512,
    chunks: int | None = None,
) -> Imatrix:
    """The importance matrix of ``source`` on ``text``, cached (as a GGUF imatrix
    file) by the content of model and text."""
    from ewq.cache import cache_dir
    from ewq.imatrix import ImatrixError, write_imatrix

    digest = hashlib.sha256(text.encode()).hexdigest()
    params = {"text": digest, "ctx": ctx, "documents": str(documents), "chunks": chunks}
    stored = cache_dir() / "imatrix" / f"{cache_key(index, 'imatrix', params)}.gguf"
    if stored.is_file():
        try:
            # computed, not a user's file: no file name in the plan's record
            return dataclasses.replace(read_imatrix(stored), file=None)
        except (ImatrixError, OSError):
            pass
    from ewq.evaluate.activations import compute_imatrix

    with as_gguf(source, index, layout) as (g_index, _):
        m = compute_imatrix(
            g_index.files[0],
            text,
            ctx=ctx,
            documents=documents,
            chunks=chunks,
            dataset=Path(str(calibration)).name,
            progress=progress,
        )
    try:
        write_imatrix(m, stored)
    except OSError:
        pass  # a read-only cache only costs a new computation next time
    return m


def imatrix(
    source: str | Path,
    calibration: str | Path,
    *,
    ctx: int = 512,
    documents: str = "stream",
    chunks: int | None = None,
    revision: str | None = None,
    progress: Progress | None = None,
) -> Imatrix:
    """The importance matrix of ``source`` (a GGUF file, or a Hugging Face checkpoint
    through llama.cpp's converter) on the text ``calibration``, computed in-process
    by llama.cpp as its llama-imatrix tool computes one (ewq.evaluate.activations),
    cached by the content of model and text."""
    from ewq.evaluate.data import load_text

    text = load_text(calibration)
    with open_source(source, download=True, revision=revision) as src:
        index = src.index
        layout = resolve(index)
    return _imatrix_for(
        source,
        index,
        layout,
        text,
        calibration,
        documents,
        revision,
        progress,
        ctx=ctx,
        chunks=chunks,
    )
