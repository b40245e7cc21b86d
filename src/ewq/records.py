"""What each stage of the API returns: frozen records, defined below the reports
that render them (so a report takes a real type) and above the stages that fill
them in."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from ewq._version import __version__
from ewq.analysis import Decision, EntropyProfile
from ewq.arch import ModelLayout
from ewq.config import BenchConfig, PlanConfig, Task
from ewq.formats import OutputFormat
from ewq.imatrix import Imatrix
from ewq.planfile import Plan
from ewq.planning import FitResult, Machine, Runtime
from ewq.quant.targets import TensorTarget
from ewq.sensitivity import Sensitivity
from ewq.types import ModelIndex, Precision

__all__ = [
    "Analysis",
    "BenchRecord",
    "EvalRecord",
    "Inspection",
    "PlanResult",
    "Quantized",
]


@dataclass(frozen=True)
class Inspection:
    """A model's tensor index and its block structure; no weight has been read."""

    index: ModelIndex
    layout: ModelLayout


@dataclass(frozen=True)
class Analysis:
    """A model's block entropies and the EWQ decision drawn from them."""

    index: ModelIndex
    layout: ModelLayout
    profile: EntropyProfile
    decision: Decision
    # with --sample: fraction, seed, bytes read of total, per block the interval,
    # the blocks left undecided and the pairs left unordered
    sampling: dict | None = None


@dataclass(frozen=True)
class Quantized:
    """A written quantized model and what went into it."""

    source: str
    out: Path
    format: OutputFormat
    plan: Plan
    targets: tuple[TensorTarget, ...]  # per tensor: planned type and exact bytes
    written: dict[str, str]  # per tensor: the type (gguf) or form (hf) read back
    predicted_bytes: int  # tensor data, from the size function
    file_bytes: int  # the file, or every file of the output folder
    llama_quantize_args: tuple[str, ...]  # gguf only
    #: how weights were rounded beyond llama.cpp's quantizer (ewq.quant.gptq): the
    #: method, the calibration text's sha256, the damping and the tensors re-rounded
    rounding: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PlanResult:
    """A plan for a budget: what it rests on, the fit, and the exports.

    ``analysis`` is the EWQ analysis (method ewq); for the FastEWQ methods it is None
    and ``predicted`` holds the classifier's choice per block. ``sensitivity`` is
    the criterion's damage table (optimal allocator); ``runtime`` the memory the
    runtime adds per machine (KV cache and buffers), when a context was given.
    ``config`` is every option as resolved (criterion and allocator filled in).
    """

    index: ModelIndex
    layout: ModelLayout
    config: PlanConfig
    format: OutputFormat
    machines: tuple[Machine, ...]
    decision: Mapping[int, Precision]
    priority: tuple[int, ...]
    result: FitResult
    exports: dict
    analysis: Analysis | None = None
    predicted: Mapping[int, bool] | None = None
    sensitivity: Sensitivity | None = None
    runtime: Runtime | None = None
    imatrix: Imatrix | None = None  # the importance matrix it rests on
    selection: Mapping | None = None  # the plans measured on calibration text
    anchor: Mapping | None = None  # the runtime's recipe the plan was held against

    @property
    def method(self) -> str:
        return self.config.method.value

    @property
    def layout_parameters(self) -> int:
        """Every parameter of the model's blocks (bits per weight count them)."""
        return sum(b.num_parameters for b in self.layout.blocks)

    @property
    def criterion(self) -> str:
        return self.config.criterion.value if self.config.criterion else "entropy"

    @property
    def allocator(self) -> str:
        return self.config.allocator.value if self.config.allocator else "ladder"


class _Record(BaseModel):
    """A result file's record: what it holds is declared, an unknown field refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    schema_version: int = 1
    ewq_version: str = __version__


class EvalRecord(_Record):
    """What `ewq eval` measured, on which data (its --json file). ``metrics`` are
    the task's (ewq.evaluate.tasks): their names differ from task to task."""

    kind: Literal["ewq-eval"] = "ewq-eval"
    task: Task
    source: str
    quantized: str | None = None
    plan: str | dict | None = None  # a plan file, or the plan itself
    data: str
    limit: int | None = None  # questions, windows or sentences
    split: str | None = None  # mmlu
    shots: int | None = None  # mmlu
    ctx: int | None = None  # tokens per window (not for sentences)
    stride: int | None = None  # perplexity and kld
    metrics: dict[str, Any]


class BenchRecord(_Record):
    """What `ewq bench` measured (its bench.json): per variant its metrics, and
    the equal-size comparison's points (per point the order that chose the blocks,
    the bytes and the metrics)."""

    kind: Literal["ewq-bench", "ewq-bench-encoder"]
    source: str
    model_name: str
    config: BenchConfig
    variants: list[dict[str, Any]]
    equal_size: list[dict[str, Any]]
    #: decoders: FastEWQ's two forests compared question by question (paired test)
    fast_vs_fast_train: dict[str, Any] | None = None
    sentences: int | None = None  # encoders: sentences per variant
    text: str | None = None  # encoders: the sentences' file
