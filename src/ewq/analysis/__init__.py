"""Entropy analysis: the exact kernel (entropy), the parallel scan over a model
(scan), block entropies (profile) and the EWQ decision (decision)."""

from ewq.analysis.decision import (
    DEFAULT_ALPHA,
    Decision,
    Variant,
    block_entropy,
    decide,
)
from ewq.analysis.profile import MATRIX_RULE, BlockEntropy, EntropyProfile, profile

__all__ = [
    "DEFAULT_ALPHA",
    "MATRIX_RULE",
    "BlockEntropy",
    "Decision",
    "EntropyProfile",
    "Variant",
    "block_entropy",
    "decide",
    "profile",
]
