"""The plan file: what `ewq quantize` takes, versioned JSON.

Schema (version 2)::

    {"schema_version": 2, "kind": "ewq-plan", "source": "...", "format": "gguf",
     "num_blocks": 30,
     "tensors": [{"name": "blk.0.attn_q.weight", "type": "IQ4_XS", "bytes": 124416},
                 ...],
     "embedding": {"precision": "8-bit"}, "head": {"precision": "raw"},
     "blocks": [{"exec_index": 2, "precision": "4-bit", "num_parameters": 3540096},
                ...],
     "imatrix": {"sha256": "...", "entries": 210, ...}}

A plan chooses per tensor: ``tensors`` gives each tensor's type (a GGML type name
for gguf, an ``int4/g128``-style form for hf). A tensor not listed there is written
at its block's ``precision`` (the per-block form: hand-written plans, the paper's
decision and its ladder, FastEWQ); a plan made by `ewq plan` lists every tensor,
and its blocks' precisions are then the view derived from them (the bit class of
most of the block's bytes). Version 1 files (blocks only) are read as version 2.

``num_blocks`` and each block's optional ``num_parameters`` identify the model the
plan was made for; a plan whose blocks or tensors do not match the model is refused.
The planner adds fields of its own (bytes, machines, exports, the resolved config,
the importance matrix it used, the predicted KL), each declared here; an unknown
field (a misspelled "embeding") is refused, not ignored.

The JSON of `ewq analyze` (kind ``ewq-analysis``) is read as a plan too: each block
at EWQ's decision for it, with no budget (the paper's unbudgeted result).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ewq.config import Format
from ewq.errors import EwqError, SourceNotFoundError
from ewq.types import Precision

__all__ = [
    "SCHEMA_VERSION",
    "BlockPlan",
    "ImatrixRecord",
    "TensorPlan",
    "Exports",
    "MachinePlan",
    "Plan",
    "PlanError",
    "RuntimePlan",
    "SidePlan",
    "load_plan",
    "plan_doc",
    "plan_from_doc",
]

SCHEMA_VERSION = 2
_READS = (1, 2)  # version 1: the per-block form, read as it is


class PlanError(EwqError):
    """A plan file is unreadable, malformed, or made for another model."""


class _Strict(BaseModel):
    # a misspelled key ("embeding") is an error, not a silently ignored extra
    model_config = ConfigDict(extra="forbid", frozen=True)


class BlockPlan(_Strict):
    exec_index: int = Field(ge=2)
    precision: Precision
    num_parameters: int | None = Field(default=None, ge=0)
    # what the planner adds: for the reader, information only
    entropy: float | None = None
    decision: Precision | None = None  # EWQ's decision for the block (the paper's)
    bytes: int | None = Field(default=None, ge=0)
    machine: str | None = None


class TensorPlan(_Strict):
    """One tensor in the plan: the type it is written as."""

    name: str = Field(min_length=1)
    type: str = Field(min_length=1)
    # what the planner adds: for the reader, information only
    bytes: int | None = Field(default=None, ge=0)
    damage: float | None = None  # its share of the predicted KL


class ImatrixRecord(_Strict):
    """The importance matrix a plan was made with (and `ewq quantize` needs)."""

    sha256: str
    file: str | None = None
    entries: int = Field(ge=0)
    chunk_count: int = Field(default=0, ge=0)
    chunk_size: int = Field(default=0, ge=0)
    datasets: list[str] = []


class SidePlan(_Strict):
    precision: Precision = Precision.RAW
    exec_index: int | None = Field(default=None, ge=1)
    num_parameters: int | None = Field(default=None, ge=0)
    bytes: int | None = Field(default=None, ge=0)
    machine: str | None = None


class MachinePlan(_Strict):
    """One machine's share, as the planner wrote it."""

    name: str
    capacity_bytes: int
    bytes: int
    weights_bytes: int
    kv_bytes: int
    buffers_bytes: int
    exec_indices: list[int]
    copy_bytes: int = 0
    host: str | None = None
    idle: str | None = None  # why a machine holds no block


class WorkerExport(_Strict):
    machine: str
    endpoint: str
    command: str
    ewq: str


class LlamaCppExport(_Strict):
    """llama.cpp's command for the placement (ewq.planning.exports)."""

    command: str | None
    refused: str | None = None
    main: str | None = None
    rpc: list[str] = []
    n_gpu_layers: int | None = None
    tensor_split: list[int] = []
    workers: list[WorkerExport] = []


class VllmRank(_Strict):
    rank: int
    machine: str
    layers: int


class VllmExport(_Strict):
    command: str | None
    refused: str | None = None
    pipeline_parallel_size: int | None = None
    VLLM_PP_LAYER_PARTITION: str | None = None
    ranks: list[VllmRank] = []
    note: str | None = None


class Exports(_Strict):
    llama_cpp: LlamaCppExport | None = None
    vllm: VllmExport | None = None


class RuntimePlan(_Strict):
    """What the runtime adds to the weights for the plan's context."""

    context: int = Field(ge=0)
    kv_cells: int = Field(ge=0)
    compute_buffer_bytes: int = Field(ge=0)
    output_buffer_bytes: int = Field(ge=0)
    kv_cache: str = "f16"  # plans of ewq before --kv-cache did not say
    rules: str | None = None


