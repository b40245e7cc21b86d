"""What a pass of llama.cpp over a text gives: an importance matrix computed
in-process by llama.cpp, as its ``llama-imatrix``
tool computes one (``tools/imatrix/imatrix.cpp``, ``collect_imatrix``).

llama.cpp calls back for every node of its compute graph (the context's
``cb_eval``); for each matrix product whose weight is a ``blk.*`` tensor (``MUL_MAT``)
or a stack of experts (``MUL_MAT_ID``), the squares of its input activations are
summed per input column (per expert, for the tokens routed to it), and the tokens
counted. Every position's logits are asked for, so the last layer computes every
row (llama.cpp skips rows whose output nobody reads).

In the same pass, the second moments X^T X that GPTQ rounds against
(:func:`compute_moments`): one per graph node that feeds dense ``blk.*`` weights
(llama.cpp multiplies q, k and v by one node, gate and up by another), of the
blocks asked for, in float32. A pass that needs no importance matrix stops the
graph after the last block asked for (``stop_after``): the callback returning false
after a node it asked for ends ggml's computation of the graph
(``ggml_backend_sched_compute_splits`` in ``ggml/src/ggml-backend.cpp``), so the
blocks after it and the output layer are never computed; what llama.cpp then reads
as logits is not used.

Windows, with ``documents``:

* ``stream``: llama-imatrix's own chunks: the text tokenized as one stream, as
  llama.cpp tokenizes a prompt (with the special tokens its vocabulary adds: BOS;
  for WordPiece, CLS first and SEP last), cut into chunks of exactly ``ctx`` tokens
  (a shorter rest is dropped), each chunk's first token replaced by BOS where the
  vocabulary adds one. At least two chunks are needed, as the tool requires.
* ``lines``: one window per line (ewq.evaluate.windows), for models trained on
  short independent sequences.

Why ctypes: llama-cpp-python exposes the callback type and the context parameter,
but no Python view of ``struct ggml_tensor``; its layout is declared here from
``ggml/include/ggml.h`` of the bundled build.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from ewq.errors import EwqError
from ewq.evaluate.windows import Documents, readable, text_windows
from ewq.imatrix import Entry, Imatrix
from ewq.native import ggml
from ewq.quant.sparse import block_of
from ewq.stages import stage
from ewq.types import Progress

__all__ = [
    "Capture",
    "Moments",
    "compute_imatrix",
    "compute_moments",
    "imatrix_windows",
    "run_pass",
]

_MAX_DIMS, _MAX_SRC, _MAX_OP_PARAMS, _MAX_NAME = 4, 10, 64, 64


class _GgmlTensor(ctypes.Structure):  # struct ggml_tensor, ggml/include/ggml.h
    pass


_GgmlTensor._fields_ = [
    ("type", ctypes.c_int),
    ("buffer", ctypes.c_void_p),
    ("ne", ctypes.c_int64 * _MAX_DIMS),
    ("nb", ctypes.c_size_t * _MAX_DIMS),
    ("op", ctypes.c_int),
    ("op_params", ctypes.c_int32 * (_MAX_OP_PARAMS // 4)),
    ("flags", ctypes.c_int32),
    ("src", ctypes.POINTER(_GgmlTensor) * _MAX_SRC),
    ("view_src", ctypes.POINTER(_GgmlTensor)),
    ("view_offs", ctypes.c_size_t),
    ("data", ctypes.c_void_p),
    ("name", ctypes.c_char * _MAX_NAME),
    ("extra", ctypes.c_void_p),
    ("padding", ctypes.c_char * 8),
]


def _weight_name(raw: bytes) -> str:
    """llama-imatrix's filter_tensor_name: ``CUDA0#blk.0.attn_k.weight#0`` ->
    ``blk.0.attn_k.weight``."""
    name = raw.decode("utf-8", "replace")
    if "#" in name:
        name = name.split("#", 2)[1]
    return name


def _view(t: _GgmlTensor, dims: int) -> np.ndarray:
    """A float32 view of a host tensor's data, ``dims`` outer-first (numpy order)."""
    ne = [int(t.ne[i]) for i in range(dims)]
    nb = [int(t.nb[i]) for i in range(dims)]
    span = sum((n - 1) * s for n, s in zip(ne, nb, strict=True)) + 4
    buf = (ctypes.c_char * span).from_address(t.data)
    flat = np.frombuffer(buf, dtype=np.float32)
    return np.lib.stride_tricks.as_strided(flat, shape=ne[::-1], strides=nb[::-1])


