"""The entropy profile of a model: every block's parameter-weighted entropy."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from ewq.analysis.decision import block_entropy
from ewq.analysis.scan import Progress, counts_as_matrix, matrices_of, scan
from ewq.arch import ModelLayout
from ewq.errors import EwqError, FormatError, InvalidParameterError
from ewq.sources import TensorSource
from ewq.sources.base import check_finite
from ewq.types import BlockKind, TensorInfo

_SMALL = 64 << 20  # tensors outside the analysis read for the NaN check (bytes)

__all__ = ["BlockEntropy", "EntropyProfile", "MATRIX_RULE", "profile"]

#: the rule, in words, recorded in every analysis output
MATRIX_RULE = (
    "float weight tensors with 2 or more dimensions (Linear and Embedding weights; "
    "a 3-D expert stack counts as one matrix per expert); norm weights and biases "
    "are left out"
)


@dataclass(frozen=True)
class BlockEntropy:
    """One block: all its parameters, those that count, and their weighted entropy."""

    exec_index: int
    kind: BlockKind
    num_parameters: int
    matrix_parameters: int
    entropy: float | None  # None when the block holds no matrix (a tied head)


@dataclass(frozen=True)
class EntropyProfile:
    eps: float
    blocks: tuple[BlockEntropy, ...]  # embedding, transformer blocks, head
    tensors: Mapping[str, tuple[float, ...]]  # per tensor, one entropy per matrix

    @property
    def transformer(self) -> tuple[BlockEntropy, ...]:
        return tuple(b for b in self.blocks if b.kind is BlockKind.TRANSFORMER)

    def block(self, kind: BlockKind) -> BlockEntropy:
        return next(b for b in self.blocks if b.kind is kind)


def check_eps(eps: float) -> None:
    if not (math.isfinite(eps) and eps >= 0):
        raise InvalidParameterError(f"eps must be a number >= 0, got {eps}")


def profile(
    src: TensorSource,
    layout: ModelLayout,
    *,
    eps: float = 0.0,
    workers: int | None = None,
    progress: Progress | None = None,
) -> EntropyProfile:
    """Read every matrix of ``src`` once and aggregate the entropies by block."""
    check_eps(eps)
    if layout.num_blocks == 0:
        raise FormatError(f"{src.index.source}: no transformer blocks to analyse")
    if src.index.metadata_only:
        raise EwqError(
            f"{src.index.source}: opened for metadata only; the analysis reads every "
            "weight (open it with download=True, or `--download` on the command line)"
        )
    counted: dict[int, list[TensorInfo]] = {}
    for block in layout.blocks:
        counted[block.exec_index] = [
            t
            for t, k in zip(block.tensors, block.keys, strict=True)
            if counts_as_matrix(t, k)
        ]
    infos = [t for ts in counted.values() for t in ts]
    infos.sort(key=lambda t: (t.file, t.offset))  # file order: sequential reads
    # the tensors that do not count (norm weights, biases) are small, but a NaN in
    # one breaks the model all the same: read them too and refuse NaN and Inf
    matrices = {t.name for t in infos}
    for t in src.index.tensors:
        if t.name not in matrices and t.nbytes <= _SMALL:
            check_finite(t, src.read(t))
    entropies = scan(src, infos, eps=eps, workers=workers, progress=progress)
    blocks = []
    for block in layout.blocks:
        pairs = [
            (t.num_elements // matrices_of(t), h)
            for t in counted[block.exec_index]
            for h in entropies[t.name]
        ]
        h = block_entropy(pairs)
        if h is None and block.kind is BlockKind.TRANSFORMER:
            raise FormatError(
                f"{src.index.source}: transformer block {block.exec_index} holds no "
                "float weight matrix to analyse"
            )
        blocks.append(
            BlockEntropy(
                block.exec_index,
                block.kind,
                block.num_parameters,
                sum(n for n, _ in pairs),
                h,
            )
        )
    return EntropyProfile(eps, tuple(blocks), entropies)
