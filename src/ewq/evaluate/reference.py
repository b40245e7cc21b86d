"""A source model's next-token distributions on fixed text windows, computed once
and compared with any number of quantized versions (KL, top-1 agreement,
perplexity): what `ewq bench` and `ewq compare` measure each variant by."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ewq.errors import EwqError
from ewq.evaluate.backends import LlamaCppModel
from ewq.evaluate.metrics import Distribution, logsumexp_rows, summarize_kl
from ewq.evaluate.windows import readable, text_windows

__all__ = ["Reference", "text_metrics"]


class Reference:
    """The reference model's next-token distributions (ewq.evaluate.metrics.
    Distribution, from llama.cpp's float32 logits) on ``windows`` windows of ``ctx`` tokens of ``text``
    (ewq.evaluate.windows: a token stream, or one document per line)."""

    def __init__(
        self,
        path: Path,
        text: str,
        *,
        ctx: int,
        windows: int,
        documents: str = "stream",
    ):
        self.ctx = ctx
        self.model = LlamaCppModel(path, ctx)
        self.seqs = text_windows(
            self.model.tokenize, self.model.bos, text, ctx, documents, windows
        )
        if not self.seqs:
            raise EwqError("the evaluation text is too short for one window")
        self.unknown_share = readable(self.seqs, self.model.unknown, "evaluation text")
        self.targets = [
            Distribution(self.model.logits(s, copy=False)) for s in self.seqs
        ]


def text_metrics(model: LlamaCppModel, ref: Reference) -> dict[str, float]:
    """KL from the reference (mean, percentiles), top-1 agreement and perplexity of
    ``model`` on the reference's windows (the same token ids)."""
    kls, t_ref, t_q, nll, count = [], [], [], 0.0, 0
    for seq, target in zip(ref.seqs, ref.targets, strict=True):
        q = model.logits(seq, copy=False)  # used up before the next window
        lq = logsumexp_rows(q)
        kls.append(target.kl(q, lq))
        t_ref.append(target.top1)
        t_q.append(q.argmax(axis=1))
        for t in range(1, len(seq)):
            nll -= float(q[t - 1, seq[t]]) - lq[t - 1]
            count += 1
    out = summarize_kl(np.concatenate(kls), np.concatenate(t_ref), np.concatenate(t_q))
    out["perplexity"] = float(math.exp(nll / count))
    return out