#: rows of one input held before they are multiplied into its second moment: a
#: window's own product is a small matrix product (BLAS is slow there); the
#: threshold is per input, so the sums' order, and so their bits, do not depend on
#: which other inputs are collected in the same pass
FLUSH_ROWS = 512
#: the second moments' type: float32 halves their memory (a 7B block's take 0.7 GB);
#: benchmarks/gptq_memory.py measures it against float64
MOMENTS_DTYPE = np.float32


@dataclass
class Moments:
    """The inputs' second moments X^T X of dense ``blk.*`` weights, one per distinct
    input: llama.cpp multiplies q, k and v (and gate and up) by the same input
    tensor, which the collector sees as one node of the graph, so they share one
    matrix (float32, columns x columns, symmetric). ``groups`` maps every weight
    seen to the weight whose matrix it shares (its group's first)."""

    matrices: dict[str, np.ndarray]
    groups: dict[str, str]
    rows: dict[str, int]

    def of(self, name: str) -> np.ndarray | None:
        """The second moment of ``name``'s inputs, or None if not collected."""
        return self.matrices.get(self.groups.get(name, name))

    def names(self) -> list[str]:
        """Every weight whose second moment is held."""
        return [n for n, g in self.groups.items() if g in self.matrices]

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.matrices.values())


