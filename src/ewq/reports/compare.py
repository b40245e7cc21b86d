"""The `ewq compare` results folder: every plan's row, the summary at each preset's
size, and the size-against-KL plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.table import Table

from ewq.fileio import atomic_path, atomic_write_text

__all__ = [
    "compare_table",
    "head_to_head",
    "summary",
    "write_compare",
    "write_compare_encoder",
]


def _curve(name: str) -> str:
    if name.startswith("ewq random"):
        return "ewq random (mean of seeds)"
    return name


def summary(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per preset size: each plan's mean KL (random: the mean of its seeds). Where
    llama.cpp's preset with and without the importance matrix differ in size, ewq
    planned at both; its plan at the smaller budget is the one compared."""
    out = []
    by: dict[str, dict[str, list[float]]] = {}
    smallest: dict[str, int] = {}
    for r in result["rows"]:
        if r.get("budget") is not None:
            smallest[r["size_of"]] = min(
                r["budget"], smallest.get(r["size_of"], r["budget"])
            )
    for r in result["rows"]:
        if r.get("bytes") is None or r.get("budget", 0) > smallest.get(r["size_of"], 0):
            continue
        by.setdefault(r["size_of"], {}).setdefault(_curve(r["plan"]), []).append(
            r["kl_mean"]
        )
    for preset, plans in by.items():
        row = {"size_of": preset}
        row.update({k: sum(v) / len(v) for k, v in plans.items()})
        out.append(row)
    return out


