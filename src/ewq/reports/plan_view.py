"""The `ewq plan` terminal view: the plan's table and caption, the placement
table, the runtimes' commands, and the one line a plan that does not fit gets
(the plan file is reports/plan.py's)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.table import Table

from ewq.errors import one_line
from ewq.records import PlanResult
from ewq.reports.fit import idle_reasons, unfit_reason
from ewq.reports.inspect import human_bytes
from ewq.reports.plan import anchor_line, machine_record, predicted_kl
from ewq.types import BlockKind

__all__ = [
    "export_lines",
    "measured_line",
    "placement_table",
    "plan_table",
    "unfit_message",
]


def plan_table(planned: PlanResult) -> Table:
    """One row per block: its entropy, the paper's decision, the precision (and
    per-tensor types) chosen, its bytes and machine; the caption sums it up."""
    r, layout = planned.result, planned.layout
    how = (
        f"criterion {planned.criterion}, {planned.allocator} allocator"
        if planned.method == "ewq"
        else f"{planned.method} (Algorithm 2)"
    )
    table = Table(
        title=f"{planned.index.source}: {how}, {planned.format.name} sizes",
        caption=_caption(planned),
    )
    per_tensor = bool(r.tensors)
    columns = ["exec_index", "kind", "entropy", "decision", "precision", "bytes"]
    columns += ["types"] if per_tensor else []
    for col in (*columns, "machine"):
        table.add_column(
            col,
            justify="right" if col in ("exec_index", "entropy", "bytes") else "left",
        )
    a = planned.analysis
    entropy = {b.exec_index: b.entropy for b in a.profile.blocks} if a else {}
    for b in layout.blocks:
        i = b.exec_index
        p = r.precision[i].value
        decision = planned.decision[i].value if b.kind is BlockKind.TRANSFORMER else "-"
        h = entropy.get(i)
        cells = [
            str(i),
            b.kind.value,
            "-" if h is None else f"{h:.6f}",
            decision,
            p,
            human_bytes(r.bytes[i]),
        ]
        if per_tensor:
            cells.append(_types(b, r.tensors))
        table.add_row(*cells, r.machine[i] or "-", style=_STYLES.get(p, "magenta"))
    return table


_STYLES = {
    "raw": "",
    "8-bit": "yellow",
    "6-bit": "yellow",
    "5-bit": "dark_orange",
    "4-bit": "red",
}


def _types(block: Any, tensors: Mapping[str, Any]) -> str:
    """How many of the block's tensors each type holds: '4 Q4_K, 2 Q6_K'."""
    counts: dict[str, int] = {}
    for t in block.tensors:
        o = tensors.get(t.name)
        if o is not None:
            counts[str(o.precision)] = counts.get(str(o.precision), 0) + 1
    return ", ".join(f"{n} {t}" for t, n in counts.items()) or "-"


def _caption(planned: PlanResult) -> str:
    """Weights, runtime and capacity; blocks per precision; bits per weight, the
    predicted KL, the importance matrix and the anchor when there are."""
    r, rt = planned.result, planned.runtime
    counts: dict[str, int] = {}
    for b in planned.layout.transformer_blocks:
        p = r.precision[b.exec_index].value
        counts[p] = counts.get(p, 0) + 1
    runtime, capacity = "", r.capacity_bytes
    if rt is not None:
        kv = sum(rt.kv_bytes.values())
        used = sum(1 for m in r.assignments if m.exec_indices)
        buffers = rt.stage_bytes * used + rt.head_bytes
        runtime = (
            f" + KV cache {human_bytes(kv)} ({rt.context} tokens) + buffers "
            f"{human_bytes(buffers)}"
        )
        capacity = r.capacity_bytes + rt.stage_bytes * len(r.assignments)
    caption = (
        f"weights {human_bytes(r.total_bytes)}{runtime} of "
        f"{human_bytes(capacity)} on {sum(1 for m in r.assignments if m.exec_indices)} "
        "machine(s); blocks: " + ", ".join(f"{n} {p}" for p, n in counts.items())
    )
    kl = predicted_kl(planned)
    if kl is None and not r.tensors:
        return caption
    bits = 8 * r.total_bytes / max(1, planned.layout_parameters)
    extra = [f"{bits:.3f} bits per weight"]
    if kl is not None:
        extra.append(f"predicted KL {kl:.4g} nats/token")
    m = planned.imatrix
    if m is not None:
        extra.append(
            f"importance matrix of {m.chunk_count} chunks"
            + (f" ({m.datasets[0]})" if m.datasets else "")
        )
    if planned.anchor is not None:
        extra.append(anchor_line(planned.anchor))
    sampled = _sampled_line(planned)
    if sampled:
        extra.append(sampled)
    return f"{caption}; " + "; ".join(extra)


