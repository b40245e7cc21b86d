"""What the comparison's parts share: the block-level plan document and the count
of a plan's types."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ewq.planfile import plan_doc
from ewq.types import Precision

Log = Callable[[str], None]


def _doc(layout, precision: dict[int, Precision]) -> dict[str, Any]:
    n = layout.num_blocks
    return plan_doc(
        n, {i: precision[i] for i in range(2, n + 2)}, precision[1], precision[n + 2]
    )


def _counts(types: dict[str, str]) -> str:
    n: dict[str, int] = {}
    for t in types.values():
        n[t] = n.get(t, 0) + 1
    return ", ".join(f"{c} {t}" for t, c in sorted(n.items(), key=lambda x: -x[1]))
