"""ewq's plans at each preset's exact bytes, measured by the judge: the criteria's
plans (`ewq plan`'s own for kl and error), and the paper's ladder."""

from __future__ import annotations

from ewq import api
from ewq.compare._common import _counts
from ewq.formats import GGUF
from ewq.planning import Machine, fit
from ewq.reports.plan import predicted_kl


def _plans(
    source, analysis, sens, im, preset_rows, judge, log, plan_options
) -> list[dict]:
    """ewq's plans at each preset's exact bytes: for the kl and error criteria,
    `ewq plan`'s own (``plan_options``), the others through the allocator."""
    layout = analysis.layout
    rows = []
    budgets: dict[int, list[str]] = {}
    for r in preset_rows:
        budgets.setdefault(r["bytes"], []).append(r["size_of"])
    ladder = _ladder_plans(analysis, budgets)
    for budget, names in sorted(budgets.items(), reverse=True):
        size_of = names[0]
        first = len(rows)
        for name, s in sens.items():
            uses = im if name == "ewq kl" else None
            machines = [Machine("m", budget)]
            predicted = None
            if name in plan_options:  # what `ewq plan` gives, measured selection too
                planned = api.plan(source, machines, **plan_options[name])
                r, predicted = planned.result, predicted_kl(planned)
            else:
                r = api.fit_tensors(GGUF, layout, s, uses, None, machines, None, None)
            if not r.fits:
                rows.append(
                    {"size_of": size_of, "plan": name, "bytes": None, "budget": budget}
                )
                continue
            types = {n: str(o.precision) for n, o in r.tensors.items()}
            changed = {n: t for n, t in types.items() if t != _own(layout, n)}
            m = judge.raw if not changed else judge.tensors(types, uses is not None)
            rows.append(
                {
                    "size_of": size_of,
                    "plan": name,
                    "budget": budget,
                    "bytes": r.total_bytes,
                    "types": _counts(types),
                    "predicted_kl": predicted,
                    **m,
                }
            )
            log(
                f"  at {size_of} {name}: {r.total_bytes / 1e6:.3f} MB, "
                f"KL {m['kl_mean']:.5f} (predicted {r.damage:.5f})"
            )
            if uses is not None and judge.gptq is not None and changed:
                g = judge.tensors(types, True, gptq=True)
                rows.append({**rows[-1], "plan": f"{name} + GPTQ", **g})
                log(f"  at {size_of} {name} + GPTQ: KL {g['kl_mean']:.5f}")
        lad = ladder.get(budget)
        if lad is not None:
            m = judge.tensors(lad[1], False)
            rows.append(
                {
                    "size_of": size_of,
                    "plan": "paper ladder (entropy)",
                    "budget": budget,
                    "bytes": lad[0],
                    "types": _counts(lad[1]),
                    **m,
                }
            )
        rows += _shared(rows[first:], names)
    return rows


def _shared(planned: list[dict], names: list[str]) -> list[dict]:
    """Presets of the same bytes (SmolLM2's Q2_K falls back to Q3_K_S's types)
    share the plans made at that budget: each gets them under its own name."""
    others = [n for n in dict.fromkeys(names) if n != names[0]]
    return [{**r, "size_of": n} for n in others for r in planned]


def _own(layout, name: str) -> str:
    for b in layout.blocks:
        for t in b.tensors:
            if t.name == name:
                return t.dtype
    return ""


def _ladder_plans(analysis, budgets) -> dict[int, tuple[int, dict[str, str]]]:
    """The paper's Algorithm 1 at each budget: (bytes, per-tensor types)."""
    from ewq.planning import block_specs

    layout = analysis.layout
    specs = {s.exec_index: s for s in block_specs(GGUF, layout)}
    blocks = [b.exec_index for b in layout.transformer_blocks]
    emb, head = layout.blocks[0].exec_index, layout.blocks[-1].exec_index
    form = GGUF
    out = {}
    for budget in budgets:
        d = analysis.decision
        r = fit(
            [specs[i] for i in blocks],
            specs[emb],
            specs[head],
            d.precision,
            d.priority,
            [Machine("m", budget)],
        )
        if not r.fits:
            continue
        types = {}
        for b in layout.blocks:
            for info, key in zip(b.tensors, b.keys, strict=True):
                e = form.encoding(info, key, r.precision[b.exec_index])
                if e is not None and e.quantizable:
                    types[info.name] = e.type
        out[budget] = (r.total_bytes, types)
    return out
