"""The error criterion's measurement, cached: its key (ewq.cache: content or, for a
sampled pass, identity), the reader it measures through (a local file, the GGUF a
Hugging Face checkpoint converts to, or a hub model's range mirror), and the pass."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time

from ewq.arch import resolve
from ewq.cache import code_digest, key, load_entry, runtime_id, store_entry
from ewq.quant.convert import as_gguf
from ewq.sensitivity import criterion as criterion_spec
from ewq.sources import open_source
from ewq.stages import reused
from ewq.types import ModelIndex


def damage_of(doc) -> dict[str, dict[str, float]]:
    return {
        str(n): {str(t): float(v) for t, v in row.items()} for n, row in doc.items()
    }


def cache_key(index: ModelIndex, kind: str, params: dict, content: bool = True) -> str:
    code = code_digest(*criterion_spec(kind).code)
    return key(
        {"kind": kind, "params": params, "code": code, "runtime": runtime_id()},
        [] if index.metadata_only else index.files,
        content,
    )


def measured_errors(
    source,
    index,
    layout,
    form,
    imatrix,
    revision,
    progress,
    sample=None,
    threads=None,
    only=None,
):
    """The relative errors per tensor and type (cached): (errors, seconds, cached,
    the sample's intervals per tensor: {} when every row was read). ``only``: of
    these tensors alone."""
    from ewq.sensitivity.error import relative_errors

    params = {
        "format": form.name,
        "imatrix": imatrix.digest() if imatrix else None,
        "sample": dataclasses.asdict(sample) if sample is not None else None,
    }
    if only is not None:
        params["only"] = sorted(only)
    # the seconds a measurement took count the scratch conversion it may need
    opened = time.perf_counter()
    with _error_source(source, index, layout, form, revision) as (src, m_layout):
        # a sampled pass names the files without reading them all (see ewq.cache)
        k = cache_key(src.index, "error", params, content=sample is None)
        doc = load_entry("error", k)
        if doc is not None:
            try:
                errors, seconds = damage_of(doc["errors"]), float(doc["seconds"])
                found = errors, seconds, True, dict(doc.get("intervals") or {})
            except (KeyError, TypeError, ValueError):
                pass
            else:
                reused("errors", seconds)
                return found
        intervals: dict[str, dict] = {}
        how = {
            "progress": progress,
            "sample": sample,
            "intervals": intervals,
            "threads": threads or os.cpu_count() or 1,
            "only": only,
        }
        w = imatrix if form.calibrated else None
        errors = relative_errors(src, m_layout, form, imatrix=w, **how)
        seconds = time.perf_counter() - opened
        fetched = getattr(src, "bytes_fetched", None)
    doc = {"errors": errors, "seconds": seconds, "intervals": intervals}
    if fetched is not None:
        doc["bytes_fetched"] = fetched
    store_entry("error", k, doc)
    return errors, seconds, False, intervals


@contextlib.contextmanager
def _error_source(source, index, layout, form, revision):
    """The reader and layout the error criterion measures: a hub model opened by
    its headers only (a sampled pass) is read through a sparse mirror filled by
    range requests (ewq.sources.ranged), the rows it samples and nothing else;
    GGUF output from a Hugging Face checkpoint, through the converted GGUF."""
    if index.metadata_only and form.container == index.container:
        from ewq.sources.ranged import open_ranged

        with open_ranged(source, revision=revision) as src:
            yield src, resolve(src.index)
        return
    if form.needs_conversion(index.container):
        if index.metadata_only:  # the converter needs the whole checkpoint
            with open_source(source, download=True, revision=revision) as full:
                index, layout = full.index, resolve(full.index)
        with (
            as_gguf(source, index, layout) as (g_index, g_layout),
            open_source(g_index.files[0]) as gsrc,
        ):
            yield gsrc, g_layout
        return
    with open_source(source, download=True, revision=revision) as src:
        yield src, layout
