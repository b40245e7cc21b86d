"""The calibration text: read once, named by its content."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from ewq.types import ModelIndex

__all__ = ["CalibrationText", "calibration_text", "token_cap"]


@dataclass(frozen=True)
class CalibrationText:
    """A calibration text and where it came from (``name``: the file's name, as an
    importance matrix's metadata records its dataset)."""

    text: str = field(repr=False)
    name: str
    path: Path | None = None

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


def calibration_text(source: str | Path | CalibrationText) -> CalibrationText:
    """The text of ``source`` (any file `ewq eval` reads: UTF-8 text, or the
    articles of a Wikipedia dump); a :class:`CalibrationText` is passed through."""
    if isinstance(source, CalibrationText):
        return source
    from ewq.evaluate.data import load_text

    path = Path(source)
    return CalibrationText(load_text(path), path.name, path)


def token_cap(setting: int | None, index: ModelIndex) -> int | None:
    """The tokens of a calibration text to use (None: all of it): ``setting``
    (--calibration-tokens; 0 is all), else the default for ``index``'s model
    (ewq.config: a floor, raised for models with wide inputs)."""
    from ewq.config import CALIBRATION_TOKENS_PER_WIDTH, DEFAULT_CALIBRATION_TOKENS

    if setting is not None:
        return setting or None
    widths = [
        t.shape[-1]
        for t in index.tensors
        if t.name.startswith(("blk.", "model.layers.")) and len(t.shape) == 2
    ]
    widest = max(widths, default=0)
    return max(DEFAULT_CALIBRATION_TOKENS, CALIBRATION_TOKENS_PER_WIDTH * widest)
