"""The `ewq quantize` provenance record and terminal summary."""

from __future__ import annotations

import shlex
from collections import Counter
from pathlib import Path
from typing import Any

from rich.table import Table

from ewq.records import Quantized
from ewq.reports.inspect import human_bytes

__all__ = ["SCHEMA_VERSION", "provenance_json", "provenance_path", "quantize_table"]

SCHEMA_VERSION = 1


def provenance_path(out: Path) -> Path:
    """The provenance record sits beside the output: ``model.gguf.ewq.json``."""
    return out.with_name(out.name + ".ewq.json")


def provenance_json(q: Quantized, ewq_version: str) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "ewq-quantized",
        "ewq_version": ewq_version,
        "source": q.source,
        "output": str(q.out),
        "format": q.format.name,
        "quantizer": q.format.quantizer
        + (", then GPTQ rounding (ewq.quant.gptq)" if q.rounding else ""),
        "plan": q.plan.to_doc(),
        "predicted_tensor_bytes": q.predicted_bytes,
        "file_bytes": q.file_bytes,
        "rounding": dict(q.rounding) or {"method": "nearest"},
        "llama_quantize_command": (
            shlex.join(q.llama_quantize_args) if q.llama_quantize_args else None
        ),
        "tensors": [
            {
                "name": t.name,
                "exec_index": t.exec_index,
                "precision": t.precision.value,
                "source_type": t.source_type,
                "planned_type": t.type,
                "type": q.written.get(t.name),
                "fallback": t.fallback,
                "bytes": t.nbytes,
            }
            for t in q.targets
        ],
    }


def quantize_table(q: Quantized) -> Table:
    table = Table(
        title=f"{q.source} -> {q.out} ({q.format.name})",
        caption=f"tensor data {human_bytes(q.predicted_bytes)} predicted and written; "
        f"file {human_bytes(q.file_bytes)} with metadata",
    )
    for col in ("exec_index", "precision", "types written", "fallbacks", "bytes"):
        table.add_column(
            col, justify="left" if col in ("precision", "types written") else "right"
        )
    rows: dict[Any, list[Any]] = {}
    for t in q.targets:
        rows.setdefault(t.exec_index, []).append(t)
    for idx in sorted(rows, key=lambda i: (i is None, i or 0)):
        ts = rows[idx]
        types = Counter(q.written.get(t.name, "?") for t in ts)
        table.add_row(
            "-" if idx is None else str(idx),
            ts[0].precision.value,
            ", ".join(f"{n} {k}" for k, n in sorted(types.items())),
            str(sum(t.fallback for t in ts)),
            human_bytes(sum(t.nbytes for t in ts)),
        )
    return table
