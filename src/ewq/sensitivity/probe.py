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
import logging
import os
import shutil
import tempfile
from collections.abc import Collection, Mapping
from pathlib import Path

import numpy as np

from ewq.arch import ModelLayout
from ewq.arch.graphs import graph_entry
from ewq.calibration.stream import StreamLogits
from ewq.errors import EwqError
from ewq.evaluate.backends import LlamaCppModel
from ewq.evaluate.metrics import Distribution
from ewq.evaluate.windows import readable, text_windows
from ewq.imatrix import Imatrix
from ewq.quant.sparse import block_of
from ewq.types import Container, ModelIndex, TensorInfo

log = logging.getLogger(__name__)

__all__ = ["MAX_STARTS", "Probes", "expert_weights", "probe_starts", "quantized_values"]


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


#: at most this many slices a probe starts from (each a copy of the working copy's
#: blocks from there on, written once): with 8, a probe computes on average 56% of
#: the blocks a whole-model pass does (probes spread evenly over the depth), with a
#: slice per block 50%
MAX_STARTS = 8


def probe_starts(
    blocks: Collection[int], period: int, most: int = MAX_STARTS
) -> list[int]:
    """The blocks the probes' slices start at: 0 and where the probed ``blocks``'
    periods start (a slice starts at a multiple of ``period``, ewq/arch/graphs.toml),
    at most ``most`` of them, spread over those."""
    period = max(period, 1)
    found = sorted({0} | {b // period * period for b in blocks})
    if len(found) <= most:
        return found
    return sorted(
        {found[round(i * (len(found) - 1) / (most - 1))] for i in range(most)}
    )


@dataclasses.dataclass
class _Run:
    """The model a probe of some blocks runs: the working copy (``start`` 0) or a
    slice of it from block ``start``, loaded, and where each probed tensor's bytes
    are in that file."""

    start: int
    logits: StreamLogits
    fd: int
    offsets: dict[str, int]
    folder: tempfile.TemporaryDirectory | None = None

    def close(self) -> None:
        self.logits.close()
        if self.folder is not None:
            os.close(self.fd)
            self.folder.cleanup()


class Probes:
    """The working copy of a GGUF model, loaded once, and the mean KL on the
    calibration windows of any set of its tensors stored as other types. A context
    manager: the copy lives in a temporary folder until it closes.

    Probes of tensors deep in the model start from the residual stream (where the
    architecture's graph allows it, ewq/arch/graphs.toml): the reference pass copies
    out the stream before each of a few ``starts`` (:func:`probe_starts`, from the
    blocks of ``probed``, every tensor of the copy unless given), and a probe whose
    first changed block is at or after a start runs the slice of the copy from
    there (written when first needed, one at a time). The slice's logits are the
    whole copy's bit for bit (checked on the first slice: else every probe runs the
    whole copy)."""

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
        probed: Collection[str] | None = None,
        slices: bool = True,
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
        self._run: _Run | None = None
        self.work: Path | None = None
        arch = index.config.get("general.architecture")
        self.entry = (
            graph_entry(arch if isinstance(arch, str) else None) if slices else None
        )
        self.starts = [0]
        if self.entry is not None:
            chosen = set(self.names if probed is None else probed)
            blocks = {b for n in chosen if (b := block_of(n)) is not None}
            self.starts = probe_starts(blocks, self.entry.period_of(dict(index.config)))
        self.checked = False  # a slice's logits compared with the whole copy's
        self.runs = dict.fromkeys(self.starts, 0)  # probes run from each start

    @property
    def model(self) -> LlamaCppModel | None:
        """The llama.cpp model the last probe ran (the working copy or a slice)."""
        return None if self._run is None else self._run.logits.model

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
        self.work = work
        copy = GGUFSource(work)
        self.copy_index = copy.index
        self.infos = {i.name: i for i in copy.index.tensors if i.name in wanted}
        copy.close()
        self._fd = os.open(work, os.O_RDWR)
        width = (
            int(self.index.config.get(f"{self.entry.arch}.embedding_length", 0))
            if self.entry
            else 0
        )
        if not width:
            self.starts = [0]
        self.width = width
        logits = StreamLogits(
            work,
            self.ctx,
            threads=self.threads,
            capture=[s - 1 for s in self.starts[1:]],
        )
        self._run = _Run(
            0, logits, self._fd, {n: i.offset for n, i in self.infos.items()}
        )
        model = logits.model
        self.seqs = text_windows(
            model.tokenize,
            model.bos,
            self.text,
            self.ctx,
            self.documents,
            max_tokens=self.tokens_wanted,
        )
        if not self.seqs:
            raise EwqError("the calibration text is too short for one window")
        readable(self.seqs, model.unknown, "calibration text")
        self.tokens = int(sum(len(s) for s in self.seqs))
        self.targets, self.streams = [], {s: [] for s in self.starts[1:]}
        for k, seq in enumerate(self.seqs):
            x = logits.logits(seq)
            if k == 0:  # what a probe that changed something must not compute
                self.first = np.array(x)
            self.targets.append(Distribution(x))
            for s in self.starts[1:]:
                self.streams[s].append(logits.captured[s - 1])

    def __exit__(self, *exc) -> None:
        if self._run is not None:
            self._run.close()
            self._run = None
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

    def _start_of(self, names: Collection[str]) -> int:
        """The last start at or before the first block ``names`` change (0 where
        one of them is outside the blocks)."""
        blocks = [block_of(n) for n in names]
        if not blocks or any(b is None for b in blocks):
            return 0
        first = min(b for b in blocks if b is not None)
        return max(s for s in self.starts if s <= first)

    def _runner(self, start: int) -> _Run:
        """The loaded model probes from ``start`` run: the current one, or the
        working copy, or a slice of it written now (the previous one removed)."""
        assert self._run is not None and self.work is not None
        if self._run.start == start:
            return self._run
        self._run.close()
        self._run = self._slice(start) if start else None
        if self._run is None:
            logits = StreamLogits(self.work, self.ctx, threads=self.threads)
            offsets = {n: i.offset for n, i in self.infos.items()}
            self._run = _Run(0, logits, self._fd, offsets)
        return self._run

    def _slice(self, start: int) -> _Run | None:
        """The slice from ``start``, loaded; None if it does not compute the whole
        copy's logits (the first slice is checked), and then no slice again."""
        from ewq.calibration.slices import SliceSource
        from ewq.sources.gguf import GGUFSource

        assert (
            self.work is not None and self._tmp is not None and self.entry is not None
        )
        folder = tempfile.TemporaryDirectory(prefix="slice-", dir=self._tmp.name)
        try:
            names = {t.name for t in self.copy_index.tensors}
            # the output layer reads the token embedding where it has no matrix of
            # its own (tied embeddings); a slice's input never does
            holes = {"token_embd.weight"} if "output.weight" in names else set()
            n = int(self.index.config[f"{self.entry.arch}.block_count"])
            path = SliceSource(self.copy_index).write(
                Path(folder.name) / "slice.gguf", blocks=range(start, n), holes=holes
            )
            src = GGUFSource(path)
            offsets = {}
            for t in src.index.tensors:
                k = block_of(t.name)
                if k is not None:
                    name = f"blk.{k + start}.{t.name.split('.', 2)[2]}"
                    if name in self.infos:
                        offsets[name] = t.offset
            src.close()
            logits = StreamLogits(
                path,
                self.ctx,
                threads=self.threads,
                width=self.width,
                scale=self.entry.input_scale(self.width),
            )
            fd = os.open(path, os.O_RDWR)
        except BaseException:
            folder.cleanup()
            raise
        run = _Run(start, logits, fd, offsets, folder)
        if not self.checked:
            got = run.logits.logits(self.seqs[0], self.streams[start][0])
            self.checked = True
            if not np.array_equal(got, self.first):
                log.warning(
                    "a slice from the residual stream does not compute the model's "
                    "logits bit for bit: every probe runs the whole model"
                )
                run.close()
                self.starts = [0]
                return None
        return run

    def kl(self, types: Mapping[str, str]) -> float:
        """Mean KL from the source of the model with ``types`` (tensor -> type)."""
        assert self._run is not None, "use Probes as a context manager"
        unknown = [n for n in types if n not in self.infos]
        if unknown:
            raise EwqError(f"tensor {unknown[0]} is not one the probes can change")
        start = self._start_of(types)
        run = self._runner(start)
        self.runs[run.start] = self.runs.get(run.start, 0) + 1
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
                os.pwrite(run.fd, np.ascontiguousarray(q).tobytes(), run.offsets[name])
            kls, same = [], True
            streams = self.streams.get(run.start)
            for k, (target, s) in enumerate(zip(self.targets, self.seqs, strict=True)):
                q = run.logits.logits(s, None if streams is None else streams[k])
                if k == 0:
                    same = bool(np.array_equal(q, self.first))
                kls.append(target.kl(q))
        finally:
            for name, src in saved.items():
                os.pwrite(run.fd, src.tobytes(), run.offsets[name])
        if same and changed:
            # the evaluation did not see the written bytes: not a shared mapping
            # (a platform or build where llama.cpp copies the weights)
            raise EwqError(
                "llama.cpp did not read the probed weights from the mapped file; "
                "probes need a memory-mapped model on the CPU"
            )
        return max(0.0, float(np.concatenate(kls).mean()))
