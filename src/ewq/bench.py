"""`ewq bench`: the paper's Tables 6, 7 and 14 on one model, and the question the
paper leaves open (METHOD.md section 8), measured.

Variants (embedding and head stay as they are in every variant, so that the
variants differ only in their transformer blocks):

* raw; uniform 8-bit; uniform 4-bit;
* EWQ "8bit mixed" (blocks below the mean entropy at 8-bit) and "4bit/8bit mixed"
  (below the threshold at 4-bit too);
* FastEWQ "fast" and "fast train" (the shipped classifier's two forests), each as
  "8bit mixed" (predicted blocks at 8-bit) and "4bit/8bit mixed" (the highest
  predicted block at 4-bit, as in the paper's Table 8 rows for FastEWQ).

Each variant is written by llama.cpp's quantizer and measured on the same data:
MMLU (letter and cloze scoring, the paper's perplexity), perplexity on a text, KL
divergence from the raw model on the same windows, and its size.

Equal-size comparison: plans from the same ladder (ewq/planning) at a range of
budgets, with the blocks ordered by entropy (EWQ), at random (several seeds), or
by position alone (highest exec_index first, FastEWQ's order without a classifier),
each measured by KL from the raw model.
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ewq import api
from ewq.analysis import decide
from ewq.errors import EwqError
from ewq.evaluate import tasks
from ewq.evaluate.backends import LlamaCppModel
from ewq.evaluate.data import load_mmlu, load_text
from ewq.evaluate.metrics import kl_logits, logsumexp_rows, summarize_kl
from ewq.fileio import atomic_write_text
from ewq.planning import BlockSpec, Machine, block_specs, fit
from ewq.types import Precision

__all__ = ["BenchConfig", "bench", "bench_encoder", "is_encoder"]

Log = Callable[[str], None]


@dataclass
class BenchConfig:
    mmlu: Path
    text: Path
    questions: int = 40  # MMLU questions per variant
    windows: int = 8  # text windows per variant (perplexity and KL)
    ctx: int = 256
    seeds: int = 3  # random orders in the equal-size comparison
    budgets: int = 6  # budgets in the equal-size comparison
    alpha: float = 1.25


@dataclass
class Variant:
    name: str
    table: str  # "table6" (EWQ and uniform) or "table7" (FastEWQ)
    precision: dict[int, Precision]
    metrics: dict[str, Any] = field(default_factory=dict)


class _Reference:
    """The raw model's log-probs on the benchmark windows, computed once."""

    def __init__(self, path: Path, text: str, cfg: BenchConfig):
        self.model = LlamaCppModel(path, cfg.ctx)
        tokens = self.model.tokenize(text)
        size = cfg.ctx - (self.model.bos is not None)
        self.seqs = [
            ([self.model.bos] if self.model.bos is not None else []) + tokens[a:b]
            for a, b, _ in tasks.windows(len(tokens), size, size, cfg.windows)
        ]
        # float32 logits as llama.cpp gives them, and their log-sum-exps: each
        # variant is compared with these, the reference runs once
        self.logits = [self.model.logits(s) for s in self.seqs]
        self.lse = [logsumexp_rows(x) for x in self.logits]


def _text_metrics(model: LlamaCppModel, ref: _Reference) -> dict[str, float]:
    kls, t_ref, t_q, nll, count = [], [], [], 0.0, 0
    for seq, p, lp in zip(ref.seqs, ref.logits, ref.lse, strict=True):
        q = model.logits(seq)
        lq = logsumexp_rows(q)
        kls.append(kl_logits(p, lp, q, lq))
        t_ref.append(p.argmax(axis=1))
        t_q.append(q.argmax(axis=1))
        for t in range(1, len(seq)):
            nll -= float(q[t - 1, seq[t]]) - lq[t - 1]
            count += 1
    out = summarize_kl(np.concatenate(kls), np.concatenate(t_ref), np.concatenate(t_q))
    out["perplexity"] = float(math.exp(nll / count))
    return out


def _plan_doc(num_blocks: int, precision: dict[int, Precision]) -> dict[str, Any]:
    return {
        "schema_version": 1,
        "num_blocks": num_blocks,
        "blocks": [
            {"exec_index": i, "precision": p.value}
            for i, p in sorted(precision.items())
        ],
    }


