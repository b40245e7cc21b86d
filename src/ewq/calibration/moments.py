"""Second moments for GPTQ rounding, in memory that does not grow with the model.

GPTQ rounds a weight against the second moment H = X^T X of its inputs (a
columns x columns matrix). Held for every weight of a model at once they outgrow
any machine (a 7B model's, one per weight in float64: about 56 GB). Here:

* one matrix per distinct input, not per weight: llama.cpp multiplies q, k and v
  (gate and up) by one input tensor, and the collector sees it as one graph node
  (:func:`ewq.calibration.collect.input_groups` asks llama.cpp, with one short
  decode, which weights share one);
* float32 (BLAS's symmetric update, half a product's work);
* as many consecutive blocks per pass over the text as ``limit`` bytes hold
  (:func:`plan_passes`), each pass's group rounded and freed before the next pass;
  the first pass also gives the importance matrix llama.cpp's quantizer needs;
* for architectures whose graph can start from a saved residual stream
  (ewq/arch/graphs.toml), each pass after the first runs a slice of the model
  that holds its group's blocks alone (ewq.calibration.slices), fed the stream
  the pass before saved after its last block (one window's rows at a time; a
  whole text's: tokens x width float32, 168 MB for 5,120 tokens of a 70B's 8,192):
  the passes together compute the model about twice, however many there are.
  Other architectures run every block before a pass's group again (the passes'
  cost grows with the square of the depth).

A weight's matrix is summed in the same order whatever the grouping (the collector
multiplies each input's rows out at a fixed count of its own), so one pass and
several give the same bytes.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ewq.arch.graphs import graph_entry
from ewq.calibration.collect import (
    FLUSH_ROWS,
    Capture,
    Moments,
    input_groups,
    run_pass,
)
from ewq.calibration.slices import SliceSource
from ewq.calibration.text import CalibrationText
from ewq.errors import EwqError
from ewq.imatrix import Imatrix
from ewq.quant.sparse import block_of
from ewq.types import ModelIndex, Progress

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_SHARE",
    "MomentPasses",
    "PassPlan",
    "available_memory",
    "memory_limit",
    "plan_passes",
]

#: the share of the machine's available memory the second moments may take unless
#: told (--memory-limit): llama.cpp's own buffers, the model's mapped pages and the
#: rounding's working copies need the rest
DEFAULT_SHARE = 0.25


def available_memory() -> int:
    """The memory the kernel says is available now (MemAvailable), else the
    physical memory."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_limit(given: int | None) -> int:
    """The bytes the second moments may hold: ``given``, else a share of the
    available memory."""
    return int(given) if given else int(DEFAULT_SHARE * available_memory())


@dataclass(frozen=True)
class PassPlan:
    """Which blocks each pass over the text holds the second moments of."""

    passes: tuple[tuple[int, ...], ...]
    held: tuple[int, ...]  # bytes each pass holds
    limit: int

    @property
    def peak(self) -> int:
        return max(self.held, default=0)


def block_bytes(index: ModelIndex, groups: dict[str, str]) -> dict[int, int]:
    """Bytes one block's second moments take while collected: per distinct input
    its float32 matrix and the rows held before they are multiplied out."""
    cols = {t.name: t.shape[-1] for t in index.tensors if len(t.shape) == 2}
    out: dict[int, int] = {}
    for name in sorted(set(groups.values())):
        block = block_of(name)
        if block is None or name not in cols:
            continue
        c = cols[name]
        out[block] = out.get(block, 0) + 4 * c * c + 4 * FLUSH_ROWS * c
    return out


