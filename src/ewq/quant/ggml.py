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
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ewq.errors import EwqError
from ewq.quant.gguf import LLAMA_CPP_PIN

__all__ = ["dequantize", "quantize", "roundtrip", "row_bytes"]

_TO_FLOAT = ctypes.CFUNCTYPE(
    None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64
)


class _Traits(ctypes.Structure):  # struct ggml_type_traits (ggml/include/ggml.h)
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_lock = threading.Lock()
_api = None


def _ggml():
    """The ggml base library loaded by llama_cpp, with the signatures we call."""
    global _api
    with _lock:
        if _api is not None:
            return _api
        try:
            import llama_cpp
        except ImportError:
            raise EwqError(
                f"ggml's quantizer comes with llama.cpp: pip install {LLAMA_CPP_PIN} "
                "(scripts/setup.sh installs it)"
            ) from None
        try:  # the copy libllama loaded, by soname: the wheel also holds
            # libggml-base.so as a second file, which would be a second copy
            lib = ctypes.CDLL("libggml-base.so.0")
        except OSError:
            libdir = Path(llama_cpp.__file__).parent / "lib"
            found = sorted(libdir.glob("libggml-base.*")) or sorted(
                libdir.glob("libggml.*")
            )
            if not found:
                raise EwqError(
                    f"no ggml library beside llama_cpp in {libdir}"
                ) from None
            lib = ctypes.CDLL(str(found[0]))
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [
            ctypes.c_int,
            ctypes.POINTER(ctypes.c_float),
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.POINTER(ctypes.c_float),
        ]
        lib.ggml_get_type_traits.restype = ctypes.POINTER(_Traits)
        lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
        lib.ggml_row_size.restype = ctypes.c_size_t
        lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
        lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
        _api = lib
        return lib


def row_bytes(qtype: int, n_per_row: int) -> int:
    return int(_ggml().ggml_row_size(int(qtype), n_per_row))


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


def quantize(rows: np.ndarray, qtype: int) -> np.ndarray:
    """Bytes of ``rows`` (2-D float32) stored as ``qtype``, as llama.cpp writes them."""
    lib = _ggml()
    if lib.ggml_quantize_requires_imatrix(int(qtype)):
        raise EwqError(f"type {qtype} needs an importance matrix")
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    nrows, n_per_row = rows.shape
    size = row_bytes(qtype, n_per_row)
    out = np.empty(nrows * size, dtype=np.uint8)
    written = lib.ggml_quantize_chunk(
        int(qtype),
        rows.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
        out.ctypes.data,
        0,
        nrows,
        n_per_row,
        None,
    )
    if written != out.size:
        raise EwqError(f"ggml wrote {written} bytes for {out.size} expected")
    return out


def roundtrip(
    rows: np.ndarray, qtype: int, *, threads: int = 1, chunk_rows: int | None = None
) -> np.ndarray:
    """``rows`` quantized to ``qtype`` and back (float32, same shape), on ``threads``
    threads over row ranges (ggml's quantizers are row-independent)."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    nrows, n_per_row = rows.shape
    out = np.empty_like(rows)
    step = chunk_rows or max(1, -(-nrows // max(1, threads)))

    def work(a: int) -> None:
        b = min(nrows, a + step)
        packed = quantize(rows[a:b], qtype)
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