class _Collector:
    """The callback's state: per weight, float64 sums (matrices, columns) and counts;
    per distinct input of the weights ``moments`` selects, float32 second moments."""

    def __init__(
        self,
        lib,
        process_output: bool,
        moments: Callable[[str], bool] | None = None,
        sums: bool = True,
        stop_after: int | None = None,
        capture: Capture | None = None,
        offset: int = 0,
    ):
        self.lib = lib
        #: the node whose rows are copied per window (the residual stream after a
        #: block), and whether the graph stops there
        self.capture = capture
        self.captured: list[np.ndarray] = []
        #: a slice's blocks are counted from 0: its block k is the model's k + offset
        self.offset = offset
        #: the graph is stopped at the first weight of a later block (no sums)
        self.stop_after = None if sums else stop_after
        self.process_output = process_output
        self.moments = moments  # which weights' inputs get second moments
        self.collect_sums = sums
        self.hessians: dict[str, np.ndarray] = {}  # F-ordered, upper triangle
        self.groups: dict[str, str] = {}  # weight -> first weight of its input
        self.window_inputs: dict[tuple[int, int], str] = {}
        self.pending: dict[str, list[np.ndarray]] = {}
        self.pending_rows: dict[str, int] = {}
        self.rows: dict[str, int] = {}
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, np.ndarray] = {}
        self.error: str | None = None
        self.interrupted = False
        self.mul_mat = self.mul_mat_id = -1
        for op in range(128):
            name = lib.ggml_op_name(op)
            if name == b"MUL_MAT":
                self.mul_mat = op
            elif name == b"MUL_MAT_ID":
                self.mul_mat_id = op

    def new_window(self) -> None:
        """A new graph: input nodes are told apart per window."""
        self.window_inputs.clear()

    def wanted(self, name: str) -> bool:
        return name.startswith("blk.") or (
            self.process_output and name == "output.weight"
        )

    def __call__(self, ptr, ask: bool, user) -> bool:
        if self.interrupted:  # a held signal (_held_signals): stop the graph
            return False
        try:
            return self._call(ptr, ask)
        except KeyboardInterrupt:
            # Ctrl-C or SIGTERM (ewq.cli raises it) arrives in this callback while
            # llama.cpp computes: ctypes would print and drop it, and the pass would
            # go on; remembered, it stops the graph and is raised after the decode
            self.interrupted = True
            return False
        except Exception as exc:  # noqa: BLE001 - never raise into C
            self.error = f"{type(exc).__name__}: {exc}"
            return False

    def _call(self, ptr, ask: bool) -> bool:
        t = ctypes.cast(ptr, ctypes.POINTER(_GgmlTensor)).contents
        if self.capture is not None and t.name == self.capture.node:
            if ask:
                return True
            self.captured.append(np.array(_view(t, 2), dtype=np.float32))
            return not self.capture.stop
        if t.op not in (self.mul_mat, self.mul_mat_id):
            return False
        src0, src1 = t.src[0].contents, t.src[1].contents
        name = _renumbered(_weight_name(src0.name), self.offset)
        if ask:
            if t.op == self.mul_mat_id:
                return self.collect_sums
            return src1.type == 0 and self.wanted(name)  # GGML_TYPE_F32
        if self.stop_after is not None and (block_of(name) or 0) > self.stop_after:
            return False  # computed, and nothing after it is needed: stop the graph
        if not self.lib.ggml_backend_buffer_is_host(src1.buffer):
            raise EwqError("activations outside host memory (ewq runs on the CPU)")
        if t.op == self.mul_mat_id:
            if self.collect_sums:
                self._experts(name, t, src0, src1)
        else:
            self._dense(name, src0, src1)
        return True

    def _acc(self, name: str, matrices: int, cols: int):
        sums = self.sums.get(name)
        if sums is None:
            sums = self.sums[name] = np.zeros((matrices, cols))
            self.counts[name] = np.zeros(matrices, dtype=np.int64)
        elif sums.shape != (matrices, cols):
            raise EwqError(f"inconsistent activation sizes for {name}")
        return sums, self.counts[name]

    def _dense(self, name: str, src0: _GgmlTensor, src1: _GgmlTensor) -> None:
        n_mat = int(src0.ne[2]) * int(src0.ne[3])
        x = _view(src1, 4)  # (ne3, ne2, ne1, ne0)
        if n_mat == 1 and name.startswith("blk."):
            self._moments(name, src1, x)
        if not self.collect_sums:
            return
        sums, counts = self._acc(name, n_mat, int(src1.ne[0]))
        for i3 in range(x.shape[0]):
            for i2 in range(x.shape[1]):
                m = (i3 % int(src0.ne[3])) * int(src0.ne[2]) + (i2 % int(src0.ne[2]))
                rows = x[i3, i2].astype(np.float64)
                sums[m] += np.einsum("ij,ij->j", rows, rows)
        if not np.isfinite(sums).all():
            raise EwqError(f"non-finite activations in {name}")
        counts += x.shape[0] * x.shape[1] * x.shape[2] // n_mat

    def _experts(self, name, t, src0, src1) -> None:
        ids_t = t.src[2].contents
        n_as = int(src0.ne[2])
        n_ids, n_tokens = int(ids_t.ne[0]), int(ids_t.ne[1])
        span = (n_tokens - 1) * int(ids_t.nb[1]) + (n_ids - 1) * int(ids_t.nb[0]) + 4
        raw = np.frombuffer((ctypes.c_char * span).from_address(ids_t.data), np.int32)
        ids = np.lib.stride_tricks.as_strided(
            raw, (n_tokens, n_ids), (int(ids_t.nb[1]), int(ids_t.nb[0]))
        )
        x = _view(src1, 3)  # (tokens, ne1, ne0)
        sums, counts = self._acc(name, n_as, int(src1.ne[0]))
        for idx in range(n_ids):
            rows = x[:, idx % x.shape[1], :].astype(np.float64)
            ex = ids[:, idx]
            if ex.min() < 0 or ex.max() >= n_as:
                raise EwqError(f"expert id out of range in {name}")
            np.add.at(sums, ex, rows * rows)
            np.add.at(counts, ex, 1)
        if not np.isfinite(sums).all():
            raise EwqError(f"non-finite activations in {name}")

    def _moments(self, name: str, src1: _GgmlTensor, x: np.ndarray) -> None:
        """The input's group (the graph node llama.cpp multiplies, told apart by its
        address in this window), and its rows held for the group's second moment."""
        node = (ctypes.addressof(src1), int(src1.data or 0))
        first = self.window_inputs.setdefault(node, name)
        if self.groups.setdefault(name, first) != first:
            raise EwqError(f"llama.cpp fed {name} another weight's input than before")
        if first != name or self.moments is None or not self.moments(name):
            return
        rows = np.array(x.reshape(-1, x.shape[-1]), dtype=np.float32)
        self.pending.setdefault(name, []).append(rows)
        self.pending_rows[name] = self.pending_rows.get(name, 0) + len(rows)
        self.rows[name] = self.rows.get(name, 0) + len(rows)
        if self.pending_rows[name] >= FLUSH_ROWS:
            self._flush(name)

    def _flush(self, name: str) -> None:
        """The held rows of one input multiplied into its second moment (BLAS's
        symmetric rank-k update in place: half a product's work, no copy)."""
        from scipy.linalg.blas import get_blas_funcs

        parts = self.pending.pop(name, None)
        self.pending_rows[name] = 0
        if not parts:
            return
        x = np.ascontiguousarray(np.concatenate(parts), dtype=MOMENTS_DTYPE)
        if not np.isfinite(x).all():
            raise EwqError(f"non-finite activations in {name}")
        h = self.hessians.get(name)
        if h is None:
            n = x.shape[1]
            h = self.hessians[name] = np.zeros((n, n), dtype=x.dtype, order="F")
        # x^T (F-ordered view of the C-ordered rows) times its transpose, into h's
        # upper triangle
        syrk = get_blas_funcs("syrk", (h,))
        self.hessians[name] = syrk(1.0, x.T, beta=1.0, c=h, trans=0, overwrite_c=1)

    def finish(self) -> Moments:
        """Every held row multiplied out; the matrices made whole (symmetric)."""
        for name in list(self.pending):
            self._flush(name)
        out = {name: _symmetric(h) for name, h in self.hessians.items()}
        self.hessians.clear()
        return Moments(out, dict(self.groups), dict(self.rows))