def plan_passes(sizes: dict[int, int], limit: int, period: int = 1) -> PassPlan:
    """Consecutive blocks, as many per pass as ``limit`` holds (a block larger than
    the limit alone in its pass); with ``period``, every pass but the first starts
    at a multiple of it (blocks whose behaviour repeats with their index: a slice
    run on its own must start where the pattern does), so a pass may hold up to
    ``period`` blocks over the limit."""
    passes: list[tuple[int, ...]] = []
    held: list[int] = []
    cur: list[int] = []
    total = 0
    units: dict[int, list[int]] = {}
    for block in sorted(sizes):
        units.setdefault(block // max(period, 1), []).append(block)
    for unit in units.values():
        size = sum(sizes[b] for b in unit)
        if cur and total + size > limit:
            passes.append(tuple(cur))
            held.append(total)
            cur, total = [], 0
        cur += unit
        total += size
    if cur:
        passes.append(tuple(cur))
        held.append(total)
    return PassPlan(tuple(passes), tuple(held), limit)


class MomentPasses:
    """The passes over a calibration text that give a GGUF model's second moments,
    one group of blocks at a time: :meth:`first` (with the importance matrix), then
    :meth:`rest`, each computed when asked (hold one group at a time)."""

    def __init__(
        self,
        path: str,
        index: ModelIndex,
        text: CalibrationText,
        *,
        ctx: int,
        documents: str,
        threads: int | None,
        limit: int,
        tokens: int | None = None,
        progress: Progress | None = None,
        workdir: str | Path | None = None,
    ):
        self.path, self.text = path, text
        self.how = {"ctx": ctx, "documents": documents, "threads": threads}
        self.tokens = tokens
        groups = input_groups(path, text.text, **self.how)
        if not groups:
            raise EwqError(f"{path}: llama.cpp multiplied no dense blk.* weight")
        self.groups = groups
        arch = index.config.get("general.architecture")
        #: how a slice of this architecture runs from the saved stream, or None:
        #: each pass then runs every block before its group again
        self.entry = graph_entry(arch if isinstance(arch, str) else None)
        period = self.entry.period_of(dict(index.config)) if self.entry else 1
        self.plan = plan_passes(block_bytes(index, groups), limit, period)
        self.sliced = self.entry is not None and len(self.plan.passes) > 1
        if self.sliced:
            assert self.entry is not None
            width = index.config.get(f"{self.entry.arch}.embedding_length")
            self.scale = self.entry.input_scale(int(width)) if width else 1.0
            self.slices = SliceSource(index)
        self.workdir = workdir
        self._stream: list[np.ndarray] | None = None
        self.stream_bytes = 0
        if self.plan.peak > limit:
            log.warning(
                "one block's second moments take %.2f GiB, over the %.2f GiB limit",
                self.plan.peak / 2**30,
                limit / 2**30,
            )
        self._progress = progress
        self._started = time.perf_counter()
        self.seconds: list[float] = []
        self.tokens_used: int | None = None

    def _told(self, run: int, n: int) -> Progress:
        def told(done: int, total: int, what: str) -> None:
            if self._progress is not None:
                self._progress(
                    run * total + done, n * total, f"pass {run + 1}/{n}: {what}"
                )

        return told

    def _pass(self, k: int, sums: bool) -> tuple[Imatrix | None, Moments]:
        """Group ``k``'s pass. Sliced: the first group's over the whole model (with
        the importance matrix), saving the stream after its last block; each later
        group's on a slice of its own blocks, from the stream the previous pass
        saved, saving the stream after its own. Otherwise over the model from its
        tokens, stopped after the group's last block unless it has ``sums``."""
        group = self.plan.passes[k]
        n = len(self.plan.passes)
        run = len(self.seconds)  # passes run before this one
        what = "importance matrix and second moments" if sums else "second moments"
        label = f"{what}, pass {run + 1}/{n} (blocks {group[0]}-{group[-1]}"
        kw = dict(
            tokens=self.tokens,
            blocks=set(group),
            sums=sums,
            dataset=self.text.name if sums else "",
            progress=self._told(run, n),
            **self.how,
        )
        started = time.perf_counter()
        if not self.sliced or k == 0:
            capture = Capture(group[-1]) if self.sliced else None
            found = run_pass(
                self.path, self.text.text, capture=capture, label=label + ")", **kw
            )
        else:
            if self._stream is None:
                raise EwqError("a slice's pass needs the stream the pass before saved")
            inputs = self._stream
            if self.scale != 1.0:
                inputs = [x / np.float32(self.scale) for x in inputs]
            folder = self.workdir
            if folder is not None and not Path(folder).is_dir():
                folder = None
            with tempfile.TemporaryDirectory(prefix=".ewq-slice-", dir=folder) as tmp:
                path = self.slices.write_slice(group, Path(tmp) / "slice.gguf")
                found = run_pass(
                    path,
                    self.text.text,
                    capture=Capture(len(group) - 1, stop=True),
                    inputs=inputs,
                    offset=group[0],
                    label=label + ", from the stream after the previous pass)",
                    **kw,
                )
            del inputs
        imatrix, moments, stream = found
        if self.sliced:
            self._stream = None if k == n - 1 else stream
            self.stream_bytes = max(self.stream_bytes, sum(x.nbytes for x in stream))
        self.seconds.append(time.perf_counter() - started)
        return imatrix, moments

    def first(self) -> tuple[Imatrix, Moments]:
        """The importance matrix and one group's second moments. Sliced: the first
        group's (its pass runs the whole graph and saves the stream after it);
        otherwise the last group's: the pass that computes the importance matrix
        runs the whole graph, which only the last group needs (the others' passes
        stop after their last block)."""
        k = 0 if self.sliced else len(self.plan.passes) - 1
        imatrix, moments = self._pass(k, sums=True)
        assert imatrix is not None
        # a dense weight's input has a row per token of the windows
        self.tokens_used = max(moments.rows.values(), default=0)
        return imatrix, moments

    def rest(self) -> Iterator[Moments]:
        """Each other group's second moments, one pass each, first to last."""
        others = range(1, len(self.plan.passes))
        if not self.sliced:
            others = range(len(self.plan.passes) - 1)
        for k in others:
            yield self._pass(k, sums=False)[1]

    def record(self) -> dict:
        """What the provenance records of the passes."""
        return {
            "tokens": self.tokens_used,
            "passes": len(self.plan.passes),
            "blocks_per_pass": [len(p) for p in self.plan.passes],
            "memory_limit": self.plan.limit,
            "peak_moment_bytes": self.plan.peak,
            "distinct_inputs": len(set(self.groups.values())),
            "passes_from_stream": self.sliced,
            "stream_bytes": self.stream_bytes,
            "weights": len(self.groups),
        }


def round_in_groups(
    first: Moments,
    rest: Iterator[Moments],
    round_group: Callable[[Moments], list[str]],
) -> list[str]:
    """Round the first group, then each later one as its pass completes (the
    previous group's matrices freed before the next pass)."""
    names = round_group(first)
    del first
    for moments in rest:
        names += round_group(moments)
        del moments
    return names
