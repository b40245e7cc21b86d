"""llama.cpp's libraries, as llama-cpp-python ships them: ggml's base library loaded
once, with the C signatures ewq calls (its quantizers, type traits, op names).

Why ctypes: llama-cpp-python binds llama.h, not ggml's quantize and type-trait
functions; these are ggml's own (ggml/include/ggml.h of the bundled build).
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path

from ewq.errors import EwqError

__all__ = ["LLAMA_CPP_PIN", "TypeTraits", "ggml", "llama_cpp"]

LLAMA_CPP_PIN = "llama-cpp-python==0.3.36"


class TypeTraits(ctypes.Structure):  # struct ggml_type_traits (ggml/include/ggml.h)
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


def llama_cpp(what: str = "this"):
    """llama-cpp-python, or one error line saying how to install it."""
    try:
        import llama_cpp as lc
    except ImportError:
        raise EwqError(
            f"{what} needs llama.cpp: pip install {LLAMA_CPP_PIN} (scripts/setup.sh "
            "installs it)"
        ) from None
    return lc


def ggml():
    """The ggml base library loaded by llama_cpp, with the signatures ewq calls."""
    global _api
    with _lock:
        if _api is not None:
            return _api
        lc = llama_cpp("ggml's quantizer")
        try:  # the copy libllama loaded, by soname: the wheel also holds
            # libggml-base.so as a second file, which would be a second copy
            lib = ctypes.CDLL("libggml-base.so.0")
        except OSError:
            libdir = Path(lc.__file__).parent / "lib"
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
        lib.ggml_get_type_traits.restype = ctypes.POINTER(TypeTraits)
        lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
        lib.ggml_row_size.restype = ctypes.c_size_t
        lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
        lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
        lib.ggml_op_name.restype = ctypes.c_char_p
        lib.ggml_op_name.argtypes = [ctypes.c_int]
        lib.ggml_backend_buffer_is_host.restype = ctypes.c_bool
        lib.ggml_backend_buffer_is_host.argtypes = [ctypes.c_void_p]
        _api = lib
        return lib
