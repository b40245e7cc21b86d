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

Written by hand, because no tool writes holes:
copying a 70B model's embedding and output matrix for every slice would write 2 GB
each time, and llama.cpp quantizing the block weights GPTQ then rounds again took
about a fifth of a 7B-shaped run.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import gguf

from ewq.errors import EwqError
from ewq.sources.gguf_header import SCALAR_CODES
from ewq.types import ModelIndex

__all__ = ["GGUFCopy", "block_of"]

_COPY_CHUNK = 64 << 20


def block_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[1]) if len(parts) > 2 and parts[1].isdigit() else None


class GGUFCopy:
    """A GGUF model's key/value entries, read once as bytes, and copies written
    from it: entries copied as they are (a 262k-token vocabulary is not decoded
    and encoded again: gguf-py's reader took 4.3 s for the default model's 49k),
    the block count and per-block arrays encoded anew."""

    def __init__(self, index: ModelIndex):
        from ewq.sources.gguf_header import read_header

        self.index = index
        path = index.files[0]
        header = read_header(Path(path))
        meta = header.metadata
        self.arch = str(meta.get("general.architecture", ""))
        self.n_blocks = int(meta.get(f"{self.arch}.block_count", 0))
        self.align = int(meta.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT))
        with open(path, "rb") as fh:
            raw = fh.read(max((end for *_, end in header.spans), default=0))
        #: (key, value type, the entry's bytes) of every entry but split.* ones
        self.entries = [
            (k, t, raw[a:b])
            for k, t, a, b in header.spans
            if not k.startswith("split.")
        ]

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
        kv = bytearray()
        for key, vtype, entry in self.entries:
            if blocks is not None:
                entry = self._cut(key, vtype, entry, first, count)
            kv += entry
        infos = bytearray()
        parts = []
        offset = 0
        for t in self.index.tensors:
            k = block_of(t.name)
            if k is None or blocks is None:
                name = t.name
            elif first <= k < first + count:
                name = f"blk.{k - first}.{t.name.split('.', 2)[2]}"
            else:
                continue
            dtype, nbytes = types.get(t.name, (t.dtype, t.nbytes))
            infos += _string(name) + struct.pack("<I", len(t.shape))
            infos += struct.pack(f"<{len(t.shape)}Q", *reversed(t.shape))
            qtype = int(gguf.GGMLQuantizationType[dtype])
            infos += struct.pack("<IQ", qtype, offset)
            parts.append((t, nbytes, t.name in holes, offset))
            offset = _pad(offset + nbytes, self.align)
        head = b"GGUF" + struct.pack("<IQQ", 3, len(parts), len(self.entries))
        data = _pad(len(head) + len(kv) + len(infos), self.align)
        try:
            with open(path, "wb") as out:
                out.write(head)
                out.write(kv)
                out.write(infos)
                fd = out.fileno()
                for t, _, hole, at in parts:
                    if not hole:
                        _copy(t.file, t.offset, t.nbytes, fd, data + at)
                os.ftruncate(fd, data + offset)
        except OSError as exc:  # a full disk, say: one line, no partial copy
            Path(path).unlink(missing_ok=True)
            raise EwqError(
                f"{Path(path).parent}: could not write a working copy of the model "
                f"({exc.strerror or exc})"
            ) from None
        return path

    def _cut(self, key: str, vtype: int, entry: bytes, first: int, count: int) -> bytes:
        """An entry of a slice of ``count`` blocks from ``first``: the block count,
        and each ``{arch}.*`` array of one entry per block cut to the slice's."""
        head = _string(key)
        if key == f"{self.arch}.block_count" and vtype in SCALAR_CODES:
            return head + struct.pack(f"<I{SCALAR_CODES[vtype]}", vtype, count)
        if vtype != gguf.GGUFValueType.ARRAY or not key.startswith(f"{self.arch}."):
            return entry
        etype, n = struct.unpack_from("<IQ", entry, len(head) + 4)
        if n != self.n_blocks or etype not in SCALAR_CODES:
            return entry
        code = SCALAR_CODES[etype]
        values = struct.unpack_from(f"<{n}{code}", entry, len(head) + 16)
        kept = values[first : first + count]
        return head + struct.pack(f"<IIQ{count}{code}", vtype, etype, count, *kept)


def _string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


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
