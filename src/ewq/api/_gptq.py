"""GPTQ rounding of a GGUF file llama.cpp wrote (ewq.quant.gptq): whether it
applies, the passes over the calibration text that give the inputs' second moments
(ewq.calibration.moments: memory bounded, one group of blocks per pass), and the
step that rounds each group before the output is committed."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ewq.calibration.imatrix import cached_moments
from ewq.calibration.moments import MomentPasses, PassPlan, memory_limit
from ewq.calibration.text import CalibrationText, calibration_text, token_cap
from ewq.config import QuantizeConfig, Rounding
from ewq.errors import EwqError
from ewq.formats import OutputFormat
from ewq.stages import skipped, stage

__all__ = ["Calibrated", "calibrated", "gptq_then", "rounds", "staged"]


def rounds(cfg: QuantizeConfig, form: OutputFormat) -> bool:
    """Whether to round by GPTQ (ewq.quant.gptq); one line when it cannot be done."""
    if cfg.rounding is Rounding.NEAREST:
        return False
    if cfg.calibration is None:
        if cfg.rounding is Rounding.GPTQ:
            raise EwqError("--rounding gptq needs a calibration text (--calibration)")
        return False
    if not form.calibrated:
        if cfg.rounding is Rounding.GPTQ:
            raise EwqError("--rounding gptq writes GGUF files (--format gguf)")
        return False
    if cfg.memory_limit is not None:
        _limit(cfg)  # one line now for a size that cannot be read
    return True


def _limit(cfg: QuantizeConfig) -> int:
    from ewq.planning.budget import parse_size

    given = None
    if cfg.memory_limit is not None:
        given = parse_size(cfg.memory_limit, "--memory-limit")
        if given <= 0:
            raise EwqError("--memory-limit: must be more than 0 bytes")
    return memory_limit(given)


class Calibrated:
    """A GPTQ run's calibration: the text, the passes over it, the importance
    matrix and one group's second moments (computed by :func:`calibrated` before
    llama.cpp quantizes, which needs the importance matrix; that pass runs the
    whole graph), then the other groups' (ewq.calibration.moments)."""

    def __init__(self, text: CalibrationText, passes: MomentPasses | Reused):
        self.text, self.passes = text, passes
        self.imatrix, self._first = passes.first()
        #: one pass holds the whole model's: kept for the next quantize of the same
        #: model and text in this process (ewq compare writes a dozen plans)
        self.whole = len(passes.plan.passes) == 1

    def groups(self):
        """Each group's second moments in turn: the one computed already (let go
        once handed over unless it is the whole model's), then one pass per other
        group, first to last."""
        first = self._first
        if not self.whole:
            self._first = None
        if first is not None:
            yield first
        del first
        yield from self.passes.rest()


def calibrated(
    index, cfg: QuantizeConfig, threads, progress, workdir: Path | None = None
) -> Calibrated:
    """The importance matrix and one group's second moments on the calibration
    text (ewq.calibration.moments), the memory bound planned from llama.cpp's own
    sharing of inputs; slices of the model, where passes run them, are written
    in ``workdir`` (the output's folder: where the user expects big files, which
    a system temp folder in memory may not hold) and removed after their pass."""
    from ewq.cache import file_digest

    text = calibration_text(cfg.calibration)
    limit = _limit(cfg)
    key = (file_digest(index.files[0]), text.sha256, cfg.calibration_ctx)
    cap = token_cap(cfg.calibration_tokens, index)
    key += (str(cfg.documents), limit, cap)
    if key in _HELD:
        return _HELD[key]
    _HELD.clear()  # one model's at a time: they may take gigabytes
    found = cached_moments(
        index,
        text,
        ctx=cfg.calibration_ctx,
        documents=str(cfg.documents),
        tokens=cap,
    )
    if found is not None and found[1].nbytes <= limit:
        run = Calibrated(text, Reused(*found, limit, cap))
        _HELD[key] = run
        return run
    passes = MomentPasses(
        str(index.files[0]),
        index,
        text,
        ctx=cfg.calibration_ctx,
        documents=str(cfg.documents),
        threads=threads,
        limit=limit,
        tokens=cap,
        progress=progress,
        workdir=workdir,
    )
    run = Calibrated(text, passes)
    if run.whole:
        _HELD[key] = run
    return run


