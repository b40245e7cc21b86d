"""The evaluation tasks: perplexity on text, KL divergence against the unquantized
model, and MMLU with the paper's scoring and cloze scoring."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from ewq.errors import EwqError
from ewq.evaluate.backends import LanguageModel
from ewq.evaluate.data import Question, format_prompt
from ewq.evaluate.metrics import (
    LETTERS,
    kl_logits,
    logsumexp_rows,
    paper_perplexity,
    paper_question_nll,
    summarize_kl,
)
from ewq.evaluate.windows import readable, windows
from ewq.types import Progress

__all__ = ["embedding_fidelity", "kld", "mmlu", "perplexity", "sentences", "windows"]

TOP_K = 100  # the paper's top-100 next tokens


def _with_bos(model: LanguageModel, tokens: list[int]) -> list[int]:
    return tokens if model.bos is None else [model.bos, *tokens]


def perplexity(
    model: LanguageModel,
    text: str,
    *,
    ctx: int = 512,
    stride: int | None = None,
    limit: int | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    tokens = model.tokenize(text)
    unknown = readable([tokens], getattr(model, "unknown", frozenset()), "text")
    size = ctx - (model.bos is not None)  # room for the BOS token
    # without a BOS a window cannot score its own first token: overlap by one
    longest = size if model.bos is not None else size - 1
    wins = windows(len(tokens), size, min(stride or longest, longest), limit)
    nll, count = 0.0, 0
    for k, (a, b, score_from) in enumerate(wins):
        seq = _with_bos(model, tokens[a:b])
        offset = len(seq) - (b - a)  # 1 with a BOS
        x = model.logits(seq, copy=False)  # used up before the next window
        lse = logsumexp_rows(x)
        # position t - 1 predicts seq[t], which is text token a + t - offset
        for t in range(max(1, score_from - a + offset), len(seq)):
            nll -= float(x[t - 1, seq[t]]) - lse[t - 1]
            count += 1
        if progress is not None:
            progress(k + 1, len(wins), f"window {k + 1}")
    if count == 0:
        raise EwqError("the text is too short to score a single token")
    return {
        "perplexity": float(np.exp(nll / count)),
        "nll_per_token": float(nll / count),
        "tokens_scored": count,
        "windows": len(wins),
        "tokens_in_text": len(tokens),
        "unknown_token_share": unknown,
    }


def _same_tokens(a: LanguageModel, b: LanguageModel, text: str) -> list[int]:
    ta = a.tokenize(text)
    if a.vocab_size != b.vocab_size or ta[:2000] != b.tokenize(text)[:2000]:
        raise EwqError(
            f"the compared models tokenize differently ({a.name}: vocabulary "
            f"{a.vocab_size}; {b.name}: {b.vocab_size}); KL needs the same tokens"
        )
    return ta


def kld(
    reference: LanguageModel,
    quantized: LanguageModel,
    text: str,
    *,
    ctx: int = 512,
    limit: int | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """KL(reference || quantized) of next-token distributions on the same tokens."""
    tokens = _same_tokens(reference, quantized, text)
    unknown = readable([tokens], getattr(reference, "unknown", frozenset()), "text")
    size = ctx - (reference.bos is not None)
    wins = windows(len(tokens), size, size, limit)
    kls, top_ref, top_q = [], [], []
    for k, (a, b, _) in enumerate(wins):
        seq = _with_bos(reference, tokens[a:b])
        p, q = reference.logits(seq, copy=False), quantized.logits(seq, copy=False)
        kls.append(kl_logits(p, logsumexp_rows(p), q, logsumexp_rows(q)))
        top_ref.append(p.argmax(axis=1))
        top_q.append(q.argmax(axis=1))
        if progress is not None:
            progress(k + 1, len(wins), f"window {k + 1}")
    if not kls:
        raise EwqError("the text is too short for a single window")
    return summarize_kl(
        np.concatenate(kls), np.concatenate(top_ref), np.concatenate(top_q)
    ) | {"windows": len(wins), "unknown_token_share": unknown}


def _letter_ids(model: LanguageModel) -> dict[str, list[int]]:
    ids = {}
    for letter in LETTERS:
        cands = []
        for form in (f" {letter}", letter):
            t = model.tokenize(form)
            if len(t) == 1:
                cands.append(t[0])
        if not cands:
            raise EwqError(
                f"{model.name}: no single token for the answer letter {letter}"
            )
        ids[letter] = cands
    return ids


def mmlu(
    model: LanguageModel,
    questions: Sequence[Question],
    *,
    dev: Sequence[Question] = (),
    shots: int = 0,
    limit: int | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Accuracy per subject and overall, with two scorings, and the paper's perplexity.

    * letter (the paper's): the letter A-D the model puts most probability on after
      "Answer:"; its perplexity from the top-100 next tokens (docs/method.md section 7);
    * cloze: the answer whose text is likeliest after the question, log-likelihood
      normalised by the answer's length in bytes.
    """
    if shots and not dev:
        raise EwqError(
            f"{shots}-shot needs the dev split (arrow or CSV layouts hold it)"
        )
    by_subject: dict[str, list[Question]] = defaultdict(list)
    for q in dev:
        by_subject[q.subject].append(q)
    letters = _letter_ids(model)
    chosen = list(questions[:limit] if limit else questions)
    if not chosen:
        raise EwqError("no MMLU questions to evaluate")
    details: list[dict[str, Any]] = []
    for k, q in enumerate(chosen):
        examples = list(by_subject.get(q.subject, []))[:shots]
        details.append(_scored(model, q, examples, letters))
        if progress is not None:
            progress(k + 1, len(chosen), q.subject)
    return _accuracies(details, shots)


