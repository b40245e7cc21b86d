"""Stream a model's weight matrices through the entropy kernel, on every core.

Which tensors count (the paper leaves it open; docs/method.md section 2 states this rule,
the same for every architecture and format):

* a *matrix* is a float tensor of kind ``weight`` with two or more dimensions: the
  Linear (and Embedding) weights that quantization acts on. Norm weights and
  biases are left out: they are 1-D, never quantized by llama.cpp or by the
  Hugging Face quantizers, and under 0.1% of a block's parameters.
* a tensor with more than two dimensions is a stack of matrices along its leading
  axes (the experts of a GGUF MoE layer), so each expert counts on its own, as it
  does in a Hugging Face checkpoint that stores experts one by one.

Work is cut into pieces of at most ``segment_bytes`` and handed to a thread pool: the
histogram kernel and positioned reads release the GIL, so the threads run in
parallel. At most two pieces per thread are in flight, and every thread reads into
its own reused buffer, so memory does not grow with the model.
"""

from __future__ import annotations

import collections
import math
import os
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from math import prod

import numpy as np

from ewq.analysis.entropy import (
    EntropyStats,
    entropy_from_histogram,
    eps_sum,
    float_stats,
    histogram16,
    is_16bit,
)
from ewq.analysis.quantized import quant_stats, supported
from ewq.errors import NonFiniteTensorError
from ewq.sources import TensorSource
from ewq.types import INT_DTYPES, ParamKind, Progress, TensorInfo, TensorKey

__all__ = ["FLOAT_DTYPES", "counts_as_matrix", "matrices_of", "scan"]

#: storage dtypes whose values are weights (safetensors names and GGML types)
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})

_BUFFER_BYTES = 16 << 20  # one read; several per segment
MAP = os.environ.get("EWQ_MMAP", "1") != "0"  # EWQ_MMAP=0: copy every read
_SEGMENT_BYTES = 64 << 20  # one task for the pool


#: take entropy sums straight from GGML quant blocks (EWQ_QUANT_KERNELS=0: dequantize
#: every block to float first, the reference path the benchmark compares against)
FAST = os.environ.get("EWQ_QUANT_KERNELS", "1") != "0"


def counts_as_matrix(info: TensorInfo, key: TensorKey | None) -> bool:
    """The rule of the module docstring: float weights with two or more dimensions."""
    if key is None or key.kind is not ParamKind.WEIGHT or len(info.shape) < 2:
        return False
    return info.dtype not in INT_DTYPES  # GGML block types (Q4_K, ...) are weights


def matrices_of(info: TensorInfo) -> int:
    """How many matrices a tensor stacks (1 for a plain 2-D weight)."""
    return prod(info.shape[:-2])


def _out_itemsize(info: TensorInfo) -> int:
    """Bytes per element as read: block-quantized and 8-bit types decode to float32."""
    size = info.nbytes // max(1, info.num_elements)
    return size if size >= 2 else 4


@dataclass(frozen=True, slots=True)
class _Piece:
    tensor: int  # position in the tensor list
    matrix: int  # matrix within the tensor
    start: int  # element range in the flattened tensor
    stop: int
    whole: bool  # the piece is the whole matrix (the eps > 0 float path needs that)


