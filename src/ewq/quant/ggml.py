"""ggml's own quantize and dequantize, from the llama.cpp library llama-cpp-python
ships: a tensor round-tripped here holds exactly the values llama.cpp writes for it
(the same ``ggml_quantize_chunk``, no importance matrix, as ``ewq quantize`` runs it).

Why ctypes and not gguf-py: gguf-py's numpy quantizers cover only Q4_0..Q8_0 (no
K-quants, no TQ1_0) and its dequantizer runs at ~0.13 G values/s holding the GIL;
ggml's C functions release it (ctypes drops the GIL around foreign calls), so
threads share the work.
"""

from __future__ import annotations

import ctypes
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ewq.errors import EwqError
from ewq.native import ggml

__all__ = [
    "block_size",
    "dequantize",
    "quantize",
    "quantize_and_back",
    "requires_imatrix",
    "roundtrip",
    "row_bytes",
    "tensor_rows",
    "tensor_values",
]

_TO_FLOAT = ctypes.CFUNCTYPE(
    None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64
)


def _ggml():
    return ggml()


def row_bytes(qtype: int, n_per_row: int) -> int:
    return int(_ggml().ggml_row_size(int(qtype), n_per_row))


def block_size(qtype: int) -> int:
    """Values per block of ``qtype`` (32, or 256 for the K and most IQ types)."""
    return int(_ggml().ggml_blck_size(int(qtype)))


def tensor_values(info) -> np.ndarray:
    """A GGUF tensor's values as float32 rows (``info``: a TensorInfo of a GGUF
    source), decoded by ggml as llama.cpp reads them."""
    import gguf

    rows = info.num_elements // info.shape[-1]
    raw = np.fromfile(info.file, dtype=np.uint8, count=info.nbytes, offset=info.offset)
    floats = {"F32": "<f4", "F16": "<f2"}
    if info.dtype in floats:
        values = raw.view(np.dtype(floats[info.dtype])).astype(np.float32)
        return values.reshape(rows, info.shape[-1])
    qtype = gguf.GGMLQuantizationType[info.dtype]
    return dequantize(raw, int(qtype), info.num_elements).reshape(rows, info.shape[-1])


def tensor_rows(info, rows: np.ndarray) -> np.ndarray:
    """Rows ``rows`` (sorted indices) of a GGUF tensor as float32, decoded by ggml:
    only their bytes are read (a row of a block-quantized tensor is whole blocks)."""
    import gguf

    cols = info.shape[-1]
    total = info.num_elements // cols
    width = info.nbytes // total
    mm = np.memmap(
        info.file, dtype=np.uint8, mode="r", offset=info.offset, shape=(total, width)
    )
    raw = np.ascontiguousarray(mm[np.asarray(rows)])
    del mm
    floats = {"F32": "<f4", "F16": "<f2"}
    if info.dtype in floats:
        return (
            raw.view(np.dtype(floats[info.dtype])).astype(np.float32).reshape(-1, cols)
        )
    qtype = gguf.GGMLQuantizationType[info.dtype]
    return dequantize(raw.reshape(-1), int(qtype), len(rows) * cols).reshape(-1, cols)


def _to_float(qtype: int):
    traits = _ggml().ggml_get_type_traits(int(qtype)).contents
    if not traits.to_float:
        raise EwqError(f"ggml has no dequantizer for type {traits.type_name.decode()}")
    return _TO_FLOAT(traits.to_float)


def dequantize(data: np.ndarray, qtype: int, n: int) -> np.ndarray:
    """``n`` float32 values from ``data`` (bytes of a ``qtype`` tensor)."""
    data = np.ascontiguousarray(data)
    out = np.empty(n, dtype=np.float32)
    _to_float(qtype)(
        data.ctypes.data, out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), n
    )
    return out


def requires_imatrix(qtype: int) -> bool:
    """ggml's own rule: the types it refuses to quantize without an importance
    matrix (ggml_quantize_requires_imatrix)."""
    return bool(_ggml().ggml_quantize_requires_imatrix(int(qtype)))


