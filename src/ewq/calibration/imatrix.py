"""Importance matrices computed for a source, cached by the content of model and
text (as GGUF imatrix files, the format llama-imatrix writes), and given ones
checked against the model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ewq.arch import ModelLayout
from ewq.cache import cache_dir, code_digest, key, runtime_id
from ewq.calibration.text import CalibrationText, calibration_text
from ewq.imatrix import Imatrix, ImatrixError, read_imatrix, write_imatrix
from ewq.quant.convert import as_gguf, gguf_layout
from ewq.types import Container, ModelIndex, Progress

__all__ = ["CODE", "cached_imatrix", "checked_imatrix", "imatrix_key"]

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
    from ewq.calibration.collect import compute_imatrix

    with as_gguf(source, index, layout) as (g_index, _):
        m = compute_imatrix(
            g_index.files[0],
            text.text,
            ctx=ctx,
            documents=documents,
            chunks=chunks,
            tokens=tokens,
            dataset=text.name,
            threads=threads,
            progress=progress,
        )
    try:
        write_imatrix(m, stored)
    except OSError:
        pass  # a read-only cache only costs a new computation next time
    return m


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