def _counts(precision: dict[int, Precision]) -> str:
    n = {p: sum(1 for v in precision.values() if v is p) for p in Precision}
    return f"{n[Precision.RAW]} / {n[Precision.Q8]} / {n[Precision.Q4]}"


def bench(
    source: str,
    cfg: BenchConfig,
    out_dir: str | Path,
    *,
    log: Log = print,
) -> dict[str, Any]:
    """Run every variant and the equal-size comparison; write the results folder."""
    out = Path(out_dir)
    # the data first: a missing file fails before minutes of work, and nothing is
    # written until every measurement is in
    questions = load_mmlu(cfg.mmlu)
    text = load_text(cfg.text)
    analysis = api.analyze(source, alpha=cfg.alpha)
    if analysis.index.format != "gguf":
        raise EwqError(
            f"{source}: ewq bench runs GGUF decoders (llama.cpp) and Hugging Face encoders"
        )
    path = Path(analysis.index.files[0])
    layout = analysis.layout
    blocks = [b.exec_index for b in layout.transformer_blocks]
    n = len(blocks)
    entropies = {b.exec_index: b.entropy for b in analysis.profile.transformer}
    d48 = decide(entropies, alpha=cfg.alpha)
    d8 = decide(entropies, alpha=cfg.alpha, variant="8bit")
    feats = api.features(source)
    variants = [
        Variant("raw", "table6", dict.fromkeys(blocks, Precision.RAW)),
        Variant("4bit", "table6", dict.fromkeys(blocks, Precision.Q4)),
        Variant("8bit", "table6", dict.fromkeys(blocks, Precision.Q8)),
        Variant("8bit mixed", "table6", dict(d8.precision)),
        Variant("4bit/8bit mixed", "table6", dict(d48.precision)),
    ]
    for method in ("fast", "fast-train"):
        predicted, decision, _ = api.fast_decision(feats, method, Precision.Q8)
        label = "fast" if method == "fast" else "fast train"
        variants.append(Variant(f"{label} 8bit mixed", "table7", dict(decision)))
        mixed = dict(decision)
        chosen = [i for i in blocks if predicted[i]]
        if chosen:
            mixed[max(chosen)] = Precision.Q4
        variants.append(Variant(f"{label} 4bit/8bit mixed", "table7", mixed))

    rng = random.Random(0)
    sample = sorted(
        rng.sample(range(len(questions)), min(cfg.questions, len(questions)))
    )
    questions = [questions[i] for i in sample]
    log(
        f"reference: {len(questions)} MMLU questions, {cfg.windows} windows of {cfg.ctx} tokens"
    )
    ref = _Reference(path, text, cfg)
    per_question: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="ewq-bench-") as tmp:
        for v in variants:
            log(f"variant {v.name}")
            q = api.quantize(source, _plan_doc(n, v.precision), Path(tmp) / "v.gguf")
            model = LlamaCppModel(q.out, max(cfg.ctx, 2048))
            mm = tasks.mmlu(model, questions)
            # the composite score's terms per question: correct - (-ln p(correct))
            per_question[v.name] = [d["correct"] - d["nll"] for d in mm["per_question"]]
            block_bytes = sum(
                t.nbytes for t in q.targets if t.exec_index in set(blocks)
            )
            v.metrics = {
                "mmlu_accuracy": mm["accuracy"],
                "mmlu_perplexity": mm["paper_perplexity"],
                "mmlu_cloze_accuracy": mm["cloze_accuracy"],
                "blocks_bytes": block_bytes,
                "total_bytes": q.predicted_bytes,
                "file_bytes": q.file_bytes,
                "raw_8bit_4bit_blocks": _counts(v.precision),
            } | {f"text_{k}": val for k, val in _text_metrics(model, ref).items()}
            del model
        comparison = _equal_size(source, analysis, feats, ref, cfg, Path(tmp), log)
    stats = _paired(per_question)
    result = {
        "schema_version": 1,
        "kind": "ewq-bench",
        "source": source,
        "model_name": feats.model_name,
        "config": {
            k: str(v) if isinstance(v, Path) else v for k, v in cfg.__dict__.items()
        },
        "variants": [
            {"variant": v.name, "table": v.table, **v.metrics} for v in variants
        ],
        "fast_vs_fast_train": stats,
        "equal_size": comparison,
    }
    _write(result, out)
    return result


