"""The public API: one function per stage, each taking a source spec and returning a record."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ewq.analysis import (
    DEFAULT_ALPHA,
    Decision,
    EntropyProfile,
    Variant,
    decide,
    profile,
)
from ewq.analysis.decision import check_alpha
from ewq.analysis.profile import check_eps
from ewq.arch import ModelLayout, resolve
from ewq.sources import open_source
from ewq.types import ModelIndex

__all__ = ["Analysis", "Inspection", "Progress", "analyze", "inspect"]

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


@dataclass(frozen=True)
class Analysis:
    """A model's block entropies and the EWQ decision drawn from them."""

    index: ModelIndex
    layout: ModelLayout
    profile: EntropyProfile
    decision: Decision


def analyze(
    source: str | Path,
    *,
    alpha: float = DEFAULT_ALPHA,
    eps: float = 0.0,
    variant: Variant | str = Variant.MIXED_4_8,
    download: bool = False,
    revision: str | None = None,
    workers: int | None = None,
    progress: Progress | None = None,
) -> Analysis:
    """Measure every block's entropy and apply the EWQ decision (METHOD.md 1-4).

    Reads each weight matrix once, in parallel on ``workers`` threads (default: every
    core); ``progress`` gets bytes read so far. Parameters are checked before any
    file is opened.

    Example:
        >>> a = analyze("default")                       # doctest: +SKIP
        >>> a.decision.precision[2], len(a.decision.priority)
        (<Precision.RAW: 'raw'>, 30)
    """
    check_alpha(alpha)
    check_eps(eps)
    variant = Variant(variant)
    with open_source(source, download=download, revision=revision) as src:
        layout = resolve(src.index)
        prof = profile(src, layout, eps=eps, workers=workers, progress=progress)
    entropies = {b.exec_index: b.entropy for b in prof.transformer}
    decision = decide(entropies, alpha=alpha, variant=variant)  # type: ignore[arg-type]
    return Analysis(src.index, layout, prof, decision)
