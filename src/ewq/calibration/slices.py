"""A slice of a GGUF model: some consecutive blocks of it as a model of their own,
which llama.cpp loads and runs from the residual stream a previous pass saved
(``llama_batch.embd``), so that a pass over the text for a group of blocks computes
those blocks alone instead of every block before them again.

The slice keeps every key of the source with the block count set to the slice's,
and each ``{arch}.*`` array that holds one entry per block cut to the slice's
entries (llama.cpp's own pruning, ``prune_layers`` in ``src/llama-quant.cpp``,
renumbers the blocks the same way but keeps such arrays whole). Its blocks are
renumbered from 0 and copied byte for byte. The token embedding and the output
matrix, which a pass from the stream never reads (it stops after the slice's last
block), are holes in a sparse file: their shapes are what llama.cpp checks when it
loads the file, and no byte of them is written.

Written by hand with gguf-py's writer for the header, because no tool writes a
sparse slice: copying a 70B model's embedding and output matrix for every slice
would write 2 GB each time.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import gguf
import numpy as np

from ewq.errors import EwqError
from ewq.types import ModelIndex

__all__ = ["HOLES", "SliceSource", "block_of"]

#: tensors a pass from the residual stream never reads (stopped after the slice's
#: last block): their bytes are left as holes
HOLES = frozenset({"token_embd.weight", "output.weight"})

_COPY_CHUNK = 64 << 20


def block_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[1]) if len(parts) > 2 and parts[1].isdigit() else None


class SliceSource:
    """A GGUF model's keys, read once, and the slices written from it."""

    def __init__(self, index: ModelIndex):
        self.index = index
        reader = gguf.GGUFReader(index.files[0])
        self.arch = str(reader.fields["general.architecture"].contents())
        self.n_blocks = int(reader.fields[f"{self.arch}.block_count"].contents())
        self.fields = []
        for name, field in reader.fields.items():
            if name.startswith("GGUF.") or name.startswith("split."):
                continue
            if name == "general.architecture":
                continue
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            self.fields.append((name, field.contents(), vtype, sub))
        del reader

    def write(self, blocks: Sequence[int], path: Path) -> Path:
        """Blocks ``blocks`` (consecutive) as a model of their own at ``path``."""
        first, count = blocks[0], len(blocks)
        if list(blocks) != list(range(first, first + count)):
            raise EwqError(f"a slice holds consecutive blocks, not {list(blocks)}")
        writer = gguf.GGUFWriter(path, self.arch)
        block_count = f"{self.arch}.block_count"
        for name, value, vtype, sub in self.fields:
            if name == block_count:
                value = count
            elif (
                vtype == gguf.GGUFValueType.ARRAY
                and name.startswith(f"{self.arch}.")
                and isinstance(value, list)
                and len(value) == self.n_blocks
            ):
                value = value[first : first + count]
            elif name == "general.alignment":
                writer.data_alignment = int(value)
            writer.add_key_value(name, value, vtype, sub_type=sub)
        parts = []
        for t in self.index.tensors:
            k = block_of(t.name)
            if k is None:
                name = t.name
            elif first <= k < first + count:
                name = f"blk.{k - first}.{t.name.split('.', 2)[2]}"
            else:
                continue
            qtype = gguf.GGMLQuantizationType[t.dtype]
            writer.add_tensor_info(name, t.shape, _DUMMY, t.nbytes, raw_dtype=qtype)
            parts.append((t, t.name in HOLES))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        align = writer.data_alignment
        assert writer.fout is not None
        out = writer.fout[0]
        out.flush()
        fd = out.fileno()
        pos = _pad(out.tell(), align)
        for t, hole in parts:
            if not hole:
                _copy(t.file, t.offset, t.nbytes, fd, pos)
            pos = _pad(pos + t.nbytes, align)
        os.ftruncate(fd, pos)
        writer.close()
        return path


_DUMMY = np.dtype("float32")  # gguf-py wants a numpy type beside a raw one


def _pad(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def _copy(src: str, offset: int, n: int, fd: int, pos: int) -> None:
    """``n`` bytes of ``src`` from ``offset`` to ``fd`` at ``pos`` (in the kernel
    where it can)."""
    with open(src, "rb") as fh:
        sfd = fh.fileno()
        done = 0
        try:
            while done < n:
                got = os.copy_file_range(
                    sfd, fd, min(n - done, _COPY_CHUNK), offset + done, pos + done
                )
                if got <= 0:
                    break
                done += got
        except OSError:
            pass  # another file system or an old kernel: copied below
        while done < n:
            buf = os.pread(sfd, min(n - done, _COPY_CHUNK), offset + done)
            if not buf:
                raise EwqError(f"{src}: ends inside a tensor's data")
            os.pwrite(fd, buf, pos + done)
            done += len(buf)
