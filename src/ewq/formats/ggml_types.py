"""Every weight type llama.cpp writes, declared once, with llama.cpp's own rules.

Pure: no I/O. Sizes come from gguf-py's ``GGML_QUANT_SIZES`` (elements and bytes
per block); the rules are restated from ``src/llama-quant.cpp`` of the bundled
llama.cpp (llama-cpp-python 0.3.36), and tested against it:

* **fallback** (``tensor_type_fallback``): the type written instead when a tensor's
  rows (its first GGML dimension) are not a multiple of the type's block; if the
  fallback does not fit either, llama.cpp writes F16.
* **needs an importance matrix** (``tensor_requires_imatrix``, with ggml's own
  ``ggml_quantize_requires_imatrix``): without one llama.cpp refuses to write these
  types ("the result will be garbage"); ewq offers them only for tensors the
  importance matrix covers.
* **never quantized** (``tensor_allows_quantization``): norms, MoE routers, position
  and token-type embeddings, and the other names below are copied as they are.

Each type belongs to one *precision* (ewq.types.Precision): the bit class the
per-block view of a plan, the paper's decision and its ladder speak in.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import gguf

from ewq.types import Precision

__all__ = [
    "GGML_TYPES",
    "GgmlType",
    "PRECISION_TYPE",
    "gguf_quantizable",
    "source_type",
    "tensor_bytes",
]

T = gguf.GGMLQuantizationType


@dataclass(frozen=True)
class GgmlType:
    """One GGML weight type as ewq plans with it."""

    name: str
    precision: Precision
    fallback: str | None  # llama.cpp's type for rows its block does not divide
    needs_imatrix: bool  # llama.cpp refuses to write it without an importance matrix

    @property
    def qtype(self) -> T:
        return T[self.name]

    @property
    def block(self) -> int:
        return gguf.GGML_QUANT_SIZES[self.qtype][0]

    @property
    def block_bytes(self) -> int:
        return gguf.GGML_QUANT_SIZES[self.qtype][1]

    @property
    def bits(self) -> float:
        """Bits per weight, scales included."""
        return 8.0 * self.block_bytes / self.block


#: the quantized types a plan chooses from, most bits first; adding a type is a line
GGML_TYPES: dict[str, GgmlType] = {
    t.name: t
    for t in (
        GgmlType("Q8_0", Precision.Q8, None, False),
        GgmlType("Q6_K", Precision.Q6, "Q8_0", False),
        GgmlType("Q5_1", Precision.Q5, None, False),
        GgmlType("Q5_K", Precision.Q5, "Q5_1", False),
        GgmlType("Q5_0", Precision.Q5, None, False),
        GgmlType("Q4_1", Precision.Q4, None, False),
        GgmlType("Q4_K", Precision.Q4, "Q5_0", False),
        GgmlType("IQ4_NL", Precision.Q4, None, False),
        GgmlType("Q4_0", Precision.Q4, None, False),
        GgmlType("IQ4_XS", Precision.Q4, "IQ4_NL", False),
        GgmlType("Q3_K", Precision.Q3, "Q4_0", False),
        GgmlType("IQ3_S", Precision.Q3, "IQ4_NL", False),
        GgmlType("IQ3_XXS", Precision.Q3, "IQ4_NL", True),
        GgmlType("Q2_K", Precision.Q2, "Q4_0", False),
        GgmlType("IQ2_S", Precision.Q2, "IQ4_NL", True),
        GgmlType("IQ2_XS", Precision.Q2, "IQ4_NL", True),
        GgmlType("TQ2_0", Precision.TERNARY, "Q4_0", False),
        GgmlType("IQ2_XXS", Precision.Q2, "IQ4_NL", True),
        GgmlType("IQ1_M", Precision.TERNARY, "IQ4_NL", True),
        GgmlType("TQ1_0", Precision.TERNARY, "Q4_0", False),
    )
}

#: the type a whole precision is written as (block-level plans: the paper's decision,
#: its ladder, FastEWQ): llama.cpp's K-quants, ternary as TQ1_0
PRECISION_TYPE: dict[Precision, str] = {
    Precision.Q8: "Q8_0",
    Precision.Q6: "Q6_K",
    Precision.Q5: "Q5_K",
    Precision.Q4: "Q4_K",
    Precision.Q3: "Q3_K",
    Precision.Q2: "Q2_K",
    Precision.TERNARY: "TQ1_0",
}

# The tensors llama.cpp's quantizer copies unchanged, as data: its rule is
# ``tensor_allows_quantization`` in src/llama-quant.cpp (the bundled build): tensors
# of 2 or more dimensions (ggml_n_dims) whose name ends in "weight", except names
# containing any of _KEPT_PARTS or equal to one of _KEPT_NAMES. (Not restated: the
# GLM5-next tensors it keeps for that architecture alone.)
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


def fits(row: int, type_name: str) -> bool:
    """Do rows of ``row`` elements fit whole blocks of ``type_name``?"""
    return row % gguf.GGML_QUANT_SIZES[T[type_name]][0] == 0


def written_type(row: int, type_name: str) -> tuple[str | None, bool]:
    """What llama.cpp writes when asked for ``type_name`` on rows of ``row``: the
    type (None: F16, no type fits) and whether that is a fallback."""
    if fits(row, type_name):
        return type_name, False
    spec = GGML_TYPES.get(type_name)
    fb = spec.fallback if spec is not None else None
    if fb is not None and fits(row, fb):
        return fb, True
    return None, True


def tensor_bytes(shape: tuple[int, ...], qtype: T) -> int:
    """Exact bytes of a tensor of ``shape`` stored as ``qtype`` (scales included)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n = prod(shape)
    if shape and shape[-1] % block:
        raise ValueError(
            f"rows of {shape[-1]} do not fit {qtype.name} blocks of {block}"
        )
    return n // block * size
