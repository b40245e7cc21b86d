"""Exact bytes of every block at every precision, from the tensor index alone."""

from __future__ import annotations

from ewq.arch import ModelLayout
from ewq.formats import OutputFormat
from ewq.planning.ladder import BlockSpec

__all__ = ["block_specs"]


def block_specs(form: OutputFormat, layout: ModelLayout) -> list[BlockSpec]:
    """One :class:`BlockSpec` per block (embedding, transformer blocks, head).

    Sizes are what the quantizer of ``form`` writes (``formats.encoding``), so a plan's
    totals are the output's tensor bytes.
    """
    specs = []
    for block in layout.blocks:
        sizes = {}
        for p in form.offered():
            total = 0
            for info, key in zip(block.tensors, block.keys, strict=True):
                t = form.encoding(info, key, p)
                total += t.nbytes if t is not None else 0
            sizes[p] = total
        specs.append(BlockSpec(block.exec_index, block.num_parameters, sizes))
    return specs
