"""The `ewq plan` JSON (the plan file `ewq quantize` takes) and terminal table."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from ewq.reports.inspect import human_bytes
from ewq.types import BlockKind

__all__ = ["SCHEMA_VERSION", "plan_json", "plan_table"]

SCHEMA_VERSION = 1


def plan_json(planned: Any, ewq_version: str) -> dict[str, Any]:
    """Deterministic: the same inputs give byte-identical files (no clock, no paths
    other than the source as given)."""
    a, r, layout = planned.analysis, planned.result, planned.layout
    entropy = {b.exec_index: b.entropy for b in a.profile.blocks} if a else {}

    def side(block: Any) -> dict[str, Any]:
        i = block.exec_index
        return {
            "exec_index": i,
            "num_parameters": block.num_parameters,
            "precision": r.precision[i].value,
            "bytes": r.bytes[i],
            "machine": r.machine[i],
        }

    doc: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "kind": "ewq-plan",
        "ewq_version": ewq_version,
        "source": planned.index.source,
        "method": planned.method,
        "mode": r.mode,
    }
    if a is not None:
        doc |= {
            "variant": a.decision.variant.value,
            "alpha": a.decision.alpha,
            "eps": a.profile.eps,
        }
    return doc | {
        "format": planned.format,
        "fits": r.fits,
        "total_bytes": r.total_bytes,
        "capacity_bytes": r.capacity_bytes,
        "smallest_bytes": r.smallest_bytes,
        "num_blocks": layout.num_blocks,
        "embedding": side(layout.blocks[0]),
        "head": side(layout.blocks[-1]),
        "blocks": [
            {
                "exec_index": b.exec_index,
                "num_parameters": b.num_parameters,
                "entropy": entropy.get(b.exec_index),
                "decision": planned.decision[b.exec_index].value,
                "precision": r.precision[b.exec_index].value,
                "bytes": r.bytes[b.exec_index],
                "machine": r.machine[b.exec_index],
            }
            for b in layout.transformer_blocks
        ],
        "machines": [
            {
                "name": m.name,
                "capacity_bytes": m.capacity_bytes,
                "bytes": m.bytes,
                "exec_indices": list(m.exec_indices),
            }
            for m in r.machines
        ],
        "exports": planned.exports,
    }


def plan_table(planned: Any) -> Table:
    a, r, layout = planned.analysis, planned.result, planned.layout
    counts: dict[str, int] = {}
    for b in layout.transformer_blocks:
        p = r.precision[b.exec_index].value
        counts[p] = counts.get(p, 0) + 1
    table = Table(
        title=f"{planned.index.source}: {planned.method} plan, mode {r.mode}, "
        f"{planned.format} sizes",
        caption=f"{human_bytes(r.total_bytes)} of {human_bytes(r.capacity_bytes)} on "
        f"{sum(1 for m in r.machines if m.exec_indices)} machine(s); blocks: "
        + ", ".join(f"{n} {p}" for p, n in counts.items()),
    )
    for col in (
        "exec_index",
        "kind",
        "entropy",
        "decision",
        "precision",
        "bytes",
        "machine",
    ):
        table.add_column(
            col,
            justify="right" if col in ("exec_index", "entropy", "bytes") else "left",
        )
    styles = {"raw": "", "8-bit": "yellow", "4-bit": "red"}
    entropy = {b.exec_index: b.entropy for b in a.profile.blocks} if a else {}
    for b in layout.blocks:
        i = b.exec_index
        p = r.precision[i].value
        decision = planned.decision[i].value if b.kind is BlockKind.TRANSFORMER else "-"
        h = entropy.get(i)
        table.add_row(
            str(i),
            b.kind.value,
            "-" if h is None else f"{h:.6f}",
            decision,
            p,
            human_bytes(r.bytes[i]),
            r.machine[i] or "-",
            style=styles.get(p, "magenta"),
        )
    return table