def _paired(per_question: dict[str, list[float]]) -> dict[str, Any]:
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


def _orders(analysis, feats, seeds: int) -> dict[str, list[int]]:
    blocks = [b.exec_index for b in analysis.layout.transformer_blocks]
    orders = {
        "ewq (entropy)": list(
            decide(
                {b.exec_index: b.entropy for b in analysis.profile.transformer}
            ).priority
        ),
        "position (highest exec_index first)": sorted(blocks, reverse=True),
    }
    for s in range(seeds):
        order = list(blocks)
        random.Random(1000 + s).shuffle(order)
        orders[f"random seed {s}"] = order
    return orders


def _equal_size(
    source, analysis, feats, ref, cfg, tmp: Path, log: Log
) -> list[dict[str, Any]]:
    """KL of plans at several budgets: same ladder, different block orders.

    Every order gets the same decision shape: all blocks start at 8-bit and the
    ladder walks them to 4-bit in the order's sequence, so at a given budget each
    order quantizes the same number of blocks, only different ones.
    """
    layout = analysis.layout
    specs = {s.exec_index: s for s in block_specs("gguf", layout)}
    blocks = [b.exec_index for b in layout.transformer_blocks]
    n = len(blocks)
    emb, head = layout.blocks[0].exec_index, layout.blocks[-1].exec_index

    def fixed(i: int) -> BlockSpec:  # embedding and head: raw whatever the ladder says
        return BlockSpec(
            i,
            specs[i].num_parameters,
            dict.fromkeys(Precision, specs[i].bytes[Precision.RAW]),
        )

    # blocks between 4-bit and 8-bit only: raw is priced out of reach (a quantized
    # source's raw blocks can be smaller than their 8-bit re-encoding)
    capped = {
        i: BlockSpec(i, s.num_parameters, {**s.bytes, Precision.RAW: 10**18})
        for i, s in specs.items()
    }
    lo = sum(specs[i].bytes[Precision.Q4] for i in blocks)
    hi = sum(specs[i].bytes[Precision.Q8] for i in blocks)
    side = specs[emb].bytes[Precision.RAW] + specs[head].bytes[Precision.RAW]
    results = []
    decision = dict.fromkeys(blocks, Precision.Q8)
    for k in range(cfg.budgets):
        budget = side + lo + (hi - lo) * (k + 0.5) / cfg.budgets
        for name, order in _orders(analysis, feats, cfg.seeds).items():
            r = fit(
                [capped[i] for i in blocks],
                fixed(emb),
                fixed(head),
                decision,
                order,
                [Machine("m", int(budget))],
            )
            if not r.fits:
                continue
            precision = {i: r.precision[i] for i in blocks}
            plan = _plan_doc(n, precision)
            plan["embedding"] = {"precision": "raw"}
            plan["head"] = {"precision": "raw"}
            q = api.quantize(source, plan, tmp / "eq.gguf")
            model = LlamaCppModel(q.out, cfg.ctx)
            m = _text_metrics(model, ref)
            del model
            results.append(
                {
                    "budget_bytes": int(budget),
                    "order": name,
                    "bytes": q.predicted_bytes,
                    "blocks_4bit": sum(
                        1 for p in precision.values() if p is Precision.Q4
                    ),
                    "kl_mean": m["kl_mean"],
                    "kl_p99": m["kl_p99"],
                    "top1_agreement": m["top1_agreement"],
                    "perplexity": m["perplexity"],
                }
            )
            log(f"  budget {k + 1}/{cfg.budgets} {name}: KL {m['kl_mean']:.4f}")
    return results


