"""The public API: one function per stage, each taking a source spec and returning a
record (ewq.records).

Options are declared once, in :mod:`ewq.config`: each function takes its record
(``plan(source, machines, PlanConfig(alpha=1.0))``) or the same fields as keywords
(``plan(source, machines, alpha=1.0)``); an unknown option is an error.

Example:
    >>> from ewq import api                                   # doctest: +SKIP
    >>> from ewq.planning import single_machine
    >>> p = api.plan("default", [single_machine("230MB")])
    >>> p.result.fits, p.config.criterion
    (True, <Criterion.ERROR: 'error'>)
"""

from __future__ import annotations

from ewq.api._evaluate import evaluate
from ewq.api._fast import build_dataset, fast_decision, train_fastewq
from ewq.api._fit import fit_tensors
from ewq.api._model import analyze, features, inspect
from ewq.api._plan import plan, resolved
from ewq.api._quantize import quantize
from ewq.api._sensitivity import imatrix, load_imatrix, sensitivity
from ewq.config import DEFAULT_CONTEXT
from ewq.errors import EwqError
from ewq.records import Analysis, Inspection, PlanResult, Quantized
from ewq.types import Progress

__all__ = [
    "DEFAULT_CONTEXT",
    "Analysis",
    "EwqError",
    "Inspection",
    "PlanResult",
    "Progress",
    "Quantized",
    "analyze",
    "build_dataset",
    "evaluate",
    "fast_decision",
    "features",
    "fit_tensors",
    "imatrix",
    "inspect",
    "load_imatrix",
    "plan",
    "quantize",
    "resolved",
    "sensitivity",
    "train_fastewq",
]
