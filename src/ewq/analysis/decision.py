"""From matrix entropies to block entropies to the EWQ decision (docs/method.md sections 2, 4).

Pure functions: numbers in, records out.

Block entropy is the parameter-weighted mean of its matrices' entropies,
``H_block = sum_k (n_k / N) H_k`` over the matrices that count (see
:mod:`ewq.analysis.scan` for the rule). The decision uses the transformer blocks
only; the embedding and the head are reported beside them and kept raw here (the
planner decides their precision).

Decision, with mean mu and population standard deviation sigma (ddof = 0: the blocks
are the whole population, not a sample) of the transformer blocks' entropies::

    T = mu - alpha * sigma
    H <  T        -> aggressive (4-bit; lower in edge modes)
    T <= H < mu   -> moderate (8-bit)
    H >= mu       -> raw

The default alpha is 1.25. The paper's own value was lost with its equations; its
Table 8 has EWQ put 2 of 32 (Llama-3.1-8B), 3 of 28 (Qwen2-7B), 6 of 42
(Gemma-2-9B) and 4 of 32 (Phi-3.5-mini) blocks at 4-bit: 15 of 134 blocks, 11.2%.
For roughly normal block entropies, P(z < -alpha) = 11.2% gives alpha = 1.22, so
1.25 reproduces the published proportion; 1.0 would put about 16% of blocks at
4-bit and 1.5 about 7%.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ewq.config import DEFAULT_ALPHA, Variant
from ewq.errors import InvalidParameterError
from ewq.types import Precision

__all__ = [
    "DEFAULT_ALPHA",
    "Decision",
    "Variant",
    "block_entropy",
    "decide",
]


def block_entropy(matrices: Iterable[tuple[int, float]]) -> float | None:
    """Parameter-weighted entropy of ``(num_elements, entropy)`` pairs; None if none."""
    total = weighted = 0.0
    for n, h in matrices:
        total += n
        weighted += n * h
    return weighted / total if total else None


@dataclass(frozen=True)
class Decision:
    """The EWQ decision for a model's transformer blocks.

    ``precision`` maps exec_index to its precision; ``priority`` lists the
    exec_indices in quantization order (ascending entropy, ties by exec_index).
    """

    alpha: float
    variant: Variant
    mean: float
    std: float
    threshold: float
    precision: Mapping[int, Precision]
    priority: tuple[int, ...]

    def rank(self, exec_index: int) -> int:
        """1 for the block quantized first."""
        return self.priority.index(exec_index) + 1


def check_alpha(alpha: float) -> None:
    if not (math.isfinite(alpha) and alpha > 0):
        raise InvalidParameterError(f"alpha must be a number > 0, got {alpha}")


def decide(
    entropies: Mapping[int, float],
    *,
    alpha: float = DEFAULT_ALPHA,
    variant: Variant = Variant.MIXED_4_8,
    moderate: Precision = Precision.Q8,
    aggressive: Precision = Precision.Q4,
) -> Decision:
    """Apply the threshold rule to ``{exec_index: block entropy}``."""
    check_alpha(alpha)
    if not entropies:
        raise InvalidParameterError("no transformer blocks to decide on")
    values: Sequence[float] = list(entropies.values())
    mean = math.fsum(values) / len(values)
    std = math.sqrt(math.fsum((h - mean) ** 2 for h in values) / len(values))
    threshold = mean - alpha * std
    precision: dict[int, Precision] = {}
    for idx, h in sorted(entropies.items()):
        if h >= mean:
            precision[idx] = Precision.RAW
        elif h < threshold and variant is Variant.MIXED_4_8:
            precision[idx] = aggressive
        else:
            precision[idx] = moderate
    priority = tuple(sorted(entropies, key=lambda i: (entropies[i], i)))
    return Decision(alpha, variant, mean, std, threshold, precision, priority)
