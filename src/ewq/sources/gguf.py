"""GGUF models (llama.cpp): one file or llama.cpp's split files, their headers
parsed by ``gguf_header``, their tensors decoded by gguf-py.

Quantized tensors are dequantized to float32 as they are read (by whole rows, for
:meth:`GGUFSource.read_range`); F32, F16 and BF16 tensors keep their storage dtype.
"""

from __future__ import annotations

import math
import os
import re
import threading
from pathlib import Path
from typing import Any

import gguf
import ml_dtypes
import numpy as np

from ewq.errors import FormatError, SourceNotFoundError
from ewq.sources.base import TensorSource, mapped
from ewq.sources.gguf_header import (
    MAX_CONFIG_ARRAY,
    GGUFHeader,
    HeaderTruncated,
    parse_header,
    read_header,
)
from ewq.types import Container, ModelIndex, TensorInfo

__all__ = [
    "MAX_CONFIG_ARRAY",
    "GGUFHeader",
    "GGUFSource",
    "HeaderTruncated",
    "gguf_models",
    "is_gguf",
    "parse_header",
    "read_header",
    "split_files",
    "split_name",
    "split_prefix",
    "tensor_infos",
]

_Q = gguf.GGMLQuantizationType
_V = gguf.GGUFValueType
_PLAIN = {
    _Q.F32: np.float32,
    _Q.F16: np.float16,
    _Q.F64: np.float64,
    _Q.I8: np.int8,
    _Q.I16: np.int16,
    _Q.I32: np.int32,
    _Q.I64: np.int64,
    _Q.BF16: ml_dtypes.bfloat16,
}


def is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == b"GGUF"
    except OSError:
        return False


def _nbytes(shape: tuple[int, ...], qtype: _Q) -> int:
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n = math.prod(shape)  # Python integers: no int64 overflow to 0 bytes
    return n // block * type_size


_SPLIT = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def split_name(prefix: str, no: int, count: int) -> str:
    """llama.cpp's name for split ``no`` (1-based) of ``count`` (llama_split_path)."""
    return f"{prefix}-{no:05d}-of-{count:05d}.gguf"


def split_prefix(name: str) -> tuple[str, int] | None:
    """(prefix, count) of a split file's name, or None for a single file."""
    m = _SPLIT.match(name)
    return (m["prefix"], int(m["count"])) if m else None


def tensor_infos(header: GGUFHeader, file: str, size: int) -> list[TensorInfo]:
    """The tensors a header declares in ``file`` of ``size`` bytes, in file order,
    checked: whole blocks per row, inside the file, not overlapping."""
    infos = []
    for name, shape, qtype, offset in header.tensors:
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        if shape and shape[-1] % block:
            raise FormatError(
                f"{file}: tensor '{name}' has rows of {shape[-1]}, not a multiple "
                f"of its {qtype.name} block of {block}"
            )
        info = TensorInfo(
            name=name,
            dtype=qtype.name,
            shape=shape,
            nbytes=_nbytes(shape, qtype),
            file=file,
            offset=offset,
        )
        if info.offset + info.nbytes > size:
            raise FormatError(f"{file}: tensor '{name}' runs past the end of the file")
        infos.append(info)
    infos.sort(key=lambda i: i.offset)
    for prev, cur in zip(infos, infos[1:], strict=False):
        if cur.offset < prev.offset + prev.nbytes:
            raise FormatError(f"{file}: tensors '{prev.name}' and '{cur.name}' overlap")
    return infos


def check_splits(headers: list[GGUFHeader], names: list[str]) -> None:
    """The split files of one model agree with their split.* keys (llama.cpp's
    loader checks the same: split.no in order, one split.count, every tensor)."""
    count = len(headers)
    for no, (h, name) in enumerate(zip(headers, names, strict=True)):
        if h.metadata.get("split.count") != count or h.metadata.get("split.no") != no:
            raise FormatError(
                f"{name}: split.no {h.metadata.get('split.no')!r} of "
                f"{h.metadata.get('split.count')!r}, expected {no} of {count}"
            )
    declared = headers[0].metadata.get("split.tensors.count")
    found = sum(len(h.tensors) for h in headers)
    if declared is not None and declared != found:
        raise FormatError(
            f"{names[0]}: split.tensors.count is {declared}, the splits hold {found}"
        )


