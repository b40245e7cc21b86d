"""Every position's logits of a model, from its tokens or from a residual stream a
pass saved, through llama.cpp's own context API.

The kl criterion's probes (ewq.sensitivity.probe) change one tensor of block b and
measure how far the next-token distributions move. Everything before block b is the
unquantized model's, so the probe need not compute it: a slice of the model from a
block at or before b to the end (ewq.calibration.slices, with the output layer kept)
is fed the residual stream the reference pass copied out there. On a model whose
probed tensors spread over its depth that computes about half the blocks.

Here: one llama.cpp context over a GGUF file (a whole model or such a slice) that
computes every row's logits of a window, from tokens or from rows of the stream
(``llama_batch.embd``), and copies out the stream after the blocks asked for
(``l_out-K``, as ewq.calibration.collect does). llama-cpp-python's ``Llama.eval``
takes tokens alone, hence the context's own API.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np

from ewq.calibration.collect import _decode, _GgmlTensor, _view
from ewq.errors import EwqError

__all__ = ["StreamLogits"]


class _Copier:
    """The eval callback that copies out the nodes ``l_out-K`` asked for."""

    def __init__(self, blocks: Collection[int]):
        self.nodes = {f"l_out-{k}".encode(): k for k in blocks}
        self.rows: dict[int, np.ndarray] = {}
        self.error: str | None = None

    def __call__(self, ptr, ask: bool, user) -> bool:
        try:
            t = ctypes.cast(ptr, ctypes.POINTER(_GgmlTensor)).contents
            k = self.nodes.get(t.name)
            if k is None:
                return False
            if not ask:
                self.rows[k] = np.array(_view(t, 2), dtype=np.float32)
            return True
        except Exception as exc:  # noqa: BLE001 - never raise into C
            self.error = f"{type(exc).__name__}: {exc}"
            return False


class StreamLogits:
    """llama.cpp computing windows of up to ``ctx`` tokens of the model at ``path``:
    :meth:`logits` gives every position's logits, from the tokens or (a slice) from
    the stream's rows divided by ``scale`` (what the architecture's graph multiplies
    its input by, ewq/arch/graphs.toml), and fills :attr:`captured` with the stream
    after each block of ``capture``. Close it (or use it as a context manager)."""

    def __init__(
        self,
        path: str | Path,
        ctx: int,
        *,
        threads: int | None = None,
        capture: Collection[int] = (),
        width: int = 0,
        scale: float = 1.0,
        flash: int = 0,
    ):
        import llama_cpp as lc

        from ewq.evaluate.backends import LlamaCppModel

        self._lc = lc
        self.model = LlamaCppModel(path, ctx, threads=threads)
        self.ctx, self.scale = ctx, np.float32(scale)
        self.vocab = self.model.vocab_size
        self._copier = _Copier(capture) if capture else None
        params = lc.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = ctx
        params.n_seq_max = 1
        params.flash_attn_type = flash
        params.n_threads = params.n_threads_batch = threads or os.cpu_count() or 1
        if self._copier is not None:
            self._callback = lc.ggml_backend_sched_eval_callback(self._copier)
            params.cb_eval = self._callback
            params.cb_eval_user_data = None
        self._ctx = lc.llama_init_from_model(self.model.llm.model, params)
        if not self._ctx:
            raise EwqError(f"{path}: llama.cpp could not make a context for it")
        self._batch = lc.llama_batch_init(ctx, width, 1)
        self.width = width

    @property
    def captured(self) -> dict[int, np.ndarray]:
        """The stream after each captured block in the last window (rows x width)."""
        return {} if self._copier is None else self._copier.rows

    def logits(self, seq: Sequence[int], rows: np.ndarray | None = None) -> np.ndarray:
        """Every position's logits of the window ``seq`` (from ``rows`` of the
        stream, when given: a slice's input): a view of llama.cpp's buffer, valid
        until the next call."""
        if self._ctx is None:
            raise EwqError("the model's context is closed")
        if len(seq) > self.ctx:
            raise EwqError(f"{len(seq)} tokens exceed the context of {self.ctx}")
        if rows is not None:
            if not self.width or rows.shape != (len(seq), self.width):
                raise EwqError("the saved residual stream does not match the window")
            if self.scale != 1:
                rows = rows / self.scale
        if self._copier is not None:
            self._copier.rows = {}
        _decode(self._lc, self._ctx, self._batch, seq, rows)
        if self._copier is not None:
            if self._copier.error:
                raise EwqError(
                    f"copying the residual stream failed: {self._copier.error}"
                )
            missing = set(self._copier.nodes.values()) - set(self._copier.rows)
            if missing:
                raise EwqError(
                    f"llama.cpp's graph has no node l_out-{min(missing)} "
                    "(the residual stream after a block)"
                )
        ptr = self._lc.llama_get_logits(self._ctx)
        return np.ctypeslib.as_array(ptr, shape=(len(seq), self.vocab))

    def close(self) -> None:
        if self._ctx is not None:
            self._lc.llama_batch_free(self._batch)
            self._lc.llama_free(self._ctx)
            self._ctx = None
        self.model = None

    def __enter__(self) -> StreamLogits:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
