"""Hugging Face safetensors checkpoints: one file, a sharded folder, or headers alone.

The header is parsed here rather than through the ``safetensors`` package because we
need what that package does not expose: each tensor's byte offsets (to read in file
order and to name overlapping tensors), and bfloat16 without torch (numpy lacks it;
``ml_dtypes`` provides it). The format is 8 bytes of little-endian header length, a
JSON header, then the data.
"""

from __future__ import annotations

import logging
import math
import os
import struct
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from ewq.errors import FormatError, SourceNotFoundError
from ewq.sources.base import TensorSource, mapped
from ewq.sources.documents import check_config, load_json
from ewq.types import ModelIndex, TensorInfo

__all__ = [
    "DTYPES",
    "SafetensorsSource",
    "parse_header",
    "read_header",
    "tensor_infos_from_header",
]

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_HEADER_BYTES = 100_000_000  # the safetensors specification's own limit

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """Return the JSON header of a safetensors file and the offset where data starts."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise FormatError(
                    f"{path}: truncated safetensors file ({size} bytes, shorter than "
                    "the 8-byte header length)"
                )
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                # the number is shown only when it is plausible: for a file that is
                # not a model, its first 8 bytes would be echoed as a number
                shown = f" {n}" if n < 1 << 32 else ""
                raise FormatError(
                    f"{path}: safetensors header length{shown} is longer than the "
                    f"file ({size} bytes): truncated or not a safetensors file"
                )
            if n > MAX_HEADER_BYTES:
                raise FormatError(
                    f"{path}: safetensors header of {n} bytes is implausible"
                )
            raw = fh.read(n)
    except OSError as exc:
        raise SourceNotFoundError(f"{path}: cannot read ({exc.strerror})") from exc
    return parse_header(raw, path), 8 + n


def parse_header(raw: bytes, where: Path | str) -> dict[str, Any]:
    header = load_json(raw, f"{where}: corrupt safetensors header")
    if not isinstance(header, dict):
        raise FormatError(f"{where}: corrupt safetensors header (not a JSON object)")
    return header


def tensor_infos_from_header(
    header: Mapping[str, Any], data_start: int, data_size: int | None, file: str
) -> list[TensorInfo]:
    """Validate a parsed header and return its tensors sorted by offset.

    ``data_size`` is the number of bytes after the header, or None when unknown
    (remote headers).
    """
    infos = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if (
            not isinstance(entry, dict)
            or not {"dtype", "shape", "data_offsets"} <= entry.keys()
        ):
            raise FormatError(f"{file}: corrupt header entry for tensor '{name}'")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise FormatError(
                f"{file}: tensor '{name}' has unknown dtype {str(dtype)[:40]!r}"
            )
        if (
            not isinstance(shape, list)
            or not all(isinstance(d, int) and d >= 0 for d in shape)
            or not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise FormatError(
                f"{file}: tensor '{name}' has a corrupt shape or data_offsets"
            )
        begin, end = offsets
        # Python integers: an int64 product of [2**32, 2**32] wraps to 0 bytes
        expected = math.prod(shape) * DTYPES[dtype].itemsize
        if end - begin != expected:
            raise FormatError(
                f"{file}: tensor '{name}' spans {end - begin} bytes but its shape "
                f"{shape} in {dtype} needs {expected}"
            )
        if data_size is not None and end > data_size:
            raise FormatError(
                f"{file}: tensor '{name}' ends at byte {data_start + end}, past the end "
                f"of the file ({data_start + data_size} bytes): truncated"
            )
        infos.append(
            TensorInfo(name, dtype, tuple(shape), end - begin, file, data_start + begin)
        )
    infos.sort(key=lambda t: (t.offset, t.nbytes))
    for prev, cur in zip(infos, infos[1:], strict=False):
        if cur.offset < prev.offset + prev.nbytes:
            raise FormatError(f"{file}: tensors '{prev.name}' and '{cur.name}' overlap")
    return infos


def _file_infos(path: Path) -> list[TensorInfo]:
    header, start = read_header(path)
    return tensor_infos_from_header(
        header, start, path.stat().st_size - start, str(path)
    )


def _load_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        log.warning(
            "%s has no config.json; the architecture will be guessed from names", folder
        )
        return {}
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise FormatError(f"{path}: cannot read ({exc})") from exc
    return check_config(load_json(text, str(path)), str(path))


def _roots(folder: Path) -> list[Path]:
    """Where a shard's link may point: the folder itself and, for a folder of the
    huggingface_hub cache (``models--org--name/snapshots/REV``), the repository's
    ``blobs`` folder, where the cache keeps the files the snapshot links to."""
    roots = [folder.resolve()]
    if folder.parent.name == "snapshots":
        roots.append((folder.parent.parent / "blobs").resolve())
    return roots


def _is_plain_name(name: str) -> bool:
    """A file name in the folder itself: no separators, no '..', not absolute."""
    return (
        name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and "\x00" not in name
    )


def _shards_from_index(folder: Path) -> list[TensorInfo]:
    index_path = folder / INDEX_FILE
    try:
        doc = load_json(index_path.read_bytes(), f"{index_path}: corrupt shard index")
        weight_map = doc["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, KeyError, TypeError) as exc:
        raise FormatError(f"{index_path}: corrupt shard index ({exc})") from exc
    by_shard: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(name)
    infos: list[TensorInfo] = []
    for shard in sorted(by_shard):
        if not isinstance(shard, str) or not _is_plain_name(shard):
            raise FormatError(
                f"{index_path}: shard {shard!r} is not a file of {folder} (a shard "
                "index may name only files beside it); nothing outside was read"
            )
        path = folder / shard
        if path.is_symlink() and not any(
            path.resolve().is_relative_to(root) for root in _roots(folder)
        ):
            raise FormatError(
                f"{index_path}: shard {shard!r} links outside {folder}; nothing "
                "outside was read"
            )
        if not path.is_file():
            raise SourceNotFoundError(
                f"{index_path}: shard '{shard}' (holding '{by_shard[shard][0]}' and "
                f"{len(by_shard[shard]) - 1} more tensors) is missing from {folder}"
            )
        shard_infos = _file_infos(path)
        held = {t.name for t in shard_infos}
        for name in by_shard[shard]:
            if name not in held:
                raise FormatError(
                    f"{index_path}: tensor '{name}' is promised in shard '{shard}', "
                    "but that shard does not hold it"
                )
        infos.extend(shard_infos)
    return infos


class SafetensorsSource(TensorSource):
    """A local safetensors checkpoint: a folder (single or sharded) or one file."""

    def __init__(self, path: str | os.PathLike[str], *, source: str | None = None):
        path = Path(path)
        if path.is_dir():
            folder = path
            if (folder / INDEX_FILE).is_file():
                infos = _shards_from_index(folder)
            elif (folder / SINGLE_FILE).is_file():
                infos = _file_infos(folder / SINGLE_FILE)
            else:
                files = sorted(folder.glob("*.safetensors"))
                if not files:
                    raise SourceNotFoundError(
                        f"{folder}: no safetensors weights (expected {SINGLE_FILE} "
                        f"or {INDEX_FILE})"
                    )
                infos = [t for f in files for t in _file_infos(f)]
        elif path.is_file():
            folder = path.parent
            infos = _file_infos(path)
        else:
            raise SourceNotFoundError(f"no such file or folder: {path}")
        self.index = ModelIndex(
            source=source or str(path),
            container="safetensors",
            files=tuple(dict.fromkeys(t.file for t in infos)),
            tensors=tuple(infos),
            config=_load_config(folder),
        )
        self._handles: dict[str, Any] = {}
        self._fds: dict[str, int] = {}
        self._fd_lock = threading.Lock()

    def read(self, info: TensorInfo) -> np.ndarray:
        fh = self._handles.get(info.file)
        if fh is None:
            # Keep one shard open at a time: tensors arrive in shard order.
            self.close()
            fh = self._handles[info.file] = open(info.file, "rb")  # noqa: SIM115
        buf = np.empty(info.nbytes, dtype=np.uint8)
        fh.seek(info.offset)
        got = fh.readinto(memoryview(buf))
        if got != info.nbytes:
            raise FormatError(f"{info.file}: tensor '{info.name}' is truncated")
        return buf.view(DTYPES[info.dtype]).reshape(info.shape)

    def _fd(self, file: str) -> int:
        with self._fd_lock:
            fd = self._fds.get(file)
            if fd is None:
                fd = self._fds[file] = os.open(file, os.O_RDONLY)
            return fd

    def map_range(self, info: TensorInfo, start: int, stop: int) -> np.ndarray | None:
        dtype = np.dtype(DTYPES[info.dtype])
        return mapped(
            self._fd(info.file),
            info.offset + start * dtype.itemsize,
            (stop - start) * dtype.itemsize,
            dtype,
            f"{info.file}: tensor '{info.name}'",
        )

    def read_range(
        self, info: TensorInfo, start: int, stop: int, buffer: np.ndarray | None = None
    ) -> np.ndarray:
        dtype = np.dtype(DTYPES[info.dtype])
        nbytes = (stop - start) * dtype.itemsize
        if buffer is None or buffer.size < nbytes:
            buffer = np.empty(nbytes, dtype=np.uint8)
        view = memoryview(buffer)[:nbytes]
        fd, offset, got = self._fd(info.file), info.offset + start * dtype.itemsize, 0
        # os.preadv: positioned (thread-safe, no shared file position) and GIL-free.
        while got < nbytes:
            n = os.preadv(fd, [view[got:]], offset + got)
            if n == 0:
                raise FormatError(f"{info.file}: tensor '{info.name}' is truncated")
            got += n
        return buffer[:nbytes].view(dtype)

    def close(self) -> None:
        for fh in self._handles.values():
            fh.close()
        self._handles.clear()
        with self._fd_lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
