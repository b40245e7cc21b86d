"""The FastEWQ classifier report: one Markdown file with its plots, our figures beside
the paper's."""

from __future__ import annotations

import csv
import os
from collections import Counter
from pathlib import Path
from typing import Any

from ewq.fileio import atomic_path, atomic_write_text

__all__ = ["write_report"]

# The paper's own figures (arXiv 2503.04704, section 4.3): random forest best, 80%
# accuracy; per class precision / recall; ablation accuracies.
PAPER_RF = {"accuracy": 0.80, "raw": (0.80, 0.87), "quantized": (0.80, 0.71)}
PAPER_ABLATION = {
    "all": 0.893,
    "exec_index": 0.621,
    "num_parameters": 0.784,
    "num_blocks": 0.847,
}


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _plots(st: Any, out: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(st.results)
    files = {}
    fig, axes = plt.subplots(2, 3, figsize=(10, 6.5), dpi=110)
    for ax, name in zip(axes.flat, names, strict=True):
        cm = st.results[name].confusion
        ax.imshow(cm, cmap="Blues")
        for i in range(2):
            for j in range(2):
                ax.text(j, i, str(cm[i][j]), ha="center", va="center", fontsize=12)
        ax.set_xticks([0, 1], ["raw", "quantized"])
        ax.set_yticks([0, 1], ["raw", "quantized"])
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{name}: {st.results[name].report['accuracy']:.1%}", fontsize=10)
    fig.tight_layout()
    _save(fig, out / "confusion.png")
    files["confusion"] = "confusion.png"

    fig, ax = plt.subplots(figsize=(6, 5), dpi=110)
    for name in names:
        fpr, tpr = st.results[name].roc
        ax.plot(fpr, tpr, label=f"{name} (AUC {st.results[name].auc:.2f})")
    ax.plot([0, 1], [0, 1], color="#999999", ls="--", lw=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC on the 30% test split")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, out / "roc.png")
    files["roc"] = "roc.png"

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=110)
    feats = list(st.importances)
    ax.barh(feats, [st.importances[f] for f in feats], color="#2b8cbe")
    ax.set_xlabel("random forest feature importance")
    fig.tight_layout()
    _save(fig, out / "importances.png")
    files["importances"] = "importances.png"
    return files


def _paper_confusion(tables: Path | None) -> dict[str, list[int]]:
    if tables is None or not (tables / "table5_confusion.csv").is_file():
        return {}
    with open(tables / "table5_confusion.csv", newline="") as fh:
        return {
            r["classifier"]: [
                int(r["true_negative"]),
                int(r["false_positive"]),
                int(r["false_negative"]),
                int(r["true_positive"]),
            ]
            for r in csv.DictReader(fh)
        }


def write_report(
    st: Any,
    rows: list[dict[str, Any]],
    out_dir: str | os.PathLike[str],
    *,
    dataset: str,
    model_path: str,
    paper_tables: str | os.PathLike[str] | None = None,
) -> Path:
    """Write ``report.md`` and its PNGs into ``out_dir``; return the report's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = _plots(st, out)
    paper_cm = _paper_confusion(Path(paper_tables) if paper_tables else None)
    lines = [
        *_intro(st, rows, dataset),
        *_accuracy(st, paper_cm),
        *_per_class(st),
        *_confusion(st, paper_cm, files),
        *_importances(st, files),
        "",
        "## The stored classifier",
        "",
        f"`{model_path}` holds two random forests (numpy arrays in a .npz, "
        "read without pickle): `fast`, trained on every row, and "
        "`fast-train`, trained on the 70% split. `ewq plan --method fast|fast-train` "
        "uses them.",
        "",
    ]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def _intro(st: Any, rows: list[dict[str, Any]], dataset: str) -> list[str]:
    models = Counter(r["model_name"] for r in rows)
    sources = Counter(r.get("label_source") or "?" for r in rows)
    return [
        "# FastEWQ classifiers",
        "",
        f"Dataset `{dataset}`: {st.n_rows} blocks of {st.n_models} models "
        f"({st.class_counts.get(0, 0)} raw, {st.class_counts.get(1, 0)} quantized); labels: "
        + ", ".join(f"{n} {s}" for s, n in sorted(sources.items()))
        + f". Split 70/30, stratified, seed {st.seed}: {st.n_train} training and "
        f"{st.n_test} test rows. Features: num_parameters, exec_index, num_blocks, "
        "standardised by a StandardScaler fitted on the training rows.",
        "",
        "Models: " + ", ".join(f"{m} ({n})" for m, n in sorted(models.items())) + ".",
    ]


def _accuracy(st: Any, paper_cm: dict) -> list[str]:
    rf = st.results["random forest"]
    lines = [
        "",
        "## Accuracy",
        "",
        "| classifier | test accuracy | AUC | leave-one-model-out accuracy | paper (Table 5) accuracy |",
        "|---|---|---|---|---|",
    ]
    for name, r in st.results.items():
        cm = paper_cm.get(name)
        paper = f"{(cm[0] + cm[3]) / sum(cm):.1%}" if cm else "-"
        lines.append(
            f"| {name} | {r.report['accuracy']:.1%} | {r.auc:.3f} | {r.lomo:.1%} | {paper} |"
        )
    return lines + [
        "",
        f"Random forest: {rf.report['accuracy']:.1%} here against the paper's "
        f"{PAPER_RF['accuracy']:.0%}. Leave-one-model-out accuracy (train on every "
        "model but one, test on that one) is the honest measure of how well the "
        "classifier predicts EWQ's choice for a model it has never seen; the 70/30 split "
        "mixes blocks of the same model into both sides.",
    ]


def _per_class(st: Any) -> list[str]:
    lines = [
        "",
        "## Per class (test split)",
        "",
        "| classifier | class | precision | recall | F1 | support |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in st.results.items():
        for cls in ("raw", "quantized", "macro avg", "weighted avg"):
            m = r.report[cls]
            lines.append(
                f"| {name} | {cls} | {m['precision']:.2f} | {m['recall']:.2f} | "
                f"{m['f1-score']:.2f} | {int(m['support'])} |"
            )
    return lines + [
        "",
        f"Paper, random forest: raw precision {PAPER_RF['raw'][0]:.2f} recall "
        f"{PAPER_RF['raw'][1]:.2f}; quantized precision {PAPER_RF['quantized'][0]:.2f} "
        f"recall {PAPER_RF['quantized'][1]:.2f}.",
    ]


def _confusion(st: Any, paper_cm: dict, files: dict[str, str]) -> list[str]:
    lines = [
        "",
        "## Confusion matrices",
        "",
        f"![confusion matrices]({files['confusion']})",
        "",
        "| classifier | TN | FP | FN | TP | paper TN / FP / FN / TP |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in st.results.items():
        (tn, fp), (fn, tp) = r.confusion
        cm = paper_cm.get(name)
        lines.append(
            f"| {name} | {tn} | {fp} | {fn} | {tp} | "
            + (" / ".join(map(str, cm)) if cm else "-")
            + " |"
        )
    return lines + ["", "## ROC curves", "", f"![ROC curves]({files['roc']})"]


def _importances(st: Any, files: dict[str, str]) -> list[str]:
    lines = [
        "",
        "## Feature importances and ablations",
        "",
        f"![random forest importances]({files['importances']})",
        "",
        "Random forest importances: "
        + ", ".join(f"{f} {v:.3f}" for f, v in st.importances.items())
        + ".",
        "",
        "Test accuracy with one feature dropped:",
        "",
        "| classifier | all | without num_parameters | without exec_index | without num_blocks |",
        "|---|---|---|---|---|",
    ]
    for name, r in st.results.items():
        a = r.ablation
        lines.append(
            f"| {name} | {r.report['accuracy']:.1%} | {a['num_parameters']:.1%} | "
            f"{a['exec_index']:.1%} | {a['num_blocks']:.1%} |"
        )
    return lines + [
        f"| paper | {PAPER_ABLATION['all']:.1%} | {PAPER_ABLATION['num_parameters']:.1%} | "
        f"{PAPER_ABLATION['exec_index']:.1%} | {PAPER_ABLATION['num_blocks']:.1%} |",
    ]
