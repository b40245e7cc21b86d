"""The `ewq plan` JSON (the plan file `ewq quantize` takes) and terminal table."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.table import Table

from ewq.errors import one_line
from ewq.planfile import (
    BlockPlan,
    ImatrixRecord,
    MachinePlan,
    Plan,
    RuntimePlan,
    SidePlan,
    TensorPlan,
)
from ewq.records import PlanResult
from ewq.reports.fit import idle_reasons, unfit_reason
from ewq.reports.inspect import human_bytes
from ewq.types import BlockKind

__all__ = [
    "broken_warning",
    "export_lines",
    "predicted_kl",
    "placement_table",
    "plan_json",
    "plan_record",
    "plan_table",
    "unfit_message",
]


def plan_json(planned: PlanResult, ewq_version: str) -> dict[str, Any]:
    """The plan file's document: the dump of :func:`plan_record`."""
    return plan_record(planned, ewq_version).to_file()


def plan_record(planned: PlanResult, ewq_version: str) -> Plan:
    """The typed plan of what was planned. Deterministic: the same inputs give
    byte-identical files (no clock, no paths other than the source as given)."""
    a, r, layout = planned.analysis, planned.result, planned.layout
    made: dict[str, Any] = {}
    if a is not None:
        made |= {
            "variant": a.decision.variant.value,
            "alpha": a.decision.alpha,
            "eps": a.profile.eps,
        }
    if r.mode is not None:  # the ladder's precision pair
        made["mode"] = r.mode
    if r.damage is not None:
        made["estimated_damage"] = r.damage
    if planned.sensitivity is not None:
        made["sensitivity"] = {
            k: v for k, v in planned.sensitivity.details.items() if k != "cached"
        }
    if planned.runtime is not None:
        made["runtime"] = _runtime(planned.runtime)
    idle = idle_reasons(planned)
    return Plan(
        ewq_version=ewq_version,
        source=planned.index.source,
        method=planned.method,
        criterion=planned.criterion,
        allocator=planned.allocator,
        # threads change the speed, not the plan: left out, so plans made with
        # different thread counts are the same file
        config=planned.config.model_dump(mode="json", exclude={"threads"}),
        **made,
        format=planned.format,
        fits=r.fits,
        total_bytes=r.total_bytes,
        capacity_bytes=r.capacity_bytes,
        smallest_bytes=r.smallest_bytes,
        num_blocks=layout.num_blocks,
        embedding=_side(planned, layout.blocks[0]),
        head=_side(planned, layout.blocks[-1]),
        blocks=_blocks(planned),
        tensors=[
            TensorPlan(name=n, type=str(o.precision), bytes=o.bytes, damage=o.damage)
            for n, o in r.tensors.items()
        ],
        imatrix=_imatrix(planned.imatrix),
        predicted_kl=predicted_kl(planned),
        selection=planned.selection,
        anchor=planned.anchor,
        bits_per_weight=8 * r.total_bytes / max(1, planned.layout_parameters),
        machines=[
            MachinePlan(
                **_machine(m, r, planned.runtime, planned.machines),
                **_idle(idle, m.name),
            )
            for m in r.assignments
        ],
        seconds_per_token=r.seconds_per_token,
        exports=planned.exports,
    )


def _runtime(rt: Any) -> RuntimePlan:
    return RuntimePlan(
        context=rt.context,
        kv_cells=rt.cells,
        compute_buffer_bytes=rt.compute_bytes,
        output_buffer_bytes=rt.output_bytes,
        kv_cache=rt.kv_cache,
        rules=f"llama.cpp: {rt.kv_cache} KV cache, n_ubatch 512 (ewq.planning.runtime)",
    )


def _side(planned: PlanResult, block: Any) -> SidePlan:
    r, i = planned.result, block.exec_index
    return SidePlan(
        exec_index=i,
        num_parameters=block.num_parameters,
        precision=r.precision[i],
        bytes=r.bytes[i],
        machine=r.machine[i],
    )


def _blocks(planned: PlanResult) -> list[BlockPlan]:
    a, r = planned.analysis, planned.result
    entropy = {b.exec_index: b.entropy for b in a.profile.blocks} if a else {}
    return [
        BlockPlan(
            exec_index=b.exec_index,
            num_parameters=b.num_parameters,
            entropy=entropy.get(b.exec_index),
            decision=planned.decision[b.exec_index],
            precision=r.precision[b.exec_index],
            bytes=r.bytes[b.exec_index],
            machine=r.machine[b.exec_index],
        )
        for b in planned.layout.transformer_blocks
    ]


