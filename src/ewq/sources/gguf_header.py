"""GGUF headers, parsed by hand rather than with ``gguf.GGUFReader``: the reader
builds a numpy view for every element of every metadata array, and took 2.4 s to
open the 98 MB default model (49,152-token vocabulary plus 48,900 merges); this
parser skips long arrays and opens it in milliseconds. Type constants come from
gguf-py. It parses a local file (memory-mapped) or the first bytes of a remote one.
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path
from typing import Any

import gguf

from ewq.errors import FormatError

__all__ = [
    "MAX_CONFIG_ARRAY",
    "SCALAR_CODES",
    "GGUFHeader",
    "HeaderTruncated",
    "parse_header",
    "read_header",
]

MAX_CONFIG_ARRAY = 64  # leave vocabularies and merges out of the config mapping
_Q = gguf.GGMLQuantizationType
_V = gguf.GGUFValueType
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


#: struct codes of GGUF's scalar value types
SCALAR_CODES = _SCALAR

_U64 = struct.Struct("<Q")


class _Truncated(Exception):
    pass


class HeaderTruncated(FormatError):
    """The bytes given end inside the header: read more of the file."""


class _Cursor:
    """Little-endian reads from a buffer, raising _Truncated past its end."""

    def __init__(self, buf: Any):
        self.buf, self.pos, self.size = buf, 0, len(buf)

    def unpack(self, code: str) -> Any:
        n = struct.calcsize(code)
        if self.pos + n > self.size:
            raise _Truncated
        value = struct.unpack_from("<" + code, self.buf, self.pos)
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
        # the vocabulary's hot loop (98,052 strings in the default model): locals
        # and a compiled Struct, 5x faster than unpack() per string
        buf, pos, size, length = self.buf, self.pos, self.size, _U64.unpack_from
        for _ in range(count):
            if pos + 8 > size:
                raise _Truncated
            pos += 8 + length(buf, pos)[0]
            if pos > size:
                raise _Truncated
        self.pos = pos

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
        spans: list[tuple[str, int, int, int]] | None = None,
    ):
        self.version = version
        self.metadata = metadata
        self.tensors = tensors  # (name, shape in numpy order, type, absolute offset)
        self.data_offset = data_offset
        #: each key/value entry's (key, value type, first byte, end) in the file
        self.spans = spans or []


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
            spans = []
            for _ in range(n_kv):
                start = cur.pos
                key = cur.string()
                vtype = cur.unpack("I")
                value = cur.value(vtype)
                spans.append((key, vtype, start, cur.pos))
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
    return GGUFHeader(version, metadata, tensors, data_offset, spans)
