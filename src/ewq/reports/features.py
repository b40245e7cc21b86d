"""The `ewq features` JSON document and terminal table."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from ewq.fast.features import Features

__all__ = ["SCHEMA_VERSION", "features_json", "features_table"]

SCHEMA_VERSION = 1


def features_json(f: Features, ewq_version: str) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "ewq-features",
        "ewq_version": ewq_version,
        "source": f.source,
        "model_name": f.model_name,
        "method": f.method,
        "num_blocks": f.num_blocks,
        "blocks": [
            {"exec_index": b.exec_index, "num_parameters": b.num_parameters}
            for b in f.blocks
        ],
    }


def features_table(f: Features) -> Table:
    how = "config.json" if f.method == "config" else "tensor headers"
    table = Table(
        title=f"{f.model_name}: FastEWQ features (from {how}, no weights read)"
    )
    for col in ("model_name", "num_blocks", "exec_index", "num_parameters"):
        table.add_column(col, justify="left" if col == "model_name" else "right")
    for b in f.blocks:
        table.add_row(
            f.model_name, str(f.num_blocks), str(b.exec_index), f"{b.num_parameters:,}"
        )
    return table
