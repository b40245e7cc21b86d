"""`ewq compare`: ewq's plans against what a user would do otherwise, at equal bytes.

GGUF decoders: llama.cpp's own presets (Q8_0 ... Q2_K), made from the same source
by llama.cpp's quantizer as shipped (its per-tensor mixtures, no importance matrix),
against ewq plans whose budget is each preset's exact tensor bytes, one per
criterion (entropy, error, kl, random with several seeds, position; all through the
optimal allocator) and the paper's ladder. Every model is measured on the same
windows of an evaluation text (the calibration text of the kl criterion is another
text): KL divergence from the source model (mean and 99th percentile), top-1
agreement and perplexity.

Hugging Face encoders (MiniLM): uniform 8-, 4- and 3-bit checkpoints against the
criteria's plans at the same bytes, by the cosine of mean-pooled embeddings.

A plan that keeps every block raw is the source itself, byte for byte: it is not
written and measured again; it gets the source's own figures (KL 0). A plan equal
to one already measured (criteria often agree) is measured once.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ewq import api
from ewq.errors import EwqError
from ewq.evaluate.data import load_text
from ewq.evaluate.reference import Reference, text_metrics
from ewq.fileio import fresh_dir
from ewq.formats import tensor_bytes
from ewq.planfile import plan_doc
from ewq.planning import Machine, Option, block_specs, fit, fit_optimal
from ewq.reports.compare import write_compare, write_compare_encoder
from ewq.sensitivity import CRITERIA, Sensitivity
from ewq.types import Precision

__all__ = ["PRESETS", "compare", "compare_encoder"]

PRESETS = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_K_S", "Q3_K_M", "Q3_K_S", "Q2_K")
Log = Callable[[str], None]


def _doc(layout, precision: dict[int, Precision]) -> dict[str, Any]:
    n = layout.num_blocks
    doc = plan_doc(n, {i: precision[i] for i in range(2, n + 2)})
    doc["embedding"] = {"precision": precision[1].value}
    doc["head"] = {"precision": precision[n + 2].value}
    return doc


def _sensitivities(
    source: str, analysis: Any, criteria: Sequence[str], seeds: int
) -> dict[str, Sensitivity]:
    """The data-free criteria by name, random once per seed (kl is the caller's)."""
    sens = {
        c: api.sensitivity(source, c, analysis=analysis)
        for c in ("entropy", "error", "position")
        if c in criteria
    }
    for k in range(seeds if "random" in criteria else 0):
        sens[f"random seed {k}"] = api.sensitivity(source, "random", seed=k)
    return sens


def _optimal(
    sens: Sensitivity, specs: dict, params: dict[int, int], budget: int
) -> dict[int, Precision] | None:
    """The optimal allocator's plan for one machine of ``budget`` bytes."""
    options = {
        i: [Option(p, b, sens.damage[i][p]) for p, b in specs[i].bytes.items()]
        for i in specs
    }
    r = fit_optimal(options, params, [Machine("m", budget)])
    return dict(r.precision) if r.fits else None


def _counts(precision: dict[int, Precision], blocks: Sequence[int]) -> str:
    n: dict[str, int] = {}
    for i in blocks:
        n[precision[i].value] = n.get(precision[i].value, 0) + 1
    return ", ".join(f"{c} {p}" for p, c in n.items())


def compare(
    source: str,
    text: Path,
    calibration: Path,
    out_dir: str | Path,
    *,
    windows: int = 8,
    ctx: int = 512,
    seeds: int = 3,
    presets: Sequence[str] = PRESETS,
    calib_windows: int = 4,
    calib_ctx: int = 256,
    extra: int = 3,
    criteria: Sequence[str] = CRITERIA,
    log: Log = lambda message: None,
) -> dict[str, Any]:
    """Run the head-to-head and write ``out_dir`` (compare.json, README.md, plot);
    ``extra`` more budgets, evenly between the smallest size ewq can reach and the
    smallest preset, compare the criteria where no preset exists."""
    from ewq.evaluate.backends import LlamaCppModel
    from ewq.quant.gguf import quantize_preset
    from ewq.sources.gguf import read_header

    started = time.perf_counter()
    unknown = sorted(set(criteria) - set(CRITERIA))
    if unknown:
        raise EwqError(
            f"unknown criterion {', '.join(unknown)} (one of {', '.join(CRITERIA)})"
        )
    eval_text = load_text(text)
    load_text(calibration)  # fail early
    analysis = api.analyze(source)
    index, layout = analysis.index, analysis.layout
    if index.format != "gguf":
        raise EwqError(
            f"{source}: ewq compare runs GGUF decoders (use compare_encoder)"
        )
    path = Path(index.files[0])
    specs = {s.exec_index: s for s in block_specs("gguf", layout)}
    params = {i: s.num_parameters for i, s in specs.items()}
    blocks = [b.exec_index for b in layout.transformer_blocks]
    source_bytes = sum(s.bytes[Precision.RAW] for s in specs.values())
    sens = _sensitivities(source, analysis, criteria, seeds)
    if "kl" in criteria:
        log("kl criterion (cached after the first run)")
        sens["kl"] = api.sensitivity(
            source, "kl", calibration=calibration, windows=calib_windows, ctx=calib_ctx
        )
    ref = Reference(path, eval_text, ctx=ctx, windows=windows)
    raw_metrics = text_metrics(ref.model, ref)
    del ref.model
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ewq-compare-") as tmp:
        out = Path(tmp) / "m.gguf"
        sizes = []
        for preset in presets:
            types = quantize_preset(path, preset, out)
            nbytes = sum(
                tensor_bytes(shape, qtype)
                for _, shape, qtype, _ in read_header(out).tensors
            )
            sizes.append((preset, nbytes))
            model = LlamaCppModel(out, ctx)
            m = text_metrics(model, ref)
            del model
            mix = {}
            for t in types.values():
                mix[t] = mix.get(t, 0) + 1
            rows.append(
                {
                    "size_of": preset,
                    "plan": f"llama.cpp {preset}",
                    "bytes": nbytes,
                    "blocks": ", ".join(f"{c} {t}" for t, c in sorted(mix.items())),
                    **m,
                }
            )
            log(f"{preset}: {nbytes / 1e6:.2f} MB, KL {m['kl_mean']:.4f}")
        # below the smallest preset, budgets no preset offers: where the criteria
        # must choose among blocks, not only the embedding
        floor = sum(min(s.bytes.values()) for s in specs.values())
        low = min((b for _, b in sizes), default=source_bytes)
        for k in range(extra, 0, -1):
            budget = floor + (low - floor) * k // (extra + 1)
            sizes.append((f"{budget / 1e6:.1f} MB", budget))
        measured: dict[int, list[dict[str, Any]]] = {}  # budget -> rows
        seen: dict[tuple, dict[str, float]] = {}  # plan -> its metrics
        for preset, budget in sizes:
            if budget in measured:  # two presets of one size (fallbacks): same plans
                rows += [{**r, "size_of": preset} for r in measured[budget]]
                continue
            first = len(rows)
            plans: dict[str, dict[int, Precision] | None] = {}
            for name, s in sens.items():
                plans[f"ewq {name}"] = _optimal(s, specs, params, budget)
            d = analysis.decision
            emb, head = layout.blocks[0].exec_index, layout.blocks[-1].exec_index
            r = fit(
                [specs[i] for i in blocks],
                specs[emb],
                specs[head],
                d.precision,
                d.priority,
                [Machine("m", budget)],
            )
            plans["paper ladder (entropy)"] = dict(r.precision) if r.fits else None
            for name, precision in plans.items():
                if precision is None:
                    rows.append({"size_of": preset, "plan": name, "bytes": None})
                    continue
                nbytes = sum(specs[i].bytes[precision[i]] for i in specs)
                key = tuple(sorted((i, p.value) for i, p in precision.items()))
                if all(p is Precision.RAW for p in precision.values()):
                    m = dict(raw_metrics)
                elif key in seen:  # the same plan at another budget: same file
                    m = dict(seen[key])
                else:
                    api.quantize(source, _doc(layout, precision), out)
                    model = LlamaCppModel(out, ctx)
                    m = seen[key] = text_metrics(model, ref)
                    del model
                rows.append(
                    {
                        "size_of": preset,
                        "plan": name,
                        "bytes": nbytes,
                        "blocks": _counts(precision, [1, *blocks]),
                        **m,
                    }
                )
                log(
                    f"  at {preset} {name}: {nbytes / 1e6:.2f} MB, KL {m['kl_mean']:.4f}"
                )
            measured[budget] = rows[first:]
    result = {
        "schema_version": 1,
        "kind": "ewq-compare",
        "source": source,
        "model_name": api.features(source).model_name,
        "source_tensor_bytes": source_bytes,
        "eval": {"text": Path(text).name, "windows": windows, "ctx": ctx},
        "calibration": {
            "text": Path(calibration).name,
            "windows": calib_windows,
            "ctx": calib_ctx,
        },
        "criterion_seconds": {k: v.seconds for k, v in sens.items()},
        "source_metrics": raw_metrics,
        "rows": rows,
        "seconds": time.perf_counter() - started,
    }
    write_compare(result, Path(out_dir))
    return result


def compare_encoder(
    source: str,
    text: Path,
    out_dir: str | Path,
    *,
    sentences: int = 128,
    seeds: int = 3,
    log: Log = lambda message: None,
) -> dict[str, Any]:
    """Hugging Face encoders: uniform 8-, 4- and 3-bit checkpoints against each
    criterion's plan at the same bytes, by embedding cosine to the source."""
    from ewq.bench import is_encoder
    from ewq.evaluate import tasks
    from ewq.evaluate.backends import TransformersEncoder

    started = time.perf_counter()
    if not is_encoder(source):
        raise EwqError(f"{source}: not a Hugging Face encoder folder")
    sentences_text = load_text(text)
    analysis = api.analyze(source)
    layout = analysis.layout
    folder = Path(analysis.index.files[0]).parent
    specs = {s.exec_index: s for s in block_specs("hf", layout)}
    params = {i: s.num_parameters for i, s in specs.items()}
    blocks = [b.exec_index for b in layout.transformer_blocks]
    sens = _sensitivities(
        source, analysis, ("entropy", "error", "position", "random"), seeds
    )
    reference = TransformersEncoder(folder)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ewq-compare-") as tmp:

        def measure(name: str, size_of: str, precision: dict[int, Precision]) -> None:
            nbytes = sum(specs[i].bytes[precision[i]] for i in specs)
            out = fresh_dir(Path(tmp) / "m")
            api.quantize(source, _doc(layout, precision), out, format="hf")
            m = tasks.embedding_fidelity(
                reference, TransformersEncoder(out), sentences_text, limit=sentences
            )
            rows.append(
                {
                    "size_of": size_of,
                    "plan": name,
                    "bytes": nbytes,
                    "blocks": _counts(precision, [1, *blocks]),
                    **m,
                }
            )
            log(
                f"  at {size_of} {name}: {nbytes / 1e6:.2f} MB, cosine {m['cosine_mean']:.5f}"
            )

        for p in (Precision.Q8, Precision.Q4, Precision.Q3):
            uniform = {i: (p if i in blocks else Precision.RAW) for i in specs}
            budget = sum(specs[i].bytes[uniform[i]] for i in specs)
            label = f"uniform {p.value}"
            measure(label, label, uniform)
            for name, sv in sens.items():
                precision = _optimal(sv, specs, params, budget)
                if precision is not None:
                    measure(f"ewq {name}", label, precision)
    result = {
        "schema_version": 1,
        "kind": "ewq-compare-encoder",
        "source": source,
        "model_name": api.features(source).model_name,
        "sentences": sentences,
        "rows": rows,
        "seconds": time.perf_counter() - started,
    }
    write_compare_encoder(result, Path(out_dir), Path(text).name)
    return result
