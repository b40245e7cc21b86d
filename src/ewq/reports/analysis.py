"""The `ewq analyze` outputs: JSON document, terminal table, and the entropy plot."""

from __future__ import annotations

import os
from typing import Any

from rich.table import Table

from ewq.analysis import MATRIX_RULE, BlockEntropy
from ewq.fileio import atomic_path
from ewq.records import Analysis
from ewq.types import BlockKind, Precision

__all__ = ["SCHEMA_VERSION", "analysis_json", "analysis_table", "write_plot"]

SCHEMA_VERSION = 1

_COLORS = {
    Precision.RAW: "#2b8cbe",
    Precision.Q8: "#f2a541",
    Precision.Q4: "#d7301f",
}


def _side_block(b: BlockEntropy) -> dict[str, Any]:
    return {
        "exec_index": b.exec_index,
        "num_parameters": b.num_parameters,
        "entropy": b.entropy,
    }


def analysis_json(analysis: Analysis, ewq_version: str) -> dict[str, Any]:
    """The analysis as a JSON-ready dict; also accepted by `ewq quantize` as a plan."""
    prof, d = analysis.profile, analysis.decision
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "ewq-analysis",
        "ewq_version": ewq_version,
        "source": analysis.index.source,
        "container": analysis.index.container,
        "architecture": analysis.layout.architecture,
        "num_blocks": analysis.layout.num_blocks,
        "alpha": d.alpha,
        "eps": prof.eps,
        "variant": d.variant.value,
        "matrices": MATRIX_RULE,
        "mean": d.mean,
        "std": d.std,
        "threshold": d.threshold,
        "blocks": [
            {
                "exec_index": b.exec_index,
                "num_parameters": b.num_parameters,
                "entropy": b.entropy,
                "decision": d.precision[b.exec_index].value,
                "priority": d.rank(b.exec_index),
            }
            for b in prof.transformer
        ],
        "embedding": _side_block(prof.block(BlockKind.EMBEDDING)),
        "head": _side_block(prof.block(BlockKind.HEAD)),
    } | ({"sampling": _sampling_json(analysis.sampling)} if analysis.sampling else {})


def _sampling_json(rec: dict[str, Any]) -> dict[str, Any]:
    z = rec["z"]
    return {
        **{k: v for k, v in rec.items() if k != "stderr"},
        "interval": "entropy +- z * stderr (99%)",
        "stderr": {str(k): v for k, v in rec["stderr"].items()},
        "halfwidth": {str(k): z * v for k, v in rec["stderr"].items()},
    }


def _sampling_caption(rec: dict[str, Any] | None) -> str:
    if not rec:
        return ""
    share = rec["bytes_read"] / max(1, rec["bytes_total"])
    text = (
        f"\nsampled: {share:.1%} of the matrices' bytes ({rec['fraction']:g} of rows, "
        f"seed {rec['seed']}, {rec['rounds']} resampling rounds); "
    )
    if rec["undecided"]:
        text += "undecided by the sample: blocks " + ", ".join(
            map(str, rec["undecided"])
        )
    else:
        text += "no block's 99% interval holds a boundary"
    n = len(rec["open_pairs"])
    return (
        text + f"; {n} neighbouring pairs in the priority overlap. Intervals hold only "
        "if the sample met a tensor's outlier rows: an estimate, not the analysis"
    )


def analysis_table(analysis: Analysis) -> Table:
    prof, d = analysis.profile, analysis.decision
    counts = {p: sum(1 for v in d.precision.values() if v is p) for p in Precision}
    summary = ", ".join(f"{n} {p.value}" for p, n in counts.items() if n)
    table = Table(
        title=f"{analysis.index.source}: EWQ {d.variant.value} mixed, alpha {d.alpha:g}"
        + (f", eps {prof.eps:g}" if prof.eps else ""),
        caption=f"mean {d.mean:.9f}  std {d.std:.3e}  threshold {d.threshold:.9f}  "
        f"->  {summary}" + _sampling_caption(analysis.sampling),
    )
    rec = analysis.sampling
    for col in ("exec_index", "kind", "parameters", "entropy", "decision", "priority"):
        table.add_column(
            col, justify="left" if col in ("kind", "decision") else "right"
        )
    styles = {Precision.RAW: "", Precision.Q8: "yellow", Precision.Q4: "red"}
    for b in prof.blocks:
        entropy = "-" if b.entropy is None else f"{b.entropy:.9f}"
        if rec and b.entropy is not None and rec["stderr"].get(b.exec_index):
            entropy += f" +- {rec['z'] * rec['stderr'][b.exec_index]:.1e}"
        if b.kind is BlockKind.TRANSFORMER:
            p = d.precision[b.exec_index]
            decision, priority, style = (
                p.value,
                str(d.rank(b.exec_index)),
                styles.get(p, ""),
            )
        else:
            decision, priority, style = "(planner)", "-", "dim"
        table.add_row(
            str(b.exec_index),
            b.kind.value,
            f"{b.num_parameters:,}",
            entropy,
            decision,
            priority,
            style=style,
        )
    return table


def write_plot(analysis: Analysis, path: str | os.PathLike[str]) -> None:
    """Entropy by block with the mean and threshold lines (the paper's Figure 1), PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prof, d = analysis.profile, analysis.decision
    blocks = prof.transformer
    fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * len(blocks) + 3), 4.2), dpi=120)
    xs = [b.exec_index for b in blocks]
    ys = [b.entropy for b in blocks]
    ax.plot(xs, ys, color="#999999", lw=1, zorder=1)
    for p, color in _COLORS.items():
        pts = [
            (b.exec_index, b.entropy) for b in blocks if d.precision[b.exec_index] is p
        ]
        if pts:
            ax.scatter(
                *zip(*pts, strict=True), color=color, s=28, zorder=2, label=p.value
            )
    ax.axhline(d.mean, color="#333333", ls="--", lw=1, label=f"mean {d.mean:.6f}")
    if d.variant.value == "4bit/8bit":
        ax.axhline(
            d.threshold,
            color="#d7301f",
            ls=":",
            lw=1,
            label=f"threshold (alpha {d.alpha:g}) {d.threshold:.6f}",
        )
    ax.set_xlabel("exec_index (transformer blocks)")
    ax.set_ylabel("block entropy H (nats)")
    ax.set_title(f"{os.path.basename(str(analysis.index.source))}: block entropy")
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