def quantize(
    rows: np.ndarray, qtype: int, imatrix: np.ndarray | None = None
) -> np.ndarray:
    """Bytes of ``rows`` (2-D float32) stored as ``qtype``, as llama.cpp writes them;
    ``imatrix``: one importance weight per column, as llama.cpp's quantizer is given
    it (ewq.imatrix)."""
    lib = _ggml()
    if imatrix is None and lib.ggml_quantize_requires_imatrix(int(qtype)):
        raise EwqError(f"type {qtype} needs an importance matrix")
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    nrows, n_per_row = rows.shape
    weights = None
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
        if imatrix.shape != (n_per_row,):
            raise EwqError(
                f"an importance matrix of {imatrix.size} values for rows of {n_per_row}"
            )
        weights = imatrix.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    size = row_bytes(qtype, n_per_row)
    out = np.empty(nrows * size, dtype=np.uint8)
    written = lib.ggml_quantize_chunk(
        int(qtype),
        rows.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
        out.ctypes.data,
        0,
        nrows,
        n_per_row,
        weights,
    )
    if written != out.size:
        raise EwqError(f"ggml wrote {written} bytes for {out.size} expected")
    return out


def quantize_and_back(
    rows: np.ndarray,
    qtype: int,
    imatrix: np.ndarray | None,
    threads: int = 1,
    pool: ThreadPoolExecutor | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The bytes of ``rows`` as ``qtype`` (one row of bytes per row) and the values
    they decode to, split by row ranges over ``threads`` threads of ``pool`` (a
    caller calling often keeps one; None: this thread only)."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    nrows, n_per_row = rows.shape
    packed = np.empty((nrows, row_bytes(qtype, n_per_row)), dtype=np.uint8)
    back = np.empty_like(rows)

    def work(span: tuple[int, int]) -> None:
        a, b = span
        packed[a:b] = quantize(rows[a:b], qtype, imatrix).reshape(b - a, -1)
        back[a:b] = dequantize(
            packed[a:b].reshape(-1), qtype, (b - a) * n_per_row
        ).reshape(b - a, n_per_row)

    step = -(-nrows // max(1, threads))
    spans = [(a, min(nrows, a + step)) for a in range(0, nrows, step)]
    if pool is None or len(spans) == 1:
        for span in spans:
            work(span)
    else:
        list(pool.map(work, spans))
    return packed, back


def roundtrip(
    rows: np.ndarray,
    qtype: int,
    *,
    threads: int = 1,
    chunk_rows: int | None = None,
    imatrix: np.ndarray | None = None,
) -> np.ndarray:
    """``rows`` quantized to ``qtype`` (with ``imatrix``, if given) and back
    (float32, same shape), on ``threads`` threads over row ranges (ggml's quantizers
    are row-independent)."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    nrows, n_per_row = rows.shape
    out = np.empty_like(rows)
    step = chunk_rows or max(1, -(-nrows // max(1, threads)))

    def work(a: int) -> None:
        b = min(nrows, a + step)
        packed = quantize(rows[a:b], qtype, imatrix)
        out[a:b] = dequantize(packed, qtype, (b - a) * n_per_row).reshape(
            b - a, n_per_row
        )

    starts = list(range(0, nrows, step))
    if threads <= 1 or len(starts) == 1:
        for a in starts:
            work(a)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(work, starts))
    return out


def roundtrip_type(
    rows: np.ndarray,
    type_name: str,
    *,
    threads: int = 1,
    imatrix: np.ndarray | None = None,
) -> np.ndarray:
    """:func:`roundtrip` by GGML type name (the GGUF format's round trip, as
    ewq.formats names it)."""
    import gguf

    qtype = int(gguf.GGMLQuantizationType[type_name])
    return roundtrip(rows, qtype, threads=threads, imatrix=imatrix)
