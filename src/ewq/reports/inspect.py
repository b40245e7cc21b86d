"""The `ewq inspect` JSON document and terminal table."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from ewq.arch import Block
from ewq.records import Inspection
from ewq.types import TensorInfo, TensorKey

__all__ = ["SCHEMA_VERSION", "inspection_json", "inspection_table"]

SCHEMA_VERSION = 1


def _tensor(t: TensorInfo, key: TensorKey | None) -> dict[str, Any]:
    return {
        "name": t.name,
        "role": key.role.value if key else None,
        "kind": key.kind.value if key else None,
        "dtype": t.dtype,
        "shape": list(t.shape),
        "num_parameters": t.num_elements,
        "bytes": t.nbytes,
    }


def _block(b: Block) -> dict[str, Any]:
    return {
        "exec_index": b.exec_index,
        "kind": b.kind.value,
        "num_parameters": b.num_parameters,
        "bytes": b.nbytes,
        "tensors": [_tensor(t, k) for t, k in zip(b.tensors, b.keys, strict=True)],
    }


def inspection_json(inspection: Inspection, ewq_version: str) -> dict[str, Any]:
    index, layout = inspection.index, inspection.layout
    return {
        "schema_version": SCHEMA_VERSION,
        "ewq_version": ewq_version,
        "source": index.source,
        "container": index.container,
        "metadata_only": index.metadata_only,
        "architecture": layout.architecture,
        "table": layout.table,
        "num_blocks": layout.num_blocks,
        "num_parameters": index.num_parameters,
        "bytes": index.nbytes,
        "files": list(index.files),
        "blocks": [_block(b) for b in layout.blocks],
        "unassigned": [_tensor(t, None) for t in layout.unassigned],
    }


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def inspection_table(inspection: Inspection) -> Table:
    index, layout = inspection.index, inspection.layout
    table = Table(
        title=f"{index.source}: {layout.architecture} ({layout.table} table), "
        f"{layout.num_blocks} transformer blocks",
        caption=f"{index.num_parameters:,} parameters, {human_bytes(index.nbytes)} "
        f"in {len(index.files)} file(s)",
    )
    for col in ("exec_index", "kind", "tensors", "parameters", "bytes"):
        table.add_column(col, justify="left" if col == "kind" else "right")
    for b in layout.blocks:
        table.add_row(
            str(b.exec_index),
            b.kind.value,
            str(len(b.tensors)),
            f"{b.num_parameters:,}",
            human_bytes(b.nbytes),
        )
    if layout.unassigned:
        n = sum(t.num_elements for t in layout.unassigned)
        size = sum(t.nbytes for t in layout.unassigned)
        table.add_row(
            "-", "unassigned", str(len(layout.unassigned)), f"{n:,}", human_bytes(size)
        )
    return table
