"""A slice of a GGUF model: some consecutive blocks of it as a model of their own,
which llama.cpp loads and runs from the residual stream a previous pass saved
(``llama_batch.embd``), so that a pass over the text for a group of blocks computes
those blocks alone instead of every block before them again.

Its blocks are renumbered from 0 and copied byte for byte (ewq.quant.sparse says
what happens to the keys); the token embedding and the output matrix, which a pass
from the stream never reads (it stops after the slice's last block), are holes of
a sparse file: their shapes are what llama.cpp checks when it loads the file, and
no byte of them is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ewq.quant.sparse import GGUFCopy, block_of

__all__ = ["HOLES", "SliceSource", "block_of"]

#: tensors a pass from the residual stream never reads (stopped after the slice's
#: last block): their bytes are left as holes
HOLES = frozenset({"token_embd.weight", "output.weight"})


class SliceSource(GGUFCopy):
    """A GGUF model's keys, read once, and the slices written from it."""

    def write_slice(self, blocks: Sequence[int], path: Path) -> Path:
        """Blocks ``blocks`` (consecutive) as a model of their own at ``path``."""
        return self.write(path, blocks=blocks, holes=HOLES)
