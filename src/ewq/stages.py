"""Named stages of long work, a line each where nobody sees a progress bar.

A long command (analysis, sensitivities, the importance matrix, the second
moments, rounding, writing) opens each stage with what it is about to do and its
size, and closes it with its time. The lines go to the ``ewq.stage`` logger,
silent unless someone listens: the CLI shows them on stderr when stderr is not a
terminal (a pipe, a job queue, CI), as llama.cpp's tools print theirs, so that a
run whose progress bar nobody sees still says what it is doing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["LOGGER", "reused", "skipped", "stage"]

LOGGER = "ewq.stage"
_log = logging.getLogger(LOGGER)


@contextmanager
def stage(name: str, size: str = "") -> Iterator[None]:
    """A stage of work: ``name: size`` when it starts, ``name: done in T`` when it
    ends (not when it fails: the error says that)."""
    _log.info("%s: %s", name, size or "started")
    started = time.perf_counter()
    yield
    _log.info("%s: done in %s", name, _duration(time.perf_counter() - started))


def reused(name: str, seconds: float) -> None:
    """A stage not run again: what an earlier run measured is read from the cache."""
    _log.info("%s: reused from the cache (measured in %s)", name, _duration(seconds))


def skipped(name: str, why: str) -> None:
    """A stage that does not run, and why, in one line."""
    _log.info("%s: %s", name, why)


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, s = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {s:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"