def _pieces(
    src: TensorSource, infos: list[TensorInfo], segment_bytes: int, whole: bool
) -> tuple[list[_Piece], list[list[int]]]:
    pieces: list[_Piece] = []
    count = []  # pieces per matrix
    for t, info in enumerate(infos):
        per_matrix = info.shape[-2] * info.shape[-1]
        g = src.granule(info)
        step = max(g, (segment_bytes // _out_itemsize(info)) // g * g)
        if whole:
            step = per_matrix
        counts = []
        for m in range(matrices_of(info)):
            base = m * per_matrix
            n = 0
            for start in range(0, per_matrix, step):
                stop = min(per_matrix, start + step)
                pieces.append(
                    _Piece(t, m, base + start, base + stop, step >= per_matrix)
                )
                n += 1
            counts.append(n)
        count.append(counts)
    return pieces, count


class _Worker:
    """What one thread does with one piece: read it in buffer-sized reads, reduce it."""

    def __init__(self, src: TensorSource, infos: list[TensorInfo], eps: float):
        self.src, self.infos, self.eps = src, infos, eps
        self.local = threading.local()

    def _reads(self, info: TensorInfo, start: int, stop: int) -> Iterator[np.ndarray]:
        buf = getattr(self.local, "buf", None)
        if buf is None:
            buf = self.local.buf = np.empty(_BUFFER_BYTES, dtype=np.uint8)
        g = self.src.granule(info)
        step = max(g, (_BUFFER_BYTES // _out_itemsize(info)) // g * g)
        for s in range(start, stop, step):
            e = min(stop, s + step)
            # stored values are read in place from the page cache where the source
            # can map them (a copy costs as much as the 16-bit histogram itself)
            values = self.src.map_range(info, s, e) if MAP else None
            yield values if values is not None else self.src.read_range(info, s, e, buf)

    def _blocks(
        self, info: TensorInfo, qtype: str, piece: _Piece
    ) -> EntropyStats | None:
        """The piece's sums straight from its quant blocks (analysis/quantized.py);
        None when a sum is not finite (the float path then says where and why)."""
        buf = getattr(self.local, "buf", None)
        if buf is None:
            buf = self.local.buf = np.empty(_BUFFER_BYTES, dtype=np.uint8)
        row = info.shape[-1]
        row_bytes = max(1, info.nbytes // max(1, info.num_elements // row))
        step = max(row, _BUFFER_BYTES // row_bytes * row)
        stats = EntropyStats(0, 0.0, 0.0, 0.0)
        for s in range(piece.start, piece.stop, step):
            raw = self.src.read_blocks(info, s, min(piece.stop, s + step), buf)
            part = quant_stats(qtype, raw)
            if part is None:
                return None
            stats = stats.merge(part)
        return stats

    def __call__(self, piece: _Piece) -> np.ndarray | EntropyStats | float:
        info = self.infos[piece.tensor]
        qtype = self.src.block_type(info)
        if self.eps == 0.0 and qtype is not None and supported(qtype) and FAST:
            fast = self._blocks(info, qtype, piece)
            if fast is not None:
                return fast
        hist: np.ndarray | None = None
        stats = EntropyStats(0, 0.0, 0.0, 0.0)
        dtype = None
        for values in self._reads(info, piece.start, piece.stop):
            if is_16bit(values.dtype):
                dtype = values.dtype
                hist = histogram16(values, hist)
            else:
                stats = stats.merge(float_stats(values))
        if hist is not None:
            return _Histogram(hist, dtype)
        if self.eps > 0.0 and piece.whole:
            _check(stats, info)
            lse = stats.logsumexp
            return sum(
                eps_sum(v, lse, self.eps)
                for v in self._reads(info, piece.start, piece.stop)
            )
        return stats


@dataclass(slots=True)
class _Histogram:
    counts: np.ndarray
    dtype: np.dtype

    def merge(self, other: _Histogram) -> _Histogram:
        self.counts += other.counts
        return self


def _check(stats: EntropyStats, info: TensorInfo) -> None:
    if not (math.isfinite(stats.m) and math.isfinite(stats.t)):
        raise NonFiniteTensorError(
            f"{info.file}: tensor '{info.name}' holds NaN or Inf values"
        )


def _finish(
    acc: _Histogram | EntropyStats | float, info: TensorInfo, eps: float
) -> float:
    if isinstance(acc, float):
        if not math.isfinite(acc):
            raise NonFiniteTensorError(
                f"{info.file}: tensor '{info.name}' holds NaN or Inf values"
            )
        return acc
    if isinstance(acc, _Histogram):
        try:
            return entropy_from_histogram(acc.counts, acc.dtype, eps)
        except ValueError:
            raise NonFiniteTensorError(
                f"{info.file}: tensor '{info.name}' holds NaN or Inf values"
            ) from None
    _check(acc, info)
    if eps > 0.0:  # float matrix split into several pieces: a second pass is needed
        raise AssertionError("eps > 0 float matrices are scanned whole")
    return acc.entropy


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def scan(
    src: TensorSource,
    tensors: Iterable[TensorInfo],
    *,
    eps: float = 0.0,
    workers: int | None = None,
    progress: Progress | None = None,
    segment_bytes: int = _SEGMENT_BYTES,
) -> dict[str, tuple[float, ...]]:
    """Exact softmax entropy of every matrix of ``tensors``: name -> one per matrix.

    Raises :class:`NonFiniteTensorError` naming the file and tensor on NaN or Inf.
    """
    infos = list(tensors)
    workers = workers or default_workers()
    # with eps > 0, float matrices need their log-sum-exp before the eps pass, so
    # each matrix is one piece (read twice); 16-bit matrices need only the histogram
    pieces, count = _pieces(src, infos, segment_bytes, whole=eps > 0.0)
    total = sum(i.nbytes for i in infos)
    done = 0
    acc: dict[tuple[int, int], _Histogram | EntropyStats | float] = {}
    left = {(t, m): n for t, c in enumerate(count) for m, n in enumerate(c)}
    result: dict[str, list[float]] = {i.name: [] for i in infos}
    worker = _Worker(src, infos, eps)

    def consume(piece: _Piece, part: _Histogram | EntropyStats | float) -> None:
        nonlocal done
        key = (piece.tensor, piece.matrix)
        prev = acc.pop(key, None)
        acc[key] = part if prev is None else prev.merge(part)  # type: ignore[union-attr]
        left[key] -= 1
        info = infos[piece.tensor]
        if left[key] == 0:
            result[info.name].append(_finish(acc.pop(key), info, eps))
        done += (piece.stop - piece.start) * info.nbytes // max(1, info.num_elements)
        if progress is not None:
            progress(done, total, info.name)

    if workers <= 1:
        for piece in pieces:
            consume(piece, worker(piece))
    else:
        pending: collections.deque[tuple[_Piece, Future]] = collections.deque()
        with ThreadPoolExecutor(workers, thread_name_prefix="ewq-scan") as pool:
            try:
                for piece in pieces:
                    pending.append((piece, pool.submit(worker, piece)))
                    if len(pending) >= 2 * workers:
                        p, f = pending.popleft()
                        consume(p, f.result())
                while pending:
                    p, f = pending.popleft()
                    consume(p, f.result())
            except BaseException:
                for _, f in pending:
                    f.cancel()
                raise
    return {name: tuple(values) for name, values in result.items()}