@dataclass(frozen=True)
class Capture:
    """A node of llama.cpp's graph whose rows a pass copies out, window by window:
    ``l_out-K``, the residual stream after block K (llama.cpp's model builders name
    each block's output so, ``cb(cur, "l_out", il)`` in ``src/models/*.cpp``), and
    whether the graph stops once it is computed (a slice's last block: nothing
    after it is needed)."""

    block: int
    stop: bool = False

    @property
    def node(self) -> bytes:
        return f"l_out-{self.block}".encode()


def _renumbered(name: str, offset: int) -> str:
    """``blk.K.*`` of a slice as the model's ``blk.(K + offset).*``."""
    if not offset or not name.startswith("blk."):
        return name
    head, k, rest = name.split(".", 2)
    return f"{head}.{int(k) + offset}.{rest}"


def _symmetric(h: np.ndarray, step: int = 1024) -> np.ndarray:
    """``h`` (F-ordered, upper triangle filled) made symmetric in place, a band of
    rows at a time (no second matrix: they may be hundreds of megabytes); returned
    as its C-ordered view (the same values: it is symmetric)."""
    n = h.shape[0]
    for a in range(0, n, step):
        b = min(n, a + step)
        h[a:b, :a] = h[:a, a:b].T
        d = h[a:b, a:b]
        d[np.tril_indices(b - a, -1)] = d.T[np.tril_indices(b - a, -1)]
    return h.T


