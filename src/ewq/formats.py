"""What each precision becomes in each output format, and its exact size in bytes.

Pure: no I/O. The quantizers write what :func:`gguf_target` says, and the planner
counts what :func:`tensor_bytes` says, so a plan's sizes are the written sizes.

Every precision is declared once, in :data:`PRECISIONS` (nominal bits, llama.cpp
type, compressed-tensors width); the other tables are derived from it.

GGUF (llama.cpp) types per precision, and the fallback llama.cpp itself applies when
a tensor's rows (its first GGML dimension) are not a multiple of the type's block
(``tensor_type_fallback`` in llama.cpp's ``src/llama-quant.cpp``; tested against the
bundled build):

==========  ============  ==========
precision   type          fallback
==========  ============  ==========
raw         its own type  -
8-bit       Q8_0          -
6-bit       Q6_K          Q8_0
5-bit       Q5_K          Q5_1
4-bit       Q4_K          Q5_0
3-bit       Q3_K          Q4_0
2-bit       Q2_K          Q4_0
1.58-bit    TQ1_0         Q4_0
==========  ============  ==========

ewq passes the final type to llama.cpp as an explicit override, so what it writes is
what is predicted. A row that fits no type (not a multiple of 32) keeps its own type
(where llama.cpp would write F16). Tensors llama.cpp never quantizes (1-D tensors,
norms, MoE routers, position and token-type embeddings) keep their type whatever the
plan says.

Hugging Face checkpoints are written in compressed-tensors' ``pack-quantized``
format (what vLLM serves and transformers loads): symmetric integer weights packed
densely into int32 (ceil(cols * bits / 32) words per row), one scale per group of
``hf_group_size(cols)`` columns in the model's dtype, and a 2-element int64 shape.
Only Linear weights are quantized (attention, MLP, experts, LM head); embeddings,
norms and MoE routers stay as they are. 1.58-bit has no compressed-tensors type and
is written as 2-bit (a recorded fallback).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from math import prod

import gguf

from ewq.types import INT_DTYPES, ParamKind, Precision, Role, TensorInfo, TensorKey

__all__ = [
    "FORMATS",
    "GGUF_CHOICES",
    "GGUF_FALLBACK",
    "PRECISIONS",
    "PrecisionSpec",
    "offered",
    "Encoding",
    "encoding",
    "HF_BITS",
    "gguf_quantizable",
    "gguf_target",
    "hf_group_size",
    "hf_quantizable",
    "hf_tensor_bytes",
    "tensor_bytes",
]

T = gguf.GGMLQuantizationType


@dataclass(frozen=True)
class PrecisionSpec:
    """One precision: its nominal bits per weight and what each format writes."""

    precision: Precision
    bits: float  # nominal bits per weight of the GGUF type, scales included
    gguf: T  # llama.cpp's type (its fallback: GGUF_FALLBACK)
    hf_bits: int | None  # compressed-tensors integer width; None: not offered for hf


#: every quantized precision, most precise first; adding one is one line here
PRECISIONS: dict[Precision, PrecisionSpec] = {
    s.precision: s
    for s in (
        PrecisionSpec(Precision.Q8, 8.5, T.Q8_0, 8),
        PrecisionSpec(Precision.Q6, 6.5625, T.Q6_K, None),
        PrecisionSpec(Precision.Q5, 5.5, T.Q5_K, None),
        PrecisionSpec(Precision.Q4, 4.5, T.Q4_K, 4),
        PrecisionSpec(Precision.Q3, 3.4375, T.Q3_K, 3),
        PrecisionSpec(Precision.Q2, 2.625, T.Q2_K, 2),
        # no ternary type in compressed-tensors: written as 2-bit (a fallback)
        PrecisionSpec(Precision.TERNARY, 1.6875, T.TQ1_0, 2),
    )
}

#: llama.cpp's fallback for rows that are not a multiple of the type's 256 block
#: (src/llama-quant.cpp, tensor_type_fallback)
GGUF_FALLBACK: dict[T, T] = {
    T.Q6_K: T.Q8_0,
    T.Q5_K: T.Q5_1,
    T.Q4_K: T.Q5_0,
    T.Q3_K: T.Q4_0,
    T.Q2_K: T.Q4_0,
    T.TQ1_0: T.Q4_0,
}

GGUF_CHOICES: dict[Precision, tuple[T, ...]] = {
    p: (s.gguf, GGUF_FALLBACK[s.gguf]) if s.gguf in GGUF_FALLBACK else (s.gguf,)
    for p, s in PRECISIONS.items()
}

HF_BITS: dict[Precision, int] = {
    p: s.hf_bits for p, s in PRECISIONS.items() if s.hf_bits is not None
}


def offered(fmt: str) -> tuple[Precision, ...]:
    """The precisions ``fmt`` can write, raw first, then most precise first."""
    if fmt == "gguf":
        return (Precision.RAW, *PRECISIONS)
    if fmt == "hf":
        return (Precision.RAW, *HF_BITS)
    raise ValueError(f"unknown format {fmt!r} (one of {', '.join(FORMATS)})")


# The tensors llama.cpp's quantizer copies unchanged, as data: its rule is
# ``tensor_allows_quantization`` in src/llama-quant.cpp (the bundled build): tensors
# of 2 or more dimensions (ggml_n_dims) whose name ends in "weight", except names containing any of
# _KEPT_PARTS or equal to one of _KEPT_NAMES. (Not restated: the GLM5-next tensors
# it keeps for that architecture alone.)
_KEPT_PARTS = (
    "_norm.weight",
    "ffn_gate_inp.weight",
    "ffn_gate_tid2eid.weight",
    "altup",
    "laurel",
    "per_layer_model_proj",
    "ssm_conv1d",
    "shortconv.conv.weight",
    "indexer.k_proj.weight",
    "indexer.q_proj.weight",
    *(
        f"time_mix_{x}.weight"
        for x in (
            "first",
            "w0",
            "w1",
            "w2",
            "v0",
            "v1",
            "v2",
            "a0",
            "a1",
            "a2",
            "g1",
            "g2",
            "decay_w1",
            "decay_w2",
            "lerp_fused",
        )
    ),  # fmt: skip
    "attn_rel_b.weight",
    ".position_embd",
    "sam.pos_embd",
    "sam.neck.",
    "sam.net_",
    ".rel_pos",
    ".patch_embd",
    ".patch_merger",
    "a.rvq.codebook",
    "mm.a.code_embd",
)
# LLM_TN(arch)(LLM_TENSOR_POS_EMBD / LLM_TENSOR_TOKEN_TYPES, "weight") (BERT)
_KEPT_NAMES = frozenset({"position_embd.weight", "token_types.weight"})

_FLOAT_TYPES = {"F32": T.F32, "F16": T.F16, "BF16": T.BF16, "F64": T.F64}


def source_type(dtype: str) -> T:
    """The GGML type of a storage dtype (safetensors or GGML name)."""
    if dtype in _FLOAT_TYPES:
        return _FLOAT_TYPES[dtype]
    try:
        return T[dtype]
    except KeyError:
        raise ValueError(f"no GGML type for dtype {dtype}") from None


def gguf_quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """Would llama.cpp quantize this tensor if asked?"""
    dims = list(shape)
    while len(dims) > 1 and dims[0] == 1:  # ggml_n_dims: outer sizes of 1 do not count
        dims.pop(0)
    return (
        len(dims) >= 2
        and name.endswith("weight")
        and name not in _KEPT_NAMES
        and not any(part in name for part in _KEPT_PARTS)
    )


def gguf_target(
    name: str, shape: tuple[int, ...], dtype: str, precision: Precision
) -> tuple[T, bool]:
    """The GGML type a tensor is written as, and whether that is a fallback.

    A fallback is a quantizable tensor written in a type other than its precision's
    first choice (a Q4_0 for a row that no K-quant fits, say).
    """
    own = source_type(dtype)
    if precision is Precision.RAW:
        return own, False
    if not gguf_quantizable(name, shape):
        return own, False  # norms, routers: never quantized, not a fallback
    row = shape[-1]
    choices = GGUF_CHOICES[precision]
    for i, qtype in enumerate(choices):
        if row % gguf.GGML_QUANT_SIZES[qtype][0] == 0:
            return qtype, i > 0
    return own, True


def tensor_bytes(shape: tuple[int, ...], qtype: T) -> int:
    """Exact bytes of a tensor of ``shape`` stored as ``qtype`` (scales included)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n = prod(shape)
    if shape and shape[-1] % block:
        raise ValueError(
            f"rows of {shape[-1]} do not fit {qtype.name} blocks of {block}"
        )
    return n // block * size


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


