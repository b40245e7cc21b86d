"""Sensitivity criteria: per tensor and per type it can be written as, an estimate
of the damage that type does (predicted KL divergence from the unquantized model,
in nats per token, for the measured criteria). The optimal allocator
(planning/allocate.py) minimises their sum within the budget.

One registry entry per criterion (:data:`CRITERIA`): its name, whether it needs
calibration text, whether it reads the weights, the function that measures it and
the modules whose source keys its cache.

* ``error`` (data-free, measured): every tensor round-tripped through the real
  quantizer at every type it can be written as; damage = the tensor's prior
  sensitivity (by its family and depth, prior.py) x the type's factor x the
  relative squared error ||W - Q(W)||^2 / ||W||^2 (error.py). With an importance
  matrix the error is weighted per input column by it (what llama.cpp's quantizer
  itself minimises) and the quantizer is given it, as `ewq quantize` will.
* ``kl`` (calibrated): the imatrix-weighted error scaled per tensor by a sensitivity
  measured on calibration text: the KL when that tensor alone is quantized (kl.py).
* ``entropy`` (the paper's score), ``random`` and ``position`` (baselines): no
  measurement of the quantizer; damage = s_b x 4^-bits, the noise power of an ideal
  quantizer at the bits the tensor is written with, scaled by a per-block
  sensitivity s_b: exp of the block's entropy z-score (higher entropy, more
  sensitive: the paper quantizes low entropy first), of a seeded random normal, or
  of the negated exec_index z-score (FastEWQ's order: the highest block is quantized
  first). The embedding and head take the largest s_b.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ewq.arch import ModelLayout
from ewq.formats import Encoding, OutputFormat
from ewq.types import Precision, TensorInfo, TensorKey

__all__ = [
    "CRITERIA",
    "BROKEN_KL",
    "COMPOUNDING",
    "CriterionSpec",
    "Sensitivity",
    "compounded",
    "criterion",
    "modelled",
    "spread",
    "tensor_candidates",
]

#: compounding, per measured criterion: a sum of per-tensor damages D (each measured
#: with the rest of the model intact) undercounts a plan that quantizes everything
#: hard. A plan's predicted KL is a x D^b, least squares in log-log over 20 random
#: mixed plans (benchmarks/damage_model.py): kl on IgLM (results/iglm/), error over
#: IgLM's and SmolLM2's 40 (benchmarks/fit_prior.py); ``spread``: the largest
#: measured / predicted there (the smallest: 0.43 for kl, 0.40 for error).
COMPOUNDING = {"kl": (2.893, 1.167, 2.47), "error": (3.745, 1.095, 3.39)}
#: a KL above this many nats per token is a broken model (its next-token
#: distributions barely agree with the unquantized model's; llama.cpp's Q2_K on IgLM
#: measures 0.08); a plan warns when its prediction times the criterion's spread
#: reaches it
BROKEN_KL = 1.0


def compounded(damage: float, criterion: str) -> float:
    """A plan's predicted KL (nats per token) from its summed damage under a measured
    criterion: a monotone map, so the allocator's least sum is also the least
    predicted KL."""
    a, b, _ = COMPOUNDING[criterion]
    return a * damage**b if damage > 0 else 0.0


def spread(criterion: str) -> float:
    """How far above its prediction a plan's KL was measured (at most), per criterion;
    1 for a KL measured on the plan itself."""
    return COMPOUNDING[criterion][2] if criterion in COMPOUNDING else 1.0


@dataclass(frozen=True)
class CriterionSpec:
    """One criterion: how damage is estimated."""

    name: str
    calibrated: bool  # needs calibration text (or an importance matrix)
    reads_weights: bool  # reads every weight (a hub id downloads them)
    code: tuple[str, ...]  # modules whose source keys its cached values
    help: str


CRITERIA: dict[str, CriterionSpec] = {
    c.name: c
    for c in (
        CriterionSpec(
            "error",
            False,
            True,
            # ewq.sampling: a sampled pass's estimate is the sampler's too
            (
                "ewq.sensitivity",
                "ewq.sensitivity.error",
                "ewq.sampling",
                "ewq.quant.ggml",
                "ewq.quant.rtn",
            ),
            "round trip through the real quantizer, data-free",
        ),
        CriterionSpec(
            "kl",
            True,
            True,
            (
                "ewq.sensitivity",
                "ewq.sensitivity.error",
                "ewq.sensitivity.kl",
                "ewq.quant.ggml",
                "ewq.quant.targets",
            ),
            "calibrated: KL per tensor measured on calibration text",
        ),
        CriterionSpec(
            "entropy", False, True, ("ewq.sensitivity",), "the paper's score"
        ),
        CriterionSpec("random", False, False, ("ewq.sensitivity",), "a baseline"),
        CriterionSpec("position", False, False, ("ewq.sensitivity",), "a baseline"),
    )
}


def criterion(name: str) -> CriterionSpec:
    from ewq.errors import EwqError

    try:
        return CRITERIA[name]
    except KeyError:
        raise EwqError(
            f"unknown criterion '{name}' (one of {', '.join(CRITERIA)})"
        ) from None


@dataclass(frozen=True)
class Sensitivity:
    """Estimated damage per tensor (by name) and type, and how it was got. A
    tensor or type not listed does no damage (its own type, a tensor never
    quantized)."""

    criterion: str
    damage: Mapping[str, Mapping[str, float]]
    seconds: float = 0.0
    details: Mapping[str, Any] = field(default_factory=dict)
    #: a sampled measurement's per tensor rows read ("rows", "of") and each type's
    #: relative half width of its 95% interval ("relative_halfwidth")
    intervals: Mapping[str, Mapping[str, Any]] | None = None

    def of(self, name: str, type_name: str) -> float:
        return self.damage.get(name, {}).get(type_name, 0.0)

    def block(
        self,
        form: OutputFormat,
        layout: ModelLayout,
        exec_index: int,
        precision: Precision,
    ) -> float:
        """A block's damage at one precision for all its tensors (the block view)."""
        b = layout.block(exec_index)
        total = 0.0
        for info, key in zip(b.tensors, b.keys, strict=True):
            e = form.encoding(info, key, precision)
            if e is not None:
                total += self.of(info.name, e.type)
        return total


