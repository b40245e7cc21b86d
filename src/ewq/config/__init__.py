"""What a user chooses, declared once: typed, frozen, strict, versioned records.

Each option is one field here, with its type, default and help; the Python API
validates its keyword options against these records (an unknown or misspelled
option is an error, not ignored), and the CLI builds its options from the same
fields (``ewq.cli.common.configured``), so a default or a help text cannot drift
between them. A plan file records the resolved :class:`PlanConfig` it was made
with, and `ewq quantize` reads its format back from it. The measuring commands'
records are in ``_measure.py``, `ewq serve`'s in ``_serve.py``.

Adding an option is adding a field to one record (and using it where it acts).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from ewq.config._base import (
    Config,
    calibration_tokens_field,
    cli,
    configure,
    gpu_layers_field,
)
from ewq.config._choices import (
    ANCHOR_PRESETS,
    CALIBRATION_TOKENS_PER_WIDTH,
    DEFAULT_ALPHA,
    DEFAULT_CALIBRATION_TOKENS,
    DEFAULT_CONTEXT,
    DEFAULT_PROBES,
    IMATRIX_PRESETS,
    PRESETS,
    Allocator,
    Criterion,
    Documents,
    Format,
    KvCache,
    Method,
    Mode,
    Rounding,
    Task,
    Variant,
)
from ewq.config._measure import BenchConfig, CompareConfig, EvalConfig
from ewq.config._serve import ServeConfig

__all__ = [
    "CALIBRATION_TOKENS_PER_WIDTH",
    "DEFAULT_ALPHA",
    "DEFAULT_CALIBRATION_TOKENS",
    "DEFAULT_CONTEXT",
    "DEFAULT_PROBES",
    "ANCHOR_PRESETS",
    "IMATRIX_PRESETS",
    "PRESETS",
    "AnalysisConfig",
    "Allocator",
    "BenchConfig",
    "CompareConfig",
    "Config",
    "Criterion",
    "Documents",
    "EvalConfig",
    "Format",
    "KvCache",
    "MakeConfig",
    "Method",
    "Mode",
    "PlanConfig",
    "QuantizeConfig",
    "ServeConfig",
    "SourceConfig",
    "Rounding",
    "Task",
    "Variant",
    "configure",
]


class SourceConfig(Config):
    """Where the model comes from (hub options; local paths ignore them)."""

    revision: str | None = Field(None, description="Hub branch, tag or commit.")
    download: bool = Field(
        False,
        description="For hub ids: download the weights into the hub cache instead "
        "of reading headers only.",
    )
    file: str | None = Field(
        None,
        description="For hub repositories with several GGUF models: the file, or a "
        "tag in its name such as Q4_K_M (the same as owner/name:FILE).",
    )

    def spec(self, source: str | Path) -> str:
        """``source`` with the hub file chosen (``owner/name:FILE``, llama.cpp's
        ``-hf`` form)."""
        return str(source) if self.file is None else f"{source}:{self.file}"


class AnalysisConfig(SourceConfig):
    """EWQ's analysis and decision (docs/method.md sections 2-4)."""

    alpha: float = Field(
        DEFAULT_ALPHA,
        gt=0,
        allow_inf_nan=False,
        description="Threshold T = mean - alpha * std: blocks below T go to 4-bit. "
        "1.25 reproduces the paper's share of 4-bit blocks (about 11%).",
    )
    eps: float = Field(
        0.0,
        description="H = -sum p log(p + eps). 0 (default) is the exact entropy; the "
        "paper used a small eps such as 0.01.",
    )
    variant: Variant = Field(
        Variant.MIXED_4_8,
        description="4bit/8bit: below T to 4-bit, below the mean to 8-bit. 8bit: "
        "every block below the mean to 8-bit.",
    )
    workers: int | None = Field(
        None,
        ge=1,
        description="Threads reading and reducing tensors (default: all cores).",
    )
    sample: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Read this share of each tensor's rows (seeded, random), with "
        "stated intervals: the entropy analysis samples every matrix and samples "
        "again the blocks whose side of a decision boundary it cannot tell; the "
        "error and kl criteria's errors read at least 64 rows (doubled while a type's 95% interval "
        "is wider than 25%), and a plan samples again (4x, up to 3 rounds) the "
        "tensors whose type it cannot tell within their intervals. A hub id is then "
        "read by range requests, the sampled rows only. Default: every row.",
    )