def hf_tensor_bytes(shape: tuple[int, ...], precision: Precision, itemsize: int) -> int:
    """Exact bytes of a Linear weight in pack-quantized form (packed, scales, shape).

    ``itemsize`` is the model dtype's (the scales are stored in it); raw is the
    plain tensor.
    """
    if precision is Precision.RAW:
        return prod(shape) * itemsize
    rows, cols = shape
    bits = HF_BITS[precision]
    group = hf_group_size(cols)
    groups = cols // group if group else 1
    return rows * math.ceil(cols * bits / 32) * 4 + rows * groups * itemsize + 2 * 8


FORMATS = ("gguf", "hf")


@dataclass(frozen=True)
class Encoding:
    """What one tensor becomes in one format at one precision."""

    type: str  # GGML type name (gguf); int4/g128-style form or own dtype (hf)
    fallback: bool  # a quantizable tensor not in its precision's first choice
    nbytes: int  # exact bytes of its data in the output
    quantizable: bool  # the format's quantizer would quantize it if asked


def encoding(
    fmt: str, info: TensorInfo, key: TensorKey | None, precision: Precision
) -> Encoding | None:
    """The one rule both the quantizers and the planner use; None: not written.

    (Only the hf format drops tensors: integer buffers of old checkpoints, such as
    BERT's ``position_ids``, which transformers rebuilds and does not save.)
    """
    if fmt == "gguf":
        qtype, fallback = gguf_target(info.name, info.shape, info.dtype, precision)
        return Encoding(
            qtype.name,
            fallback,
            tensor_bytes(info.shape, qtype),
            gguf_quantizable(info.name, info.shape),
        )
    if fmt != "hf":
        raise ValueError(f"unknown format {fmt!r} (one of {', '.join(FORMATS)})")
    if info.dtype in INT_DTYPES:
        return None
    is_weight = key is not None and key.kind is ParamKind.WEIGHT
    linear = key is not None and hf_quantizable(key.role, info.shape, is_weight)
    if precision is Precision.RAW or not linear:
        matrix = is_weight and len(info.shape) >= 2
        fallback = precision is not Precision.RAW and matrix
        return Encoding(info.dtype, fallback, info.nbytes, linear)
    if precision not in HF_BITS:
        raise ValueError(f"{precision.value} is not offered for the hf format")
    group = hf_group_size(info.shape[-1])
    form = f"int{HF_BITS[precision]}/" + (f"g{group}" if group else "row")
    itemsize = info.nbytes // max(1, info.num_elements)
    return Encoding(
        form,
        precision is Precision.TERNARY,
        hf_tensor_bytes(info.shape, precision, itemsize),
        True,
    )