def tensor_candidates(
    form: OutputFormat, layout: ModelLayout, imatrix: Any = None
) -> dict[str, tuple[TensorInfo, TensorKey, list[Encoding]]]:
    """Every tensor of the model's blocks that the format can write in more than one
    way, with its candidates (its own type first). Types that need an importance
    matrix are offered for a tensor only when ``imatrix`` has an entry for it."""
    covered = set(imatrix.entries) if imatrix is not None else set()
    out = {}
    for block in layout.blocks:
        for info, key in zip(block.tensors, block.keys, strict=True):
            if info.num_elements == 0:
                continue
            cands = form.candidates(info, key, imatrix=info.name in covered)
            if len(cands) > 1:
                out[info.name] = (info, key, cands)
    return out


def modelled(
    criterion: str,
    form: OutputFormat,
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
    damage: dict[str, dict[str, float]] = {}
    for name, (info, key, cands) in tensor_candidates(form, layout).items():
        s = scale.get(key.exec_index, top)
        damage[name] = {
            e.type: s * 4.0 ** -(8.0 * e.nbytes / info.num_elements)
            for e in cands[1:]
            if e.quantizable
        }
    details = {"seed": seed} if criterion == "random" else {}
    return Sensitivity(criterion, damage, 0.0, details)


def _zscores(values: list[float]) -> list[float]:
    if not values:
        return []
    mean = math.fsum(values) / len(values)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / len(values))
    return [0.0 if std == 0 else (v - mean) / std for v in values]
