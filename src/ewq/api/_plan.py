"""Fitting a model into machines: the decision, the sizes, the allocation, the
placement and the runtime's commands."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from ewq.analysis import decide
from ewq.analysis.decision import check_alpha
from ewq.api._fast import fast_decision
from ewq.api._model import analyze
from ewq.api._sensitivity import sensitivity
from ewq.config import (
    Allocator,
    AnalysisConfig,
    Criterion,
    Method,
    PlanConfig,
    configure,
)
from ewq.errors import EwqError
from ewq.fast.features import features as _features
from ewq.planning import (
    MODES,
    BlockSpec,
    Machine,
    Option,
    block_specs,
    exports,
    fit,
    fit_optimal,
    route_for,
    runtime_memory,
)
from ewq.records import Analysis, PlanResult
from ewq.types import Progress

__all__ = ["plan", "resolved"]


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
        criterion = Criterion.ERROR
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
    Algorithm 1 (METHOD.md section 5) and needs the entropy criterion. ``method``
    fast and fast-train read only metadata and let the FastEWQ classifier choose
    the blocks (Algorithm 2, ladder only). Sizes are the exact bytes ``format``
    writes (default: gguf for a GGUF source, hf otherwise; for GGUF from a Hugging
    Face checkpoint, the file llama.cpp's converter will write). ``context`` > 0
    adds the runtime's KV cache for that many tokens and its compute buffers to
    every machine (planning/runtime.py).
    """
    cfg = resolved(configure(PlanConfig, config, options))
    if not machines:
        raise EwqError("no machine to plan for")
    source = cfg.spec(source)
    method, criterion, allocator = cfg.method, cfg.criterion.value, cfg.allocator
    calibration, context, mode = cfg.calibration, cfg.context, cfg.mode.value
    alpha, variant, revision = cfg.alpha, cfg.variant, cfg.revision
    levels = MODES[mode]
    analysis = predicted = None
    if method is Method.EWQ:
        kept = {k: getattr(cfg, k) for k in AnalysisConfig.model_fields}
        analysis = analyze(
            source, AnalysisConfig(**{**kept, "file": None}), progress=progress
        )
        entropies = {b.exec_index: b.entropy for b in analysis.profile.transformer}
        d = decide(
            entropies,
            alpha=alpha,
            variant=variant,
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
            feats, method.value, levels[2], cfg.classifier
        )
    fmt = cfg.format.value if cfg.format else None
    fmt = fmt or ("gguf" if index.format == "gguf" else "hf")
    # sizes, runtime and route are those of the file the plan is for: for GGUF from
    # a Hugging Face checkpoint, the GGUF llama.cpp's converter will write
    out_index, out_layout = index, layout
    if fmt == "gguf" and index.format != "gguf":
        from ewq.quant.convert import gguf_layout

        out_index, out_layout = gguf_layout(source, index, layout)
    runtime = None
    if context:
        try:
            runtime = runtime_memory(
                out_index, out_layout, context, cache_type=cfg.kv_cache.value
            )
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
    if allocator is Allocator.LADDER:
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
        choices = {
            i: [
                Option(p, nbytes, sens.damage[i][p])
                for p, nbytes in specs[i].bytes.items()
            ]
            for i in specs
        }
        params = {i: specs[i].num_parameters for i in specs}
        result = fit_optimal(choices, params, machines, mode="optimal", route=route)
    if runtime is not None:  # sizes in the result are weights + KV: report weights
        result = replace(
            result,
            bytes={i: b - runtime.kv_bytes.get(i, 0) for i, b in result.bytes.items()},
            total_bytes=result.total_bytes - sum(runtime.kv_bytes.values()),
            smallest_bytes=result.smallest_bytes - sum(runtime.kv_bytes.values()),
        )
    return PlanResult(
        index,
        layout,
        cfg,
        fmt,
        tuple(machines),
        decision,
        tuple(priority),
        result,
        exports(result, machines, transformer, fmt, cfg.kv_cache.value),
        analysis,
        predicted,
        sens,
        runtime,
    )
