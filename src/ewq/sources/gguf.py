"""GGUF files (llama.cpp), read through gguf-py's memory-mapped ``GGUFReader``.

Quantized tensors are dequantized to float32 one at a time as they are read; F32, F16
and BF16 tensors keep their storage dtype.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import gguf
import ml_dtypes
import numpy as np

from ewq.errors import FormatError, SourceNotFoundError
from ewq.sources.base import TensorSource
from ewq.types import ModelIndex, TensorInfo

__all__ = ["GGUFSource", "is_gguf"]

_MAX_CONFIG_ARRAY = 64  # leave vocabularies and merges out of the config mapping
_Q = gguf.GGMLQuantizationType


def is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == b"GGUF"
    except OSError:
        return False


def _field_value(field: Any) -> Any:
    if len(field.types) > 1 and len(field.data) > _MAX_CONFIG_ARRAY:
        return None
    try:
        return field.contents()
    except (ValueError, IndexError, TypeError):
        return None


class GGUFSource(TensorSource):
    """One local GGUF file."""

    def __init__(self, path: str | os.PathLike[str], *, source: str | None = None):
        path = Path(path)
        if not path.is_file():
            raise SourceNotFoundError(f"no such file: {path}")
        try:
            self._reader = gguf.GGUFReader(path, "r")
        except (ValueError, KeyError, IndexError, TypeError, OSError) as exc:
            raise FormatError(f"{path}: not a readable GGUF file ({exc})") from exc
        size = path.stat().st_size
        infos = []
        self._tensors = {}
        for t in self._reader.tensors:
            info = TensorInfo(
                name=t.name,
                dtype=t.tensor_type.name,
                shape=tuple(int(d) for d in reversed(t.shape.tolist())),
                nbytes=int(t.n_bytes),
                file=str(path),
                offset=int(t.data_offset),
            )
            if info.offset + info.nbytes > size:
                raise FormatError(
                    f"{path}: tensor '{t.name}' runs past the end of the file"
                )
            infos.append(info)
            self._tensors[t.name] = t
        infos.sort(key=lambda i: i.offset)
        for prev, cur in zip(infos, infos[1:], strict=False):
            if cur.offset < prev.offset + prev.nbytes:
                raise FormatError(
                    f"{path}: tensors '{prev.name}' and '{cur.name}' overlap"
                )
        config = {
            name: value
            for name, field in self._reader.fields.items()
            if not name.startswith("GGUF.")
            and (value := _field_value(field)) is not None
        }
        self.index = ModelIndex(
            source=source or str(path),
            format="gguf",
            files=(str(path),),
            tensors=tuple(infos),
            config=config,
        )

    def read(self, info: TensorInfo) -> np.ndarray:
        t = self._tensors[info.name]
        qtype = t.tensor_type
        try:
            if qtype in (_Q.F32, _Q.F16, _Q.F64, _Q.I8, _Q.I16, _Q.I32, _Q.I64):
                array = np.asarray(t.data)
            elif qtype == _Q.BF16:
                array = np.asarray(t.data).view(np.uint16).view(ml_dtypes.bfloat16)
            else:
                array = gguf.quants.dequantize(t.data, qtype)
        except NotImplementedError as exc:
            raise FormatError(
                f"{info.file}: tensor '{info.name}' has type {qtype.name}, which gguf-py "
                "cannot dequantize"
            ) from exc
        return array.reshape(info.shape)