def split_files(path: Path) -> list[Path]:
    """Every file of the model ``path`` belongs to: itself, or all of llama.cpp's
    split files ``PREFIX-0000i-of-0000N.gguf`` when it is one of them."""
    found = split_prefix(path.name)
    if found is None:
        return [path]
    prefix, count = found
    files = [path.with_name(split_name(prefix, i, count)) for i in range(1, count + 1)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise SourceNotFoundError(
            f"{path}: split {len(files) - len(missing)} of {count} files present; "
            f"missing {', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else "")
        )
    return files


def gguf_models(names: list[str]) -> dict[str, list[str]]:
    """GGUF file names grouped into models: llama.cpp's split files of one prefix
    are one model (named by the prefix, files in split order), any other file is
    one. Split groups with files missing are kept: opening them says which."""
    models: dict[str, list[str]] = {}
    for name in sorted(names):
        found = split_prefix(name)
        models.setdefault(found[0] if found else name, []).append(name)
    return models


class GGUFSource(TensorSource):
    """One local GGUF model: a file, or llama.cpp's split files (any one of them
    names the model; ``index.files[0]`` is the first, which llama.cpp opens)."""

    def __init__(self, path: str | os.PathLike[str], *, source: str | None = None):
        path = Path(path)
        if not path.is_file():
            raise SourceNotFoundError(f"no such file: {path}")
        files = split_files(path)
        headers = [read_header(f) for f in files]
        if len(files) > 1:
            check_splits(headers, [str(f) for f in files])
        infos: list[TensorInfo] = []
        self._types: dict[str, _Q] = {}
        for f, header in zip(files, headers, strict=True):
            infos.extend(tensor_infos(header, str(f), f.stat().st_size))
            for name, _, qtype, _ in header.tensors:
                self._types[name] = qtype
        if len(self._types) != len(infos):
            raise FormatError(f"{path}: a tensor name appears twice")
        self.version = headers[0].version
        self.index = ModelIndex(
            source=source or str(path),
            container=Container.GGUF,
            files=tuple(str(f) for f in files),
            tensors=tuple(infos),
            config=headers[0].metadata,
        )
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def _file(self, file: str) -> int:
        with self._lock:
            if file not in self._fds:
                self._fds[file] = os.open(file, os.O_RDONLY)
            return self._fds[file]

    def _pread(
        self, info: TensorInfo, offset: int, nbytes: int, buffer: Any
    ) -> np.ndarray:
        if buffer is None or buffer.size < nbytes:
            buffer = np.empty(nbytes, dtype=np.uint8)
        view, got, fd = memoryview(buffer)[:nbytes], 0, self._file(info.file)
        while got < nbytes:  # positioned reads: thread-safe and GIL-free
            n = os.preadv(fd, [view[got:]], info.offset + offset + got)
            if n == 0:
                raise FormatError(f"{info.file}: tensor '{info.name}' is truncated")
            got += n
        return buffer[:nbytes]

    def read(self, info: TensorInfo) -> np.ndarray:
        return self.read_range(info, 0, info.num_elements).reshape(info.shape)

    def granule(self, info: TensorInfo) -> int:
        if self._types[info.name] in _PLAIN:
            return 1
        return info.shape[-1]  # quantized blocks never straddle rows

    def block_type(self, info: TensorInfo) -> str | None:
        qtype = self._types[info.name]
        return None if qtype in _PLAIN else qtype.name

    def read_blocks(
        self, info: TensorInfo, start: int, stop: int, buffer: np.ndarray | None = None
    ) -> np.ndarray:
        row = info.shape[-1]
        if start % row or stop % row:
            raise ValueError(f"range [{start}, {stop}) is not whole rows of {row}")
        row_bytes = _nbytes((row,), self._types[info.name])
        return self._pread(
            info, start // row * row_bytes, (stop - start) // row * row_bytes, buffer
        )

    def map_range(self, info: TensorInfo, start: int, stop: int) -> np.ndarray | None:
        qtype = self._types[info.name]
        if qtype not in _PLAIN:
            return None  # quantized blocks are decoded (read_range) or read raw
        dtype = np.dtype(_PLAIN[qtype])
        return mapped(
            self._file(info.file),
            info.offset + start * dtype.itemsize,
            (stop - start) * dtype.itemsize,
            dtype,
            f"{info.file}: tensor '{info.name}'",
        )

    def read_range(
        self, info: TensorInfo, start: int, stop: int, buffer: np.ndarray | None = None
    ) -> np.ndarray:
        qtype = self._types[info.name]
        if qtype in _PLAIN:
            dtype = np.dtype(_PLAIN[qtype])
            raw = self._pread(
                info, start * dtype.itemsize, (stop - start) * dtype.itemsize, buffer
            )
            return raw.view(dtype)
        row = info.shape[-1]
        if start % row or stop % row:
            raise ValueError(f"range [{start}, {stop}) is not whole rows of {row}")
        row_bytes = _nbytes((row,), qtype)
        raw = self._pread(
            info,
            start // row * row_bytes,
            (stop - start) // row * row_bytes,
            buffer if buffer is not None else None,
        )
        try:
            values = gguf.quants.dequantize(raw.reshape(-1, row_bytes), qtype)
        except NotImplementedError as exc:
            raise FormatError(
                f"{info.file}: tensor '{info.name}' has type {qtype.name}, which gguf-py "
                "cannot dequantize"
            ) from exc
        return values.reshape(-1)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