def imatrix_windows(
    model, text: str, ctx: int, documents: Documents | str, chunks: int | None
) -> list[list[int]]:
    """The windows ``compute_imatrix`` runs (see the module docstring)."""
    if Documents(documents) is Documents.LINES:
        return text_windows(model.tokenize, model.bos, text, ctx, "lines", chunks)
    tokens = model.tokenize(text, add_special=True)
    if len(tokens) < 2 * ctx:
        raise EwqError(
            f"the calibration text has {len(tokens)} tokens; an importance matrix "
            f"in chunks of {ctx} needs at least {2 * ctx} (llama-imatrix's rule)"
        )
    n = len(tokens) // ctx if chunks is None else min(chunks, len(tokens) // ctx)
    out = []
    for k in range(n):
        chunk = tokens[k * ctx : (k + 1) * ctx]
        if model.bos is not None:
            chunk[0] = model.bos
        out.append(chunk)
    return out


def compute_imatrix(
    path: str | Path,
    text: str,
    *,
    ctx: int = 512,
    documents: Documents | str = Documents.STREAM,
    chunks: int | None = None,
    tokens: int | None = None,
    dataset: str = "",
    threads: int | None = None,
    process_output: bool = False,
    progress: Progress | None = None,
) -> Imatrix:
    """The importance matrix of the GGUF model at ``path`` on ``text`` (windows of
    ``ctx`` tokens, at most ``chunks`` of them holding at most ``tokens`` tokens),
    named ``dataset`` in its metadata."""
    collector, n = _collect(
        path,
        text,
        ctx,
        documents,
        chunks,
        threads,
        progress,
        process_output,
        tokens=tokens,
        label="importance matrix",
    )
    return _imatrix_of(collector, n, ctx, dataset)


def compute_moments(
    path: str | Path,
    text: str,
    *,
    ctx: int = 512,
    documents: Documents | str = Documents.STREAM,
    chunks: int | None = None,
    tokens: int | None = None,
    threads: int | None = None,
    blocks: Collection[int] | None = None,
    sums: bool = True,
    progress: Progress | None = None,
    label: str = "second moments",
    dataset: str = "",
) -> tuple[Imatrix | None, Moments]:
    """In one pass over ``text``: the importance matrix (with ``sums``) and the
    second moments X^T X of the inputs of dense ``blk.*`` weights (of ``blocks``
    alone, when given): what GPTQ-style rounding needs (ewq.quant.gptq). Without
    ``sums``, the pass stops after the last of ``blocks``."""
    imatrix, moments, _ = run_pass(
        path,
        text,
        ctx=ctx,
        documents=documents,
        chunks=chunks,
        tokens=tokens,
        threads=threads,
        blocks=blocks,
        sums=sums,
        progress=progress,
        label=label,
        dataset=dataset,
    )
    return imatrix, moments


def run_pass(
    path: str | Path,
    text: str,
    *,
    ctx: int = 512,
    documents: Documents | str = Documents.STREAM,
    chunks: int | None = None,
    tokens: int | None = None,
    threads: int | None = None,
    blocks: Collection[int] | None = None,
    sums: bool = False,
    capture: Capture | None = None,
    inputs: Sequence[np.ndarray] | None = None,
    offset: int = 0,
    progress: Progress | None = None,
    label: str = "second moments",
    dataset: str = "",
) -> tuple[Imatrix | None, Moments, list[np.ndarray]]:
    """One pass of a group's second moments (blocks ``blocks``, counted as the
    model counts them; every block: None), the importance matrix with ``sums``, and
    the rows of ``capture`` per window. ``path`` may be a slice whose block 0 is the
    model's ``offset`` (ewq.calibration.slices), run from ``inputs``; without
    ``capture``, a pass with no ``sums`` stops after the last of ``blocks``."""

    def chosen(name: str) -> bool:
        return blocks is None or block_of(name) in blocks

    last = None if blocks is None else max(blocks)
    stop = None if sums or capture is not None else last
    collector, n = _collect(
        path,
        text,
        ctx,
        documents,
        chunks,
        threads,
        progress,
        moments=chosen,
        sums=sums,
        tokens=tokens,
        label=label,
        stop_after=stop,
        inputs=inputs,
        capture=capture,
        offset=offset,
    )
    moments = collector.finish()
    imatrix = _imatrix_of(collector, n, ctx, dataset) if sums else None
    if capture is not None and len(collector.captured) != n:
        raise EwqError(
            f"{path}: llama.cpp's graph has no node {capture.node.decode()} "
            "(the residual stream after a block)"
        )
    return imatrix, moments, collector.captured


