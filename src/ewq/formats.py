"""What each precision becomes in each output format, and its exact size in bytes.

Pure: no I/O. The quantizers write what :func:`gguf_target` says, and the planner
counts what :func:`tensor_bytes` says, so a plan's sizes are the written sizes.

GGUF (llama.cpp) types per precision, first fit wins; a type fits a tensor when its
row length is a multiple of the type's block:

==========  ====================================================
raw         the tensor's own type (copied bit for bit)
8-bit       Q8_0 (block 32)
4-bit       Q4_K (block 256), else Q4_0 (32)
3-bit       Q3_K (256), else Q4_0: no 3-bit type has a block of 32
2-bit       Q2_K (256), else Q4_0
1.58-bit    TQ1_0 (256), else Q4_0
==========  ====================================================

The Q4_0 fallbacks are the ones llama.cpp itself applies (it logs "falling back");
choosing them here makes the prediction exact. A row that fits no type (not a
multiple of 32) keeps its own type. Tensors llama.cpp never quantizes (1-D tensors,
norms, MoE routers, position and token-type embeddings) keep their type whatever the
plan says.
"""

from __future__ import annotations

import re
from math import prod

import gguf

from ewq.types import Precision

__all__ = [
    "GGUF_CHOICES",
    "gguf_quantizable",
    "gguf_target",
    "tensor_bytes",
]

T = gguf.GGMLQuantizationType

GGUF_CHOICES: dict[Precision, tuple[T, ...]] = {
    Precision.Q8: (T.Q8_0,),
    Precision.Q4: (T.Q4_K, T.Q4_0),
    Precision.Q3: (T.Q3_K, T.Q4_0),
    Precision.Q2: (T.Q2_K, T.Q4_0),
    Precision.TERNARY: (T.TQ1_0, T.Q4_0),
}

# Names llama.cpp's quantizer copies unchanged (llama-quant.cpp, "quantize &= ..."):
# kept as data so the size prediction matches what it writes.
_NEVER_QUANTIZED = re.compile(
    r"(_norm\.weight$|ffn_gate_inp\.weight$|ffn_gate_inp_shexp\.weight$|"
    r"pos_embd|token_types|attn_rel_b|ssm_|time_mix_|cls\.|altup|laurel|per_layer_)"
)

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
    return len(shape) >= 2 and not _NEVER_QUANTIZED.search(name)


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
