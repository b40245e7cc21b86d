"""Fitting a model into machines: the decision, the sizes, the allocation, the
placement and the runtime's commands."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from ewq.analysis import decide
from ewq.analysis.decision import check_alpha
from ewq.api._anchor import RESOLUTION, anchored, recipes
from ewq.api._fast import fast_decision
from ewq.api._model import analyze
from ewq.api._select import select
from ewq.api._sensitivity import imatrix, load_imatrix, sensitivity
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
from ewq.types import Precision, Progress

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
    sens = im = selection = anchor = None
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
        result = replace(result, tensors=_block_types(fmt, out_layout, result))
    else:
        im = _imatrix(cfg, source, index, layout, fmt, progress)
        sens = sensitivity(
            source,
            criterion,
            fmt=fmt,
            calibration=calibration,
            imatrix=im,
            tokens=cfg.calibration_tokens,
            ctx=cfg.calibration_ctx,
            type_probes=cfg.type_probes,
            documents=cfg.documents.value,
            analysis=analysis,
            revision=revision,
            progress=progress,
        )

        def fit_with(allow=None):
            return fit_tensors(
                fmt, out_layout, sens, im, runtime, machines, route, cfg.bpw, allow
            )

        result = fit_with()
        model_damage, smallest, found = result.damage, result.smallest_bytes, None
        if cfg.anchor and criterion in ("error", "kl") and result.fits:
            found = _anchor(source, index, layout, fmt, out_layout, sens, im, fit_with)
        if criterion == "kl" and cfg.select and result.fits:
            result, selection = select(
                cfg,
                source,
                index,
                layout,
                out_layout,
                im,
                fit_with,
                result,
                found,
                progress,
            )
        elif found is not None and model_damage > RESOLUTION * found[1].damage:
            result = found[1]
        kept_recipe = found is not None and result is found[1]
        # the least the model can take, whichever restricted plan was kept
        result = replace(result, smallest_bytes=smallest)
        if found is not None:
            anchor = {
                "preset": found[0],
                "recipe_damage": found[1].damage,
                "model_damage": model_damage,
                "resolution": None if selection else RESOLUTION,
                "chosen": kept_recipe,
            }
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
        im,
        selection,
        anchor,
    )


def _anchor(source, index, layout, fmt, out_layout, sens, im, fit_with):
    """The runtime's own recipe that fits, upgraded with the bytes left
    (ewq.api._anchor), as (preset, result), or None."""
    from ewq.sensitivity import tensor_candidates

    found = recipes(source, index, layout, fmt, im)
    if not found:
        return None
    return anchored(found, fit_with, tensor_candidates(fmt, out_layout, im), sens)


def _imatrix(cfg: PlanConfig, source, index, layout, fmt: str, progress):
    """The importance matrix the plan rests on: --imatrix FILE, else one computed on
    --calibration (cached), else none."""
    if cfg.imatrix is None and cfg.calibration is None:
        return None
    if fmt != "gguf":
        raise EwqError(
            "an importance matrix weighs GGUF output; for --format hf plan without "
            "--imatrix and --calibration"
        )
    if cfg.imatrix is not None:
        return load_imatrix(cfg.imatrix, index, layout, source)
    return imatrix(
        source,
        cfg.calibration,
        documents=cfg.documents.value,
        revision=cfg.revision,
        progress=progress,
    )


def fit_tensors(fmt, layout, sens, imatrix_, runtime, machines, route, bpw, allow=None):
    """The optimal per-tensor allocation: every tensor the format can write in more
    than one way chooses its type; the others, and the KV cache, are fixed bytes.
    ``allow(info, encoding)``: the options a tensor may take (its own type and at
    least one other are always kept)."""
    from ewq.formats import output_format
    from ewq.sensitivity import tensor_candidates

    cands = tensor_candidates(fmt, layout, imatrix_)
    form = output_format(fmt)
    options, block_of = {}, {}
    fixed = {b.exec_index: 0 for b in layout.blocks}
    params = {b.exec_index: b.num_parameters for b in layout.blocks}
    views: dict[str, Precision] = {}
    for block in layout.blocks:
        for info, key in zip(block.tensors, block.keys, strict=True):
            if info.name not in cands:
                e = form.encoding(info, key, Precision.RAW)
                fixed[block.exec_index] += e.nbytes if e is not None else 0
                continue
            _, _, encs = cands[info.name]
            if allow is not None:
                kept = [e for e in encs if allow(info, e)]
                encs = kept if kept else encs
            options[info.name] = [
                Option(e.type, e.nbytes, sens.of(info.name, e.type)) for e in encs
            ]
            views.update({f"{info.name}\0{e.type}": e.precision for e in encs})
            block_of[info.name] = block.exec_index
    if runtime is not None:
        for i, kv in runtime.kv_bytes.items():
            fixed[i] = fixed.get(i, 0) + kv
    cap = None
    if bpw is not None:  # the weights' budget, plus the KV cache counted in fixed
        kv = sum(runtime.kv_bytes.values()) if runtime is not None else 0
        cap = int(bpw * sum(params.values()) / 8) + kv
    view = {
        id(o): views[f"{n}\0{o.precision}"] for n, opts in options.items() for o in opts
    }
    return fit_optimal(
        options,
        params,
        machines,
        mode="optimal",
        route=route,
        block_of=block_of,
        fixed=fixed,
        view=lambda o: view[id(o)],
        cap=cap,
    )


def _block_types(fmt: str, layout, result) -> dict[str, Option]:
    """A block-level result's per-tensor types (the plan file is per tensor): each
    tensor the format can write in more than one way, at its block's precision."""
    from ewq.formats import output_format
    from ewq.sensitivity import tensor_candidates

    form = output_format(fmt)
    cands = tensor_candidates(fmt, layout)
    out = {}
    for block in layout.blocks:
        p = result.precision[block.exec_index]
        for info, key in zip(block.tensors, block.keys, strict=True):
            if info.name in cands:
                e = form.encoding(info, key, p)
                out[info.name] = Option(e.type, e.nbytes, 0.0)
    return out
