"""A GGUF model copied with some tensors' bytes left as holes of a sparse file.

Two uses: a slice of a model's blocks, which a calibration pass runs from a saved
residual stream and whose embedding and output matrix it never reads
(ewq.calibration.slices); and the source llama.cpp's quantizer reads when GPTQ
rounds the dense block weights afterwards (ewq.api._gptq): those are declared in
their target types and left as holes, so that llama.cpp copies them (its quantizer
copies a tensor already in its target type, ``quantize = cur_type != new_type`` in
``src/llama-quant.cpp``) instead of quantizing bytes that are overwritten next.

The keys are the source's, with the block count set to the copy's and each
``{arch}.*`` array that holds one entry per block cut to the copy's blocks
(llama.cpp's own pruning, ``prune_layers`` in ``src/llama-quant.cpp``, renumbers
blocks the same way but keeps such arrays whole). Kept blocks are renumbered from 0.

Written by hand with gguf-py's writer for the header, because no tool writes holes:
copying a 70B model's embedding and output matrix for every slice would write 2 GB
each time, and llama.cpp quantizing the block weights GPTQ then rounds again took
about a fifth of a 7B-shaped run.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import gguf
import numpy as np

from ewq.errors import EwqError
from ewq.types import ModelIndex

__all__ = ["GGUFCopy", "block_of"]

_COPY_CHUNK = 64 << 20
_DUMMY = np.dtype("float32")  # gguf-py wants a numpy type beside a raw one


def block_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[1]) if len(parts) > 2 and parts[1].isdigit() else None


class GGUFCopy:
    """A GGUF model's keys, read once, and copies written from it."""

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

    def write(
        self,
        path: Path,
        *,
        blocks: Sequence[int] | None = None,
        holes: Collection[str] = (),
        types: Mapping[str, tuple[str, int]] | None = None,
    ) -> Path:
        """The copy at ``path``: blocks ``blocks`` alone (consecutive, renumbered
        from 0; None: every block as it is), the tensors named in ``holes`` left
        as holes, and those in ``types`` declared as (GGML type, bytes) instead of
        the source's (they must be holes: their bytes are not the source's)."""
        types = dict(types or {})
        if set(types) - set(holes):
            raise EwqError("a tensor given another type must be left as a hole")
        first, count = (
            (0, self.n_blocks) if blocks is None else (blocks[0], len(blocks))
        )
        if blocks is not None and list(blocks) != list(range(first, first + count)):
            raise EwqError(f"a slice holds consecutive blocks, not {list(blocks)}")
        writer = gguf.GGUFWriter(path, self.arch)
        for name, value, vtype, sub in self.fields:
            if name == f"{self.arch}.block_count":
                value = count
            elif (
                blocks is not None
                and vtype == gguf.GGUFValueType.ARRAY
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
            if k is None or blocks is None:
                name = t.name
            elif first <= k < first + count:
                name = f"blk.{k - first}.{t.name.split('.', 2)[2]}"
            else:
                continue
            dtype, nbytes = types.get(t.name, (t.dtype, t.nbytes))
            qtype = gguf.GGMLQuantizationType[dtype]
            writer.add_tensor_info(name, t.shape, _DUMMY, nbytes, raw_dtype=qtype)
            parts.append((t, nbytes, t.name in holes))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        align = writer.data_alignment
        assert writer.fout is not None
        out = writer.fout[0]
        out.flush()
        fd = out.fileno()
        pos = _pad(out.tell(), align)
        for t, nbytes, hole in parts:
            if not hole:
                _copy(t.file, t.offset, t.nbytes, fd, pos)
            pos = _pad(pos + nbytes, align)
        os.ftruncate(fd, pos)
        writer.close()
        return path


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