class PlanConfig(AnalysisConfig):
    """How a model is fitted into machines (`ewq plan`)."""

    sample: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Share of each tensor's rows (seeded, random) the error pass "
        "reads, for either criterion, with stated intervals (at least 64 rows, "
        "doubled while a type's 95% interval is wider than 25%); with the error "
        "criterion, a tensor whose type the plan cannot tell within them is sampled "
        "again (4x, up to 3 rounds). "
        "Default: 2% of a model on disk (its plans measured as good as from every "
        "row), every row of a hub id; 1: every row. Given for a hub id, its entropy "
        "analysis samples too and only the sampled rows are fetched (range requests).",
    )

    method: Method = Field(
        Method.EWQ,
        description="Block selection: ewq (reads every weight), or fast / fast-train "
        "(FastEWQ classifier, reads metadata only; the paper's ladder).",
    )
    criterion: Criterion | None = Field(
        None,
        description="Damage estimate per block and precision: error (round trip "
        "through the real quantizer, data-free; the default), kl (calibrated on the "
        "--calibration text; the default when one is given), entropy (the paper's "
        "score), random, position.",
    )
    allocator: Allocator | None = Field(
        None,
        description="optimal (least total damage within the budget; default) or "
        "ladder (the paper's Algorithm 1; default with --criterion entropy).",
    )
    calibration: Path | None = Field(
        None,
        description="Calibration text (UTF-8 text, or a Wikipedia .xml.bz2 dump), or "
        "'self': text sampled from the model itself (seeded; a chat model answers a "
        "bundled list of varied prompts; cached, and written beside the plan as "
        "PLAN.calibration.txt). An importance matrix is computed on it and each "
        "tensor's sensitivity measured (--criterion kl, the default with it).",
    )
    imatrix: Path | None = Field(
        None,
        description="An importance matrix (llama.cpp's GGUF or legacy .dat, from `ewq "
        "imatrix` or llama-imatrix): weighs each tensor's error and is handed to "
        "llama.cpp's quantizer.",
    )
    documents: Documents = Field(
        Documents.STREAM,
        description="How the calibration text is cut into windows: stream (one token "
        "stream) or lines (every line a document of its own, for models trained on "
        "short sequences).",
    )
    calibration_tokens: int | None = calibration_tokens_field()
    probe_tokens: int = Field(
        1024,
        ge=16,
        description="Tokens of the calibration text each tensor's sensitivity is "
        "measured on (--criterion kl): more is steadier and slower.",
    )
    calibration_ctx: int = Field(
        256, ge=16, description="Tokens per calibration window (--criterion kl)."
    )
    type_probes: int | None = Field(
        4,
        ge=0,
        description="Float tensors --criterion kl writes at every type, together in "
        "one model per type, for each type's factor (a model written and run per "
        "type); 0: the data-free table's factors, nothing written; more than the "
        "model has: every (tensor, type) pair on its own.",
    )
    probes: int | None = Field(
        DEFAULT_PROBES,
        ge=2,
        description="Tensors whose sensitivity --criterion kl measures, a pass over "
        "--probe-tokens each (at least the first and last of each role); the others "
        "are interpolated over depth. More than the model has: every tensor.",
    )
    select: bool = Field(
        True,
        description="With --calibration: measure the damage model's plan and a few "
        "alternatives to it on the calibration text and keep the best.",
    )
    anchor: bool = Field(
        True,
        description="GGUF: depart from llama.cpp's own recipe for the largest of "
        "its presets that fits (upgraded with the bytes left) only when the damage "
        "model predicts clearly less damage; with --calibration the recipe is one of "
        "the plans measured. --no-anchor: the damage model's optimum alone.",
    )
    select_candidates: int = Field(
        12, ge=1, description="At most this many plans measured by --select."
    )
    threads: int | None = Field(
        None, ge=1, description="Threads for the error criterion (default: all cores)."
    )
    gpu_layers: int | None = gpu_layers_field()
    bpw: float | None = Field(
        None,
        gt=0,
        description="At most this many bits per weight on average (all tensors' bytes "
        "x 8 / parameters, as llama.cpp counts them); alone, or with --memory/--cluster.",
    )
    context: int = Field(
        DEFAULT_CONTEXT,
        ge=0,
        description="Tokens of context the runtime must hold: adds its KV cache and "
        "compute buffers (llama.cpp's rules) to every machine; 0: weights only.",
    )
    kv_cache: KvCache = Field(
        KvCache.F16,
        description="The runtime's KV cache type (llama.cpp's --cache-type-k/-v): "
        "q8_0 and q4_0 hold the context in about 1/2 and 1/4 of f16's memory "
        "(llama.cpp runs them with flash attention).",
    )
    mode: Mode = Field(
        Mode.M84,
        description="Moderate/aggressive precisions: 8/4, or 4/3 and 4/2 for edge "
        "devices.",
    )
    format: Format | None = Field(
        None,
        description="Count sizes as this output format writes them (default: gguf "
        "for GGUF sources, hf otherwise).",
        json_schema_extra=cli("--format"),
    )
    classifier: Path | None = Field(
        None,
        description="FastEWQ classifier (.npz, or an older .skops); default: the one shipped with ewq.",
    )


