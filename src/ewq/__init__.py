"""ewq: Entropy-Weighted Quantization (EWQ) and FastEWQ for large language models."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ewq")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+unknown"

from ewq.api import Analysis, Inspection, analyze, features, inspect  # noqa: E402

__all__ = ["Analysis", "Inspection", "__version__", "analyze", "features", "inspect"]
