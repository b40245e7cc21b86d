"""The public API: one function per stage, each taking a source spec and returning a record."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
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
from ewq.formats import FORMATS, offered
from ewq.outputs import check_output
from ewq.planfile import Plan, load_plan, plan_from_doc
from ewq.planning import (
    MODES,
    BlockSpec,
    FitResult,
    Machine,
    Option,
    Runtime,
    block_specs,
    exports,
    fit,
    fit_optimal,
    route_for,
    runtime_memory,
)
from ewq.quant.targets import (
    TensorTarget,
    check_plan,
    gguf_targets,
    hf_targets,
    llama_quantize_args,
)
from ewq.sensitivity import CRITERIA, Sensitivity, modelled
from ewq.sources import open_source
from ewq.types import ModelIndex, Precision

log = logging.getLogger(__name__)

__all__ = [
    "Analysis",
    "Planned",
    "sensitivity",
    "plan",
    "Inspection",
    "Progress",
    "Quantized",
    "analyze",
    "build_dataset",
    "evaluate",
    "features",
    "train_fastewq",
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
    format: str | None = None,
    revision: str | None = None,
    threads: int | None = None,
    force: bool = False,
    record: Callable[[Quantized], None] | None = None,
    progress: Progress | None = None,
) -> Quantized:
    """Write ``source`` quantized block by block as ``plan`` says, in ``format``
    (default: the format the plan was sized for, else gguf).

    The plan is checked against the model before anything is written; the output
    appears atomically (temporary file, then rename) or not at all. An output that
    would overwrite an input, or an existing folder, is refused (ewq.outputs);
    ``force`` replaces an earlier ewq output folder. ``record(result)`` runs after
    the output is checked and before it is renamed into place: the CLI writes the
    provenance record there, so a model never sits beside a missing or stale one.
    """
    plan_path = plan if isinstance(plan, (str, Path)) else None
    if isinstance(plan, (str, Path)):
        plan = load_plan(plan)
    elif isinstance(plan, dict):
        plan = plan_from_doc(plan)
    # the format the plan was sized for, unless told otherwise
    format = format or plan.format or "gguf"
    if format not in FORMATS:
        raise EwqError(
            f"unknown output format '{format}' (one of {', '.join(FORMATS)})"
        )
    if plan.format is not None and plan.format != format:
        log.warning(
            "the plan sized its blocks as %s; writing %s, the sizes will differ",
            plan.format,
            format,
        )
    out = Path(out)
    # a hub id is downloaded into the hub cache: quantizing reads every weight
    with open_source(source, download=True, revision=revision) as src:
        index = src.index
        layout = resolve(index)
    check_plan(plan, layout, str(source))
    check_output(
        out,
        (*index.files, plan_path, str(source)),
        folder=format == "hf",
        force=force,
    )
    wanted = {b.precision for b in plan.blocks} | {
        plan.embedding.precision,
        plan.head.precision,
    }
    missing = sorted(p.value for p in wanted - set(offered(format)))
    if missing:
        raise EwqError(
            f"the {format} format does not offer {', '.join(missing)} (it offers "
            f"{', '.join(p.value for p in offered(format))})"
        )
    if format == "hf":
        return _quantize_hf(
            source, index, layout, plan, out, progress, record, revision
        )
    if index.format != "gguf":
        from ewq.quant.convert import converted

        with converted(source, index, layout, out.parent) as (index, layout):
            check_plan(plan, layout, str(source))
            shown = f"{Path(str(source)).name}-converted.gguf"
            return _quantize_gguf(
                source, index, layout, plan, out, threads, progress, record, shown
            )
    return _quantize_gguf(source, index, layout, plan, out, threads, progress, record)


def _quantize_gguf(
    source, index, layout, plan, out, threads, progress, record, shown=None
):
    """GGUF -> per-block quantized GGUF by llama.cpp's quantizer; ``shown`` names the
    input in the llama-quantize command recorded (a converted file is temporary)."""
    from ewq.quant.gguf import quantize_gguf

    arch = index.config.get("general.architecture")
    declared = index.config.get(f"{arch}.block_count")
    if declared != layout.num_blocks:
        # llama.cpp asserts on a block count that disagrees with the tensors
        # (SIGABRT): refuse it here, in one line
        raise EwqError(
            f"{source}: its metadata declares {arch}.block_count = {declared!r}, but "
            f"its tensors hold {layout.num_blocks} blocks; llama.cpp cannot load it"
        )
    targets = gguf_targets(index, layout, plan)
    path = index.files[0]
    commit, made = _recorder(
        record,
        source=str(source),
        out=out,
        format="gguf",
        plan=plan,
        targets=tuple(targets),
        predicted_bytes=sum(t.nbytes for t in targets),
        llama_quantize_args=tuple(
            llama_quantize_args(targets, shown or path, str(out))
        ),
    )
    quantize_gguf(
        path,
        targets,
        out,
        threads=threads,
        progress=progress,
        before_commit=commit,
        metadata=_gguf_provenance(source, plan),
    )
    return made[0]


def _gguf_provenance(source, plan: Plan) -> dict[str, str]:
    """``ewq.*`` keys for the GGUF's own metadata, beside llama.cpp's ``general.*``:
    readable by anything that reads GGUF (the full record is PATH.ewq.json)."""
    from ewq import __version__

    counts: dict[str, int] = {}
    for b in plan.blocks:
        counts[b.precision.value] = counts.get(b.precision.value, 0) + 1
    doc = json.dumps(plan.to_doc(), sort_keys=True).encode()
    name = str(source)
    return {
        "ewq.version": __version__,
        "ewq.source": name if len(name.encode()) <= 127 else Path(name).name,
        "ewq.plan.method": plan.method,
        "ewq.plan.blocks": ", ".join(f"{n} {p}" for p, n in counts.items()),
        "ewq.plan.embedding": plan.embedding.precision.value,
        "ewq.plan.head": plan.head.precision.value,
        "ewq.plan.sha256": hashlib.sha256(doc).hexdigest(),
    }


def _recorder(record: Callable[[Quantized], None] | None, **fields):
    """The hook a quantizer calls between its check and its rename: the result
    record (types written, file bytes of the temporary output), handed to
    ``record`` before the output appears."""
    made: list[Quantized] = []

    def commit(tmp: Path, written: Mapping[str, object]) -> None:
        files = [tmp] if tmp.is_file() else [f for f in tmp.iterdir() if f.is_file()]
        if fields["format"] == "hf":
            written = {t.name: t.type for t in fields["targets"] if t.name in written}
        made.append(
            Quantized(
                written=dict(written),
                file_bytes=sum(f.stat().st_size for f in files),
                **fields,
            )
        )
        if record is not None:
            record(made[0])

    return commit, made


def _quantize_hf(
    source, index, layout, plan, out, progress, record, revision=None
) -> Quantized:
    from ewq.quant.hf import quantize_hf

    folder = Path(index.files[0]).parent
    if index.format != "safetensors" or not (folder / "config.json").is_file():
        raise EwqError(
            f"{source}: Hugging Face output needs a Hugging Face model folder "
            "(config.json and safetensors weights)"
        )
    targets = hf_targets(index, layout, plan)
    commit, made = _recorder(
        record,
        source=str(source),
        out=out,
        format="hf",
        plan=plan,
        targets=tuple(targets),
        predicted_bytes=sum(t.nbytes for t in targets),
        llama_quantize_args=(),
    )
    from ewq import __version__
    from ewq.reports.card import hub_revision, model_card
    from ewq.sources.hub import is_hub_id, split_spec

    name = str(source)
    card = model_card(
        source=name,
        revision=revision or hub_revision(str(folder)),
        hub_id=split_spec(name)[0]
        if is_hub_id(name) and not Path(name).exists()
        else None,
        plan=plan,
        targets=targets,
        predicted_bytes=sum(t.nbytes for t in targets),
        ewq_version=__version__,
        record=f"{out.name}.ewq.json",
    )
    quantize_hf(
        folder, targets, out, progress=progress, before_commit=commit, card=card
    )
    return made[0]


@dataclass(frozen=True)
class Planned:
    """A plan for a budget: what it rests on, the fit, and the exports.

    ``analysis`` is the EWQ analysis (method ewq); for the FastEWQ methods it is None
    and ``predicted`` holds the classifier's choice per block. ``sensitivity`` is
    the criterion's damage table (optimal allocator); ``runtime`` the memory the
    runtime adds per machine (KV cache and buffers), when a context was given.
    """

    index: ModelIndex
    layout: ModelLayout
    method: str
    format: str
    machines: tuple[Machine, ...]
    decision: Mapping[int, Precision]
    priority: tuple[int, ...]
    result: FitResult
    exports: dict
    analysis: Analysis | None = None
    predicted: Mapping[int, bool] | None = None
    criterion: str = "entropy"
    allocator: str = "ladder"
    sensitivity: Sensitivity | None = None
    runtime: Runtime | None = None


METHODS = ("ewq", "fast", "fast-train")
ALLOCATORS = ("optimal", "ladder")
DEFAULT_CRITERION = "error"
DEFAULT_CONTEXT = 2048  # tokens the runtime holds, unless told otherwise


def plan(
    source: str | Path,
    machines: Sequence[Machine],
    *,
    method: str = "ewq",
    criterion: str | None = None,
    allocator: str | None = None,
    calibration: str | Path | None = None,
    context: int = DEFAULT_CONTEXT,
    mode: str = "8/4",
    alpha: float = DEFAULT_ALPHA,
    variant: Variant | str = Variant.MIXED_4_8,
    format: str | None = None,
    classifier: str | Path | None = None,
    download: bool = False,
    revision: str | None = None,
    workers: int | None = None,
    progress: Progress | None = None,
) -> Planned:
    """Fit ``source`` into ``machines``.

    ``criterion`` says how much damage each precision does to each block (see
    ewq.sensitivity): entropy (the paper's score), error (round trip through the
    real quantizer, data-free; the default), kl (calibrated on the text
    ``calibration``; the default when one is given), random or position
    (baselines). ``allocator`` optimal picks, per block, the precision
    of least total damage that fits (planning/allocate.py); ladder is the paper's
    Algorithm 1 (METHOD.md section 5) and needs the entropy criterion. ``method``
    fast and fast-train read only metadata and let the FastEWQ classifier choose
    the blocks (Algorithm 2, ladder only). Sizes are the exact bytes ``format``
    writes (default: gguf for a GGUF source, hf otherwise). ``context`` > 0 adds the
    runtime's KV cache for that many tokens and its compute buffers to every
    machine (planning/runtime.py).
    """
    if method not in METHODS:
        raise EwqError(f"unknown method '{method}' (one of {', '.join(METHODS)})")
    if mode not in MODES:
        raise EwqError(f"unknown mode '{mode}' (one of {', '.join(MODES)})")
    if not machines:
        raise EwqError("no machine to plan for")
    if method != "ewq":
        criterion = criterion or "entropy"
        allocator = allocator or "ladder"
        if allocator != "ladder" or criterion != "entropy":
            raise EwqError(
                f"method {method} plans by the paper's ladder (Algorithm 2): use "
                "--method ewq for other criteria or the optimal allocator"
            )
    if criterion is None:
        criterion = "entropy" if allocator == "ladder" else DEFAULT_CRITERION
        if allocator != "ladder" and calibration is not None:
            criterion = "kl"
    if criterion not in CRITERIA:
        raise EwqError(
            f"unknown criterion '{criterion}' (one of {', '.join(CRITERIA)})"
        )
    allocator = allocator or ("ladder" if criterion == "entropy" else "optimal")
    if allocator not in ALLOCATORS:
        raise EwqError(
            f"unknown allocator '{allocator}' (one of {', '.join(ALLOCATORS)})"
        )
    if allocator == "ladder" and criterion != "entropy":
        raise EwqError(
            "the ladder (the paper's Algorithm 1) orders blocks by entropy: use "
            "--criterion entropy with it, or --allocator optimal"
        )
    if criterion == "kl" and calibration is None:
        raise EwqError("the kl criterion needs a calibration text (--calibration FILE)")
    if context < 0:
        raise EwqError("--context must be >= 0")
    check_alpha(alpha)
    levels = MODES[mode]
    analysis = predicted = None
    if method == "ewq":
        analysis = analyze(
            source,
            alpha=alpha,
            variant=variant,
            download=download,
            revision=revision,
            workers=workers,
            progress=progress,
        )
        entropies = {b.exec_index: b.entropy for b in analysis.profile.transformer}
        d = decide(
            entropies,
            alpha=alpha,
            variant=Variant(variant),
            moderate=levels[2],
            aggressive=levels[1],
        )
        analysis = Analysis(analysis.index, analysis.layout, analysis.profile, d)
        index, layout = analysis.index, analysis.layout
        decision, priority = d.precision, d.priority
    else:
        feats = _features(source, revision=revision)
        index, layout = feats.index, feats.layout
        predicted, decision, priority = fast_decision(
            feats, method, levels[2], classifier
        )
    fmt = format or ("gguf" if index.format == "gguf" else "hf")
    if fmt not in FORMATS:
        raise EwqError(f"unknown format '{fmt}' (one of {', '.join(FORMATS)})")
    # sizes, runtime and route are those of the file the plan is for: for GGUF from
    # a Hugging Face checkpoint, the GGUF llama.cpp's converter will write
    out_index, out_layout = index, layout
    if fmt == "gguf" and index.format != "gguf":
        from ewq.quant.convert import gguf_layout

        out_index, out_layout = gguf_layout(source, index, layout)
    runtime = None
    if context:
        try:
            runtime = runtime_memory(out_index, out_layout, context)
        except ValueError as exc:
            raise EwqError(
                f"{source}: cannot size the runtime's KV cache ({exc}); plan the "
                "weights alone with --context 0"
            ) from None
        machines = tuple(
            replace(m, reserve=m.reserve + runtime.stage_bytes) for m in machines
        )
    specs = {s.exec_index: s for s in block_specs(fmt, out_layout)}
    if runtime is not None:
        specs = {
            i: BlockSpec(
                i,
                s.num_parameters,
                {p: b + runtime.kv_bytes.get(i, 0) for p, b in s.bytes.items()},
                s.entropy,
            )
            for i, s in specs.items()
        }
    emb = out_layout.blocks[0].exec_index
    head = out_layout.blocks[-1].exec_index
    transformer = [b.exec_index for b in out_layout.transformer_blocks]
    sens = None
    route = route_for(out_index, out_layout, fmt, runtime)
    if allocator == "ladder":
        result = fit(
            [specs[i] for i in transformer],
            specs[emb],
            specs[head],
            decision,
            priority,
            machines,
            mode=mode,
            route=route,
        )
    else:
        sens = sensitivity(
            source,
            criterion,
            fmt=fmt,
            calibration=calibration,
            analysis=analysis,
            revision=revision,
            progress=progress,
        )
        options = {
            i: [
                Option(p, nbytes, sens.damage[i][p])
                for p, nbytes in specs[i].bytes.items()
            ]
            for i in specs
        }
        params = {i: specs[i].num_parameters for i in specs}
        result = fit_optimal(options, params, machines, mode="optimal", route=route)
    if runtime is not None:  # sizes in the result are weights + KV: report weights
        result = replace(
            result,
            bytes={i: b - runtime.kv_bytes.get(i, 0) for i, b in result.bytes.items()},
            total_bytes=result.total_bytes - sum(runtime.kv_bytes.values()),
            smallest_bytes=result.smallest_bytes - sum(runtime.kv_bytes.values()),
        )
    return Planned(
        index,
        layout,
        method,
        fmt,
        tuple(machines),
        decision,
        tuple(priority),
        result,
        exports(result, machines, transformer, fmt),
        analysis,
        predicted,
        criterion,
        allocator,
        sens,
        runtime,
    )


def sensitivity(
    source: str | Path,
    criterion: str,
    *,
    fmt: str | None = None,
    calibration: str | Path | None = None,
    windows: int = 4,
    ctx: int = 256,
    probe: Precision | None = Precision.Q4,
    seed: int = 0,
    analysis: Analysis | None = None,
    revision: str | None = None,
    progress: Progress | None = None,
) -> Sensitivity:
    """Estimated damage per block and precision by ``criterion`` (ewq.sensitivity).

    error and kl are measured once per model file and setting, then cached
    (sensitivity/cache.py); kl reads ``calibration`` (any text `ewq eval` reads).
    """
    from ewq.sensitivity.cache import cached

    if criterion not in CRITERIA:
        raise EwqError(
            f"unknown criterion '{criterion}' (one of {', '.join(CRITERIA)})"
        )
    measured = criterion in ("error", "kl")  # these read weights: a hub id downloads
    with open_source(source, download=measured, revision=revision) as src:
        index = src.index
        layout = resolve(index)
        fmt = fmt or ("gguf" if index.format == "gguf" else "hf")
        if criterion in ("random", "position"):
            return modelled(criterion, fmt, layout, seed=seed)
        if criterion == "entropy":
            a = analysis or analyze(source, progress=progress)
            h = {b.exec_index: b.entropy for b in a.profile.transformer}
            return modelled("entropy", fmt, layout, h)
        if criterion == "error":
            from ewq.sensitivity.error import error_sensitivity

            if index.format != "gguf" and fmt == "gguf":

                def measure() -> Sensitivity:
                    # measured on the file quantize will start from: the converted
                    # GGUF, in a scratch file that is removed afterwards
                    with (
                        _as_gguf(source, index, layout) as (conv, conv_layout),
                        open_source(conv.files[0]) as gsrc,
                    ):
                        return error_sensitivity(
                            gsrc, conv_layout, "gguf", progress=progress
                        )

                return cached(index, "error", fmt, {}, measure)
            return cached(
                index,
                "error",
                fmt,
                {},
                lambda: error_sensitivity(src, layout, fmt, progress=progress),
            )
    from ewq.evaluate.data import load_text
    from ewq.sensitivity.kl import kl_sensitivity

    if calibration is None:
        raise EwqError("the kl criterion needs a calibration text")
    text = load_text(calibration)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]

    def measure_kl(index: ModelIndex, layout: ModelLayout) -> Sensitivity:
        return kl_sensitivity(
            index,
            layout,
            text,
            windows=windows,
            ctx=ctx,
            probe=probe,
            # measured (or read from the cache) only when kl itself is measured
            error=(
                sensitivity(source, "error", fmt="gguf", revision=revision)
                if probe
                else None
            ),
            progress=progress,
        )

    def measure() -> Sensitivity:
        if index.format == "gguf" or fmt != "gguf":  # the second: a clear error
            return measure_kl(index, layout)
        with _as_gguf(source, index, layout) as (conv, conv_layout):
            return measure_kl(conv, conv_layout)

    return cached(
        index,
        "kl",
        "gguf",
        {
            "text": digest,
            "windows": windows,
            "ctx": ctx,
            "probe": probe.value if probe is not None else "all",
        },
        measure,
    )


@contextlib.contextmanager
def _as_gguf(source, index: ModelIndex, layout: ModelLayout):
    """A Hugging Face checkpoint converted to a scratch GGUF in ewq's cache folder,
    for the criteria that measure the GGUF itself (removed afterwards)."""
    from ewq.quant.convert import converted
    from ewq.sensitivity.cache import cache_dir

    with converted(source, index, layout, cache_dir() / "scratch") as found:
        yield found


def fast_decision(
    feats: Features,
    method: str,
    moderate: Precision,
    classifier: str | Path | None = None,
) -> tuple[dict[int, bool], dict[int, Precision], list[int]]:
    """Algorithm 2: the classifier's blocks at the moderate precision, in order of
    exec_index descending (the highest block is quantized first); the others raw,
    after them in the same order."""
    from ewq.fast.classify import load_model, predict

    doc = load_model(classifier)
    rows = feats.rows()
    chosen = predict(doc, method, rows)
    predicted = {int(r["exec_index"]): c for r, c in zip(rows, chosen, strict=True)}
    decision = {i: moderate if q else Precision.RAW for i, q in predicted.items()}
    desc = sorted(predicted, reverse=True)
    priority = [i for i in desc if predicted[i]] + [i for i in desc if not predicted[i]]
    return predicted, decision, priority


def build_dataset(
    sources: Sequence[str | Path],
    *,
    paper_tables: str | Path | None = None,
    alpha: float = DEFAULT_ALPHA,
    names: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """FastEWQ dataset rows: the EWQ analysis of each source (its features from
    its headers, its labels from the decision), plus the paper's published labels
    when ``paper_tables`` (the folder of its CSV tables) is given."""
    from ewq.fast.dataset import paper_rows, rows_from_decision

    rows: list[dict] = []
    for k, source in enumerate(sources):
        if progress is not None:
            progress(str(source))
        a = analyze(source, alpha=alpha)
        feats = _features(source, name=names[k] if names else None)
        rows += rows_from_decision(feats, a.decision.precision)
    if paper_tables is not None:
        rows += paper_rows(paper_tables)
    if not rows:
        raise EwqError("no rows: give at least one model or the paper's tables")
    return rows


def train_fastewq(
    dataset: str | Path,
    out: str | Path,
    *,
    report_dir: str | Path | None = None,
    paper_tables: str | Path | None = None,
    seed: int = 42,
):
    """Train and evaluate the six classifiers on ``dataset``; store the random forest
    (fast and fast-train) at ``out`` (skops) and write the Markdown report."""
    from ewq.fast.classify import save_model, study
    from ewq.fast.dataset import read_dataset
    from ewq.reports.fastewq import write_report

    rows = read_dataset(dataset)
    st = study(rows, seed=seed)
    report = None
    if report_dir is not None:  # the report first: a report that fails leaves no model
        report = write_report(
            st,
            rows,
            report_dir,
            dataset=Path(dataset).name,
            model_path=Path(out).name,
            paper_tables=paper_tables,
        )
    save_model(st, out, Path(dataset).name)
    return st, report


TASKS = ("mmlu", "perplexity", "kld", "embedding")


def evaluate(
    source: str | Path,
    task: str,
    *,
    data: str | Path,
    quantized: str | Path | None = None,
    plan: str | Path | dict | None = None,
    shots: int = 0,
    limit: int | None = None,
    ctx: int = 512,
    stride: int | None = None,
    split: str = "validation",
    progress: Progress | None = None,
) -> dict:
    """Evaluate a model (or its quantized version) on ``task`` (METHOD.md section 7).

    ``quantized`` is a written model; ``plan`` quantizes ``source`` into a temporary
    file first. perplexity and mmlu evaluate the quantized model when one is given,
    else the source; kld compares the two and needs one. Both sides of a comparison
    run on the same runtime and the same token ids.
    """
    import tempfile

    from ewq.evaluate import tasks
    from ewq.evaluate.backends import open_model
    from ewq.evaluate.data import load_mmlu, load_text

    if task not in TASKS:
        raise EwqError(f"unknown task '{task}' (one of {', '.join(TASKS)})")
    if quantized is not None and plan is not None:
        raise EwqError("give --quantized or --plan, not both")
    if task == "kld" and quantized is None and plan is None:
        raise EwqError(
            "kld compares two models: give --quantized PATH or --plan PLAN.json"
        )
    if shots < 0 or (limit is not None and limit < 1) or ctx < 8:
        raise EwqError("shots must be >= 0, limit >= 1 and ctx >= 8")
    # the data first: a missing file is found before any model is loaded
    text = load_text(data) if task in ("perplexity", "kld", "embedding") else None
    questions = load_mmlu(data, split) if task == "mmlu" else None
    dev = load_mmlu(data, "dev") if task == "mmlu" and shots else []
    with open_source(source, download=True) as src:
        base_path = Path(src.index.files[0])
        base = base_path if src.index.format == "gguf" else base_path.parent
    with tempfile.TemporaryDirectory(prefix="ewq-eval-") as tmp:
        if plan is not None:
            fmt = "gguf" if base.is_file() else "hf"
            out = Path(tmp) / ("model.gguf" if fmt == "gguf" else "model")
            quantized = quantize(source, plan, out, format=fmt).out
        if task == "embedding":
            from ewq.evaluate.backends import LlamaCppEncoder, TransformersEncoder

            if not base.is_dir():
                raise EwqError(
                    "the embedding task compares with a Hugging Face encoder folder"
                )
            other = Path(quantized)
            # across runtimes both sides must see the same tokens: llama.cpp takes
            # the whole sentence (up to the model's 512), so transformers does too
            ref = TransformersEncoder(base, max_tokens=512 if other.is_file() else 128)
            metrics = tasks.embedding_fidelity(
                ref,
                LlamaCppEncoder(other)
                if other.is_file()
                else TransformersEncoder(other),
                text,
                limit=limit or 64,
            )
            return {
                "task": task,
                "source": str(source),
                "quantized": str(quantized) if plan is None else None,
                "plan": plan
                if isinstance(plan, dict)
                else (str(plan) if plan else None),
                "data": str(data),
                "limit": limit or 64,
                "metrics": metrics,
            }
        target = open_model(quantized if quantized is not None else base, ctx)
        if task == "perplexity":
            metrics = tasks.perplexity(
                target, text, ctx=ctx, stride=stride, limit=limit, progress=progress
            )
        elif task == "kld":
            reference = open_model(base, ctx)
            metrics = tasks.kld(
                reference, target, text, ctx=ctx, limit=limit, progress=progress
            )
        else:
            metrics = tasks.mmlu(
                target, questions, dev=dev, shots=shots, limit=limit, progress=progress
            )
    return {
        "task": task,
        "source": str(source),
        "quantized": str(quantized) if quantized is not None and plan is None else None,
        "plan": plan if isinstance(plan, dict) else (str(plan) if plan else None),
        "data": str(data),
        "limit": limit,
        "shots": shots if task == "mmlu" else None,
        "ctx": ctx,
        "stride": (stride or ctx) if task != "mmlu" else None,
        "metrics": metrics,
    }
