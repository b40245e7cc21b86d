"""`ewq bench`: the paper's Tables 6, 7 and 14 on one model, and the question the
paper leaves open (docs/method.md section 8), measured.

One runner for every model; what differs is the judge, which writes and measures:

* GGUF decoders (llama.cpp): raw; uniform 8-bit; uniform 4-bit; EWQ "8bit mixed"
  (blocks below the mean entropy at 8-bit) and "4bit/8bit mixed" (below the
  threshold at 4-bit too); FastEWQ "fast" and "fast train" (the shipped classifier's
  two forests), each as "8bit mixed" and "4bit/8bit mixed" (the highest predicted
  block at 4-bit, as in the paper's Table 8 rows for FastEWQ). Each is measured by
  MMLU (letter and cloze scoring, the paper's perplexity), perplexity on a text and
  KL divergence from the raw model on the same windows, and its size.
* Hugging Face encoders (MiniLM): raw, uniform 8-, 4- and 3-bit and the two EWQ
  mixes, written as compressed-tensors checkpoints, measured by the cosine of
  mean-pooled sentence embeddings to the raw model's.

Embedding and head stay as they are in every variant, so variants differ only in
their transformer blocks. Equal size: the same blocks at 8-bit, k of them at 4-bit,
the k chosen by entropy (EWQ), at random (several seeds), or by position alone
(highest exec_index first). Decoders take the k the paper's ladder reaches at
``budgets`` budgets between all-4-bit and all-8-bit; encoders every k. A plan met
twice is measured once.
"""

from __future__ import annotations

import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ewq import api
from ewq.analysis import decide
from ewq.config import BenchConfig
from ewq.errors import EwqError
from ewq.evaluate import tasks
from ewq.evaluate.backends import offload
from ewq.evaluate.data import load_mmlu, load_text
from ewq.evaluate.stats import paired
from ewq.fileio import fresh_dir
from ewq.formats import GGUF, HF, OutputFormat
from ewq.planfile import plan_doc
from ewq.planning import BlockSpec, Machine, block_specs, fit
from ewq.records import Analysis, BenchRecord
from ewq.reports.bench import write_bench, write_bench_encoder
from ewq.types import Container, Precision, Progress

__all__ = ["BenchConfig", "BenchVariant", "bench", "is_encoder", "paired"]


@dataclass
class BenchVariant:
    name: str
    table: str  # "table6" (EWQ and uniform) or "table7" (FastEWQ)
    precision: dict[int, Precision]
    metrics: dict[str, Any] = field(default_factory=dict)


def _key(precision: dict[int, Precision]) -> tuple:
    return tuple(sorted((i, p.value) for i, p in precision.items()))


def _counts(precision: dict[int, Precision]) -> str:
    n = {p: sum(1 for v in precision.values() if v is p) for p in Precision}
    return f"{n[Precision.RAW]} / {n[Precision.Q8]} / {n[Precision.Q4]}"


def _orders(analysis: Analysis, seeds: int) -> dict[str, list[int]]:
    blocks = [b.exec_index for b in analysis.layout.transformer_blocks]
    entropies = {b.exec_index: b.entropy for b in analysis.profile.transformer}
    orders = {
        "ewq (entropy)": list(decide(entropies).priority),
        "position (highest exec_index first)": sorted(blocks, reverse=True),
    }
    for s in range(seeds):
        order = list(blocks)
        random.Random(1000 + s).shuffle(order)
        orders[f"random seed {s}"] = order
    return orders


