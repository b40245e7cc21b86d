"""Measured KL of quantized tensors without writing a model per measurement.

A probe asks: how far do the model's next-token distributions move when these
tensors (one, for the ``kl`` criterion's sensitivities) are stored as those types?
Writing and loading a whole GGUF per probe costs more than the forward pass itself on
a quantized source (SmolLM2: 3 s to write, 0.2 s to load, and its Q4_1 matrices run
at half the speed of float ones), so the probes share one working copy:

* every tensor that can be probed is stored as F32, holding the source's values as
  ggml decodes them (an F32 source is copied as it is);
* llama.cpp loads it once, memory-mapped: on the CPU it computes straight from the
  mapping, and Linux keeps a file's mapping and its page cache one, so bytes written
  into the file at a tensor's offset are what the next evaluation multiplies by
  (tests/test_probe.py asks llama.cpp: a probe agrees with the written GGUF);
* a probe writes the tensor's values after ggml's quantizer (with the importance
  matrix, per expert) and its dequantizer, evaluates the calibration windows, and
  writes the source values back.

The reference logits are the working copy's own, so a probe measures the tensors'
change alone. What a probe leaves out is that llama.cpp multiplies quantized weights
by activations rounded to 8 bits (Q8_K/Q8_0), a noise shared by every plan.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ewq.arch import ModelLayout
from ewq.errors import EwqError
from ewq.evaluate.backends import LlamaCppModel
from ewq.evaluate.metrics import kl_logits, logsumexp_rows
from ewq.evaluate.windows import readable, text_windows
from ewq.imatrix import Imatrix
from ewq.types import Container, ModelIndex, TensorInfo

__all__ = ["Probes", "expert_weights", "quantized_values"]


def expert_weights(w_all: np.ndarray | None, m: int, cols: int) -> np.ndarray | None:
    """Matrix ``m``'s importance weights: a stacked-experts tensor's imatrix holds one
    row of ``cols`` per expert (llama.cpp's layout), a plain tensor's one row."""
    if w_all is None:
        return None
    k = m % (w_all.size // cols)
    return w_all[k * cols : (k + 1) * cols]


def quantized_values(
    values: np.ndarray,
    info: TensorInfo,
    type_name: str,
    w_all: np.ndarray | None,
    threads: int = 2,
) -> np.ndarray:
    """``values`` (rows x cols float32) as ``type_name`` stores them, read back:
    ggml's quantizer given each matrix's importance weights, as llama.cpp's is."""
    import gguf

    from ewq.quant import ggml

    qtype = int(gguf.GGMLQuantizationType[type_name])
    matrices = info.shape[0] if len(info.shape) == 3 else 1
    per = values.shape[0] // matrices
    out = np.empty_like(values)
    for m in range(matrices):
        part = values[m * per : (m + 1) * per]
        w = expert_weights(w_all, m, values.shape[1])
        out[m * per : (m + 1) * per] = ggml.roundtrip(
            part, qtype, threads=threads, imatrix=w
        )
    return out


class Probes:
    """The working copy of a GGUF model, loaded once, and the mean KL on the
    calibration windows of any set of its tensors stored as other types. A context
    manager: the copy lives in a temporary folder until it closes."""

    def __init__(
        self,
        index: ModelIndex,
        layout: ModelLayout,
        names: list[str],
        text: str,
        *,
        tokens: int,
        ctx: int,
        documents: str,
        imatrix: Imatrix | None,
        threads: int = 2,
    ):
        if index.container != Container.GGUF:
            raise EwqError("probes run GGUF models through llama.cpp")
        self.index, self.layout, self.ctx = index, layout, ctx
        self.names, self.text = list(names), text
        self.tokens_wanted, self.documents = tokens, documents
        self.weights = imatrix.weights() if imatrix is not None else {}
        self.threads = threads
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._fd: int | None = None
        self.model: LlamaCppModel | None = None

    def __enter__(self) -> Probes:
        self._tmp = tempfile.TemporaryDirectory(prefix="ewq-probe-")
        try:
            self._open(Path(self._tmp.name) / "work.gguf")
        except BaseException:
            self.__exit__()
            raise
        return self

    def _open(self, work: Path) -> None:
        from ewq.formats import GGUF
        from ewq.quant.gguf import quantize_gguf
        from ewq.quant.targets import plan_targets
        from ewq.sensitivity.kl import _plan
        from ewq.sources.gguf import GGUFSource

        by_name = {i.name: i for i in self.index.tensors}
        wanted = set(self.names)
        if len(self.index.files) == 1 and all(
            by_name[n].dtype == "F32" for n in wanted
        ):
            shutil.copyfile(self.index.files[0], work)
        else:  # llama.cpp's quantizer decodes the rest to F32 (splits: one file)
            targets = [
                dataclasses.replace(
                    t, type="F32", nbytes=4 * by_name[t.name].num_elements
                )
                if t.name in wanted
                else t
                for t in plan_targets(
                    GGUF, self.index, self.layout, _plan(self.layout, {})
                )
            ]
            quantize_gguf(self.index.files[0], targets, work)
        copy = GGUFSource(work)
        self.infos = {i.name: i for i in copy.index.tensors if i.name in wanted}
        copy.close()
        self._fd = os.open(work, os.O_RDWR)
        self.model = LlamaCppModel(work, self.ctx, threads=self.threads)
        self.seqs = text_windows(
            self.model.tokenize,
            self.model.bos,
            self.text,
            self.ctx,
            self.documents,
            max_tokens=self.tokens_wanted,
        )
        if not self.seqs:
            raise EwqError("the calibration text is too short for one window")
        readable(self.seqs, self.model.unknown, "calibration text")
        self.tokens = int(sum(len(s) for s in self.seqs))
        self.reference = [self.model.logits(s) for s in self.seqs]
        self.lse = [logsumexp_rows(x) for x in self.reference]

    def __exit__(self, *exc) -> None:
        self.model = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def values(self, name: str) -> np.ndarray:
        """The tensor's source values (float32 rows) as the working copy holds them."""
        info = self.infos[name]
        raw = os.pread(self._fd, info.nbytes, info.offset)
        return np.frombuffer(raw, dtype=np.float32).reshape(-1, info.shape[-1])

    def kl(self, types: Mapping[str, str]) -> float:
        """Mean KL from the source of the model with ``types`` (tensor -> type)."""
        assert self.model is not None, "use Probes as a context manager"
        unknown = [n for n in types if n not in self.infos]
        if unknown:
            raise EwqError(f"tensor {unknown[0]} is not one the probes can change")
        saved, changed = {}, False
        try:
            for name, type_name in types.items():
                info = self.infos[name]
                src = self.values(name)
                saved[name] = src
                q = quantized_values(
                    src, info, type_name, self.weights.get(name), self.threads
                )
                changed = changed or not np.array_equal(q, src)
                os.pwrite(self._fd, np.ascontiguousarray(q).tobytes(), info.offset)
            kls, same = [], True
            for p, lp, s in zip(self.reference, self.lse, self.seqs, strict=True):
                q = self.model.logits(s, copy=False)
                same = same and bool(np.array_equal(p, q))
                kls.append(kl_logits(p, lp, q, logsumexp_rows(q)))
        finally:
            for name, src in saved.items():
                os.pwrite(self._fd, src.tobytes(), self.infos[name].offset)
        if same and changed:
            # the evaluation did not see the written bytes: not a shared mapping
            # (a platform or build where llama.cpp copies the weights)
            raise EwqError(
                "llama.cpp did not read the probed weights from the mapped file; "
                "probes need a memory-mapped model on the CPU"
            )
        return max(0.0, float(np.concatenate(kls).mean()))
