"""How llama.cpp's graph of an architecture enters its first block (graphs.toml):
what running a slice of a model's blocks from a saved residual stream needs."""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

__all__ = ["GraphEntry", "graph_entry"]


@dataclass(frozen=True)
class GraphEntry:
    """One architecture's row of graphs.toml."""

    arch: str
    embd_scale: str | None = None
    period: int = 1

    def input_scale(self, n_embd: int) -> float:
        """What the graph multiplies a slice's input by before its first block."""
        if self.embd_scale == "sqrt_n_embd":
            return math.sqrt(n_embd)
        return 1.0

    def period_of(self, config: dict[str, Any]) -> int:
        """The period of block behaviour in this file: its sliding-window pattern
        where the file states a number, else the table's."""
        given = config.get(f"{self.arch}.attention.sliding_window_pattern")
        if isinstance(given, int) and not isinstance(given, bool) and given > 0:
            return given
        return self.period


@cache
def _table() -> dict[str, dict[str, Any]]:
    return tomllib.loads((Path(__file__).with_name("graphs.toml")).read_text())


def graph_entry(arch: str | None) -> GraphEntry | None:
    """The entry of llama.cpp architecture ``arch``, or None when a slice of it
    cannot be run from a saved stream."""
    row = _table().get(arch or "")
    if row is None:
        return None
    return GraphEntry(arch or "", row.get("embd_scale"), int(row.get("period", 1)))
