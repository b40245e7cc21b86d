"""The public API: one function per stage, each taking a source spec and returning a record."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ewq.arch import ModelLayout, resolve
from ewq.sources import open_source
from ewq.types import ModelIndex

__all__ = ["Inspection", "inspect"]


@dataclass(frozen=True)
class Inspection:
    """A model's tensor index and its block structure; no weight has been read."""

    index: ModelIndex
    layout: ModelLayout


def inspect(
    source: str | Path, *, download: bool = False, revision: str | None = None
) -> Inspection:
    """Index a model and group its tensors into blocks.

    Example:
        >>> r = inspect("default")                       # doctest: +SKIP
        >>> r.layout.num_blocks, r.layout.blocks[1].exec_index
        (30, 2)
    """
    with open_source(source, download=download, revision=revision) as src:
        return Inspection(src.index, resolve(src.index))