def _write(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "bench.json", json.dumps(result, indent=2) + "\n")
    name = result["model_name"]
    variants = result["variants"]
    raw = next(v for v in variants if v["variant"] == "raw")
    mb = 1e6

    def rows(table: str) -> list[dict[str, Any]]:
        return [
            {
                "model": name,
                "variant": v["variant"],
                "mmlu_accuracy": f"{v['mmlu_accuracy']:.4f}",
                "mmlu_perplexity": f"{v['mmlu_perplexity']:.4f}",
                "blocks_mb_over_total_mb": f"{v['blocks_bytes'] / mb:.2f} / {v['total_bytes'] / mb:.2f}",
                "raw_8bit_4bit_blocks": v["raw_8bit_4bit_blocks"],
                "mmlu_cloze_accuracy": f"{v['mmlu_cloze_accuracy']:.4f}",
                "text_perplexity": f"{v['text_perplexity']:.4f}",
                "kl_mean": f"{v['text_kl_mean']:.5f}",
                "kl_p99": f"{v['text_kl_p99']:.5f}",
                "top1_agreement": f"{v['text_top1_agreement']:.4f}",
            }
            for v in variants
            if v["table"] == table or (table == "table6" and v["variant"] == "raw")
        ]

    def rel(v: dict[str, Any], key: str) -> str:
        if raw[key] == 0:
            return f"{v[key] - raw[key]:+.4f} (abs)"
        return f"{(v[key] - raw[key]) / raw[key]:+.2%}"

    t14 = [
        {
            "model": name,
            "variant": v["variant"],
            "accuracy_or_rel": f"{v['mmlu_accuracy']:.4f}"
            if v is raw
            else rel(v, "mmlu_accuracy"),
            "perplexity_or_rel": f"{v['mmlu_perplexity']:.4f}"
            if v is raw
            else rel(v, "mmlu_perplexity"),
            "size_rel_over_total_mb": (
                f"{raw['total_bytes'] / mb:.2f}"
                if v is raw
                else f"{rel(v, 'total_bytes')} / {v['total_bytes'] / mb:.2f}"
            ),
            "text_perplexity_or_rel": (
                f"{v['text_perplexity']:.4f}" if v is raw else rel(v, "text_perplexity")
            ),
            "kl_mean": f"{v['text_kl_mean']:.5f}",
        }
        for v in variants
    ]
    tables = {"table6": rows("table6"), "table7": rows("table7"), "table14": t14}
    md = [f"# {name}: the paper's tables, measured here", ""]
    cfg = result["config"]
    md.append(
        f"MMLU: {cfg['questions']} questions sampled (seed 0) from `{Path(cfg['mmlu']).name}`, "
        f"0-shot, letter scoring (accuracy, the paper's top-100 perplexity) and cloze "
        f"scoring. Text: {cfg['windows']} windows of {cfg['ctx']} tokens of "
        f"`{Path(cfg['text']).name}` (perplexity, and KL divergence from the raw model on "
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
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(tables[key][0]), lineterminator="\n")
        w.writeheader()
        w.writerows(tables[key])
        atomic_write_text(out / f"{key}.csv", buf.getvalue())
        cols = list(tables[key][0])
        md += [
            "",
            f"## {title}",
            "",
            "| " + " | ".join(cols) + " |",
            "|" + "---|" * len(cols),
        ]
        md += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in tables[key]]
    md += [
        "",
        "## Composite score, fast against fast train",
        "",
        "| mix | composite fast | composite fast train | t | p | Cohen's d | questions |",
        "|---|---|---|---|---|---|---|",
    ]
    for mix, s in result["fast_vs_fast_train"].items():
        md.append(
            f"| {mix} | {s['composite_fast']:.3f} | {s['composite_fast_train']:.3f} | "
            f"{s['t']:.3f} | {s['p']:.3f} | {s['cohens_d']:.3f} | {s['questions']} |"
        )
    md += ["", "## At equal size: entropy against random and position-only choices", ""]
    md += [_equal_size_plot(result, out), "", _verdict(result["equal_size"])]
    atomic_write_text(out / "README.md", "\n".join(md) + "\n")


