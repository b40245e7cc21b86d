"""GPTQ rounding of a GGUF file llama.cpp wrote (ewq.quant.gptq): whether it
applies, the inputs' second moments on the calibration text, and the step that
rounds before the output is committed."""

from __future__ import annotations

import hashlib
from pathlib import Path

from ewq.config import QuantizeConfig, Rounding
from ewq.errors import EwqError
from ewq.formats import output_format

__all__ = ["HESSIAN_LIMIT", "gptq_then", "rounds", "second_moments"]

#: the inputs' second moments GPTQ rounding may hold in memory at once
HESSIAN_LIMIT = 4 << 30


def rounds(cfg: QuantizeConfig, format: str) -> bool:
    """Whether to round by GPTQ (ewq.quant.gptq); one line when it cannot be done."""
    if cfg.rounding is Rounding.NEAREST:
        return False
    if cfg.calibration is None:
        if cfg.rounding is Rounding.GPTQ:
            raise EwqError("--rounding gptq needs a calibration text (--calibration)")
        return False
    if not output_format(format).calibrated:
        if cfg.rounding is Rounding.GPTQ:
            raise EwqError("--rounding gptq writes GGUF files (--format gguf)")
        return False
    return True


def second_moments(index, cfg: QuantizeConfig, threads, progress):
    """The importance matrix and the inputs' second moments on the calibration text."""
    from ewq.evaluate.activations import compute_hessians
    from ewq.evaluate.data import load_text
    from ewq.quant.gptq import hessian_bytes

    cols = {
        t.name: t.shape[-1]
        for t in index.tensors
        if t.name.startswith("blk.") and len(t.shape) == 2
    }
    need = hessian_bytes(cols)
    if need > HESSIAN_LIMIT:
        raise EwqError(
            f"GPTQ rounding would hold {need / 2**30:.1f} GiB of second moments for "
            f"this model (at most {HESSIAN_LIMIT / 2**30:.0f} GiB): quantize with "
            "--rounding nearest"
        )
    from ewq.cache import file_digest

    text = load_text(cfg.calibration)
    key = (
        file_digest(index.files[0]),
        hashlib.sha256(text.encode()).hexdigest(),
        cfg.calibration_ctx,
        str(cfg.documents),
    )
    if _HESSIANS.get("key") != key:
        _HESSIANS.clear()  # one model's at a time: they may take gigabytes
        _HESSIANS["value"] = compute_hessians(
            index.files[0],
            text,
            ctx=cfg.calibration_ctx,
            documents=cfg.documents,
            threads=threads,
            progress=progress,
        )
        _HESSIANS["key"] = key
    return _HESSIANS["value"]


#: the last second moments computed, by model content, text and windows: quantizing
#: the same model at several plans in one process (ewq compare) passes over the text
#: once (IgLM: 56 s of each GPTQ quantize)
_HESSIANS: dict = {}


def gptq_then(commit, index, hessians, cfg: QuantizeConfig, progress):
    """``commit`` preceded by GPTQ rounding of the file llama.cpp wrote (recorded in
    the result's ``rounding``)."""
    from ewq.quant import ggml
    from ewq.quant.gptq import DAMP, patch

    by_name = {t.name: t for t in index.tensors}

    def values(name: str):
        info = by_name.get(name)
        return None if info is None else ggml.tensor_values(info)

    def run(tmp: Path, written: dict[str, str]) -> None:
        names = patch(Path(tmp), values, hessians, progress)
        commit.rounding.update(
            method="gptq",
            calibration_sha256=hashlib.sha256(
                Path(cfg.calibration).read_bytes()
            ).hexdigest(),
            calibration_ctx=cfg.calibration_ctx,
            documents=str(cfg.documents),
            damp=DAMP,
            tensors=len(names),
        )
        commit(tmp, written)

    return run
