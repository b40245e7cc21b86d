"""Sensitivity criteria: per block and per candidate precision, an estimate of the
damage that precision does. The optimal allocator (planning/allocate.py) minimises
their sum within the budget.

* ``error`` (data-free, measured): every tensor round-tripped through the real
  target quantizer, damage = sum over the block's tensors of the relative squared
  reconstruction error ||W - Q(W)||^2 / ||W||^2 (error.py).
* ``kl`` (calibrated): the model quantized one block at a time to each candidate,
  damage = mean KL divergence from the unquantized model on calibration text
  (kl.py; GGUF through llama.cpp).
* ``entropy`` (the paper's score), ``random`` and ``position`` (baselines): no
  measurement of the quantizer; damage = s_b * sum over the block's tensors of
  4^-bits, the noise power of an ideal quantizer at the bits the tensor is written
  with, scaled by a per-block sensitivity s_b: exp of the block's entropy z-score
  (higher entropy, more sensitive: the paper quantizes low entropy first), of a
  seeded random normal, or of the negated exec_index z-score (FastEWQ's order: the
  highest block is quantized first). The embedding and head take the largest s_b.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ewq.arch import ModelLayout
from ewq.formats import encoding, offered
from ewq.types import Precision

__all__ = ["CRITERIA", "Sensitivity", "modelled"]

CRITERIA = ("entropy", "error", "kl", "random", "position")


@dataclass(frozen=True)
class Sensitivity:
    """Estimated damage per block (exec_index) and precision, and how it was got."""

    criterion: str
    damage: Mapping[int, Mapping[Precision, float]]
    seconds: float = 0.0
    details: Mapping[str, Any] = field(default_factory=dict)


def _bits(fmt: str, layout: ModelLayout, exec_index: int, p: Precision) -> list[float]:
    """Bits per weight each quantizable matrix of a block is written with at ``p``
    (None-like 0 entries are skipped: raw keeps the source, noise 0)."""
    block = layout.block(exec_index)
    out = []
    for info, key in zip(block.tensors, block.keys, strict=True):
        if len(info.shape) < 2 or info.num_elements == 0:
            continue
        t = encoding(fmt, info, key, p)
        if t is None or not t.quantizable or t.type == info.dtype:
            continue
        out.append(8.0 * t.nbytes / info.num_elements)
    return out


def modelled(
    criterion: str,
    fmt: str,
    layout: ModelLayout,
    entropy: Mapping[int, float] | None = None,
    seed: int = 0,
) -> Sensitivity:
    """The ideal-quantizer damage model with the criterion's per-block sensitivity."""
    blocks = [b.exec_index for b in layout.transformer_blocks]
    if criterion == "entropy":
        if not entropy:
            raise ValueError("the entropy criterion needs the block entropies")
        z = _zscores([entropy[i] for i in blocks])
    elif criterion == "random":
        rng = random.Random(seed)
        z = [rng.gauss(0.0, 1.0) for _ in blocks]
    elif criterion == "position":
        z = [-v for v in _zscores([float(i) for i in blocks])]
    else:
        raise ValueError(f"{criterion} is a measured criterion, not a modelled one")
    scale = {i: math.exp(v) for i, v in zip(blocks, z, strict=True)}
    top = max(scale.values(), default=1.0)
    damage: dict[int, dict[Precision, float]] = {}
    for b in layout.blocks:
        s = scale.get(b.exec_index, top)
        damage[b.exec_index] = {
            p: s * math.fsum(4.0**-bits for bits in _bits(fmt, layout, b.exec_index, p))
            for p in offered(fmt)
        }
    details = {"seed": seed} if criterion == "random" else {}
    return Sensitivity(criterion, damage, 0.0, details)


def _zscores(values: list[float]) -> list[float]:
    if not values:
        return []
    mean = math.fsum(values) / len(values)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / len(values))
    return [0.0 if std == 0 else (v - mean) / std for v in values]
