"""The public API: one function per stage, each taking a source spec and returning a record."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ewq.arch import ModelLayout, resolve
from ewq.sources import open_source
from ewq.types import ModelIndex

__all__ = ["Inspection", "Progress", "inspect"]

#: progress callback: (bytes done, bytes in all, name of the tensor just read)
Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class Inspection:
    """A model's tensor index and its block structure; no weight has been read."""

    index: ModelIndex
    layout: ModelLayout


def inspect(
    source: str | Path,
    *,
    download: bool = False,
    revision: str | None = None,
    verify: bool = False,
    progress: Progress | None = None,
) -> Inspection:
    """Index a model and group its tensors into blocks.

    With ``verify``, also read every tensor once (streamed) and refuse NaN, Inf and
    truncated data; ``progress`` is then called after each tensor.

    Example:
        >>> r = inspect("default")                       # doctest: +SKIP
        >>> r.layout.num_blocks, r.layout.blocks[1].exec_index
        (30, 2)
    """
    with open_source(source, download=download, revision=revision) as src:
        layout = resolve(src.index)
        if verify:
            done, total = 0, src.index.nbytes
            for info, _ in src.iter_tensors(check=True):
                done += info.nbytes
                if progress is not None:
                    progress(done, total, info.name)
        return Inspection(src.index, layout)