def predicted_kl(planned: PlanResult) -> float | None:
    """The plan's predicted KL from the unquantized model (nats per token): what the
    measured selection measured on the calibration text for the chosen plan, else
    the measured criteria's summed damage, compounded (None for the other criteria:
    not a KL)."""
    measured = _selected_kl(planned)
    if measured is not None:
        return measured
    if planned.criterion in ("error", "kl") and planned.result.damage is not None:
        from ewq.sensitivity import compounded

        return compounded(planned.result.damage, planned.criterion)
    return None


def _selected_kl(planned: PlanResult) -> float | None:
    chosen = (planned.selection or {}).get("chosen")
    for c in (planned.selection or {}).get("candidates", []):
        if c.get("plan") == chosen and c.get("measured_kl") is not None:
            return float(c["measured_kl"])
    return None


def _anchor_line(anchor: Mapping[str, Any]) -> str:
    """What the plan was held against: llama.cpp's recipe, and which was kept."""
    name = f"llama.cpp's {anchor['preset']} recipe"
    if anchor.get("resolution") is None:  # the measured selection decided
        return f"{name} measured too" + (" and kept" if anchor["chosen"] else "")
    if anchor["chosen"]:
        return f"{name} kept (the damage model's plan was not clearly better)"
    ratio = anchor["model_damage"] / anchor["recipe_damage"]
    return f"{ratio:.2f}x the predicted damage of {name}"


def broken_warning(planned: PlanResult) -> str | None:
    """One line when the plan may be a broken model: its predicted KL, at the most
    its criterion has been seen to underestimate, reaches BROKEN_KL."""
    from ewq.sensitivity import BROKEN_KL, spread

    kl = predicted_kl(planned)
    if kl is None:
        return None
    worst = kl if _selected_kl(planned) is not None else kl * spread(planned.criterion)
    if worst < BROKEN_KL:
        return None
    up_to = "" if worst == kl else f", up to {worst:.2f} as measured on other plans"
    return (
        f"warning: the plan's predicted KL divergence is {kl:.2f} nats per token"
        f"{up_to} (a broken model from {BROKEN_KL:g}): the model may be broken; "
        "give it more memory or bits"
    )


def _imatrix(m: Any) -> ImatrixRecord | None:
    if m is None:
        return None
    return ImatrixRecord(
        sha256=m.digest(),
        file=m.file,
        entries=len(m.entries),
        chunk_count=m.chunk_count,
        chunk_size=m.chunk_size,
        datasets=list(m.datasets),
    )


def _idle(reasons: dict[str, str], name: str) -> dict[str, str]:
    return {"idle": reasons[name]} if name in reasons else {}


def _machine(m: Any, r: Any, rt: Any, machines: Any = ()) -> dict[str, Any]:
    """One machine's share: weights, the KV cache of its layers, the runtime's
    buffers (when a context was given) and their sum against its capacity."""
    weights = sum(r.bytes[i] for i in m.exec_indices) + m.copy_bytes
    kv = sum(rt.kv_bytes.get(i, 0) for i in m.exec_indices) if rt is not None else 0
    buffers = 0
    if rt is not None and m.exec_indices:
        holds_head = m.exec_indices[-1] == max(r.precision)
        buffers = rt.buffers_bytes if holds_head else rt.stage_bytes
    return {
        "name": m.name,
        "capacity_bytes": m.capacity_bytes + (rt.stage_bytes if rt else 0),
        "bytes": weights + kv + buffers,
        "weights_bytes": weights,
        "kv_bytes": kv,
        "buffers_bytes": buffers,
        "exec_indices": list(m.exec_indices),
        "copy_bytes": m.copy_bytes,
        "host": next((x.host for x in machines if x.name == m.name), None),
    }


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
        title=f"{planned.index.source}: {how}, {planned.format} sizes",
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
        extra.append(_anchor_line(planned.anchor))
    return f"{caption}; " + "; ".join(extra)


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
        row = _machine(m, r, rt)
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
