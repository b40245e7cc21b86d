"""A cache of measured sensitivities, one JSON file per model and setting.

The key is the model's files (resolved path, size and modification time), the
criterion, the format and the criterion's parameters (for kl, a hash of the
calibration text), and ewq's version: a changed model file or a new ewq measures
again. The folder is ``$EWQ_CACHE`` or ``$XDG_CACHE_HOME/ewq`` (``~/.cache/ewq``).
A cache file that cannot be read is measured again, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ewq.fileio import atomic_write_text
from ewq.sensitivity import Sensitivity
from ewq.types import ModelIndex, Precision

__all__ = ["cache_dir", "cached"]


def cache_dir() -> Path:
    if os.environ.get("EWQ_CACHE"):
        return Path(os.environ["EWQ_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ewq"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ewq")
    except PackageNotFoundError:
        return "unknown"


def _key(index: ModelIndex, criterion: str, fmt: str, params: Mapping[str, Any]) -> str:
    files = []
    for f in index.files:
        st = Path(f).stat()
        files.append([str(Path(f).resolve()), st.st_size, st.st_mtime_ns])
    doc = {
        "files": files,
        "criterion": criterion,
        "format": fmt,
        "params": dict(params),
        "ewq": _version(),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:24]


def cached(
    index: ModelIndex,
    criterion: str,
    fmt: str,
    params: Mapping[str, Any],
    measure: Callable[[], Sensitivity],
) -> Sensitivity:
    """The cached sensitivity for this model and setting, else ``measure()``'s
    (then stored). ``details['cached']`` says which."""
    path = cache_dir() / f"{criterion}-{_key(index, criterion, fmt, params)}.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        damage = {
            int(i): {Precision(p): float(v) for p, v in row.items()}
            for i, row in doc["damage"].items()
        }
        return Sensitivity(
            criterion,
            damage,
            float(doc["seconds"]),
            {**doc["details"], "cached": True},
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    result = measure()
    doc = {
        "criterion": criterion,
        "format": fmt,
        "params": dict(params),
        "seconds": result.seconds,
        "details": dict(result.details),
        "damage": {
            str(i): {p.value: v for p, v in row.items()}
            for i, row in result.damage.items()
        },
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(doc, indent=1) + "\n")
    except OSError:
        pass  # a read-only cache folder only costs a new measurement next time
    return Sensitivity(
        criterion, result.damage, result.seconds, {**result.details, "cached": False}
    )
