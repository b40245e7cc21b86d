"""The calibration text: read once, named by its content."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

__all__ = ["CalibrationText", "calibration_text"]


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
