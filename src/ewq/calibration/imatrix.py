"""Importance matrices computed for a source, cached by the content of model and
text (as GGUF imatrix files, the format llama-imatrix writes), and given ones
checked against the model.

Where a model's second moments are small (:data:`MOMENTS_CACHED`: a small model's,
every block at once), the pass that computes the importance matrix also computes
them and caches them beside it, so that ``ewq quantize`` after ``ewq plan`` on the
same text rounds by GPTQ without a pass of its own (the default model: 400 MB of
moments, an 80 s pass spared)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from ewq.arch import ModelLayout
from ewq.cache import cache_dir, code_digest, key, runtime_id
from ewq.calibration.text import CalibrationText, calibration_text
from ewq.imatrix import Imatrix, ImatrixError, read_imatrix, write_imatrix
from ewq.quant.convert import as_gguf, gguf_layout
from ewq.types import Container, ModelIndex, Progress

__all__ = [
    "CODE",
    "MOMENTS_CACHED",
    "cached_imatrix",
    "cached_moments",
    "checked_imatrix",
    "imatrix_key",
]

#: the largest second moments (bytes, every block's at once, counted as if no two
#: weights shared an input) the importance matrix's pass also computes and caches
MOMENTS_CACHED = 1 << 30

#: the modules an importance matrix is computed by (its cache key names their code)
CODE = ("ewq.calibration.collect", "ewq.imatrix")


def imatrix_key(index: ModelIndex, params: dict) -> str:
    """The cache key of an importance matrix of ``index``'s model under ``params``."""
    doc = {
        "kind": "imatrix",
        "params": params,
        "code": code_digest(*CODE),
        "runtime": runtime_id(),
    }
    return key(doc, [] if index.metadata_only else index.files)


def cached_imatrix(
    source,
    index: ModelIndex,
    layout: ModelLayout,
    text: CalibrationText | str | Path,
    *,
    documents: str = "stream",
    ctx: int = 512,
    chunks: int | None = None,
    tokens: int | None = None,
    threads: int | None = None,
    progress: Progress | None = None,
) -> Imatrix:
    """The importance matrix of ``source`` on ``text``, computed in-process by
    llama.cpp as its llama-imatrix tool computes one (ewq.calibration.collect) on the
    GGUF the source is or converts to, cached by the content of model and text."""
    text = calibration_text(text)
    params = {
        "text": text.sha256,
        "ctx": ctx,
        "documents": str(documents),
        "chunks": chunks,
        "tokens": tokens,
    }
    stored = cache_dir() / "imatrix" / f"{imatrix_key(index, params)}.gguf"
    if stored.is_file():
        try:
            # computed, not a user's file: no file name in the plan's record
            return dataclasses.replace(read_imatrix(stored), file=None)
        except (ImatrixError, OSError):
            pass
    from ewq.calibration.collect import compute_imatrix, compute_moments

    how = {"ctx": ctx, "documents": documents, "chunks": chunks, "tokens": tokens}
    how |= {"threads": threads, "progress": progress}
    moments = None
    with as_gguf(source, index, layout) as (g_index, _):
        if _moments_bytes(g_index) <= MOMENTS_CACHED:
            m, moments = compute_moments(
                g_index.files[0],
                text.text,
                dataset=text.name,
                label="importance matrix",
                **how,
            )
            assert m is not None
        else:
            m = compute_imatrix(g_index.files[0], text.text, dataset=text.name, **how)
        if moments is not None:
            _store_moments(moments, _moments_path(g_index, params))
    try:
        write_imatrix(m, stored)
    except OSError:
        pass  # a read-only cache only costs a new computation next time
    return m


def _moments_bytes(index: ModelIndex) -> int:
    """An upper bound of the second moments of every dense block weight's input."""
    return sum(
        4 * t.shape[-1] ** 2
        for t in index.tensors
        if len(t.shape) == 2 and t.name.startswith("blk.")
    )


def _moments_path(index: ModelIndex, params: dict) -> Path:
    doc = {"kind": "moments", "params": params, "code": code_digest(*CODE)}
    doc["runtime"] = runtime_id()
    return cache_dir() / "moments" / f"{key(doc, index.files)}.npz"


def _store_moments(moments, path: Path) -> None:
    """The matrices (float32) and which weight shares whose, in one .npz written
    whole or not at all."""
    from ewq.fileio import atomic_path

    meta = json.dumps({"groups": moments.groups, "rows": moments.rows}).encode()
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            # a file object: np.savez given a name would add ".npz" to it
            np.savez(fh, __groups__=np.frombuffer(meta, np.uint8), **moments.matrices)
    except OSError:
        pass  # no room: quantize runs its own pass


def cached_moments(
    index: ModelIndex,
    text: CalibrationText,
    *,
    ctx: int,
    documents: str,
    tokens: int | None,
):
    """The importance matrix and every block's second moments of the GGUF model
    ``index`` on ``text``, as a plan's pass cached them, or None."""
    from ewq.calibration.collect import Moments

    params = {
        "text": text.sha256,
        "ctx": ctx,
        "documents": str(documents),
        "chunks": None,
        "tokens": tokens,
    }
    path = _moments_path(index, params)
    stored = cache_dir() / "imatrix" / f"{imatrix_key(index, params)}.gguf"
    if not (path.is_file() and stored.is_file()):
        return None
    try:
        imatrix = dataclasses.replace(read_imatrix(stored), file=None)
        with np.load(path) as npz:
            meta = json.loads(npz["__groups__"].tobytes())
            matrices = {n: npz[n] for n in npz.files if n != "__groups__"}
    except (ImatrixError, OSError, ValueError, KeyError):
        return None
    return imatrix, Moments(matrices, meta["groups"], meta["rows"])


def checked_imatrix(
    path: str | Path, index: ModelIndex, layout: ModelLayout, source
) -> Imatrix:
    """An importance matrix file, checked against the GGUF ``source`` is (or, for a
    Hugging Face checkpoint, the GGUF llama.cpp's converter will write)."""
    m = read_imatrix(path)
    if index.container != Container.GGUF:
        index, _ = gguf_layout(source, index, layout)
    m.check({t.name: t.shape for t in index.tensors}, str(path))
    return m