def _scored(
    model: LanguageModel,
    q: Question,
    examples: list[Question],
    letters: dict[str, list[int]],
) -> dict[str, Any]:
    """One question, both ways: the letter the model puts most probability on (and
    the paper's NLL from the top-100 tokens), and the likeliest answer text."""
    ids = _with_bos(model, model.tokenize(format_prompt(q, examples)))
    lp = model.logprobs(ids, slice(-1, None))[0]
    top = set(np.argpartition(lp, -TOP_K)[-TOP_K:].tolist())
    best = {L: max(lp[i] for i in letters[L]) for L in LETTERS}
    found = {
        L: max((lp[i] for i in letters[L] if i in top), default=None) for L in LETTERS
    }
    return {
        "subject": q.subject,
        "correct": int(max(best, key=best.get) == q.letter),
        "nll": paper_question_nll(found, q.letter),
        "cloze_correct": int(_cloze(model, q) == q.answer),
    }


def _accuracies(details: list[dict[str, Any]], shots: int) -> dict[str, Any]:
    """Accuracy overall and per subject, both scorings, and the paper's perplexity."""
    subjects: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for d in details:
        subjects[d["subject"]].append(d)
    return {
        "accuracy": float(np.mean([d["correct"] for d in details])),
        "paper_perplexity": paper_perplexity([d["nll"] for d in details]),
        "cloze_accuracy": float(np.mean([d["cloze_correct"] for d in details])),
        "questions": len(details),
        "shots": shots,
        "per_subject": {
            s: {
                "accuracy": float(np.mean([d["correct"] for d in ds])),
                "cloze_accuracy": float(np.mean([d["cloze_correct"] for d in ds])),
                "questions": len(ds),
            }
            for s, ds in sorted(subjects.items())
        },
        "per_question": details,
    }


def _cloze(model: LanguageModel, q: Question) -> int:
    stem = f"Question: {q.question.strip()}\nAnswer:"
    base = _with_bos(model, model.tokenize(stem))
    conts = [model.tokenize(" " + choice) for choice in q.choices]
    shared = getattr(model, "continuations", None)  # the stem evaluated once
    if shared is not None:
        lps = shared(base, conts)
    else:
        lps = [
            model.logprobs(base + c, slice(len(base) - 1, len(base) + len(c) - 1))
            for c in conts
        ]
    scores = []
    for choice, cont, lp in zip(q.choices, conts, lps, strict=True):
        ll = sum(lp[j, t] for j, t in enumerate(cont))
        scores.append(ll / max(1, len((" " + choice).encode("utf-8"))))
    return int(np.argmax(scores))


def sentences(text: str, limit: int | None = None, min_chars: int = 20) -> list[str]:
    """Lines of real text (headings and blank lines skipped), for encoder tests."""
    out = [
        ln.strip()
        for ln in text.splitlines()
        if len(ln.strip()) >= min_chars and not ln.strip().startswith("=")
    ]
    return out[:limit] if limit else out


def embedding_fidelity(
    reference: Any,
    quantized: Any,
    text: str,
    *,
    limit: int | None = 64,
    batch: int = 16,
) -> dict[str, Any]:
    """Cosine similarity of each sentence's embedding, quantized against reference
    (the encoders' counterpart of KL divergence)."""
    if reference.vocab_size != quantized.vocab_size:
        raise EwqError("the compared encoders have different vocabularies")
    items = sentences(text, limit)
    if not items:
        raise EwqError("no sentences of 20 characters or more in the text")
    cos = []
    for k in range(0, len(items), batch):
        a = reference.embed(items[k : k + batch])
        b = quantized.embed(items[k : k + batch])
        cos.append(
            (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        )
    c = np.concatenate(cos)
    return {
        "cosine_mean": float(c.mean()),
        "cosine_p01": float(np.percentile(c, 1)),
        "cosine_min": float(c.min()),
        "sentences": int(c.size),
    }
