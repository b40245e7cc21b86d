"""The data-free ``error`` criterion's sensitivity per tensor: how much KL a unit of
relative squared error in a tensor does, by what the tensor is (its family) and
where it sits, read from a table (``prior.toml``) measured by the calibrated
criterion on the models here (benchmarks/damage_model.py writes each tensor's
measured sensitivity; benchmarks/fit_prior.py fits the table from them).

Measured on IgLM, KL per unit relative error ranges 25-fold across tensors (0.009
for a late attention output, 0.26 for the tied embedding): one constant for every
tensor (what the criterion used before) spends bits where they do little. The
table gives, per family, a sensitivity at the first and at the last transformer
block (linear in depth between, in log space): the families below, and the
embedding used as the output head (a tied embedding) apart from one that is only
looked up.
"""

from __future__ import annotations

import math
import tomllib
from functools import cache
from importlib import resources
from typing import Any

from ewq.arch import ModelLayout
from ewq.formats import FLOAT_TYPES
from ewq.types import BlockKind, Role

__all__ = ["damage", "factor", "family", "prior", "table"]

#: which family each role's error reaches the model through
_FAMILY = {
    Role.EMBED: "embed",
    Role.LM_HEAD: "head",
    Role.ATTN_Q: "attn_in",
    Role.ATTN_K: "attn_in",
    Role.ATTN_V: "attn_in",
    Role.ATTN_QKV: "attn_in",
    Role.ATTN_Q_A: "attn_in",
    Role.ATTN_Q_B: "attn_in",
    Role.ATTN_KV_A: "attn_in",
    Role.ATTN_KV_B: "attn_in",
    Role.ATTN_K_B: "attn_in",
    Role.ATTN_V_B: "attn_in",
    Role.ATTN_O: "attn_out",
    Role.MLP_GATE: "ffn_in",
    Role.MLP_UP: "ffn_in",
    Role.MLP_GATE_UP: "ffn_in",
    Role.MOE_EXPERT_GATE: "ffn_in",
    Role.MOE_EXPERT_UP: "ffn_in",
    Role.MOE_EXPERT_GATE_UP: "ffn_in",
    Role.MOE_SHARED_GATE: "ffn_in",
    Role.MOE_SHARED_UP: "ffn_in",
    Role.MLP_DOWN: "ffn_out",
    Role.MOE_EXPERT_DOWN: "ffn_out",
    Role.MOE_SHARED_DOWN: "ffn_out",
}


@cache
def table() -> dict[str, Any]:
    text = resources.files("ewq.sensitivity").joinpath("prior.toml").read_text()
    return tomllib.loads(text)


def factor(type_name: str) -> float:
    """How much more KL a type does than its weight error alone says, for a tensor
    the source stores as floats: llama.cpp's CPU kernels round each activation to 8
    bits for the dot product, an error of their own that weighs most beside the
    smallest weight errors (Q8_0, Q6_K). Measured against float sources only (as the
    kl criterion measures it, sensitivity/kl.py)."""
    return float(table()["type_factor"].get(type_name, 1.0))


def damage(
    layout: ModelLayout,
    errors: dict[str, dict[str, float]],
    weighted: bool = False,
) -> dict[str, dict[str, float]]:
    """The error criterion's damage: prior x type factor (float sources) x error."""
    weights = prior(layout, weighted)
    floats = {
        info.name
        for b in layout.blocks
        for info in b.tensors
        if info.dtype.upper() in FLOAT_TYPES
    }
    return {
        n: {
            t: weights[n] * (factor(t) if n in floats else 1.0) * v
            for t, v in row.items()
        }
        for n, row in errors.items()
    }


def family(role: Role, tied: bool) -> str:
    """The table row of a tensor of ``role`` ("other" for one no row names)."""
    f = _FAMILY.get(role, "other")
    return "embed_tied" if f == "embed" and tied else f


def prior(layout: ModelLayout, weighted: bool = False) -> dict[str, float]:
    """KL (nats per token) per unit of relative squared error, per tensor name, for
    the error criterion unweighted (``weighted`` False) or weighted by an importance
    matrix."""
    rows = table()["imatrix" if weighted else "free"]
    tied = not any(k.role is Role.LM_HEAD for b in layout.blocks for k in b.keys)
    blocks = [b.exec_index for b in layout.transformer_blocks]
    first, last = (blocks[0], blocks[-1]) if blocks else (0, 0)
    out: dict[str, float] = {}
    for b in layout.blocks:
        if b.kind is BlockKind.TRANSFORMER and last > first:
            depth = (b.exec_index - first) / (last - first)
        else:
            depth = 0.0 if b.kind is not BlockKind.HEAD else 1.0
        for info, key in zip(b.tensors, b.keys, strict=True):
            lo, hi = rows.get(family(key.role, tied), rows["other"])
            out[info.name] = math.exp((1 - depth) * math.log(lo) + depth * math.log(hi))
    return out
