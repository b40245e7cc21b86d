"""An importance matrix computed in-process by llama.cpp, as its ``llama-imatrix``
tool computes one (``tools/imatrix/imatrix.cpp``, ``collect_imatrix``).

llama.cpp calls back for every node of its compute graph (the context's
``cb_eval``); for each matrix product whose weight is a ``blk.*`` tensor (``MUL_MAT``)
or a stack of experts (``MUL_MAT_ID``), the squares of its input activations are
summed per input column (per expert, for the tokens routed to it), and the tokens
counted. Every position's logits are asked for, so the last layer computes every
row (llama.cpp skips rows whose output nobody reads).

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
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ewq.errors import EwqError
from ewq.evaluate.windows import Documents, readable, text_windows
from ewq.imatrix import Entry, Imatrix
from ewq.native import ggml
from ewq.types import Progress

__all__ = ["compute_hessians", "compute_imatrix", "imatrix_windows"]

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


#: inputs held for the second moments before they are multiplied out
PENDING_BYTES = 256 << 20


class _Collector:
    """The callback's state: per weight, float64 sums (matrices, columns) and counts."""

    def __init__(self, lib, process_output: bool, full: bool = False):
        self.lib = lib
        self.process_output = process_output
        self.full = full  # also the full second moments X^T X of dense weights
        self.hessians: dict[str, np.ndarray] = {}
        self.pending: dict[str, list[np.ndarray]] = {}
        self.pending_bytes = 0
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
        if t.op not in (self.mul_mat, self.mul_mat_id):
            return False
        src0, src1 = t.src[0].contents, t.src[1].contents
        name = _weight_name(src0.name)
        if ask:
            if t.op == self.mul_mat_id:
                return True
            return src1.type == 0 and self.wanted(name)  # GGML_TYPE_F32
        if not self.lib.ggml_backend_buffer_is_host(src1.buffer):
            raise EwqError("activations outside host memory (ewq runs on the CPU)")
        if t.op == self.mul_mat_id:
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
        sums, counts = self._acc(name, n_mat, int(src1.ne[0]))
        for i3 in range(x.shape[0]):
            for i2 in range(x.shape[1]):
                m = (i3 % int(src0.ne[3])) * int(src0.ne[2]) + (i2 % int(src0.ne[2]))
                rows = x[i3, i2].astype(np.float64)
                sums[m] += np.einsum("ij,ij->j", rows, rows)
                if self.full and n_mat == 1:
                    self._pend(name, np.array(x[i3, i2], dtype=np.float32))
        if not np.isfinite(sums).all():
            raise EwqError(f"non-finite activations in {name}")
        counts += x.shape[0] * x.shape[1] * x.shape[2] // n_mat

    def _pend(self, name: str, rows: np.ndarray) -> None:
        """Hold a window's inputs until enough are held: one float32 product over
        many windows, then summed in float64 (a product and a float64 sum of the
        cols x cols matrix per 64-token window cost IgLM 76 s, most of it the sum)."""
        self.pending.setdefault(name, []).append(rows)
        self.pending_bytes += rows.nbytes
        if self.pending_bytes > PENDING_BYTES:
            self.flush()

    def flush(self) -> None:
        """Add every held window's inputs to the second moments."""
        for name, parts in self.pending.items():
            x = np.concatenate(parts)
            h = self.hessians.get(name)
            if h is None:
                h = self.hessians[name] = np.zeros((x.shape[1],) * 2)
            h += x.T @ x
        self.pending.clear()
        self.pending_bytes = 0

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
    dataset: str = "",
    threads: int | None = None,
    process_output: bool = False,
    progress: Progress | None = None,
) -> Imatrix:
    """The importance matrix of the GGUF model at ``path`` on ``text`` (windows of
    ``ctx`` tokens, at most ``chunks`` of them), named ``dataset`` in its metadata."""
    collector, n = _collect(
        path, text, ctx, documents, chunks, threads, process_output, False, progress
    )
    return _imatrix_of(collector, n, ctx, dataset)


def compute_hessians(
    path: str | Path,
    text: str,
    *,
    ctx: int = 512,
    documents: Documents | str = Documents.STREAM,
    chunks: int | None = None,
    threads: int | None = None,
    progress: Progress | None = None,
) -> tuple[Imatrix, dict[str, np.ndarray]]:
    """The importance matrix and, per dense ``blk.*`` weight, the full second moment
    of its inputs, X^T X (float64, columns x columns), in one pass over ``text``
    (what GPTQ-style rounding needs: ewq.quant.gptq)."""
    collector, n = _collect(
        path, text, ctx, documents, chunks, threads, False, True, progress
    )
    return _imatrix_of(collector, n, ctx, ""), collector.hessians


def _imatrix_of(collector: _Collector, n: int, ctx: int, dataset: str) -> Imatrix:
    entries = {
        name: Entry(s.astype(np.float32), collector.counts[name])
        for name, s in collector.sums.items()
    }
    return Imatrix(entries, (dataset,), n, ctx)


def _decode_all(lc, lctx, batch, seqs, collector, progress, started) -> None:
    """Each window through llama.cpp, the callback collecting."""
    for k, seq in enumerate(seqs):
        try:
            _decode(lc, lctx, batch, seq)
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
    path, text, ctx, documents, chunks, threads, process_output, full, progress
) -> tuple[_Collector, int]:
    """Run llama.cpp over the windows of ``text`` with the collecting callback."""
    import llama_cpp as lc

    from ewq.evaluate.backends import LlamaCppModel

    lib = ggml()
    model = LlamaCppModel(path, ctx, threads=threads)
    seqs = imatrix_windows(model, text, ctx, documents, chunks)
    if not seqs:
        raise EwqError("the calibration text holds no window of at least 2 tokens")
    readable(seqs, model.unknown, "calibration text")
    collector = _Collector(lib, process_output, full)
    callback = lc.ggml_backend_sched_eval_callback(collector)
    params = lc.llama_context_default_params()
    params.n_ctx = params.n_batch = params.n_ubatch = ctx
    params.n_seq_max = 1
    if threads:
        params.n_threads = params.n_threads_batch = threads
    params.cb_eval = callback
    params.cb_eval_user_data = None
    lctx = lc.llama_init_from_model(model.llm.model, params)
    if not lctx:
        raise EwqError(f"{path}: llama.cpp could not make a context for it")
    batch = lc.llama_batch_init(ctx, 0, 1)
    started = time.perf_counter()
    try:
        with _held_signals(collector):
            _decode_all(lc, lctx, batch, seqs, collector, progress, started)
        collector.flush()
    finally:
        lc.llama_batch_free(batch)
        lc.llama_free(lctx)
        del model
    if not collector.sums:
        raise EwqError(f"{path}: no matrix product of a blk.* weight was seen")
    return collector, len(seqs)


def _eta(started: float, done: int, total: int) -> str:
    left = (time.perf_counter() - started) / done * (total - done)
    return f"chunk {done}/{total}, about {math.ceil(left)} s left"


def _decode(lc, lctx, batch, seq: Sequence[int]) -> None:
    lc.llama_memory_clear(lc.llama_get_memory(lctx), True)
    for i, tok in enumerate(seq):
        batch.token[i] = tok
        batch.pos[i] = i
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = 0
        batch.logits[i] = 1  # every row of the last layer is computed
    batch.n_tokens = len(seq)
    rc = lc.llama_decode(lctx, batch)
    if rc != 0:
        raise EwqError(f"llama.cpp could not evaluate a window (status {rc})")