def input_groups(
    path: str | Path,
    text: str,
    *,
    ctx: int = 512,
    documents: Documents | str = Documents.STREAM,
    threads: int | None = None,
) -> dict[str, str]:
    """Which dense ``blk.*`` weights llama.cpp multiplies by the same input (weight
    -> the first of its group), from the first tokens of the first window: a pass
    that plans its memory asks this first (it costs one short decode)."""
    collector, _ = _collect(
        path, text, ctx, documents, 1, threads, None, sums=False, first=8
    )
    return dict(collector.groups)


def capped(seqs: list[list[int]], tokens: int | None) -> list[list[int]]:
    """The first windows holding at most ``tokens`` tokens (at least one window)."""
    if tokens is None:
        return seqs
    held = 0
    for k, seq in enumerate(seqs):
        held += len(seq)
        if held > tokens:
            return seqs[: max(k, 1)]
    return seqs


def _imatrix_of(collector: _Collector, n: int, ctx: int, dataset: str) -> Imatrix:
    entries = {
        name: Entry(s.astype(np.float32), collector.counts[name])
        for name, s in collector.sums.items()
    }
    return Imatrix(entries, (dataset,), n, ctx)


def _decode_all(
    lc, lctx, batch, seqs, collector, progress, started, inputs=None
) -> None:
    """Each window through llama.cpp (its tokens, or its ``inputs`` rows), the
    callback collecting."""
    for k, seq in enumerate(seqs):
        collector.new_window()
        try:
            _decode(lc, lctx, batch, seq, None if inputs is None else inputs[k])
        finally:
            if collector.interrupted:
                raise KeyboardInterrupt
        if collector.error:
            raise EwqError(f"collecting activations failed: {collector.error}")
        if progress is not None:
            progress(k + 1, len(seqs), _eta(started, k + 1, len(seqs)))


