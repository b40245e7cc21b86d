"""`ewq serve`: where llama.cpp put each machine's share, beside the plan."""

from __future__ import annotations

from typing import Any

from rich.table import Table

__all__ = ["served_json", "served_table"]


def _layers(layers: list[int]) -> str:
    if not layers:
        return "-"
    return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])


def _mib(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f} MiB"


def served_table(cm: Any) -> Table:
    """One row per machine: the layers llama.cpp put there (its layer numbers; the
    last is the output layer) and its buffers as llama.cpp reported them. The main
    machine maps the whole file, so its model buffer is the file."""
    table = Table(
        title=f"llama.cpp placement (-ngl {cm.n_gpu_layers}, --tensor-split "
        f"{','.join(f'{x:g}' for x in cm.tensor_split) or '-'})",
    )
    for col in ("machine", "endpoint", "layers", "planned", "model", "KV", "compute"):
        table.add_column(
            col, justify="left" if col in ("machine", "endpoint", "layers") else "right"
        )
    for row in cm.report():
        table.add_row(
            row["machine"],
            row["endpoint"] or "this process",
            _layers(row["layers"]),
            _mib(row["planned_weights_mib"]),
            _mib(row["model_mib"]),
            _mib(row["kv_mib"]),
            _mib(row["compute_mib"]),
        )
    return table


def served_json(
    cm: Any, prompt: str | None, text: str | None, ewq_version: str
) -> dict[str, Any]:
    return {
        "kind": "ewq-serve",
        "ewq_version": ewq_version,
        "n_gpu_layers": cm.n_gpu_layers,
        "tensor_split": cm.tensor_split,
        "machines": cm.report(),
        "prompt": prompt,
        "completion": text,
    }
