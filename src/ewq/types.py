"""Shared vocabulary: tensor roles and the frozen records passed between layers.

This module is a leaf: it imports nothing from ``ewq``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from math import prod
from typing import Any

#: the most transformer blocks a model may declare (the largest published models
#: have a few hundred); a header or config.json beyond it is refused, not allocated
MAX_BLOCKS = 10_000

#: storage dtypes that hold integers (buffers such as position ids), never weights
INT_DTYPES = frozenset({"I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64", "BOOL"})

__all__ = [
    "INT_DTYPES",
    "MAX_BLOCKS",
    "BlockKind",
    "ModelIndex",
    "ParamKind",
    "Precision",
    "Container",
    "Progress",
    "Role",
    "TensorInfo",
    "TensorKey",
]


class Role(StrEnum):
    """Canonical role of a tensor, whatever the model family calls it.

    The values are the words used in the architecture tables (``arch/tables``).
    """

    # embedding block (exec_index 1)
    EMBED = "embed"  # token embedding
    POS_EMBED = "pos_embed"  # learned absolute positions (GPT-2, BERT)
    TYPE_EMBED = "type_embed"  # token-type (segment) embedding (BERT)
    EMBED_NORM = "embed_norm"  # norm applied to the embeddings (BERT, Bloom)
    # attention
    ATTN_NORM = "attn_norm"  # pre-attention norm
    ATTN_Q = "attn_q"
    ATTN_K = "attn_k"
    ATTN_V = "attn_v"
    ATTN_O = "attn_o"
    ATTN_QKV = "attn_qkv"  # fused q/k/v (Phi-3, GPT-2, Falcon)
    ATTN_Q_NORM = "attn_q_norm"  # per-head q norm (Qwen3, Gemma-3)
    ATTN_K_NORM = "attn_k_norm"
    ATTN_POST_NORM = "attn_post_norm"  # norm after attention (Gemma-2/3, BERT)
    ATTN_Q_A = "attn_q_a"  # MLA low-rank q down-projection (DeepSeek-V2/V3)
    ATTN_Q_A_NORM = "attn_q_a_norm"
    ATTN_Q_B = "attn_q_b"
    ATTN_KV_A = "attn_kv_a"  # MLA joint kv down-projection with the rope part
    ATTN_KV_A_NORM = "attn_kv_a_norm"
    ATTN_KV_B = "attn_kv_b"
    ATTN_K_B = "attn_k_b"  # llama.cpp splits kv_b into k_b and v_b in newer GGUFs
    ATTN_V_B = "attn_v_b"
    # dense MLP
    FFN_NORM = "ffn_norm"  # pre-MLP norm
    FFN_POST_NORM = "ffn_post_norm"  # norm after the MLP (Gemma-2/3, BERT)
    MLP_GATE = "mlp_gate"
    MLP_UP = "mlp_up"
    MLP_DOWN = "mlp_down"
    MLP_GATE_UP = "mlp_gate_up"  # fused gate and up (Phi-3)
    # mixture of experts
    MOE_ROUTER = "moe_router"
    MOE_ROUTER_BIAS = "moe_router_bias"  # expert score correction (DeepSeek-V3)
    MOE_EXPERT_GATE = "moe_expert_gate"
    MOE_EXPERT_UP = "moe_expert_up"
    MOE_EXPERT_DOWN = "moe_expert_down"
    MOE_EXPERT_GATE_UP = "moe_expert_gate_up"
    MOE_SHARED_GATE = "moe_shared_gate"
    MOE_SHARED_UP = "moe_shared_up"
    MOE_SHARED_DOWN = "moe_shared_down"
    MOE_SHARED_ROUTER = "moe_shared_router"  # Qwen2-MoE's shared-expert gate
    # head block (after the last transformer block)
    FINAL_NORM = "final_norm"
    LM_HEAD = "lm_head"
    POOLER = "pooler"  # BERT pooler / classifier head
    OTHER = "other"  # a tensor no table knows

    @property
    def is_norm(self) -> bool:
        return self.value.endswith("norm")


class ParamKind(StrEnum):
    """What part of a module a tensor is: its weight, its bias, or something else."""

    WEIGHT = "weight"
    BIAS = "bias"
    OTHER = "other"


class Precision(StrEnum):
    """The precision a block is stored at; the words plan files use."""

    RAW = "raw"  # the source model's own precision
    Q8 = "8-bit"
    Q6 = "6-bit"
    Q5 = "5-bit"
    Q4 = "4-bit"
    Q3 = "3-bit"
    Q2 = "2-bit"
    TERNARY = "1.58-bit"

    @property
    def rank(self) -> int:
        """Higher is more precise: raw 5, 8-bit 4, ..., 1.58-bit 0."""
        return len(Precision) - 1 - list(Precision).index(self)


class Container(StrEnum):
    """What a model's files are: how ewq reads them."""

    SAFETENSORS = "safetensors"
    GGUF = "gguf"
    CONFIG = "config"  # config.json alone: shapes, no weights


class BlockKind(StrEnum):
    EMBEDDING = "embedding"
    TRANSFORMER = "transformer"
    HEAD = "head"


#: progress callback: (bytes or items done, in all, name of what was just done)
Progress = Callable[[int, int, str], None]


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One tensor as an index knows it, before any weight is read.

    ``shape`` is in row-major (numpy / PyTorch) order for every format, GGUF included.
    ``dtype`` is the storage type: safetensors names (F32, BF16, ...) or GGML type
    names (Q4_K, Q8_0, ...). ``offset`` is the absolute byte offset in ``file``; for
    metadata-only hub sources, whose header sizes are not kept, it is relative to
    the start of the file's data section.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    file: str
    offset: int

    @property
    def num_elements(self) -> int:
        return prod(self.shape)


@dataclass(frozen=True, slots=True)
class TensorKey:
    """Where a tensor sits in the model: its block (exec_index) and role."""

    exec_index: int
    role: Role
    kind: ParamKind
    block_kind: BlockKind


@dataclass(frozen=True)
class ModelIndex:
    """Every tensor of a model, in file order, plus its configuration.

    ``config`` is config.json for Hugging Face models; for GGUF it is the file's
    key/value metadata (arrays longer than 64 entries, such as the vocabulary,
    are left out).
    """

    source: str
    container: str  # the files' kind: a Container
    files: tuple[str, ...]
    tensors: tuple[TensorInfo, ...]
    config: Mapping[str, Any] = field(default_factory=dict)
    metadata_only: bool = False

    @property
    def num_parameters(self) -> int:
        return sum(t.num_elements for t in self.tensors)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)
