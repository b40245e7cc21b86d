"""Statistics over per-question scores: two variants compared question by question."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["paired"]


def paired(per_question: dict[str, list[float]]) -> dict[str, Any]:
    """Composite score (accuracy - ln perplexity) of fast against fast train: paired
    t-test over questions and Cohen's d with the pooled standard deviation."""
    from scipy import stats

    out = {}
    for mix in ("8bit mixed", "4bit/8bit mixed"):
        a = np.array(per_question[f"fast {mix}"])
        b = np.array(per_question[f"fast train {mix}"])
        diff = a - b
        pooled = math.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2) if len(a) > 1 else 0.0
        if np.allclose(diff, 0):
            t, p = 0.0, 1.0
        else:
            res = stats.ttest_rel(a, b)
            t, p = float(res.statistic), float(res.pvalue)
        out[mix] = {
            "composite_fast": float(a.mean()),
            "composite_fast_train": float(b.mean()),
            "t": t,
            "p": p,
            "cohens_d": float(diff.mean() / pooled) if pooled > 0 else 0.0,
            "questions": int(len(a)),
        }
    return out
