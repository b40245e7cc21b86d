"""Fitting a model into machines: the decision, the sizes, the allocation, the
placement and the runtime's commands."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from ewq.analysis import decide
from ewq.analysis.decision import check_alpha
from ewq.api._anchor import RESOLUTION, anchor_for
from ewq.api._fast import fast_decision
from ewq.api._fit import _block_types, fit_tensors
from ewq.api._model import analyze
from ewq.api._select import select
from ewq.api._sensitivity import imatrix, load_imatrix, own_text, sensitivity
from ewq.arch import ModelLayout
from ewq.calibration.text import token_cap
from ewq.config import (
    Allocator,
    AnalysisConfig,
    Criterion,
    Method,
    PlanConfig,
    configure,
)
from ewq.errors import EwqError
from ewq.evaluate.backends import offload
from ewq.fast.features import features as _features
from ewq.formats import OutputFormat, format_for, output_format
from ewq.planning import (
    MODES,
    BlockSpec,
    Machine,
    block_specs,
    exports,
    fit,
    route_for,
    runtime_memory,
)
from ewq.planning.placement import Route
from ewq.planning.runtime import Runtime
from ewq.records import Analysis, PlanResult
from ewq.sampling import chosen
from ewq.sources.hub import is_remote
from ewq.types import ModelIndex, Progress

__all__ = ["fit_tensors", "plan", "resolved"]


def resolved(config: PlanConfig) -> PlanConfig:
    """``config`` with its criterion and allocator filled in, or one error line for
    a combination that cannot plan: the FastEWQ methods and the ladder order blocks
    by entropy; kl needs a calibration text. Defaults: error and optimal; kl when a
    calibration text is given; the ladder with entropy."""
    method, criterion, allocator = config.method, config.criterion, config.allocator
    if method is not Method.EWQ:
        criterion = criterion or Criterion.ENTROPY
        allocator = allocator or Allocator.LADDER
        if allocator is not Allocator.LADDER or criterion is not Criterion.ENTROPY:
            raise EwqError(
                f"method {method.value} plans by the paper's ladder (Algorithm 2): use "
                "--method ewq for other criteria or the optimal allocator"
            )
    if criterion is None:
        criterion = Criterion.ERROR  # weighted by --imatrix when one is given
        if allocator is Allocator.LADDER:
            criterion = Criterion.ENTROPY
        elif config.calibration is not None:
            criterion = Criterion.KL
    if allocator is None:
        allocator = (
            Allocator.LADDER if criterion is Criterion.ENTROPY else Allocator.OPTIMAL
        )
    if allocator is Allocator.LADDER and criterion is not Criterion.ENTROPY:
        raise EwqError(
            "the ladder (the paper's Algorithm 1) orders blocks by entropy: use "
            "--criterion entropy with it, or --allocator optimal"
        )
    if criterion is Criterion.KL and config.calibration is None:
        raise EwqError("the kl criterion needs a calibration text (--calibration FILE)")
    if config.bpw is not None and allocator is Allocator.LADDER:
        raise EwqError(
            "--bpw budgets the optimal allocator (per tensor); the ladder "
            "plans for --memory or --cluster"
        )
    check_alpha(config.alpha)
    return config.model_copy(update={"criterion": criterion, "allocator": allocator})


def plan(
    source: str | Path,
    machines: Sequence[Machine],
    config: PlanConfig | None = None,
    *,
    progress: Progress | None = None,
    **options,
) -> PlanResult:
    """Fit ``source`` into ``machines``; options are :class:`ewq.config.PlanConfig`'s,
    as a record or as keywords.

    ``criterion`` says how much damage each precision does to each block (see
    ewq.sensitivity): entropy (the paper's score), error (round trip through the
    real quantizer, data-free; the default), kl (calibrated on the text
    ``calibration``; the default when one is given), random or position
    (baselines). ``allocator`` optimal picks, per block, the precision
    of least total damage that fits (planning/allocate.py); ladder is the paper's
    Algorithm 1 (docs/method.md section 5) and needs the entropy criterion. ``method``
    fast and fast-train read only metadata and let the FastEWQ classifier choose
    the blocks (Algorithm 2, ladder only). Sizes are the exact bytes ``format``
    writes (default: gguf for a GGUF source, hf otherwise; for GGUF from a Hugging
    Face checkpoint, the file llama.cpp's converter will write). ``context`` > 0
    adds the runtime's KV cache for that many tokens and its compute buffers to
    every machine (planning/runtime.py).
    """
    cfg = resolved(configure(PlanConfig, config, options))
    with offload(cfg.gpu_layers):
        cfg = own_text(cfg, source, progress)
        return _planned(source, machines, cfg, progress)


def _planned(source, machines, cfg: PlanConfig, progress) -> PlanResult:
    if not machines:
        raise EwqError("no machine to plan for")
    source = cfg.spec(source)
    analysis, predicted, decision, priority = _decide(cfg, source, progress)
    index = analysis.index if analysis is not None else predicted[0]
    layout = analysis.layout if analysis is not None else predicted[1]
    t = _target(cfg, source, index, layout, machines)
    sens = im = selection = anchor = None
    if cfg.allocator is Allocator.LADDER:
        result = _ladder(t, cfg, decision, priority)
    else:
        result, sens, im, selection, anchor = _optimal(t, cfg, analysis, progress)
    result = _weights_only(result, t.runtime)
    transformer = [b.exec_index for b in t.layout.transformer_blocks]
    return PlanResult(
        index,
        layout,
        cfg,
        t.form,
        t.machines,
        decision,
        tuple(priority),
        result,
        exports(result, t.machines, transformer, t.form, cfg.kv_cache.value),
        analysis,
        predicted[2] if predicted is not None else None,
        sens,
        t.runtime,
        im,
        selection,
        anchor,
    )


def _ladder(t: _Target, cfg: PlanConfig, decision, priority):
    """The paper's Algorithm 1 over whole blocks (planning/ladder.py)."""
    specs = {s.exec_index: s for s in block_specs(t.form, t.layout)}
    if t.runtime is not None:  # each block holds its layers' KV cache too
        specs = {i: _with_kv(s, t.runtime) for i, s in specs.items()}
    result = fit(
        [specs[b.exec_index] for b in t.layout.transformer_blocks],
        specs[t.layout.blocks[0].exec_index],
        specs[t.layout.blocks[-1].exec_index],
        decision,
        priority,
        t.machines,
        mode=cfg.mode.value,
        route=t.route,
    )
    return replace(result, tensors=_block_types(t.form, t.layout, result))


def _weights_only(result, runtime: Runtime | None):
    """The allocation counts each block's KV cache with its bytes (a machine holds
    both); the plan reports the weights."""
    if runtime is None:
        return result
    kv = runtime.kv_bytes
    return replace(
        result,
        bytes={i: b - kv.get(i, 0) for i, b in result.bytes.items()},
        total_bytes=result.total_bytes - sum(kv.values()),
        smallest_bytes=result.smallest_bytes - sum(kv.values()),
    )


def _decide(cfg: PlanConfig, source, progress):
    """The paper's decision per block: from the entropy analysis (method ewq), or
    from the FastEWQ classifier on metadata. Returns (analysis, (index, layout,
    classifier's choice) for FastEWQ, decision, priority)."""
    levels = MODES[cfg.mode.value]
    if cfg.method is Method.EWQ:
        kept = {k: getattr(cfg, k) for k in AnalysisConfig.model_fields}
        # a local model's entropies are read whole at the speed of reading it;
        # sampled ones (slower per byte, and estimates) only spare a hub download
        if not is_remote(source):
            kept["sample"] = None
        a = analyze(source, AnalysisConfig(**{**kept, "file": None}), progress=progress)
        d = decide(
            {b.exec_index: b.entropy for b in a.profile.transformer},
            alpha=cfg.alpha,
            variant=cfg.variant,
            moderate=levels[2],
            aggressive=levels[1],
        )
        return Analysis(a.index, a.layout, a.profile, d), None, d.precision, d.priority
    feats = _features(source, revision=cfg.revision)
    chosen, decision, priority = fast_decision(
        feats, cfg.method.value, levels[2], cfg.classifier
    )
    return None, (feats.index, feats.layout, chosen), decision, priority


@dataclass(frozen=True)
class _Target:
    """What a plan is sized for: the output file's index and layout (for GGUF from a
    Hugging Face checkpoint, the GGUF llama.cpp's converter will write), its format,
    the runtime's memory, the machines (less the runtime's buffers) and the route."""

    source: str
    index: ModelIndex  # the source's
    layout: ModelLayout  # the output's
    src_layout: ModelLayout
    form: OutputFormat
    runtime: Runtime | None
    machines: tuple[Machine, ...]
    route: Route


def _target(cfg: PlanConfig, source, index, layout, machines) -> _Target:
    form = output_format(cfg.format) if cfg.format else format_for(index.container)
    out_index, out_layout = index, layout
    if form.needs_conversion(index.container):
        from ewq.quant.convert import gguf_layout

        out_index, out_layout = gguf_layout(source, index, layout)
    runtime = None
    if cfg.context:
        try:
            runtime = runtime_memory(
                out_index, out_layout, cfg.context, cache_type=cfg.kv_cache.value
            )
        except ValueError as exc:
            raise EwqError(
                f"{source}: cannot size the runtime's KV cache ({exc}); plan the "
                "weights alone with --context 0"
            ) from None
        machines = [
            replace(m, reserve=m.reserve + runtime.stage_bytes) for m in machines
        ]
    route = route_for(out_index, out_layout, form, runtime)
    return _Target(
        source, index, out_layout, layout, form, runtime, tuple(machines), route
    )


def _with_kv(s: BlockSpec, runtime: Runtime) -> BlockSpec:
    kv = runtime.kv_bytes.get(s.exec_index, 0)
    return BlockSpec(
        s.exec_index,
        s.num_parameters,
        {p: b + kv for p, b in s.bytes.items()},
        s.entropy,
    )


def _grown(t: _Target, cfg: PlanConfig, sens, im, fit_with):
    """The plan of a sampled error criterion, its tensors sampled again where the
    plan cannot tell their type (ewq.api._grow); the rounds go into the
    criterion's sampling record."""
    from ewq.api._grow import grow, undecided
    from ewq.api._sensitivity import regrown

    sample = _sampling(cfg, t.source)

    def regrow(s, rows):
        return regrown(
            t.source,
            t.index,
            t.src_layout,
            s,
            rows,
            form=t.form,
            imatrix=im,
            sample=sample,
            revision=cfg.revision,
            threads=cfg.threads,
        )

    result, sens, rounds = grow(
        lambda s: fit_with(criterion_=s),
        regrow,
        lambda s, r: undecided(t.form, t.layout, s, im, r),
        sens,
    )
    left = undecided(t.form, t.layout, sens, im, result)
    record = {**sens.details["sampling"], "rounds": rounds, "undecided": left}
    return result, replace(sens, details={**sens.details, "sampling": record})


def _sampling(cfg: PlanConfig, source):
    """The row sample of the error pass (ewq.sampling.chosen)."""
    return chosen(cfg.sample, is_remote(source))


def _optimal(t: _Target, cfg: PlanConfig, analysis, progress):
    """The per-tensor plan: the criterion's damage, the optimal allocation, held
    against the runtime's own recipe (ewq.api._anchor) and, with calibration text,
    measured (ewq.api._select). Returns (result, sensitivity, imatrix, selection,
    anchor record)."""
    source, index, layout = t.source, t.index, t.src_layout
    criterion = cfg.criterion.value
    im = _imatrix(cfg, source, index, layout, t.form, progress)
    sens = sensitivity(
        source,
        criterion,
        format=t.form,
        calibration=cfg.calibration,
        imatrix=im,
        tokens=cfg.probe_tokens,
        ctx=cfg.calibration_ctx,
        type_probes=cfg.type_probes,
        probes=cfg.probes,
        documents=cfg.documents.value,
        analysis=analysis,
        revision=cfg.revision,
        progress=progress,
        sample=_sampling(cfg, source),
        threads=cfg.threads,
    )

    def fit_with(allow=None, criterion_=None):
        return fit_tensors(
            t.form,
            t.layout,
            criterion_ or sens,
            im,
            t.runtime,
            t.machines,
            t.route,
            cfg.bpw,
            allow,
        )

    if sens.intervals is not None:  # sampled: grown where the plan depends on it
        result, sens = _grown(t, cfg, sens, im, fit_with)
    else:
        result = fit_with()
    model_damage, smallest, found, selection = (
        result.damage,
        result.smallest_bytes,
        None,
        None,
    )
    if cfg.anchor and criterion in ("error", "kl") and result.fits:
        found = anchor_for(source, index, layout, t.form, t.layout, sens, im, fit_with)
    if criterion == "kl" and cfg.select and result.fits:
        result, selection = select(
            cfg, source, index, layout, t.layout, im, fit_with, result, found, progress
        )
    elif found is not None and model_damage > RESOLUTION * found[1].damage:
        result = found[1]
    anchor = None
    if found is not None:
        anchor = {
            "preset": found[0],
            "recipe_damage": found[1].damage,
            "model_damage": model_damage,
            "resolution": None if selection else RESOLUTION,
            "chosen": result is found[1],
        }
    # the least the model can take, whichever restricted plan was kept
    result = replace(result, smallest_bytes=smallest)
    return result, sens, im, selection, anchor


def _imatrix(cfg: PlanConfig, source, index, layout, form: OutputFormat, progress):
    """The importance matrix the plan rests on: --imatrix FILE, else one computed on
    --calibration (cached), else none."""
    if cfg.imatrix is None and cfg.calibration is None:
        return None
    if not form.calibrated:
        raise EwqError(
            f"an importance matrix weighs GGUF output; for --format {form.name} plan "
            "without --imatrix and --calibration"
        )
    if cfg.imatrix is not None:
        return load_imatrix(cfg.imatrix, index, layout, source)
    return imatrix(
        source,
        cfg.calibration,
        documents=cfg.documents.value,
        tokens=token_cap(cfg.calibration_tokens, index),
        revision=cfg.revision,
        progress=progress,
    )