class _Decoder:
    """GGUF decoders through llama.cpp: MMLU and the text against the raw model."""

    format = GGUF

    def __init__(self, source: str, cfg: BenchConfig):
        if cfg.mmlu is None:
            raise EwqError("--mmlu is required for decoders")
        # the data first: a missing file fails before minutes of work
        questions = load_mmlu(cfg.mmlu)
        self.text = load_text(cfg.text)
        self.source, self.cfg = source, cfg
        rng = random.Random(0)
        pick = sorted(
            rng.sample(range(len(questions)), min(cfg.questions, len(questions)))
        )
        self.questions = [questions[i] for i in pick]
        self.per_question: dict[str, list[float]] = {}

    def start(self, analysis: Analysis) -> None:
        from ewq.evaluate.reference import Reference

        if analysis.index.container != Container.GGUF:
            raise EwqError(
                f"{self.source}: ewq bench runs GGUF decoders (llama.cpp) and Hugging "
                "Face encoders"
            )
        self.ref = Reference(
            Path(analysis.index.files[0]),
            self.text,
            ctx=self.cfg.ctx,
            windows=self.cfg.windows,
        )

    def variants(self, analysis: Analysis, blocks: list[int]) -> list[BenchVariant]:
        entropies = {b.exec_index: b.entropy for b in analysis.profile.transformer}
        d48 = decide(entropies, alpha=self.cfg.alpha)
        d8 = decide(entropies, alpha=self.cfg.alpha, variant="8bit")
        out = [
            BenchVariant("raw", "table6", dict.fromkeys(blocks, Precision.RAW)),
            BenchVariant("4bit", "table6", dict.fromkeys(blocks, Precision.Q4)),
            BenchVariant("8bit", "table6", dict.fromkeys(blocks, Precision.Q8)),
            BenchVariant("8bit mixed", "table6", dict(d8.precision)),
            BenchVariant("4bit/8bit mixed", "table6", dict(d48.precision)),
        ]
        feats = api.features(self.source)
        for method in ("fast", "fast-train"):
            predicted, decision, _ = api.fast_decision(feats, method, Precision.Q8)
            label = "fast" if method == "fast" else "fast train"
            out.append(BenchVariant(f"{label} 8bit mixed", "table7", dict(decision)))
            mixed = dict(decision)
            chosen = [i for i in blocks if predicted[i]]
            if chosen:
                mixed[max(chosen)] = Precision.Q4
            out.append(BenchVariant(f"{label} 4bit/8bit mixed", "table7", mixed))
        return out

    def measure(self, v: BenchVariant, q: api.Quantized) -> dict[str, Any]:
        from ewq.evaluate.backends import LlamaCppModel
        from ewq.evaluate.reference import text_metrics

        model = LlamaCppModel(q.out, max(self.cfg.ctx, 2048))
        mm = tasks.mmlu(model, self.questions)
        # the composite score's terms per question: correct - (-ln p(correct))
        self.per_question[v.name] = [
            d["correct"] - d["nll"] for d in mm["per_question"]
        ]
        blocks = set(v.precision)
        return {
            "mmlu_accuracy": mm["accuracy"],
            "mmlu_perplexity": mm["paper_perplexity"],
            "mmlu_cloze_accuracy": mm["cloze_accuracy"],
            "blocks_bytes": sum(t.nbytes for t in q.targets if t.exec_index in blocks),
            "total_bytes": q.predicted_bytes,
            "file_bytes": q.file_bytes,
            "raw_8bit_4bit_blocks": _counts(v.precision),
        } | {f"text_{k}": val for k, val in text_metrics(model, self.ref).items()}

    def reuse(self, v: BenchVariant, same: BenchVariant) -> dict[str, Any]:
        self.per_question[v.name] = self.per_question[same.name]
        return dict(same.metrics)

    def sizes(
        self, analysis: Analysis, orders: dict[str, list[int]]
    ) -> list[tuple[dict[str, Any], str, dict[int, Precision]]]:
        """Per budget and order, the ladder's plan: every block starts at 8-bit and
        walks to 4-bit in the order's sequence, so at a budget each order quantizes
        the same number of blocks, only different ones."""
        layout = analysis.layout
        specs = {s.exec_index: s for s in block_specs(GGUF, layout)}
        blocks = [b.exec_index for b in layout.transformer_blocks]
        emb, head = layout.blocks[0].exec_index, layout.blocks[-1].exec_index

        def fixed(i: int) -> BlockSpec:  # embedding and head: raw whatever happens
            raw = specs[i].bytes[Precision.RAW]
            return BlockSpec(i, specs[i].num_parameters, dict.fromkeys(Precision, raw))

        # blocks between 4-bit and 8-bit only: raw is priced out of reach (a
        # quantized source's raw blocks can be smaller than their 8-bit re-encoding)
        capped = {
            i: BlockSpec(i, s.num_parameters, {**s.bytes, Precision.RAW: 10**18})
            for i, s in specs.items()
        }
        lo = sum(specs[i].bytes[Precision.Q4] for i in blocks)
        hi = sum(specs[i].bytes[Precision.Q8] for i in blocks)
        side = specs[emb].bytes[Precision.RAW] + specs[head].bytes[Precision.RAW]
        decision = dict.fromkeys(blocks, Precision.Q8)
        out = []
        for k in range(self.cfg.budgets):
            budget = int(side + lo + (hi - lo) * (k + 0.5) / self.cfg.budgets)
            for name, order in orders.items():
                machine = [Machine("m", budget)]
                r = fit(
                    [capped[i] for i in blocks],
                    fixed(emb),
                    fixed(head),
                    decision,
                    order,
                    machine,
                )
                if r.fits:
                    precision = {i: r.precision[i] for i in blocks}
                    out.append(({"budget_bytes": budget}, name, precision))
        return out

    def measure_size(self, q: api.Quantized) -> dict[str, Any]:
        from ewq.evaluate.backends import LlamaCppModel
        from ewq.evaluate.reference import text_metrics

        m = text_metrics(LlamaCppModel(q.out, self.cfg.ctx), self.ref)
        keep = ("kl_mean", "kl_p99", "top1_agreement", "perplexity")
        return {k: m[k] for k in keep}

    def result(self, variants: list[BenchVariant]) -> dict[str, Any]:
        return {
            "kind": "ewq-bench",
            "variants": [
                {"variant": v.name, "table": v.table, **v.metrics} for v in variants
            ],
            "fast_vs_fast_train": paired(self.per_question),
        }

    write = staticmethod(write_bench)


