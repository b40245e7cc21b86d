"""Reading a model: its blocks (inspect), FastEWQ's features, its EWQ analysis."""

from __future__ import annotations

from pathlib import Path

from ewq.analysis import decide, profile
from ewq.analysis.decision import check_alpha
from ewq.analysis.profile import check_eps
from ewq.arch import resolve
from ewq.config import AnalysisConfig, SourceConfig, configure
from ewq.errors import InvalidParameterError
from ewq.fast.features import Features
from ewq.fast.features import features as _features
from ewq.records import Analysis, Inspection
from ewq.sources import open_source
from ewq.stages import stage
from ewq.types import Progress

__all__ = ["analyze", "features", "inspect"]


def inspect(
    source: str | Path,
    config: SourceConfig | None = None,
    *,
    verify: bool = False,
    progress: Progress | None = None,
    **options,
) -> Inspection:
    """Index a model and group its tensors into blocks (options: the hub's
    revision, download and file, :class:`ewq.config.SourceConfig`).

    With ``verify``, also read every tensor once (streamed) and refuse NaN, Inf and
    truncated data; ``progress`` is then called after each tensor.

    Example:
        >>> r = inspect("default")                       # doctest: +SKIP
        >>> r.layout.num_blocks, r.layout.blocks[1].exec_index
        (30, 2)
    """
    cfg = configure(SourceConfig, config, options)
    spec = cfg.spec(source)
    with open_source(spec, download=cfg.download, revision=cfg.revision) as src:
        layout = resolve(src.index)
        if verify:
            done, total = 0, src.index.nbytes
            for info, _ in src.iter_tensors(check=True):
                done += info.nbytes
                if progress is not None:
                    progress(done, total, info.name)
        return Inspection(src.index, layout)


def features(
    source: str | Path,
    config: SourceConfig | None = None,
    *,
    analytic: bool = False,
    **options,
) -> Features:
    """FastEWQ's features per transformer block, from metadata only (no weight read).

    Example:
        >>> f = features("path/to/config.json")          # doctest: +SKIP
        >>> f.num_blocks, f.blocks[0].num_parameters
        (32, 218112000)
    """
    cfg = configure(SourceConfig, config, options)
    return _features(cfg.spec(source), analytic=analytic, revision=cfg.revision)


def analyze(
    source: str | Path,
    config: AnalysisConfig | None = None,
    *,
    progress: Progress | None = None,
    **options,
) -> Analysis:
    """Measure every block's entropy and apply the EWQ decision (docs/method.md 1-4).

    Options are :class:`ewq.config.AnalysisConfig`'s (alpha, eps, variant, workers,
    and the hub's revision, download, file), as a record or as keywords. Reads each
    weight matrix once, in parallel on ``workers`` threads (default: every core);
    ``progress`` gets bytes read so far. Options are checked before any file is
    opened.

    Example:
        >>> a = analyze("default")                       # doctest: +SKIP
        >>> a.decision.precision[2], len(a.decision.priority)
        (<Precision.RAW: 'raw'>, 30)
    """
    cfg = configure(AnalysisConfig, config, options)
    check_alpha(cfg.alpha)
    check_eps(cfg.eps)
    spec = cfg.spec(source)
    if cfg.sample is not None:
        return _sampled(spec, cfg, progress)
    with open_source(spec, download=cfg.download, revision=cfg.revision) as src:
        layout = resolve(src.index)
        size = f"{len(src.index.tensors)} tensors, {_gb(src.index)} GB"
        with stage("entropy analysis", size):
            prof = profile(
                src, layout, eps=cfg.eps, workers=cfg.workers, progress=progress
            )
    entropies = {b.exec_index: b.entropy for b in prof.transformer}
    decision = decide(entropies, alpha=cfg.alpha, variant=cfg.variant)
    return Analysis(src.index, layout, prof, decision)


def _gb(index) -> str:
    return f"{sum(t.nbytes for t in index.tensors) / 1e9:.2f}"


def _sampled(spec, cfg: AnalysisConfig, progress) -> Analysis:
    """The analysis from a sample of each matrix's rows (ewq.analysis.sampled);
    a hub id is read by range requests (ewq.sources.ranged), the sample only."""
    from ewq.analysis.profile import BlockEntropy, EntropyProfile
    from ewq.analysis.sampled import Z, sampled_decision
    from ewq.sources.hub import is_remote

    if cfg.eps != 0:
        raise InvalidParameterError(
            "--sample estimates the exact entropy (eps 0) only: eps > 0 needs every "
            "element's log-sum-exp first"
        )
    if is_remote(spec):
        from ewq.sources.ranged import open_ranged

        opened = open_ranged(str(spec), revision=cfg.revision)
    else:
        opened = open_source(spec, download=cfg.download, revision=cfg.revision)
    with opened as src:
        layout = resolve(src.index)
        sd = sampled_decision(
            src,
            layout,
            fraction=cfg.sample,
            alpha=cfg.alpha,
            variant=cfg.variant,
            workers=cfg.workers,
            progress=progress,
        )
        fetched = getattr(src, "bytes_fetched", None)
    p = sd.profile
    prof = EntropyProfile(
        0.0,
        tuple(
            BlockEntropy(
                b.exec_index, b.kind, b.num_parameters, b.matrix_parameters, b.entropy
            )
            for b in p.blocks
        ),
        {},
    )
    record = {
        "fraction": p.fraction,
        "seed": p.seed,
        "z": Z,
        "bytes_read": p.bytes_read,
        "bytes_total": p.bytes_total,
        "bytes_fetched": fetched,
        "rounds": sd.rounds,
        "stderr": {b.exec_index: b.stderr for b in p.blocks if b.entropy is not None},
        "undecided": list(sd.undecided),
        "open_pairs": [list(x) for x in sd.open_pairs],
    }
    return Analysis(src.index, layout, prof, sd.decision, record)
