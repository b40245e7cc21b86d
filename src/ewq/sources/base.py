"""The contract every model source meets: an index first, then tensors one at a time."""

from __future__ import annotations

import abc
import os
from collections.abc import Iterator

import numpy as np

from ewq.errors import EwqError, FormatError, NonFiniteTensorError
from ewq.types import ModelIndex, TensorInfo

__all__ = ["TensorSource", "check_finite"]

# Exponent masks: a float is NaN or Inf exactly when its exponent bits are all ones.
# Testing bit patterns is one cheap integer pass and works for bf16, which plain numpy
# cannot test with isfinite without a conversion.
_EXP_MASK = {2: np.uint16(0x7C00), 4: np.uint32(0x7F800000), 8: np.uint64(0x7FF0 << 48)}
_BF16_EXP_MASK = np.uint16(0x7F80)
_CHUNK = 1 << 18


def check_finite(info: TensorInfo, array: np.ndarray) -> None:
    """Raise :class:`NonFiniteTensorError` if ``array`` holds NaN or Inf."""
    if array.dtype.kind not in "fV" and array.dtype.name not in ("bfloat16",):
        return
    if array.dtype.name == "bfloat16":
        bits, mask = array.view(np.uint16), _BF16_EXP_MASK
    elif array.dtype.itemsize in _EXP_MASK and array.dtype.kind == "f":
        bits = array.view(f"u{array.dtype.itemsize}")
        mask = _EXP_MASK[array.dtype.itemsize]
    else:  # float8 and other exotic types: convert, rare and small
        if np.isfinite(array.astype(np.float32)).all():
            return
        raise _non_finite(info, array.astype(np.float32))
    flat = bits.reshape(-1)
    # In chunks: a cache-sized scratch buffer instead of two tensor-sized temporaries.
    scratch = np.empty(min(flat.size, _CHUNK), dtype=flat.dtype)
    for start in range(0, flat.size, _CHUNK):
        part = flat[start : start + _CHUNK]
        masked = np.bitwise_and(part, mask, out=scratch[: part.size])
        if np.any(masked == mask):
            raise _non_finite(info, array.astype(np.float32))


def _non_finite(info: TensorInfo, values: np.ndarray) -> NonFiniteTensorError:
    n_nan = int(np.isnan(values).sum())
    n_inf = int(np.isinf(values).sum())
    return NonFiniteTensorError(
        f"{info.file}: tensor '{info.name}' holds {n_nan} NaN and {n_inf} Inf values"
    )


class TensorSource(abc.ABC):
    """A model opened for reading.

    ``index`` is complete as soon as the source is open and no weight has been read.
    :meth:`iter_tensors` then yields ``(TensorInfo, array)`` pairs in file order,
    materialising one tensor at a time, so memory stays bounded by the largest tensor.

    Arrays come in their storage dtype where numpy has one (float32, float16,
    ``ml_dtypes.bfloat16``, integers); GGML quantized tensors are dequantized to float32.
    """

    index: ModelIndex

    @abc.abstractmethod
    def read(self, info: TensorInfo) -> np.ndarray:
        """Read one tensor, shaped as ``info.shape``."""

    def granule(self, info: TensorInfo) -> int:
        """Ranges given to :meth:`read_range` must start and end on multiples of this.

        1 for plain dtypes; a row for block-quantized tensors, which decode by rows.
        """
        return 1

    def block_type(self, info: TensorInfo) -> str | None:
        """The GGML block type (``Q4_K``...) of a block-quantized tensor whose raw
        blocks :meth:`read_blocks` gives; None for everything else."""
        return None

    def map_range(self, info: TensorInfo, start: int, stop: int) -> np.ndarray | None:
        """Elements ``[start, stop)`` as a read-only view of a memory mapping of the
        file (no copy: the page cache is read in place), or None where the source
        cannot map them (the caller then uses :meth:`read_range`). The mapping
        lives as long as the array."""
        return None

    def read_blocks(
        self, info: TensorInfo, start: int, stop: int, buffer: np.ndarray | None = None
    ) -> np.ndarray:
        """The raw bytes of elements ``[start, stop)`` (whole rows) of a tensor whose
        :meth:`block_type` is not None."""
        raise NotImplementedError

    def prefetch(self, info: TensorInfo, rows: np.ndarray) -> None:
        """Make rows ``rows`` (sorted) of a tensor readable at once: a remote
        source fetches them in as few requests as it can; local ones need nothing."""
        return None

    def read_range(
        self, info: TensorInfo, start: int, stop: int, buffer: np.ndarray | None = None
    ) -> np.ndarray:
        """Elements ``[start, stop)`` of the flattened tensor, as a 1-D array.

        Safe to call from several threads at once. A source may read into ``buffer``
        (bytes, ``uint8``, at least the range's size) instead of allocating; the result
        is then a view of it. This default reads the whole tensor: sources override it.
        """
        return self.read(info).reshape(-1)[start:stop]

    def iter_tensors(
        self, *, check: bool = True
    ) -> Iterator[tuple[TensorInfo, np.ndarray]]:
        """Yield every tensor in file order; with ``check``, refuse NaN and Inf."""
        if self.index.metadata_only:
            raise EwqError(
                f"{self.index.source}: opened for metadata only; its weights were not "
                "downloaded (open it with download=True, or `--download` on the command line)"
            )
        for info in self.index.tensors:
            array = self.read(info)
            if check:
                check_finite(info, array)
            yield info, array

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release file handles; sources that hold none need not override it."""

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def mapped(
    fd: int, offset: int, nbytes: int, dtype: np.dtype, where: str
) -> np.ndarray | None:
    """``nbytes`` at ``offset`` of the open file ``fd`` as a read-only array of
    ``dtype`` over a mapping of just that range (pages aligned by the kernel's
    granularity); the mapping is released with the array. A file shorter than the
    range is a :class:`FormatError`, never a SIGBUS on touching a missing page; a
    file that cannot be mapped gives None (the caller reads it instead)."""
    import mmap

    if os.fstat(fd).st_size < offset + nbytes:
        raise FormatError(f"{where} is truncated")
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    try:
        mm = mmap.mmap(
            fd, offset + nbytes - start, offset=start, access=mmap.ACCESS_READ
        )
    except (OSError, ValueError):  # a file system without mmap: read it instead
        return None
    return np.frombuffer(
        mm, dtype=dtype, count=nbytes // dtype.itemsize, offset=offset - start
    )
