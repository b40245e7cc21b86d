"""The public API: one function per stage, each taking a source spec and returning a record."""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
from ewq.errors import EwqError
from ewq.fast.features import Features
from ewq.fast.features import features as _features
from ewq.planfile import Plan, load_plan, plan_from_doc
from ewq.planning import MODES, FitResult, Machine, block_specs, exports, fit
from ewq.quant.targets import (
    TensorTarget,
    check_plan,
    gguf_targets,
    hf_targets,
    llama_quantize_args,
)
from ewq.sources import open_source
from ewq.types import BlockKind, ModelIndex

__all__ = [
    "Analysis",
    "Planned",
    "plan",
    "Inspection",
    "Progress",
    "Quantized",
    "analyze",
    "features",
    "inspect",
    "quantize",
]

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


def features(
    source: str | Path,
    *,
    analytic: bool = False,
    revision: str | None = None,
) -> Features:
    """FastEWQ's features per transformer block, from metadata only (no weight read).

    Example:
        >>> f = features("path/to/config.json")          # doctest: +SKIP
        >>> f.num_blocks, f.blocks[0].num_parameters
        (32, 218112000)
    """
    return _features(source, analytic=analytic, revision=revision)


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


@dataclass(frozen=True)
class Quantized:
    """A written quantized model and what went into it."""

    source: str
    out: Path
    format: str
    plan: Plan
    targets: tuple[TensorTarget, ...]  # per tensor: planned type and exact bytes
    written: dict[str, str]  # per tensor: the type (gguf) or form (hf) read back
    predicted_bytes: int  # tensor data, from the size function
    file_bytes: int  # the file, or every file of the output folder
    llama_quantize_args: tuple[str, ...]  # gguf only


def quantize(
    source: str | Path,
    plan: Plan | dict | str | Path,
    out: str | Path,
    *,
    format: str = "gguf",
    threads: int | None = None,
    progress: Progress | None = None,
) -> Quantized:
    """Write ``source`` quantized block by block as ``plan`` says.

    The plan is checked against the model before anything is written; the output
    appears atomically (temporary file, then rename) or not at all.
    """
    if format not in ("gguf", "hf"):
        raise EwqError(f"unknown output format '{format}' (gguf or hf)")
    if isinstance(plan, (str, Path)):
        plan = load_plan(plan)
    elif isinstance(plan, dict):
        plan = plan_from_doc(plan)
    out = Path(out)
    with open_source(source) as src:
        index = src.index
        layout = resolve(index)
    check_plan(plan, layout, str(source))
    if format == "hf":
        return _quantize_hf(source, index, layout, plan, out, progress)
    from ewq.quant.gguf import quantize_gguf

    if index.format != "gguf":
        raise EwqError(
            f"{source}: GGUF output needs a GGUF source; no maintained converter from "
            "Hugging Face checkpoints to GGUF is installable here (use --format hf)"
        )
    targets = gguf_targets(index, layout, plan)
    path = index.files[0]
    written = quantize_gguf(path, targets, out, threads=threads, progress=progress)
    return Quantized(
        source=str(source),
        out=out,
        format=format,
        plan=plan,
        targets=tuple(targets),
        written=written,
        predicted_bytes=sum(t.nbytes for t in targets),
        file_bytes=out.stat().st_size,
        llama_quantize_args=tuple(llama_quantize_args(targets, path, str(out))),
    )


def _quantize_hf(source, index, layout, plan, out, progress) -> Quantized:
    from ewq.quant.hf import quantize_hf

    folder = Path(index.files[0]).parent
    if index.format != "safetensors" or not (folder / "config.json").is_file():
        raise EwqError(
            f"{source}: Hugging Face output needs a Hugging Face model folder "
            "(config.json and safetensors weights)"
        )
    targets = hf_targets(index, layout, plan)
    sizes = quantize_hf(folder, targets, out, progress=progress)
    return Quantized(
        source=str(source),
        out=out,
        format="hf",
        plan=plan,
        targets=tuple(targets),
        written={t.name: t.type for t in targets if t.name in sizes},
        predicted_bytes=sum(t.nbytes for t in targets),
        file_bytes=sum(f.stat().st_size for f in out.iterdir() if f.is_file()),
        llama_quantize_args=(),
    )


@dataclass(frozen=True)
class Planned:
    """A plan for a budget: the analysis it rests on, the fit, and the exports."""

    analysis: Analysis
    method: str
    format: str
    machines: tuple[Machine, ...]
    result: FitResult
    exports: dict


def plan(
    source: str | Path,
    machines: Sequence[Machine],
    *,
    method: str = "ewq",
    mode: str = "8/4",
    alpha: float = DEFAULT_ALPHA,
    variant: Variant | str = Variant.MIXED_4_8,
    format: str | None = None,
    download: bool = False,
    revision: str | None = None,
    workers: int | None = None,
    progress: Progress | None = None,
) -> Planned:
    """Fit ``source`` into ``machines`` (Algorithm 1, METHOD.md section 5).

    Sizes are the exact bytes ``format`` writes (default: gguf for a GGUF source,
    hf for a Hugging Face folder). The EWQ decision uses the mode's pair of
    precisions (8/4: 8-bit and 4-bit; 4/3 and 4/2: 4-bit and 3- or 2-bit).
    """
    if method != "ewq":
        raise EwqError(f"unknown method '{method}' (this version plans with ewq)")
    if mode not in MODES:
        raise EwqError(f"unknown mode '{mode}' (one of {', '.join(MODES)})")
    if not machines:
        raise EwqError("no machine to plan for")
    check_alpha(alpha)
    levels = MODES[mode]
    a = analyze(
        source,
        alpha=alpha,
        variant=variant,
        download=download,
        revision=revision,
        workers=workers,
        progress=progress,
    )
    fmt = format or ("gguf" if a.index.format == "gguf" else "hf")
    entropies = {b.exec_index: b.entropy for b in a.profile.transformer}
    decision = decide(
        entropies,
        alpha=alpha,
        variant=Variant(variant),
        moderate=levels[2],
        aggressive=levels[1],
    )
    a = Analysis(a.index, a.layout, a.profile, decision)
    specs = {s.exec_index: s for s in block_specs(fmt, a.layout)}
    emb = a.layout.blocks[0].exec_index
    head = a.layout.blocks[-1].exec_index
    transformer = [
        b.exec_index for b in a.layout.blocks if b.kind is BlockKind.TRANSFORMER
    ]
    result = fit(
        [specs[i] for i in transformer],
        specs[emb],
        specs[head],
        decision.precision,
        decision.priority,
        machines,
        mode=mode,
    )
    return Planned(
        a, method, fmt, tuple(machines), result, exports(result, machines, transformer)
    )
