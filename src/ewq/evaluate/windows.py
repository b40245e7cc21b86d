"""The windows of a text a model is measured on (KL, perplexity, calibration).

Two ways to cut a text, chosen by the user (``--documents``):

* ``stream`` (default): the text is one token stream, cut into consecutive windows
  of ``ctx`` tokens (with the model's BOS first, where its vocabulary adds one).
* ``lines``: every non-empty line is a document of its own: one window per line,
  from its first token, cut at ``ctx``. Windows never straddle two documents: for
  models trained on short, independent sequences (IgLM's antibodies), a window
  across two of them measures a confused model.

The BOS rule is llama.cpp's: a BOS token starts a window only where the model's
vocabulary says it adds one (``tokenizer.ggml.add_bos_token``), as llama-perplexity
and llama-imatrix do.
"""

from __future__ import annotations

from collections.abc import Callable

from ewq.config import Documents
from ewq.errors import EwqError

__all__ = ["Documents", "readable", "text_windows", "windows"]

#: above this share of unknown tokens a text is refused; above WARN_UNKNOWN warned
REFUSE_UNKNOWN = 0.5
WARN_UNKNOWN = 0.05


def readable(seqs: list[list[int]], unknown: frozenset[int], what: str) -> float:
    """The share of the windows' tokens the vocabulary does not know (its UNKNOWN
    tokens: what a text in another script or for another tokenizer becomes). Above
    half, one error line: a KL or an importance matrix on such text measures
    nothing; above 5%, a warning (Python's warnings; the CLI prints it as one line)."""
    import warnings

    total = sum(len(s) for s in seqs)
    share = sum(t in unknown for s in seqs for t in s) / total if total else 0.0
    if share > REFUSE_UNKNOWN:
        raise EwqError(
            f"{share:.0%} of the {what}'s tokens are unknown to the model's vocabulary "
            "(is it text in the model's language and script?)"
        )
    if share > WARN_UNKNOWN:
        warnings.warn(
            f"{share:.1%} of the {what}'s tokens are unknown to the model's "
            "vocabulary: its figures measure the unknown token",
            UserWarning,
            stacklevel=2,
        )
    return share


def windows(
    n_tokens: int, size: int, stride: int, limit: int | None
) -> list[tuple[int, int, int]]:
    """(start, stop, score_from) of each window of the text's tokens.

    Windows of ``size`` tokens start every ``stride`` tokens. A window scores the
    tokens in ``[score_from, stop)``: the ones no earlier window scored, so every
    token is counted once and, after the first window, with at least
    ``size - stride`` tokens of context.
    """
    if not 0 < stride <= size:
        raise EwqError(f"stride must be in 1..{size}, got {stride}")
    out, start, scored = [], 0, 0
    while start < n_tokens and (limit is None or len(out) < limit):
        stop = min(start + size, n_tokens)
        out.append((start, stop, scored))
        scored = stop
        if stop == n_tokens:
            break
        start += stride
    return out


def text_windows(
    tokenize: Callable[[str], list[int]],
    bos: int | None,
    text: str,
    ctx: int,
    documents: Documents | str = Documents.STREAM,
    limit: int | None = None,
    max_tokens: int | None = None,
) -> list[list[int]]:
    """Token windows of ``text`` (each with ``bos`` first, when not None), at most
    ``limit`` of them and, with ``max_tokens``, as many as hold that many tokens in
    all (at least one); windows of fewer than 2 tokens are left out."""
    out = _windows(tokenize, bos, text, ctx, documents, limit)
    if max_tokens is None:
        return out
    kept, total = [], 0
    for w in out:
        if kept and total + len(w) > max_tokens:
            break
        kept.append(w)
        total += len(w)
    return kept


def _windows(tokenize, bos, text, ctx, documents, limit) -> list[list[int]]:
    size = ctx - (bos is not None)
    if size < 2:
        raise EwqError(f"a context of {ctx} tokens holds no window")
    head = [bos] if bos is not None else []
    out: list[list[int]] = []
    if Documents(documents) is Documents.LINES:
        for line in text.splitlines():
            if limit is not None and len(out) >= limit:
                break
            tokens = tokenize(line) if line.strip() else []
            if len(tokens) >= 2:
                out.append(head + tokens[:size])
        return out
    tokens = tokenize(text)
    for a, b, _ in windows(len(tokens), size, size, limit):
        if b - a >= 2:
            out.append(head + tokens[a:b])
    return out
