"""ewq: Entropy-Weighted Quantization (EWQ) and FastEWQ for large language models.

``import ewq`` is light (the CLI starts in a fraction of a second); the API's
functions load with their first use: ``ewq.analyze``, ``ewq.inspect``, ...
"""

from __future__ import annotations

from typing import Any

from ewq._version import __version__

__all__ = ["Analysis", "Inspection", "__version__", "analyze", "features", "inspect"]

_LAZY = {"Analysis", "Inspection", "analyze", "features", "inspect"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from ewq import api

        return getattr(api, name)
    raise AttributeError(f"module 'ewq' has no attribute {name!r}")