@contextlib.contextmanager
def _held_signals(collector: _Collector):
    """While llama.cpp computes, Ctrl-C or SIGTERM only marks the pass stopped: a
    KeyboardInterrupt raised inside the ctypes callback can land outside its try
    (ctypes prints it and drops it, and the pass runs on; a full test run caught
    it once). After the window the previous handler gets the signal (ewq.cli's turns
    it into 128 + the signal)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []

    def hold(signum: int, frame: object) -> None:
        got.append(signum)
        collector.interrupted = True

    wanted = (signal.SIGINT, signal.SIGTERM)
    previous = {n: signal.signal(n, hold) for n in wanted}
    try:
        yield
    finally:
        for n, h in previous.items():
            signal.signal(n, h)
        if got:
            handler = previous[got[0]]
            if callable(handler):
                handler(got[0], None)
            raise KeyboardInterrupt


def _collect(
    path,
    text,
    ctx,
    documents,
    chunks,
    threads,
    progress,
    process_output: bool = False,
    *,
    moments: Callable[[str], bool] | None = None,
    sums: bool = True,
    first: int | None = None,
    tokens: int | None = None,
    label: str = "",
    stop_after: int | None = None,
    inputs: Sequence[np.ndarray] | None = None,
    capture: Capture | None = None,
    offset: int = 0,
) -> tuple[_Collector, int]:
    """Run llama.cpp over the windows of ``text`` (their ``first`` tokens alone,
    when given; the first windows holding at most ``tokens`` tokens) with the
    collecting callback, as the stage ``label``. With ``inputs`` (one array of
    rows per window), those go in as the windows' embeddings instead of their
    tokens: a slice's pass from the residual stream."""
    import llama_cpp as lc

    from ewq.evaluate.backends import LlamaCppModel

    lib = ggml()
    model = LlamaCppModel(path, ctx, threads=threads)
    seqs = imatrix_windows(model, text, ctx, documents, chunks)
    if not seqs:
        raise EwqError("the calibration text holds no window of at least 2 tokens")
    readable(seqs, model.unknown, "calibration text")
    whole = sum(map(len, seqs))
    seqs = capped(seqs, tokens)
    if first is not None:
        seqs = [s[:first] for s in seqs]
    if inputs is not None and [len(s) for s in seqs] != [len(x) for x in inputs]:
        raise EwqError("the saved residual stream does not match the text's windows")
    collector = _Collector(
        lib, process_output, moments, sums, stop_after, capture, offset
    )
    callback = lc.ggml_backend_sched_eval_callback(collector)
    params = lc.llama_context_default_params()
    params.n_ctx = params.n_batch = params.n_ubatch = ctx
    params.n_seq_max = 1
    # llama.h's default is 4 threads whatever the machine (llama-imatrix asks for
    # the cores); on 2 cores 4 threads made a pass over 6 blocks of Llama-2-7B's
    # shapes 1-9% slower
    params.n_threads = params.n_threads_batch = threads or os.cpu_count() or 1
    params.cb_eval = callback
    params.cb_eval_user_data = None
    lctx = lc.llama_init_from_model(model.llm.model, params)
    if not lctx:
        raise EwqError(f"{path}: llama.cpp could not make a context for it")
    n_embd = 0 if inputs is None else int(inputs[0].shape[1])
    batch = lc.llama_batch_init(ctx, n_embd, 1)
    started = time.perf_counter()
    held = sum(map(len, seqs))
    size = f"{len(seqs)} windows, {held:,} tokens"
    if held < whole:
        size += f" of the text's {whole:,} (--calibration-tokens)"
    try:
        # the second moments' BLAS calls on one thread: OpenBLAS's idle threads
        # spin after each call and take the cores llama.cpp's threads compute on
        # (the default model's pass with every block's moments: 18.4 s instead of
        # 31.6 s for 4 windows; 6 blocks of Llama-2-7B's shapes: the same). scipy's
        # BLAS is its own library: loaded first, or the limit would miss it
        import scipy.linalg.blas  # noqa: F401

        with (
            stage(label, size) if label else contextlib.nullcontext(),
            _held_signals(collector),
            threadpool_limits(1),
        ):
            _decode_all(lc, lctx, batch, seqs, collector, progress, started, inputs)
    finally:
        lc.llama_batch_free(batch)
        lc.llama_free(lctx)
        del model
    if sums and not collector.sums:
        raise EwqError(f"{path}: no matrix product of a blk.* weight was seen")
    return collector, len(seqs)


def _eta(started: float, done: int, total: int) -> str:
    left = (time.perf_counter() - started) / done * (total - done)
    return f"chunk {done}/{total}, about {math.ceil(left)} s left"


def _decode(lc, lctx, batch, seq: Sequence[int], rows=None) -> None:
    lc.llama_memory_clear(lc.llama_get_memory(lctx), True)
    if rows is not None:
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        ctypes.memmove(batch.embd, rows.ctypes.data, rows.nbytes)
    for i, tok in enumerate(seq):
        if rows is None:
            batch.token[i] = tok
        batch.pos[i] = i
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = 0
        batch.logits[i] = 1  # every row of the last layer is computed
    batch.n_tokens = len(seq)
    rc = lc.llama_decode(lctx, batch)
    if rc != 0:
        raise EwqError(f"llama.cpp could not evaluate a window (status {rc})")
