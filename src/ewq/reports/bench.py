"""The `ewq bench` results folder: the paper's tables (CSV and Markdown), the
equal-size plot, and one sentence saying what the equal-size comparison shows."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from ewq.fileio import atomic_path, atomic_write_text
from ewq.records import BenchRecord

__all__ = [
    "bench_table",
    "equal_size_plot",
    "verdict",
    "verdict_cosine",
    "write_bench",
    "write_bench_encoder",
]


def write_bench(result: BenchRecord, out: Path) -> None:
    """bench.json, table6/7/14.csv, README.md and size_vs_kl.png of a decoder's run."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "bench.json", result.model_dump_json(indent=2) + "\n")
    name = result.model_name
    tables = {
        "table6": _paper_rows(result, "table6"),
        "table7": _paper_rows(result, "table7"),
        "table14": _relative_rows(result),
    }
    md = [f"# {name}: the paper's tables, measured here", ""]
    cfg = result.config
    md.append(
        f"MMLU: {cfg.questions} questions sampled (seed 0) from `{Path(cfg.mmlu).name}`, "
        f"0-shot, letter scoring (accuracy, the paper's top-100 perplexity) and cloze "
        f"scoring. Text: {cfg.windows} windows of {cfg.ctx} tokens of "
        f"`{Path(cfg.text).name}` (perplexity, and KL divergence from the raw model on "
        "the same tokens). Sizes are tensor bytes written by llama.cpp (MB = 10^6 B); "
        "the embedding and head stay raw in every variant. The 'raw' model is the GGUF "
        "file as shipped, whose weights are already quantized: 8-bit blocks re-encode "
        "them, and can be larger than raw."
    )
    for key, title in (
        ("table6", "EWQ and uniform (Table 6)"),
        ("table7", "FastEWQ (Table 7)"),
        ("table14", "Relative to raw (Table 14)"),
    ):
        atomic_write_text(out / f"{key}.csv", _csv(tables[key]))
        md += ["", f"## {title}", "", *_markdown(tables[key])]
    md += [
        "",
        "## Composite score, fast against fast train",
        "",
        "| mix | composite fast | composite fast train | t | p | Cohen's d | questions |",
        "|---|---|---|---|---|---|---|",
    ]
    for mix, s in result.fast_vs_fast_train.items():
        md.append(
            f"| {mix} | {s['composite_fast']:.3f} | {s['composite_fast_train']:.3f} | "
            f"{s['t']:.3f} | {s['p']:.3f} | {s['cohens_d']:.3f} | {s['questions']} |"
        )
    md += ["", "## At equal size: entropy against random and position-only choices", ""]
    md += [equal_size_plot(result, out), "", verdict(result.equal_size)]
    atomic_write_text(out / "README.md", "\n".join(md) + "\n")


_MB = 1e6


def _paper_rows(result: BenchRecord, table: str) -> list[dict[str, Any]]:
    """The rows of the paper's Table 6 (EWQ, uniform; raw first) or 7 (FastEWQ)."""
    return [
        {
            "model": result.model_name,
            "variant": v["variant"],
            "mmlu_accuracy": f"{v['mmlu_accuracy']:.4f}",
            "mmlu_perplexity": f"{v['mmlu_perplexity']:.4f}",
            "blocks_mb_over_total_mb": f"{v['blocks_bytes'] / _MB:.2f} / {v['total_bytes'] / _MB:.2f}",
            "raw_8bit_4bit_blocks": v["raw_8bit_4bit_blocks"],
            "mmlu_cloze_accuracy": f"{v['mmlu_cloze_accuracy']:.4f}",
            "text_perplexity": f"{v['text_perplexity']:.4f}",
            "kl_mean": f"{v['text_kl_mean']:.5f}",
            "kl_p99": f"{v['text_kl_p99']:.5f}",
            "top1_agreement": f"{v['text_top1_agreement']:.4f}",
        }
        for v in result.variants
        if v["table"] == table or (table == "table6" and v["variant"] == "raw")
    ]


def _relative_rows(result: BenchRecord) -> list[dict[str, Any]]:
    """The paper's Table 14: every variant relative to the raw model."""
    variants = result.variants
    raw = next(v for v in variants if v["variant"] == "raw")

    def rel(v: dict[str, Any], key: str) -> str:
        if raw[key] == 0:
            return f"{v[key] - raw[key]:+.4f} (abs)"
        return f"{(v[key] - raw[key]) / raw[key]:+.2%}"

    return [
        {
            "model": result.model_name,
            "variant": v["variant"],
            "accuracy_or_rel": f"{v['mmlu_accuracy']:.4f}"
            if v is raw
            else rel(v, "mmlu_accuracy"),
            "perplexity_or_rel": f"{v['mmlu_perplexity']:.4f}"
            if v is raw
            else rel(v, "mmlu_perplexity"),
            "size_rel_over_total_mb": (
                f"{raw['total_bytes'] / _MB:.2f}"
                if v is raw
                else f"{rel(v, 'total_bytes')} / {v['total_bytes'] / _MB:.2f}"
            ),
            "text_perplexity_or_rel": (
                f"{v['text_perplexity']:.4f}" if v is raw else rel(v, "text_perplexity")
            ),
            "kl_mean": f"{v['text_kl_mean']:.5f}",
        }
        for v in variants
    ]