class Plan(_Strict):
    """A plan file. `ewq plan` builds one from what it planned and writes its dump
    (fields it did not set are left out); fields are in the order a reader wants
    them: what it is and how it was made, what it gives, then the long lists."""

    schema_version: int = SCHEMA_VERSION
    kind: str = "ewq-plan"
    ewq_version: str | None = None
    source: str | None = None
    method: str = "ewq"
    criterion: str | None = None
    allocator: str | None = None
    mode: str | None = None  # the ladder's precision pair (allocator ladder)
    # the options as resolved: what `ewq quantize` and a re-run read back
    config: dict[str, Any] | None = None
    variant: str | None = None
    alpha: float | None = None
    eps: float | None = None
    estimated_damage: float | None = None
    sensitivity: dict[str, Any] | None = None
    runtime: RuntimePlan | None = None
    format: Format | None = None  # the output format the plan's sizes are for
    fits: bool | None = None
    total_bytes: int | None = None
    capacity_bytes: int | None = None
    smallest_bytes: int | None = None
    num_blocks: int | None = Field(default=None, ge=1)
    embedding: SidePlan = SidePlan()
    head: SidePlan = SidePlan()
    blocks: list[BlockPlan]
    tensors: list[TensorPlan] = []
    imatrix: ImatrixRecord | None = None
    predicted_kl: float | None = None
    selection: dict[str, Any] | None = None
    anchor: dict[str, Any] | None = None
    bits_per_weight: float | None = None
    machines: list[MachinePlan] = []
    seconds_per_token: float | None = None
    exports: Exports = Exports()

    def precision_of(self, exec_index: int, num_blocks: int) -> Precision:
        if exec_index == 1:
            return self.embedding.precision
        if exec_index == num_blocks + 2:
            return self.head.precision
        return self.by_index()[exec_index].precision

    def by_index(self) -> dict[int, BlockPlan]:
        return {b.exec_index: b for b in self.blocks}

    def types(self) -> dict[str, str]:
        """The per-tensor decisions, by tensor name."""
        return {t.name: t.type for t in self.tensors}

    def to_doc(self) -> dict[str, Any]:
        """Every field, defaults included (what a plan's digest is taken of)."""
        return self.model_dump(mode="json")

    def to_file(self) -> dict[str, Any]:
        """The plan file: what it is, and the fields that were set."""
        doc = self.model_dump(mode="json", exclude_unset=True)
        return {"schema_version": self.schema_version, "kind": self.kind} | doc


def plan_from_doc(doc: Any, origin: str = "plan") -> Plan:
    """Validate a decoded JSON plan."""
    if not isinstance(doc, dict):
        raise PlanError(f"{origin}: not a JSON object")
    version = doc.get("schema_version")
    if version not in _READS:
        raise PlanError(
            f"{origin}: schema_version {version!r} is not supported (this ewq reads "
            f"{', '.join(map(str, _READS))})"
        )
    if doc.get("kind") == "ewq-analysis":
        doc = _from_analysis(doc, origin)
    if doc.get("kind", "ewq-plan") != "ewq-plan":
        raise PlanError(
            f"{origin}: a {doc.get('kind')!r} document, not a plan (make one with "
            "ewq plan)"
        )
    try:
        plan = Plan.model_validate({**doc, "schema_version": SCHEMA_VERSION})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise PlanError(f"{origin}: {where}: {first['msg']}") from None
    seen: set[int] = set()
    for b in plan.blocks:
        if b.exec_index in seen:
            raise PlanError(f"{origin}: block {b.exec_index} is planned twice")
        seen.add(b.exec_index)
    names: set[str] = set()
    for t in plan.tensors:
        if t.name in names:
            raise PlanError(f"{origin}: tensor '{t.name}' is planned twice")
        names.add(t.name)
    return plan


def _from_analysis(doc: dict[str, Any], origin: str) -> dict[str, Any]:
    """The JSON of `ewq analyze` as a plan: EWQ's own decision per block, with no
    budget (the paper's result: each block at the precision its entropy gives it;
    the embedding and the head as they are)."""
    blocks = doc.get("blocks")
    if not isinstance(blocks, list) or not all(isinstance(b, dict) for b in blocks):
        raise PlanError(f"{origin}: an ewq analysis whose blocks are not a list")
    out: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "kind": "ewq-plan",
        "method": "ewq",
        "blocks": [
            {
                "exec_index": b.get("exec_index"),
                "precision": b.get("decision"),
                "num_parameters": b.get("num_parameters"),
                "entropy": b.get("entropy"),
                "decision": b.get("decision"),
            }
            for b in blocks
        ],
    }
    for key in ("source", "num_blocks", "variant", "alpha", "eps"):
        if doc.get(key) is not None:
            out[key] = doc[key]
    return out


def load_plan(path: str | os.PathLike[str]) -> Plan:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SourceNotFoundError(f"no such plan file: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PlanError(f"{path}: cannot read the plan ({exc})") from exc
    try:
        doc = json.loads(text)
    except RecursionError:
        raise PlanError(f"{path}: JSON nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, and integers of over 4,300 digits
        first = str(exc).splitlines()[0][:200]
        raise PlanError(f"{path}: not valid JSON ({first})") from None
    return plan_from_doc(doc, str(path))


def plan_doc(
    num_blocks: int,
    precision: dict[int, Precision],
    embedding: Precision | None = None,
    head: Precision | None = None,
    tensors: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A minimal plan document: each transformer block's precision (and, if given,
    the embedding's and the head's, and per-tensor types that override them)."""
    doc: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "num_blocks": num_blocks,
        "blocks": [
            {"exec_index": i, "precision": p.value}
            for i, p in sorted(precision.items())
        ],
    }
    if embedding is not None:
        doc["embedding"] = {"precision": embedding.value}
    if head is not None:
        doc["head"] = {"precision": head.value}
    if tensors:
        doc["tensors"] = [{"name": n, "type": t} for n, t in tensors.items()]
    return doc