class _Encoder:
    """Hugging Face encoders through transformers: embedding cosine to the raw model."""

    format = HF

    def __init__(self, source: str, cfg: BenchConfig):
        self.text = load_text(cfg.text)
        self.source, self.cfg = source, cfg

    def start(self, analysis: Analysis) -> None:
        from ewq.evaluate.backends import TransformersEncoder

        if analysis.index.container != "safetensors":
            raise EwqError(
                f"{self.source}: the encoder bench reads a Hugging Face folder"
            )
        self.reference = TransformersEncoder(Path(analysis.index.files[0]).parent)

    def variants(self, analysis: Analysis, blocks: list[int]) -> list[BenchVariant]:
        entropies = {b.exec_index: b.entropy for b in analysis.profile.transformer}
        uniform = [
            (name, dict.fromkeys(blocks, p))
            for name, p in (
                ("raw", Precision.RAW),
                ("8bit", Precision.Q8),
                ("4bit", Precision.Q4),
                ("3bit", Precision.Q3),
            )
        ]
        mixed = [
            ("8bit mixed", dict(decide(entropies, variant="8bit").precision)),
            ("4bit/8bit mixed", dict(decide(entropies).precision)),
        ]
        return [BenchVariant(n, "encoder", p) for n, p in uniform + mixed]

    def _fidelity(self, q: api.Quantized) -> dict[str, Any]:
        from ewq.evaluate.backends import TransformersEncoder

        other = TransformersEncoder(q.out)
        return tasks.embedding_fidelity(
            self.reference, other, self.text, limit=self.cfg.sentences
        )

    def measure(self, v: BenchVariant, q: api.Quantized) -> dict[str, Any]:
        counts = {p.value: list(v.precision.values()).count(p) for p in Precision}
        blocks = ", ".join(f"{c} {p}" for p, c in counts.items() if c)
        return {"blocks": blocks, "total_bytes": q.predicted_bytes} | self._fidelity(q)

    def reuse(self, v: BenchVariant, same: BenchVariant) -> dict[str, Any]:
        counts = {p.value: list(v.precision.values()).count(p) for p in Precision}
        blocks = ", ".join(f"{c} {p}" for p, c in counts.items() if c)
        return dict(same.metrics) | {"blocks": blocks}

    def sizes(
        self, analysis: Analysis, orders: dict[str, list[int]]
    ) -> list[tuple[dict[str, Any], str, dict[int, Precision]]]:
        """Every k: k blocks at 4-bit, the others at 8-bit (every block has the same
        size, so each k is one size)."""
        blocks = [b.exec_index for b in analysis.layout.transformer_blocks]
        out = []
        for k in range(1, len(blocks)):
            for name, order in orders.items():
                first = set(order[:k])
                precision = {
                    i: Precision.Q4 if i in first else Precision.Q8 for i in blocks
                }
                out.append(({}, name, precision))
        return out

    def measure_size(self, q: api.Quantized) -> dict[str, Any]:
        return self._fidelity(q)

    def result(self, variants: list[BenchVariant]) -> dict[str, Any]:
        return {
            "kind": "ewq-bench-encoder",
            "sentences": self.cfg.sentences,
            "text": str(self.cfg.text),
            "variants": [{"variant": v.name, **v.metrics} for v in variants],
        }

    write = staticmethod(write_bench_encoder)


