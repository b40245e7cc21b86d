"""FastEWQ: the classifier's decision (Algorithm 2), its dataset and its training."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from ewq.api._model import analyze
from ewq.config import DEFAULT_ALPHA
from ewq.errors import EwqError
from ewq.fast.features import Features
from ewq.fast.features import features as _features
from ewq.types import Precision

__all__ = ["build_dataset", "fast_decision", "train_fastewq"]


def fast_decision(
    feats: Features,
    method: str,
    moderate: Precision,
    classifier: str | Path | None = None,
) -> tuple[dict[int, bool], dict[int, Precision], list[int]]:
    """Algorithm 2: the classifier's blocks at the moderate precision, in order of
    exec_index descending (the highest block is quantized first); the others raw,
    after them in the same order."""
    from ewq.fast.classify import load_model, predict

    doc = load_model(classifier)
    rows = feats.rows()
    chosen = predict(doc, method, rows)
    predicted = {int(r["exec_index"]): c for r, c in zip(rows, chosen, strict=True)}
    decision = {i: moderate if q else Precision.RAW for i, q in predicted.items()}
    desc = sorted(predicted, reverse=True)
    priority = [i for i in desc if predicted[i]] + [i for i in desc if not predicted[i]]
    return predicted, decision, priority


def build_dataset(
    sources: Sequence[str | Path],
    *,
    paper_tables: str | Path | None = None,
    alpha: float = DEFAULT_ALPHA,
    names: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """FastEWQ dataset rows: the EWQ analysis of each source (its features from
    its headers, its labels from the decision), plus the paper's published labels
    when ``paper_tables`` (the folder of its CSV tables) is given."""
    from ewq.fast.dataset import paper_rows, rows_from_decision

    rows: list[dict] = []
    for k, source in enumerate(sources):
        if progress is not None:
            progress(str(source))
        a = analyze(source, alpha=alpha)
        feats = _features(source, name=names[k] if names else None)
        rows += rows_from_decision(feats, a.decision.precision)
    if paper_tables is not None:
        rows += paper_rows(paper_tables)
    if not rows:
        raise EwqError("no rows: give at least one model or the paper's tables")
    return rows


def train_fastewq(
    dataset: str | Path,
    out: str | Path,
    *,
    report_dir: str | Path | None = None,
    paper_tables: str | Path | None = None,
    seed: int = 42,
):
    """Train and evaluate the six classifiers on ``dataset``; store the random forest
    (fast and fast-train) at ``out`` (.npz) and write the Markdown report."""
    from ewq.fast.classify import save_model, study
    from ewq.fast.dataset import read_dataset
    from ewq.reports.fastewq import write_report

    if Path(out).suffix != ".npz":  # refused before minutes of training
        raise EwqError(
            f"{out}: a FastEWQ classifier is stored as .npz (numpy arrays, no pickle)"
        )
    rows = read_dataset(dataset)
    st = study(rows, seed=seed)
    report = None
    if report_dir is not None:  # the report first: a report that fails leaves no model
        report = write_report(
            st,
            rows,
            report_dir,
            dataset=Path(dataset).name,
            model_path=Path(out).name,
            paper_tables=paper_tables,
        )
    save_model(st, out, Path(dataset).name)
    return st, report