def _csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def _markdown(rows: list[dict[str, Any]]) -> list[str]:
    cols = list(rows[0])
    return [
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
        *("| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows),
    ]


def equal_size_plot(result: BenchRecord, out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = result.equal_size
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    groups: dict[str, list[tuple[float, float]]] = {}
    for p in points:
        key = "random" if p["order"].startswith("random") else p["order"]
        groups.setdefault(key, []).append((p["bytes"] / 1e6, p["kl_mean"]))
    style = {
        "ewq (entropy)": ("#d7301f", "o"),
        "random": ("#999999", "x"),
        "position (highest exec_index first)": ("#2b8cbe", "s"),
    }
    for key, pts in groups.items():
        color, marker = style.get(key, ("#333333", "."))
        xs, ys = zip(*sorted(pts), strict=True)
        ax.scatter(xs, ys, color=color, marker=marker, label=key, s=30)
        if key != "random":
            ax.plot(xs, ys, color=color, lw=1)
    ax.set_xlabel("tensor bytes written (MB)")
    ax.set_ylabel("mean KL from the raw model (nats/token)")
    ax.set_title(f"{result.model_name}: size against KL at equal size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(out / "size_vs_kl.png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return "![size against KL](size_vs_kl.png)"


def _wins(
    points: list[dict[str, Any]], size: str, metric: str, better
) -> tuple[int, dict]:
    """Per equal size, is EWQ's order better than position-only and than the mean of
    the random orders? Returns the number of sizes compared and the win counts."""
    by_size: dict[Any, dict[str, list[float]]] = {}
    for p in points:
        order = p["order"]
        key = (
            "random"
            if order.startswith("random")
            else ("ewq" if order.startswith("ewq") else "position")
        )
        by_size.setdefault(p[size], {}).setdefault(key, []).append(p[metric])
    wins = {"random": 0, "position": 0}
    total = 0
    for groups in by_size.values():
        if "ewq" not in groups:
            continue
        total += 1
        for other in wins:
            if other in groups and better(
                groups["ewq"][0], float(np.mean(groups[other]))
            ):
                wins[other] += 1
    return total, wins


def verdict(points: list[dict[str, Any]]) -> str:
    """One sentence saying what the equal-size comparison shows, whichever way."""
    total, wins = _wins(points, "budget_bytes", "kl_mean", lambda e, o: e < o)
    if total == 0:
        return "No budget gave comparable plans."
    return (
        f"At {total} equal-size budgets, EWQ's entropy order gave a lower mean KL than "
        f"the average of the random orders at {wins['random']} and than the "
        f"position-only order at {wins['position']}."
    )


def write_bench_encoder(result: BenchRecord, out: Path) -> None:
    """bench.json and README.md of an encoder's run (embedding fidelity)."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "bench.json", result.model_dump_json(indent=2) + "\n")
    name, sentences = result.model_name, result.sentences
    text_path, rows = result.text, result.variants
    comparison = result.equal_size
    md = [
        f"# {name}: embedding fidelity of quantized variants",
        "",
        f"Sentences: the first {sentences} lines of 20 or more characters of "
        f"`{Path(text_path).name}`; fidelity is the cosine similarity of each sentence's "
        "mean-pooled embedding to the unquantized model's. Variants are Hugging Face "
        "checkpoints (compressed-tensors pack-quantized, round-to-nearest); the "
        "embeddings (two thirds of MiniLM's parameters) stay raw.",
        "",
        "| variant | blocks | tensor MB | cosine mean | cosine p01 | cosine min |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        md.append(
            f"| {r['variant']} | {r['blocks']} | {r['total_bytes'] / 1e6:.2f} | "
            f"{r['cosine_mean']:.5f} | {r['cosine_p01']:.5f} | {r['cosine_min']:.5f} |"
        )
    md += [
        "",
        "## At equal size: entropy against random and position-only choices",
        "",
        "k blocks at 4-bit and the others at 8-bit (every block has the same size, so "
        "each k is one size), the k chosen lowest entropy first (EWQ), highest "
        "exec_index first, or at random (3 seeds).",
        "",
        "| 4-bit blocks | order | cosine mean | cosine p01 |",
        "|---|---|---|---|",
    ]
    md += [
        f"| {c['blocks_4bit']} | {c['order']} | {c['cosine_mean']:.5f} | {c['cosine_p01']:.5f} |"
        for c in comparison
    ]
    md += ["", verdict_cosine(comparison)]
    atomic_write_text(out / "README.md", "\n".join(md) + "\n")


def verdict_cosine(points: list[dict[str, Any]]) -> str:
    total, wins = _wins(points, "blocks_4bit", "cosine_mean", lambda e, o: e > o)
    return (
        f"At {total} equal sizes, EWQ's entropy order kept the embeddings closer to "
        f"the raw model's than the average of the random orders at {wins['random']} and "
        f"than the position-only order at {wins['position']}."
    )


def bench_table(result: BenchRecord) -> Table:
    """The variants in the terminal: decoders by MMLU and KL, encoders by cosine."""
    table = Table(title=result.model_name)
    if result.kind == "ewq-bench-encoder":
        for col in ("variant", "blocks", "MB", "cosine mean", "cosine p01"):
            table.add_column(
                col, justify="left" if col in ("variant", "blocks") else "right"
            )
        for v in result.variants:
            table.add_row(
                v["variant"],
                v["blocks"],
                f"{v['total_bytes'] / 1e6:.2f}",
                f"{v['cosine_mean']:.5f}",
                f"{v['cosine_p01']:.5f}",
            )
        return table
    for col in ("variant", "MMLU", "cloze", "text ppl", "KL mean", "MB", "raw/8/4"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for v in result.variants:
        table.add_row(
            v["variant"],
            f"{v['mmlu_accuracy']:.3f}",
            f"{v['mmlu_cloze_accuracy']:.3f}",
            f"{v['text_perplexity']:.2f}",
            f"{v['text_kl_mean']:.4f}",
            f"{v['total_bytes'] / 1e6:.1f}",
            v["raw_8bit_4bit_blocks"],
        )
    return table