class QuantizeConfig(SourceConfig):
    """How a planned model is written (`ewq quantize`)."""

    format: Format | None = Field(
        None,
        description="gguf: one file for llama.cpp (from a GGUF or a Hugging Face "
        "source). hf: a folder transformers and vLLM load (compressed-tensors, from a "
        "Hugging Face folder). Default: the format the plan was sized for, else gguf.",
        json_schema_extra=cli("--format"),
    )
    threads: int | None = Field(
        None, ge=1, description="Quantizer threads (default: all cores)."
    )
    gpu_layers: int | None = gpu_layers_field()
    imatrix: Path | None = Field(
        None,
        description="The importance matrix for llama.cpp's quantizer (default: the one "
        "the plan was made with, found beside the plan).",
    )
    force: bool = Field(
        False, description="Replace an earlier ewq output folder at --out (hf)."
    )
    calibration: Path | None = Field(
        None,
        description="Calibration text, or 'self' (text sampled from the model, as "
        "`ewq plan --calibration self` samples it): each quantized tensor is rounded "
        "against its inputs' second moments on it (GPTQ inside llama.cpp's types; "
        "gguf), and its importance matrix is handed to llama.cpp's quantizer unless "
        "one is given.",
    )
    documents: Documents = Field(
        Documents.STREAM,
        description="How the calibration text is cut into windows: stream or lines.",
    )
    calibration_ctx: int = Field(
        512, ge=16, description="Tokens per calibration window."
    )
    calibration_tokens: int | None = calibration_tokens_field()
    rounding: Rounding = Field(
        Rounding.AUTO,
        description="gptq (the default with --calibration) or nearest (llama.cpp's "
        "own rounding, per row).",
    )
    memory_limit: str | None = Field(
        None,
        description="At most this much memory for GPTQ's second moments (8GB, "
        "1.5GiB): as many blocks per pass over the calibration text as it holds. "
        "Default: a quarter of the memory available.",
    )


class MakeConfig(PlanConfig):
    """`ewq quantize` with a budget instead of --plan: the plan made, written beside
    the output and followed in one go. Every option of `ewq plan` and of `ewq
    quantize`; :meth:`planning` and :meth:`writing` give each step its record."""

    calibration_ctx: int | None = Field(  # type: ignore[assignment]
        None,
        ge=16,
        description="Tokens per calibration window. Default: each step's own (the "
        "plan's kl criterion 256, the rounding 512).",
    )
    force: bool = QuantizeConfig.model_fields["force"]
    rounding: Rounding = QuantizeConfig.model_fields["rounding"]
    memory_limit: str | None = QuantizeConfig.model_fields["memory_limit"]

    def planning(self) -> PlanConfig:
        """The plan's options."""
        return self._as(PlanConfig)

    def writing(self) -> QuantizeConfig:
        """The quantizer's options."""
        return self._as(QuantizeConfig)

    def _as(self, kind: type[Config]) -> Any:
        values = {k: getattr(self, k) for k in kind.model_fields}
        if values.get("calibration_ctx") is None:
            values.pop("calibration_ctx", None)  # that step's own default
        return kind(**values)

    def planned_options(self) -> list[str]:
        """The options given that only a plan made here reads (with --plan, the
        plan is made already): those of `ewq plan` that `ewq quantize` lacks, set
        to other than their defaults."""
        own = set(QuantizeConfig.model_fields)
        return [
            name
            for name, f in PlanConfig.model_fields.items()
            if name not in own and getattr(self, name) != f.default
        ]
