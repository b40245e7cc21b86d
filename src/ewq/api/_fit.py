"""The per-tensor allocation over what a format can write, and the per-tensor types
of a block-level plan."""

from __future__ import annotations

import math

from ewq.errors import EwqError
from ewq.formats import OutputFormat
from ewq.planning import Option, fit_optimal
from ewq.types import Precision

__all__ = ["fit_tensors"]


def fit_tensors(
    form: OutputFormat,
    layout,
    sens,
    imatrix_,
    runtime,
    machines,
    route,
    bpw,
    allow=None,
):
    """The optimal per-tensor allocation: every tensor the format can write in more
    than one way chooses its type; the others, and the KV cache, are fixed bytes.
    ``allow(info, encoding)``: the options a tensor may take (its own type and at
    least one other are always kept)."""
    from ewq.sensitivity import tensor_candidates

    cands = tensor_candidates(form, layout, imatrix_)
    options, block_of = {}, {}
    fixed = {b.exec_index: 0 for b in layout.blocks}
    params = {b.exec_index: b.num_parameters for b in layout.blocks}
    views: dict[str, Precision] = {}
    for block in layout.blocks:
        for info, key in zip(block.tensors, block.keys, strict=True):
            if info.name not in cands:
                e = form.encoding(info, key, Precision.RAW)
                fixed[block.exec_index] += e.nbytes if e is not None else 0
                continue
            _, _, encs = cands[info.name]
            if allow is not None:
                kept = [e for e in encs if allow(info, e)]
                encs = kept if kept else encs
            options[info.name] = [
                Option(e.type, e.nbytes, _damage(sens, info.name, e.type)) for e in encs
            ]
            views.update({f"{info.name}\0{e.type}": e.precision for e in encs})
            block_of[info.name] = block.exec_index
    if runtime is not None:
        for i, kv in runtime.kv_bytes.items():
            fixed[i] = fixed.get(i, 0) + kv
    cap = None
    if bpw is not None:  # the weights' budget, plus the KV cache counted in fixed
        kv = sum(runtime.kv_bytes.values()) if runtime is not None else 0
        cap = int(bpw * sum(params.values()) / 8) + kv
    view = {
        id(o): views[f"{n}\0{o.precision}"] for n, opts in options.items() for o in opts
    }
    return fit_optimal(
        options,
        params,
        machines,
        route=route,
        block_of=block_of,
        fixed=fixed,
        view=lambda o: view[id(o)],
        cap=cap,
    )


def _damage(sens, name: str, type_name: str) -> float:
    """A tensor's damage at a type, or one line naming both when it is not a number
    the allocator can add (a damaged importance matrix, a broken measurement)."""
    v = sens.of(name, type_name)
    if not math.isfinite(v) or v < 0:
        raise EwqError(
            f"the {sens.criterion} criterion gives {name} a damage of {v!r} at "
            f"{type_name}, which is not a finite number >= 0 (an importance matrix "
            "with absurd values?)"
        )
    return v


def _block_types(form: OutputFormat, layout, result) -> dict[str, Option]:
    """A block-level result's per-tensor types (the plan file is per tensor): each
    tensor the format can write in more than one way, at its block's precision."""
    from ewq.sensitivity import tensor_candidates

    cands = tensor_candidates(form, layout)
    out = {}
    for block in layout.blocks:
        p = result.precision[block.exec_index]
        for info, key in zip(block.tensors, block.keys, strict=True):
            if info.name in cands:
                e = form.encoding(info, key, p)
                out[info.name] = Option(e.type, e.nbytes, 0.0)
    return out