def measured_line(planned: PlanResult) -> str | None:
    """What the criterion measured for this plan, or that it reused an earlier
    measurement (one measurement serves every budget and machine); None for a
    modelled criterion."""
    sens = planned.sensitivity
    if sens is None or "cached" not in sens.details:  # a modelled criterion
        return None
    d = sens.details
    what = f"{sens.criterion} criterion"
    if "tensors_measured" in d:
        what += (
            f" ({d['tensors_measured']} tensors measured, "
            f"{d['tensors_interpolated']} interpolated, "
            f"{d.get('type_files', 0)} type files)"
        )
    if d.get("cached"):
        return f"{what}: reused from the cache (measured once in {sens.seconds:.0f} s)"
    return f"{what}: measured in {sens.seconds:.0f} s (cached for other budgets)"


def _sampled_line(planned: PlanResult) -> str | None:
    """How much of the model a sampled error criterion read, what it sampled again
    and what it could not decide (ewq.api._grow)."""
    sens = planned.sensitivity
    rec = sens.details.get("sampling") if sens is not None else None
    if not rec:
        return None
    read = rec["rows_read"] / max(1, rec["rows_total"])
    rounds = [r for r in rec.get("rounds") or () if r["rows_added"]]
    line = f"errors from {read:.1%} of the rows"
    if rounds:
        added = sum(r["rows_added"] for r in rounds)
        line += f" ({added:,} added in {len(rounds)} round(s) where the plan was close)"
    left = rec.get("undecided") or []
    if left:
        line += f"; {len(left)} tensor(s) whose type the sample cannot decide"
    return line


def placement_table(planned: PlanResult) -> Table | None:
    """One row per machine of the pipeline: its blocks, its bytes against its
    capacity, and the command it runs (None for a single machine)."""
    r = planned.result
    stages = [m for m in r.assignments if m.exec_indices]
    if len(stages) < 2 or not r.fits:
        return None
    rt = planned.runtime
    llama = planned.exports.get("llama_cpp", {})
    vllm = planned.exports.get("vllm", {})
    runs: dict[str, str] = {}
    if llama.get("command"):
        runs[stages[0].name] = "ewq serve PLAN.json --model MODEL.gguf"
        runs.update({w["machine"]: w["ewq"] for w in llama["workers"]})
    elif vllm.get("command"):
        runs = {x["machine"]: f"vLLM rank {x['rank']}" for x in vllm["ranks"]}
    seconds = r.seconds_per_token
    idle = idle_reasons(planned)
    table = Table(
        title="placement, in pipeline order"
        + (f" (modelled {seconds * 1e3:.2f} ms per token)" if seconds else ""),
        caption=one_line(
            "; ".join(f"{n} has no block: {why}" for n, why in idle.items())
        )
        or None,
    )
    for col in ("machine", "blocks", "weights", "total", "capacity", "runs"):
        table.add_column(
            col, justify="right" if col in ("weights", "total", "capacity") else "left"
        )
    for m in stages:
        row = machine_record(m, r, rt)
        first, last = m.exec_indices[0], m.exec_indices[-1]
        blocks = f"{first}-{last}" if first != last else str(first)
        if m.copy_bytes:
            blocks += " + embedding copy"
        table.add_row(
            m.name,
            blocks,
            human_bytes(row["weights_bytes"]),
            human_bytes(row["bytes"]),
            human_bytes(row["capacity_bytes"]),
            runs.get(m.name, "-"),
        )
    return table


def export_lines(planned: PlanResult) -> list[str]:
    """The runtime commands of a plan, one line each (workers first)."""
    lines = []
    for name, export in planned.exports.items():
        if not export.get("command"):
            lines.append(f"{name}: not exported: {export['refused']}")
            continue
        for w in export.get("workers", ()):
            lines.append(f"{name}: on {w['machine']}: {w['command']}")
        lines.append(f"{name}: {export['command']}")
    return lines


def unfit_message(planned: PlanResult, source: str) -> str:
    """Why a plan does not fit, in one line: the smallest the weights can be, and
    what the runtime adds for its context."""
    r, rt, machines = planned.result, planned.runtime, planned.machines
    memory = sum(
        m.memory if m.disk is None else min(m.memory, m.disk) for m in machines
    )
    runtime = ""
    if rt is not None:
        extra = (
            sum(rt.kv_bytes.values()) + rt.stage_bytes * len(machines) + rt.head_bytes
        )
        runtime = (
            f" and the runtime {human_bytes(extra)} for {rt.context} tokens of "
            "context (KV cache and buffers; --context)"
        )
    reason = unfit_reason(planned)
    if reason is not None:
        return f"cannot fit {source} on {len(machines)} machines: {reason}"
    split = ", before splitting them across machines" if len(machines) > 1 else ""
    return (
        f"cannot fit {source} into {human_bytes(memory)} on {len(machines)} "
        f"machine(s): the weights need at least {human_bytes(r.smallest_bytes)} "
        f"({r.smallest_bytes:,} bytes{split}){runtime}"
    )
