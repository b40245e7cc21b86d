"""The `ewq compare` results folder: every plan's row, the summary at each preset's
size, and the size-against-KL plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.table import Table

from ewq.fileio import atomic_path, atomic_write_text

__all__ = ["compare_table", "summary", "write_compare", "write_compare_encoder"]


def _curve(name: str) -> str:
    if name.startswith("ewq random"):
        return "ewq random (mean of seeds)"
    if name.startswith("llama.cpp"):
        return "llama.cpp preset"
    return name


def summary(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per preset size: the preset's KL and each plan's (random: mean of seeds)."""
    out = []
    by: dict[str, dict[str, list[float]]] = {}
    for r in result["rows"]:
        if r.get("bytes") is None:
            continue
        by.setdefault(r["size_of"], {}).setdefault(_curve(r["plan"]), []).append(
            r["kl_mean"]
        )
    for preset, plans in by.items():
        row = {"size_of": preset}
        row.update({k: sum(v) / len(v) for k, v in plans.items()})
        out.append(row)
    return out


def write_compare(result: dict[str, Any], out: Path) -> None:
    """compare.json, README.md and size_vs_kl.png of a decoder's comparison."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "compare.json", json.dumps(result, indent=2) + "\n")
    src_mb = result["source_tensor_bytes"] / 1e6
    md = [
        f"# {result['model_name']}: ewq plans against llama.cpp's presets at equal bytes",
        "",
        f"Source: the GGUF file as shipped ({src_mb:.2f} MB of tensor data). Each "
        "llama.cpp preset is made from it by llama.cpp's quantizer (its own per-tensor "
        "mixture, `--allow-requantize`, no importance matrix); each ewq plan gets the "
        "preset's exact tensor bytes as its budget (optimal allocator, one precision "
        "per block from the whole GGUF ladder). Measured on "
        f"{result['eval']['windows']} windows of {result['eval']['ctx']} tokens of "
        f"`{result['eval']['text']}`; the kl criterion was calibrated on "
        f"{result['calibration']['windows']} windows of {result['calibration']['ctx']} "
        f"tokens of `{result['calibration']['text']}` (another text). KL is from the "
        "source model, in nats per token. MB = 10^6 bytes.",
        "",
        "![size against KL](size_vs_kl.png)",
        "",
        "| size of | plan | MB | blocks | KL mean | KL p99 | top-1 | perplexity |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if r.get("bytes") is None:
            md.append(f"| {r['size_of']} | {r['plan']} | does not fit | | | | | |")
            continue
        md.append(
            f"| {r['size_of']} | {r['plan']} | {r['bytes'] / 1e6:.2f} | {r['blocks']} | "
            f"{max(r['kl_mean'], 0.0):.4f} | {max(r['kl_p99'], 0.0):.3f} | "
            f"{r['top1_agreement']:.4f} | "
            f"{r['perplexity']:.3f} |"
        )
    md += ["", "## Summary: mean KL at each preset's size", ""]
    summ = summary(result)
    cols = sorted({k for row in summ for k in row if k != "size_of"})
    md.append("| size of | " + " | ".join(cols) + " |")
    md.append("|---|" + "---|" * len(cols))
    for row in summ:
        md.append(
            f"| {row['size_of']} | "
            + " | ".join(f"{max(row[c], 0.0):.4f}" if c in row else "-" for c in cols)
            + " |"
        )
    md += [
        "",
        "Criterion time (s): "
        + ", ".join(f"{k} {v:.1f}" for k, v in result["criterion_seconds"].items())
        + f"; whole run {result['seconds'] / 60:.1f} min.",
    ]
    _plot(result, out / "size_vs_kl.png")
    atomic_write_text(out / "README.md", "\n".join(md) + "\n")


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, list[tuple[float, float]]] = {}
    for r in result["rows"]:
        if r.get("bytes") is None:
            continue
        name = "llama.cpp presets" if r["plan"].startswith("llama.cpp") else r["plan"]
        curves.setdefault(name, []).append((r["bytes"] / 1e6, max(r["kl_mean"], 1e-5)))
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for name, pts in sorted(curves.items()):
        xs, ys = zip(*sorted(pts), strict=True)
        style = dict(lw=2.2, color="black", marker="s") if "llama.cpp" in name else {}
        if name.startswith("ewq random"):
            style = dict(lw=0.8, color="#999999", marker="x")
        ax.plot(xs, ys, marker=style.pop("marker", "o"), ms=4, label=name, **style)
    ax.axvline(result["source_tensor_bytes"] / 1e6, color="#bbbbbb", ls="--", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("tensor bytes written (MB)")
    ax.set_ylabel("mean KL from the source (nats/token, log)")
    ax.set_title(f"{result['model_name']}: size against KL")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_compare_encoder(result: dict[str, Any], out: Path, text_name: str) -> None:
    """compare.json and README.md of an encoder's comparison."""
    sentences = result["sentences"]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "compare.json", json.dumps(result, indent=2) + "\n")
    md = [
        f"# {result['model_name']}: uniform precisions against ewq's criteria at equal bytes",
        "",
        "Each uniform checkpoint puts every transformer block at one precision "
        "(embeddings raw); each ewq plan gets its exact tensor bytes as the budget "
        "(optimal allocator over raw, 8, 4, 3 and 2 bits per block, embeddings "
        f"included). Fidelity: cosine of mean-pooled embeddings of {sentences} "
        f"sentences of `{text_name}` to the source model's. Hugging Face output "
        "(compressed-tensors, round to nearest); the kl criterion needs llama.cpp and "
        "is not run here.",
        "",
        "| size of | plan | MB | blocks | cosine mean | cosine p01 |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        md.append(
            f"| {r['size_of']} | {r['plan']} | {r['bytes'] / 1e6:.3f} | {r['blocks']} | "
            f"{r['cosine_mean']:.5f} | {r['cosine_p01']:.5f} |"
        )
    md += ["", f"Whole run {result['seconds'] / 60:.1f} min."]
    atomic_write_text(out / "README.md", "\n".join(md) + "\n")


def compare_table(result: dict[str, Any]) -> Table:
    """The summary in the terminal: mean KL at each preset's size, per plan."""
    rows = summary(result)
    cols = sorted({k for r in rows for k in r if k != "size_of"})
    table = Table(title=f"{result['model_name']}: mean KL at each preset's size")
    table.add_column("size of")
    for c in cols:
        table.add_column(c.replace("ewq ", ""), justify="right")
    for r in rows:
        table.add_row(
            r["size_of"], *(f"{max(r[c], 0.0):.4f}" if c in r else "-" for c in cols)
        )
    return table
