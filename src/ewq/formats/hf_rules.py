"""What Hugging Face output (compressed-tensors ``pack-quantized``) writes.

Symmetric integer weights packed densely into int32 (ceil(cols * bits / 32) words
per row), one scale per group of ``hf_group_size(cols)`` columns in the model's
dtype, and a 2-element int64 shape: what vLLM serves and transformers loads. Only
Linear weights are quantized (attention, MLP, experts, LM head); embeddings, norms
and MoE routers stay as they are. 1.58-bit has no compressed-tensors type and is
written as 2-bit (a recorded fallback).

Pure: no I/O.
"""

from __future__ import annotations

import math
from math import prod

from ewq.types import Precision, Role

__all__ = [
    "HF_BITS",
    "hf_form",
    "hf_group_size",
    "hf_quantizable",
    "hf_tensor_bytes",
]

#: compressed-tensors integer width per precision (no 6- or 5-bit type is offered)
HF_BITS: dict[Precision, int] = {
    Precision.Q8: 8,
    Precision.Q4: 4,
    Precision.Q3: 3,
    Precision.Q2: 2,
    Precision.TERNARY: 2,  # no ternary type in compressed-tensors: a fallback
}

_HF_LINEAR_ROLES = frozenset(
    {
        Role.ATTN_Q,
        Role.ATTN_K,
        Role.ATTN_V,
        Role.ATTN_O,
        Role.ATTN_QKV,
        Role.ATTN_Q_A,
        Role.ATTN_Q_B,
        Role.ATTN_KV_A,
        Role.ATTN_KV_B,
        Role.ATTN_K_B,
        Role.ATTN_V_B,
        Role.MLP_GATE,
        Role.MLP_UP,
        Role.MLP_DOWN,
        Role.MLP_GATE_UP,
        Role.MOE_EXPERT_GATE,
        Role.MOE_EXPERT_UP,
        Role.MOE_EXPERT_DOWN,
        Role.MOE_EXPERT_GATE_UP,
        Role.MOE_SHARED_GATE,
        Role.MOE_SHARED_UP,
        Role.MOE_SHARED_DOWN,
        Role.LM_HEAD,
        Role.POOLER,
    }
)


def hf_quantizable(role: Role, shape: tuple[int, ...], weight: bool = True) -> bool:
    """Is this the weight of a Linear layer that compressed-tensors quantizes?"""
    return weight and len(shape) == 2 and role in _HF_LINEAR_ROLES


def hf_group_size(cols: int) -> int | None:
    """Scale group: 128 columns where they divide the row, else 64 or 32; else one
    scale per row (None)."""
    for g in (128, 64, 32):
        if cols % g == 0:
            return g
    return None


def hf_form(bits: int, cols: int) -> str:
    """The encoding's name: ``int4/g128`` (4-bit, scales per 128 columns) or
    ``int8/row`` (one scale per row)."""
    group = hf_group_size(cols)
    return f"int{bits}/" + (f"g{group}" if group else "row")


def hf_tensor_bytes(shape: tuple[int, ...], bits: int | None, itemsize: int) -> int:
    """Exact bytes of a Linear weight in pack-quantized form (packed, scales, shape);
    ``bits`` None: the plain tensor. ``itemsize`` is the model dtype's (the scales
    are stored in it)."""
    if bits is None:
        return prod(shape) * itemsize
    rows, cols = shape
    group = hf_group_size(cols)
    groups = cols // group if group else 1
    return rows * math.ceil(cols * bits / 32) * 4 + rows * groups * itemsize + 2 * 8
