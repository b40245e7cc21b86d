"""A plan checked against a model, and what every tensor becomes under it."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ewq.arch import ModelLayout
from ewq.formats import (
    HF_BITS,
    gguf_quantizable,
    gguf_target,
    hf_group_size,
    hf_quantizable,
    hf_tensor_bytes,
    tensor_bytes,
)
from ewq.planfile import Plan, PlanError
from ewq.types import ModelIndex, Precision

__all__ = [
    "TensorTarget",
    "check_plan",
    "gguf_targets",
    "hf_targets",
    "llama_quantize_args",
    "overrides",
]

_INT_DTYPES = frozenset({"I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64", "BOOL"})
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


def gguf_targets(
    index: ModelIndex, layout: ModelLayout, plan: Plan
) -> list[TensorTarget]:
    """Every tensor's GGML type and exact size under ``plan``, in file order."""
    out = []
    for info in index.tensors:
        key = layout.keys.get(info.name)
        exec_index = key.exec_index if key else None
        precision = (
            plan.precision_of(exec_index, layout.num_blocks)
            if exec_index is not None
            else Precision.RAW
        )
        qtype, fallback = gguf_target(info.name, info.shape, info.dtype, precision)
        out.append(
            TensorTarget(
                info.name,
                exec_index,
                precision,
                info.dtype,
                qtype.name,
                fallback,
                tensor_bytes(info.shape, qtype),
                gguf_quantizable(info.name, info.shape),
            )
        )
    return out


def hf_targets(
    index: ModelIndex, layout: ModelLayout, plan: Plan
) -> list[TensorTarget]:
    """Every tensor's form and exact size in a pack-quantized Hugging Face checkpoint.

    ``type`` reads ``int4/g128`` (4-bit integers, scales per 128 columns),
    ``int8/row`` (one scale per row), or the tensor's own dtype when kept. Integer
    buffers of old checkpoints (BERT's ``position_ids``) are not weights: transformers
    rebuilds them and does not save them, so they are left out.
    """
    out = []
    for info in index.tensors:
        if info.dtype in _INT_DTYPES:
            continue
        key = layout.keys.get(info.name)
        exec_index = key.exec_index if key else None
        precision = (
            plan.precision_of(exec_index, layout.num_blocks)
            if exec_index is not None
            else Precision.RAW
        )
        itemsize = info.nbytes // max(1, info.num_elements)
        linear = key is not None and hf_quantizable(
            key.role, info.shape, key.kind.value == "weight"
        )
        if precision is Precision.RAW or not linear:
            matrix = (
                key is not None and key.kind.value == "weight" and len(info.shape) >= 2
            )
            out.append(
                TensorTarget(
                    info.name,
                    exec_index,
                    precision,
                    info.dtype,
                    info.dtype,
                    precision is not Precision.RAW and matrix,
                    info.nbytes,
                    linear,
                )
            )
            continue
        group = hf_group_size(info.shape[-1])
        form = f"int{HF_BITS[precision]}/" + (f"g{group}" if group else "row")
        out.append(
            TensorTarget(
                info.name,
                exec_index,
                precision,
                info.dtype,
                form,
                precision is Precision.TERNARY,
                hf_tensor_bytes(info.shape, precision, itemsize),
                True,
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


def llama_quantize_args(targets: list[TensorTarget], src: str, out: str) -> list[str]:
    """The same job for llama.cpp's command-line `llama-quantize`."""
    args = ["llama-quantize", "--allow-requantize", "--pure"]
    for pattern, qtype in overrides(targets):
        args += ["--tensor-type", f"{pattern}={qtype.lower()}"]
    return [*args, src, out, "q8_0"]
