"""The data-free ``error`` criterion: every tensor round-tripped through the real
target quantizer, in one streaming pass over the model.

Per tensor and per distinct target type, the relative squared error
||W - Q(W)||^2 / ||W||^2; a block's damage at a precision is the sum over its
matrices. Rationale: for y = W x with inputs of no preferred direction, the output
error energy relative to the output is the same ratio, so each matrix counts as one
signal path whose noise-to-signal ratio adds up along the residual stream.

GGUF: ggml's own quantize/dequantize (quant/ggml.py), so every type and fallback is
what llama.cpp writes; the source values are the source tensor dequantized by ggml.
Hugging Face: round to nearest with symmetric max-abs scales per group, the rule
compressed-tensors' ``calculate_qparams`` applies when `ewq quantize --format hf`
packs the weights (groups from ``formats.hf_group_size``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np

from ewq.arch import ModelLayout
from ewq.formats import HF_BITS, encoding, hf_group_size, offered
from ewq.sensitivity import Sensitivity
from ewq.sources.base import TensorSource
from ewq.types import Precision, TensorInfo

__all__ = ["error_sensitivity"]

_FLOAT = {"F32": np.float32, "F16": np.float16}
_CHUNK_ELEMENTS = 1 << 22  # rows per round trip: about 16 MB of float32 at a time


def _gguf_values(src: TensorSource, info: TensorInfo) -> np.ndarray:
    """The tensor's values as float32 rows, decoded by ggml (as llama.cpp reads it)."""
    import gguf

    from ewq.quant import ggml

    rows = info.num_elements // info.shape[-1]
    if info.dtype in _FLOAT:
        return src.read(info).astype(np.float32).reshape(rows, info.shape[-1])
    raw = np.fromfile(info.file, dtype=np.uint8, count=info.nbytes, offset=info.offset)
    qtype = gguf.GGMLQuantizationType[info.dtype]
    return ggml.dequantize(raw, int(qtype), info.num_elements).reshape(
        rows, info.shape[-1]
    )


def _rel_error_gguf(values: np.ndarray, qtype_name: str, threads: int) -> float:
    import gguf

    from ewq.quant import ggml

    qtype = int(gguf.GGMLQuantizationType[qtype_name])
    rows_per = max(1, _CHUNK_ELEMENTS // values.shape[1])
    sse = 0.0
    for a in range(0, values.shape[0], rows_per):
        part = values[a : a + rows_per]
        back = ggml.roundtrip(part, qtype, threads=threads)
        d = (back - part).ravel()
        sse += float(np.dot(d.astype(np.float64), d.astype(np.float64)))
    return sse


def _rel_error_hf(values: np.ndarray, bits: int) -> float:
    cols = values.shape[1]
    group = hf_group_size(cols) or cols
    g = values.reshape(values.shape[0], cols // group, group).astype(np.float64)
    qmax, qmin = 2 ** (bits - 1) - 1, -(2 ** (bits - 1))
    scale = np.abs(g).max(axis=2, keepdims=True) / ((qmax - qmin) / 2)
    scale[scale == 0] = 1.0
    q = np.clip(np.round(g / scale), qmin, qmax) * scale
    return float(((q - g) ** 2).sum())


def error_sensitivity(
    src: TensorSource,
    layout: ModelLayout,
    fmt: str,
    *,
    threads: int = 2,
    progress: Callable[[int, int, str], None] | None = None,
) -> Sensitivity:
    """Measure the ``error`` criterion for every block of an open source."""
    started = time.perf_counter()
    precisions = offered(fmt)
    damage = {b.exec_index: dict.fromkeys(precisions, 0.0) for b in layout.blocks}
    total = sum(b.nbytes for b in layout.blocks)
    done = 0
    for block in layout.blocks:
        for info, key in zip(block.tensors, block.keys, strict=True):
            done += info.nbytes
            if len(info.shape) < 2 or info.num_elements == 0:
                continue
            kinds: dict[str, list[Precision]] = {}
            for p in precisions:
                t = encoding(fmt, info, key, p)
                if t is None or not t.quantizable or p is Precision.RAW:
                    continue
                if t.type == info.dtype:  # llama.cpp copies its own type unchanged
                    continue
                kinds.setdefault(t.type, []).append(p)
            if not kinds:
                continue
            if fmt == "gguf":
                values = _gguf_values(src, info)
            else:
                values = src.read(info).astype(np.float32)
                values = values.reshape(-1, info.shape[-1])
            energy = float(np.dot(values.ravel().astype(np.float64), values.ravel()))
            if energy == 0 or not math.isfinite(energy):
                continue
            for kind, ps in kinds.items():
                if fmt == "gguf":
                    sse = _rel_error_gguf(values, kind, threads)
                else:
                    sse = _rel_error_hf(values, HF_BITS[ps[0]])
                for p in ps:
                    damage[block.exec_index][p] += sse / energy
            if progress is not None:
                progress(done, total, info.name)
    return Sensitivity(
        "error",
        damage,
        time.perf_counter() - started,
        {"measure": "sum over matrices of ||W - Q(W)||^2 / ||W||^2"},
    )