def _equal_size_plot(result: dict[str, Any], out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ewq.fileio import atomic_path

    points = result["equal_size"]
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
    ax.set_title(f"{result['model_name']}: size against KL at equal size")
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


def _verdict(points: list[dict[str, Any]]) -> str:
    """One sentence saying what the equal-size comparison shows, whichever way."""
    total, wins = _wins(points, "budget_bytes", "kl_mean", lambda e, o: e < o)
    if total == 0:
        return "No budget gave comparable plans."
    return (
        f"At {total} equal-size budgets, EWQ's entropy order gave a lower mean KL than "
        f"the average of the random orders at {wins['random']} and than the "
        f"position-only order at {wins['position']}."
    )


def _fresh(folder: Path) -> Path:
    """A scratch output folder of this run, emptied for the next variant (ewq never
    replaces a folder it is not told to)."""
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    return folder


def is_encoder(source: str | Path) -> bool:
    """A Hugging Face folder of an encoder (no causal or generation head)?"""
    index = api.inspect(source).index
    archs = " ".join(index.config.get("architectures") or [])
    return index.format == "safetensors" and not any(
        k in archs for k in ("CausalLM", "LMHead", "ConditionalGeneration")
    )


def bench_encoder(
    source: str,
    text_path: Path,
    out_dir: str | Path,
    *,
    sentences: int = 128,
    log: Log = print,
) -> dict[str, Any]:
    """Encoders (MiniLM): the variants written as Hugging Face checkpoints
    (compressed-tensors), measured by embedding fidelity instead of perplexity."""
    from ewq.evaluate.backends import TransformersEncoder

    text = load_text(text_path)
    analysis = api.analyze(source)
    if analysis.index.format != "safetensors":
        raise EwqError(f"{source}: the encoder bench reads a Hugging Face folder")
    folder = Path(analysis.index.files[0]).parent
    blocks = [b.exec_index for b in analysis.layout.transformer_blocks]
    n = len(blocks)
    entropies = {b.exec_index: b.entropy for b in analysis.profile.transformer}
    variants = [
        ("raw", dict.fromkeys(blocks, Precision.RAW)),
        ("8bit", dict.fromkeys(blocks, Precision.Q8)),
        ("4bit", dict.fromkeys(blocks, Precision.Q4)),
        ("3bit", dict.fromkeys(blocks, Precision.Q3)),
        ("8bit mixed", dict(decide(entropies, variant="8bit").precision)),
        ("4bit/8bit mixed", dict(decide(entropies).precision)),
    ]
    reference = TransformersEncoder(folder)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ewq-bench-") as tmp:
        for name, precision in variants:
            log(f"variant {name}")
            q = api.quantize(
                source,
                _plan_doc(n, precision),
                Path(tmp) / name.replace("/", "-"),
                format="hf",
            )
            m = tasks.embedding_fidelity(
                reference, TransformersEncoder(q.out), text, limit=sentences
            )
            counts = {p.value: list(precision.values()).count(p) for p in Precision}
            rows.append(
                {
                    "variant": name,
                    "blocks": ", ".join(f"{c} {p}" for p, c in counts.items() if c),
                    "total_bytes": q.predicted_bytes,
                    **m,
                }
            )
        # equal size: k blocks at 4-bit, the rest at 8-bit, the k chosen by each order
        comparison = []
        for k in range(1, n):
            for order_name, order in _orders(analysis, None, 3).items():
                first = set(order[:k])
                precision = {
                    i: Precision.Q4 if i in first else Precision.Q8 for i in blocks
                }
                q = api.quantize(
                    source,
                    _plan_doc(n, precision),
                    _fresh(Path(tmp) / "eq"),
                    format="hf",
                )
                m = tasks.embedding_fidelity(
                    reference, TransformersEncoder(q.out), text, limit=sentences
                )
                comparison.append(
                    {
                        "blocks_4bit": k,
                        "order": order_name,
                        "bytes": q.predicted_bytes,
                        **m,
                    }
                )
                log(
                    f"  {k} blocks at 4-bit, {order_name}: cosine {m['cosine_mean']:.5f}"
                )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = api.features(source).model_name
    result = {
        "schema_version": 1,
        "kind": "ewq-bench-encoder",
        "model_name": name,
        "sentences": sentences,
        "variants": rows,
        "equal_size": comparison,
    }
    atomic_write_text(out / "bench.json", json.dumps(result, indent=2) + "\n")
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
    md += ["", _verdict_cosine(comparison)]
    atomic_write_text(out / "README.md", "\n".join(md) + "\n")
    return result


def _verdict_cosine(points: list[dict[str, Any]]) -> str:
    total, wins = _wins(points, "blocks_4bit", "cosine_mean", lambda e, o: e > o)
    return (
        f"At {total} equal sizes, EWQ's entropy order kept the embeddings closer to "
        f"the raw model's than the average of the random orders at {wins['random']} and "
        f"than the position-only order at {wins['position']}."
    )