def is_encoder(source: str | Path) -> bool:
    """A Hugging Face folder of an encoder (no causal or generation head)?"""
    index = api.inspect(source).index
    archs = " ".join(index.config.get("architectures") or [])
    return index.container == "safetensors" and not any(
        k in archs for k in ("CausalLM", "LMHead", "ConditionalGeneration")
    )


class _Writer:
    """Writes a plan of block precisions as the judge's format, into a scratch folder."""

    def __init__(self, source: str, form: OutputFormat, n: int, tmp: Path):
        self.source, self.format, self.n, self.tmp = source, form, n, tmp

    def __call__(self, name: str, precision: dict[int, Precision], *sides):
        out = fresh_dir(self.tmp / f"{name}{self.format.suffix}")
        doc = plan_doc(self.n, precision, *sides)
        return api.quantize(self.source, doc, out, format=self.format.name)


def _measure_variants(judge, variants: list[BenchVariant], write: _Writer, step):
    """Each variant written and measured; a plan met twice (FastEWQ's forests often
    agree) is measured once."""
    measured: dict[tuple, BenchVariant] = {}
    for v in variants:
        same = measured.get(_key(v.precision))
        if same is not None:
            v.metrics = judge.reuse(v, same)
        else:
            v.metrics = judge.measure(v, write("v", v.precision))
            measured[_key(v.precision)] = v
        step(f"variant {v.name}")


def _measure_sizes(judge, sizes, write: _Writer, step) -> list[dict[str, Any]]:
    """The equal-size comparison: each order's blocks at 4-bit, embedding and head
    raw; a point met by two orders is measured once."""
    points: dict[tuple, dict[str, Any]] = {}
    comparison = []
    for key, order, precision in sizes:
        if _key(precision) not in points:
            q = write("eq", precision, Precision.RAW, Precision.RAW)
            points[_key(precision)] = {
                "bytes": q.predicted_bytes,
                "blocks_4bit": sum(1 for p in precision.values() if p is Precision.Q4),
            } | judge.measure_size(q)
        point = key | {"order": order} | points[_key(precision)]
        comparison.append(point)
        step(f"equal size, {point['blocks_4bit']} blocks at 4-bit, {order}")
    return comparison


def bench(
    source: str,
    cfg: BenchConfig,
    out_dir: str | Path,
    *,
    progress: Progress | None = None,
) -> BenchRecord:
    """Run every variant and the equal-size comparison; write the results folder
    (nothing is written until every measurement is in). ``progress(done, total,
    what)`` follows the steps."""
    with offload(cfg.gpu_layers):
        return _benched(source, cfg, out_dir, progress)


def _benched(source, cfg: BenchConfig, out_dir, progress) -> BenchRecord:
    judge = (_Encoder if is_encoder(source) else _Decoder)(source, cfg)
    analysis = api.analyze(source, alpha=cfg.alpha)
    judge.start(analysis)
    blocks = [b.exec_index for b in analysis.layout.transformer_blocks]
    n = len(blocks)
    variants = judge.variants(analysis, blocks)
    sizes = judge.sizes(analysis, _orders(analysis, cfg.seeds))
    total, done = len(variants) + len(sizes), 0

    def step(what: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total, what)

    with tempfile.TemporaryDirectory(prefix="ewq-bench-") as tmp:
        written = _Writer(source, judge.format, n, Path(tmp))
        _measure_variants(judge, variants, written, step)
        comparison = _measure_sizes(judge, sizes, written, step)
    result = BenchRecord(
        source=str(source),
        model_name=api.features(source).model_name,
        config=cfg,
        equal_size=comparison,
        **judge.result(variants),
    )
    judge.write(result, Path(out_dir))
    return result
