"""GGUF files (llama.cpp): the header parsed here, tensors decoded by gguf-py.

The header is parsed by hand rather than with ``gguf.GGUFReader``: the reader builds
a numpy view for every element of every metadata array, and took 2.4 s to open the
98 MB default model (49,152-token vocabulary plus 48,900 merges); this parser skips
long arrays and opens it in milliseconds. Type constants, block sizes and the
dequantizers still come from gguf-py.

Quantized tensors are dequantized to float32 as they are read (by whole rows, for
:meth:`GGUFSource.read_range`); F32, F16 and BF16 tensors keep their storage dtype.
"""

from __future__ import annotations

import math
import mmap
import os
import re
import struct
import threading
from pathlib import Path
from typing import Any

import gguf
import ml_dtypes
import numpy as np

from ewq.errors import FormatError, SourceNotFoundError
from ewq.sources.base import TensorSource
from ewq.types import ModelIndex, TensorInfo

__all__ = [
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

MAX_CONFIG_ARRAY = 64  # leave vocabularies and merges out of the config mapping
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
_SCALAR = {
    _V.UINT8: "B",
    _V.INT8: "b",
    _V.UINT16: "H",
    _V.INT16: "h",
    _V.UINT32: "I",
    _V.INT32: "i",
    _V.FLOAT32: "f",
    _V.BOOL: "?",
    _V.UINT64: "Q",
    _V.INT64: "q",
    _V.FLOAT64: "d",
}


def is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == b"GGUF"
    except OSError:
        return False


class _Truncated(Exception):
    pass


class HeaderTruncated(FormatError):
    """The bytes given end inside the header: read more of the file."""


class _Cursor:
    """Little-endian reads from a buffer, raising _Truncated past its end."""

    def __init__(self, buf: Any):
        self.buf, self.pos, self.size = buf, 0, len(buf)

    def unpack(self, fmt: str) -> Any:
        n = struct.calcsize(fmt)
        if self.pos + n > self.size:
            raise _Truncated
        value = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += n
        return value[0] if len(value) == 1 else value

    def string(self) -> str:
        n = self.unpack("Q")
        if self.pos + n > self.size:
            raise _Truncated
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def skip_strings(self, count: int) -> None:
        for _ in range(count):
            n = self.unpack("Q")
            if self.pos + n > self.size:
                raise _Truncated
            self.pos += n

    def value(self, vtype: int) -> Any:
        vtype = _V(vtype)
        if vtype in _SCALAR:
            return self.unpack(_SCALAR[vtype])
        if vtype is _V.STRING:
            return self.string()
        if vtype is _V.ARRAY:
            etype, count = _V(self.unpack("I")), self.unpack("Q")
            if count > MAX_CONFIG_ARRAY or etype is _V.ARRAY:
                self.skip(etype, count)
                return None
            return [self.value(etype) for _ in range(count)]
        raise ValueError(f"unknown value type {vtype}")

    def skip(self, etype: _V, count: int) -> None:
        if etype in _SCALAR:
            n = struct.calcsize(_SCALAR[etype]) * count
            if self.pos + n > self.size:
                raise _Truncated
            self.pos += n
        elif etype is _V.STRING:
            self.skip_strings(count)
        else:  # nested arrays: walk them
            for _ in range(count):
                inner, n = _V(self.unpack("I")), self.unpack("Q")
                self.skip(inner, n)


class GGUFHeader:
    """What a GGUF header says: metadata (short values only) and tensor infos."""

    def __init__(
        self,
        version: int,
        metadata: dict[str, Any],
        tensors: list[tuple[str, tuple[int, ...], _Q, int]],
        data_offset: int,
    ):
        self.version = version
        self.metadata = metadata
        self.tensors = tensors  # (name, shape in numpy order, type, absolute offset)
        self.data_offset = data_offset


def read_header(path: Path) -> GGUFHeader:
    """Parse the header of a local GGUF file; :class:`FormatError` if it is not one."""
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size < 24:
                raise FormatError(
                    f"{path}: not a readable GGUF file (only {size} bytes)"
                )
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                return _parse(memoryview(mm), size, path)
    except OSError as exc:
        raise FormatError(f"{path}: not a readable GGUF file ({exc})") from exc


def parse_header(buf: bytes | memoryview, path: Path | str) -> GGUFHeader:
    """Parse a GGUF header from its first bytes (a range read of a remote file, say);
    :class:`HeaderTruncated` when they end inside it."""
    view = memoryview(buf)
    return _parse(view, len(view), Path(path), partial=True)


def _parse(buf: memoryview, size: int, path: Path, partial: bool = False) -> GGUFHeader:
    cur = _Cursor(buf)
    try:
        try:
            magic = bytes(buf[:4])
            if magic != b"GGUF":
                raise ValueError(f"bad magic {magic!r}")
            cur.pos = 4
            version = cur.unpack("I")
            if version not in (2, 3):
                raise ValueError(
                    f"GGUF version {version} (this reader handles 2 and 3, little-endian)"
                )
            n_tensors, n_kv = cur.unpack("Q"), cur.unpack("Q")
            metadata: dict[str, Any] = {}
            for _ in range(n_kv):
                key = cur.string()
                value = cur.value(cur.unpack("I"))
                if value is not None:
                    metadata[key] = value
            raw = []
            for _ in range(n_tensors):
                name = cur.string()
                n_dims = cur.unpack("I")
                if n_dims > 8:
                    raise ValueError(f"tensor '{name}' has {n_dims} dimensions")
                dims = tuple(cur.unpack("Q") for _ in range(n_dims))
                qtype = _Q(cur.unpack("I"))
                offset = cur.unpack("Q")
                raw.append((name, tuple(reversed(dims)), qtype, offset))
        finally:
            buf.release()
    except _Truncated:
        kind = HeaderTruncated if partial else FormatError
        raise kind(f"{path}: not a readable GGUF file (truncated header)") from None
    except (ValueError, struct.error) as exc:
        raise FormatError(f"{path}: not a readable GGUF file ({exc})") from exc
    align = metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
    if (
        isinstance(align, bool)
        or not isinstance(align, int)
        or not 1 <= align <= 1 << 20
        or align & (align - 1)
    ):
        raise FormatError(
            f"{path}: general.alignment {align!r:.40} is not a power of two "
            "(llama.cpp reads only those)"
        )
    data_offset = -(-cur.pos // align) * align
    tensors = [(n, s, q, data_offset + off) for n, s, q, off in raw]
    return GGUFHeader(version, metadata, tensors, data_offset)


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
            format="gguf",
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