class Reused:
    """The passes' stand-in when a plan's pass cached the importance matrix and
    every block's second moments (ewq.calibration.imatrix): no pass runs."""

    def __init__(self, imatrix, moments, limit: int, cap: int | None):
        self._found = (imatrix, moments)
        self.groups = moments.groups
        self.tokens = cap
        self.used = max(moments.rows.values(), default=0)
        self.plan = PassPlan(((),), (moments.nbytes,), limit)
        skipped(
            "importance matrix and second moments",
            f"reused from the plan's pass (cached, {self.used:,} tokens)",
        )

    def first(self):
        return self._found

    def rest(self):
        return iter(())

    def record(self) -> dict:
        imatrix, moments = self._found
        return {
            "tokens": self.used,
            "passes": 0,
            "reused": "the importance matrix and second moments a plan's pass cached",
            "memory_limit": self.plan.limit,
            "peak_moment_bytes": moments.nbytes,
            "distinct_inputs": len(moments.matrices),
            "weights": len(moments.groups),
        }


#: the last calibration whose second moments were the whole model's, by model
#: content, text, windows and limit (IgLM: 56 s a pass saved per later quantize)
_HELD: dict[tuple, Calibrated] = {}


@contextlib.contextmanager
def staged(index, targets, run: Calibrated, folder: Path) -> Iterator[tuple[Path, set]]:
    """The source llama.cpp's quantizer reads when GPTQ rounds afterwards: the
    model with every weight GPTQ will round declared in its target type and left
    as a hole (ewq.quant.sparse), so that llama.cpp copies it instead of quantizing
    bytes the rounding overwrites (a fifth of a run on 6 blocks of 7B shapes). Its
    path and the names of those weights; written in ``folder`` (the output's),
    removed after."""
    from ewq.formats import FLOAT_TYPES
    from ewq.quant.sparse import GGUFCopy, block_of

    shapes = {t.name: t.shape for t in index.tensors}
    holes = {
        t.name: (t.type, t.nbytes)
        for t in targets
        if t.type not in FLOAT_TYPES
        and len(shapes.get(t.name, ())) == 2
        and block_of(t.name) is not None
        and t.name in run.passes.groups
    }
    where = folder if folder.is_dir() else None
    with tempfile.TemporaryDirectory(prefix=".ewq-staged-", dir=where) as tmp:
        with stage("staging", f"{len(holes)} weights left for GPTQ to write"):
            path = GGUFCopy(index).write(
                Path(tmp) / "staged.gguf", holes=set(holes), types=holes
            )
        yield path, set(holes)


def gptq_then(
    commit, index, run: Calibrated, cfg: QuantizeConfig, progress, holes=frozenset()
):
    """``commit`` preceded by GPTQ rounding of the file llama.cpp wrote, one group of
    blocks at a time (recorded in the result's ``rounding``); every weight in
    ``holes`` (llama.cpp copied it from a hole: zeros) must have been written, or
    nothing is committed."""
    from ewq.quant import ggml
    from ewq.quant.gptq import DAMP, patch

    by_name = {t.name: t for t in index.tensors}
    threads = cfg.threads or os.cpu_count() or 1

    def values(name: str):
        info = by_name.get(name)
        return None if info is None else ggml.tensor_values(info)

    def rounded(tmp: Path, written: dict[str, str]) -> None:
        names: list[str] = []
        for moments in run.groups():
            size = f"{len(moments.names())} tensors, {moments.nbytes / 2**30:.2f} GiB"
            with stage("GPTQ rounding", size + " of second moments"):
                names += patch(Path(tmp), values, moments, progress, threads)
            del moments
        missing = sorted(set(holes) - set(names))
        if missing:
            raise EwqError(
                f"GPTQ rounding did not write {missing[0]} "
                f"({len(missing)} weights); nothing was written"
            )
        commit.rounding.update(
            method="gptq",
            calibration_sha256=run.text.sha256,
            calibration_ctx=cfg.calibration_ctx,
            calibration_tokens=run.passes.tokens,
            documents=str(cfg.documents),
            damp=DAMP,
            tensors=len(names),
            second_moments="float32, one per distinct input",
            **run.passes.record(),
        )
        commit(tmp, written)

    return rounded
