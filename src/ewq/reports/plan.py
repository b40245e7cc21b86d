"""The `ewq plan` JSON: the plan file `ewq quantize` and `ewq serve` take (its terminal
view is reports/plan_view.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

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
from ewq.reports.fit import idle_reasons

__all__ = [
    "anchor_line",
    "broken_warning",
    "machine_record",
    "plan_json",
    "plan_record",
    "predicted_kl",
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
        # threads and GPU offload change the speed, not the plan: left out, so
        # plans made with different thread counts or devices are the same file
        config=planned.config.model_dump(
            mode="json", exclude={"threads", "gpu_layers"}
        ),
        **made,
        format=planned.format.name,
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
                **machine_record(m, r, planned.runtime, planned.machines),
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


def anchor_line(anchor: Mapping[str, Any]) -> str:
    """What the plan was held against: llama.cpp's recipe, and which was kept."""
    name = f"llama.cpp's {anchor['preset']} recipe"
    if anchor.get("resolution") is None:  # the measured selection decided
        return f"{name} measured too" + (" and kept" if anchor["chosen"] else "")
    if anchor["chosen"]:
        return f"{name} kept (the damage model's plan was not clearly better)"
    model, recipe = anchor["model_damage"], anchor["recipe_damage"]
    if recipe <= 0:  # a budget that holds the model as it is: nothing to compare
        return f"no predicted damage, as {name}"
    return f"{model / recipe:.2f}x the predicted damage of {name}"


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


def machine_record(m: Any, r: Any, rt: Any, machines: Any = ()) -> dict[str, Any]:
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
