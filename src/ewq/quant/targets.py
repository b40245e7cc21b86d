"""A plan checked against a model, and what every tensor becomes under it."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ewq.arch import ModelLayout
from ewq.formats import OutputFormat
from ewq.planfile import Plan, PlanError
from ewq.types import ModelIndex, Precision

__all__ = [
    "TensorTarget",
    "check_plan",
    "plan_targets",
    "llama_quantize_args",
    "overrides",
]

_BLOCK = re.compile(r"^blk\.\d+\.")


def check_plan(plan: Plan, layout: ModelLayout, source: str) -> None:
    """Refuse a plan that does not fit this model, before a byte is written."""
    n = layout.num_blocks
    first, last = 2, n + 1
    if plan.num_blocks is not None and plan.num_blocks != n:
        raise PlanError(
            f"the plan was made for a model with {plan.num_blocks} transformer blocks; "
            f"{source} has {n}"
        )
    planned = plan.by_index()
    for idx in planned:
        if not first <= idx <= last:
            raise PlanError(
                f"the plan names block {idx}, which {source} does not have (its "
                f"transformer blocks are exec_index {first}..{last})"
            )
    missing = [i for i in range(first, last + 1) if i not in planned]
    if missing:
        shown = ", ".join(map(str, missing[:5])) + (" ..." if len(missing) > 5 else "")
        raise PlanError(f"the plan gives no precision for block(s) {shown} of {source}")
    for block in layout.transformer_blocks:
        want = planned[block.exec_index].num_parameters
        if want is not None and want != block.num_parameters:
            raise PlanError(
                f"the plan was made for another model: block {block.exec_index} has "
                f"{block.num_parameters:,} parameters in {source}, the plan says {want:,}"
            )


@dataclass(frozen=True)
class TensorTarget:
    name: str
    exec_index: int | None  # None for tensors outside the blocks
    precision: Precision
    source_type: str
    type: str  # GGML type name to write
    fallback: bool
    nbytes: int
    quantizable: bool  # llama.cpp would quantize it if asked
    needs_imatrix: bool = False  # llama.cpp writes its type only with an imatrix


def plan_targets(
    form: OutputFormat, index: ModelIndex, layout: ModelLayout, plan: Plan
) -> list[TensorTarget]:
    """Every written tensor's type and exact size under ``plan``, in file order: the
    plan's own type for a tensor it lists, else its block's precision.

    For hf, ``type`` reads ``int4/g128`` (4-bit integers, scales per 128 columns),
    ``int8/row`` (one scale per row), or the tensor's own dtype when kept. A listed
    type the format cannot write for that tensor (a K-quant on rows of 576, a type
    of the other format) is refused, naming the tensor.
    """
    chosen = plan.types()
    known = {info.name for info in index.tensors}
    stray = [n for n in chosen if n not in known]
    if stray:
        raise PlanError(
            f"the plan names tensor '{stray[0]}', which the model does not have"
            + (f" (and {len(stray) - 1} more)" if len(stray) > 1 else "")
        )
    out = []
    for info in index.tensors:
        key = layout.keys.get(info.name)
        exec_index = key.exec_index if key else None
        precision = (
            plan.precision_of(exec_index, layout.num_blocks)
            if exec_index is not None
            else Precision.RAW
        )
        if info.name in chosen:
            t = form.of_type(info, key, chosen[info.name])
            if t is None:
                raise PlanError(
                    f"the {form.name} format cannot write tensor '{info.name}' "
                    f"({'x'.join(map(str, info.shape))}, {info.dtype}) as "
                    f"{chosen[info.name]}"
                )
            precision = t.precision
        else:
            t = form.encoding(info, key, precision)
        if t is not None:
            out.append(
                TensorTarget(
                    info.name,
                    exec_index,
                    precision,
                    info.dtype,
                    t.type,
                    t.fallback,
                    t.nbytes,
                    t.quantizable,
                    t.needs_imatrix,
                )
            )
    return out


def overrides(targets: list[TensorTarget]) -> list[tuple[str, str]]:
    """(regex, GGML type) pairs that give every quantizable tensor its planned type.

    A raw tensor is given its own type, which llama.cpp copies bit for bit. Where
    all quantizable tensors of a GGUF block (``blk.N.``) share one type, one pattern
    covers the block: llama.cpp never quantizes the block's norms, whatever matches.
    """
    groups: dict[str, list[TensorTarget]] = {}
    for t in targets:
        if not t.quantizable:
            continue
        m = _BLOCK.match(t.name)
        groups.setdefault(m.group(0) if m else t.name, []).append(t)
    pairs = []
    for key, ts in groups.items():
        types = {t.type for t in ts}
        if key.endswith(".") and len(types) == 1:
            pairs.append(("^" + re.escape(key), types.pop()))
        else:
            pairs.extend(("^" + re.escape(t.name) + "$", t.type) for t in ts)
    return pairs


def llama_quantize_args(
    targets: list[TensorTarget], src: str, out: str, imatrix: str | None = None
) -> list[str]:
    """The same job for llama.cpp's command-line `llama-quantize`."""
    args = ["llama-quantize", "--allow-requantize", "--pure"]
    if imatrix is not None:
        args += ["--imatrix", imatrix]
    for pattern, qtype in overrides(targets):
        args += ["--tensor-type", f"{pattern}={qtype.lower()}"]
    return [*args, src, out, "q8_0"]