def head_to_head(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per preset size: llama.cpp's preset without and with the importance matrix,
    ewq's calibrated (kl) and data-free (error) plans, and their ratios to the
    better preset (kl) and to the preset without an importance matrix (error)."""
    rows = []
    for row in summary(result):
        size = row["size_of"]
        plain = row.get(f"llama.cpp {size}")
        imat = row.get(f"llama.cpp {size} + imatrix")
        best = min(v for v in (plain, imat) if v is not None)
        kl, err = row.get("ewq kl"), row.get("ewq error")
        gptq = row.get("ewq kl + GPTQ")
        rows.append(
            {
                "size_of": size,
                "preset": plain,
                "preset_imatrix": imat,
                "ewq_kl": kl,
                "ewq_kl_gptq": gptq,
                "ewq_error": err,
                "kl_ratio": kl / best if kl is not None and best > 0 else None,
                "gptq_ratio": gptq / best if gptq is not None and best > 0 else None,
                "error_ratio": err / plain if err is not None and plain else None,
            }
        )
    return rows


def _f(v: float | None, digits: int = 5) -> str:
    return "-" if v is None else f"{max(v, 0.0):.{digits}f}"


def write_compare(result: dict[str, Any], out: Path) -> None:
    """compare.json, README.md and size_vs_kl.png of a decoder's comparison."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "compare.json", json.dumps(result, indent=2) + "\n")
    md = [
        *_intro(result),
        *_head_to_head_section(result),
        *_every_plan_section(result),
    ]
    _plot(result, out / "size_vs_kl.png")
    atomic_write_text(out / "README.md", "\n".join(md) + "\n")


def _intro(result: dict[str, Any]) -> list[str]:
    """What was compared, how, on which text."""
    src_mb = result["source_tensor_bytes"] / 1e6
    ev, cal, im = result["eval"], result["calibration"], result["imatrix"]
    docs = "one document per line" if ev["documents"] == "lines" else "a token stream"
    md = [
        f"# {result['model_name']}: ewq against llama.cpp's presets at equal bytes",
        "",
        f"Source: {src_mb:.2f} MB of tensor data ({result['source_types']}). Each "
        "llama.cpp preset is made from it by llama.cpp's quantizer (its own per-tensor "
        "mixture, `--allow-requantize`), without an importance matrix and with the "
        "same importance matrix ewq uses; each ewq plan gets the preset's exact tensor "
        "bytes as its budget (per-tensor optimal allocator over every GGML type "
        f"llama.cpp writes). Measured on {ev['windows']} windows of up to {ev['ctx']} "
        f"tokens ({ev['tokens']:,} tokens, {docs}) of `{ev['text']}`",
    ]
    if cal["text"]:
        md[-1] += (
            f"; the importance matrix ({im['chunks']} chunks) and the kl criterion "
            f"(probes on {cal['tokens']:,} tokens) used `{cal['text']}`, another text."
        )
    if result.get("error_sample"):
        md[-1] += (
            f" The error criterion was estimated from {result['error_sample']:.0%} "
            "of each tensor's rows (`--sample`)."
        )
    md[-1] += " KL is from the source model, in nats per token. MB = 10^6 bytes."
    return md


def _head_to_head_section(result: dict[str, Any]) -> list[str]:
    """The plot, and each preset's size: its KL beside ewq's plans'."""
    md = [
        "",
        "![size against KL](size_vs_kl.png)",
        "",
        "## Head to head",
        "",
        "| size of | preset | preset + imatrix | ewq kl | ewq kl / better preset "
        "| ewq kl + GPTQ | GPTQ / better preset "
        "| ewq error (data-free) | ewq error / preset |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for h in head_to_head(result):
        md.append(
            f"| {h['size_of']} | {_f(h['preset'])} | {_f(h['preset_imatrix'])} | "
            f"{_f(h['ewq_kl'])} | {_f(h['kl_ratio'], 2)} | {_f(h['ewq_kl_gptq'])} | "
            f"{_f(h['gptq_ratio'], 2)} | {_f(h['ewq_error'])} | "
            f"{_f(h['error_ratio'], 2)} |"
        )
    return md


def _every_plan_section(result: dict[str, Any]) -> list[str]:
    """Every plan measured, and the criteria's times."""
    md = [
        "",
        "## Every plan",
        "",
        "| size of | plan | MB | types | KL mean | predicted KL | KL p99 | top-1 "
        "| perplexity |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if r.get("bytes") is None:
            md.append(f"| {r['size_of']} | {r['plan']} | does not fit | | | | | | |")
            continue
        md.append(
            f"| {r['size_of']} | {r['plan']} | {r['bytes'] / 1e6:.3f} | {r['types']} | "
            f"{_f(r['kl_mean'])} | {_f(r.get('predicted_kl'))} | "
            f"{max(r['kl_p99'], 0.0):.3f} | {r['top1_agreement']:.4f} | "
            f"{r['perplexity']:.3f} |"
        )
    md += [
        "",
        "Criterion time (s): "
        + ", ".join(f"{k} {v:.1f}" for k, v in result["criterion_seconds"].items())
        + f"; whole run {result['seconds'] / 60:.1f} min.",
    ]
    return md


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, list[tuple[float, float]]] = {}
    for r in result["rows"]:
        if r.get("bytes") is None:
            continue
        name = r["plan"]
        if name.startswith("llama.cpp"):
            name = "llama.cpp + imatrix" if name.endswith("imatrix") else "llama.cpp"
        curves.setdefault(name, []).append((r["bytes"] / 1e6, max(r["kl_mean"], 1e-5)))
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for name, pts in sorted(curves.items()):
        xs, ys = zip(*sorted(pts), strict=True)
        style = {}
        if name.startswith("llama.cpp"):
            style = dict(
                lw=2.2,
                color="black" if name == "llama.cpp" else "#555555",
                marker="s",
                ls="-" if name == "llama.cpp" else "--",
            )
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
        "(per-tensor optimal allocator over raw, 8, 4, 3 and 2 bits). "
        f"Fidelity: cosine of mean-pooled embeddings of {sentences} "
        f"sentences of `{text_name}` to the source model's. Hugging Face output "
        "(compressed-tensors, round to nearest); the kl criterion needs llama.cpp and "
        "is not run here.",
        "",
        "| size of | plan | MB | types | cosine mean | cosine p01 |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        md.append(
            f"| {r['size_of']} | {r['plan']} | {r['bytes'] / 1e6:.3f} | {r['types']} | "
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
