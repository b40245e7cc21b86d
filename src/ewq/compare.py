"""`ewq compare`: ewq's plans against what a user would do otherwise, at equal bytes.

GGUF decoders: llama.cpp's own presets (Q6_K ... IQ2_M), made from the same source
by llama.cpp's quantizer as shipped (its per-tensor mixtures), without an importance
matrix and, when one is given or computed, with the same importance matrix (presets
that need one only with it); against ewq plans whose budget is each preset's exact
tensor bytes, one per criterion (all through the per-tensor optimal allocator) and
the paper's ladder. Every model is measured on the same windows of an evaluation
text that neither the importance matrix nor the criterion saw: KL divergence from
the source model (mean and 99th percentile), top-1 agreement and perplexity.

Hugging Face encoders (MiniLM): uniform 8-, 4- and 3-bit checkpoints against the
criteria's plans at the same bytes, by the cosine of mean-pooled embeddings.

A plan that keeps every tensor as it is is the source itself, byte for byte: it is
not written and measured again; it gets the source's own figures (KL 0). A plan
equal to one already measured (criteria often agree) is measured once.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ewq import api
from ewq.config import IMATRIX_PRESETS, PRESETS, CompareConfig
from ewq.errors import EwqError
from ewq.evaluate.data import load_text
from ewq.fileio import fresh_dir
from ewq.formats import tensor_bytes
from ewq.imatrix import Imatrix, write_imatrix
from ewq.planfile import plan_doc
from ewq.planning import Machine, fit
from ewq.reports.compare import write_compare, write_compare_encoder
from ewq.reports.plan import predicted_kl
from ewq.sensitivity import Sensitivity
from ewq.types import Precision

__all__ = ["IMATRIX_PRESETS", "PRESETS", "compare", "compare_encoder"]

CRITERIA = ("kl", "error", "entropy", "position", "random")
Log = Callable[[str], None]


def _doc(layout, precision: dict[int, Precision]) -> dict[str, Any]:
    n = layout.num_blocks
    return plan_doc(
        n, {i: precision[i] for i in range(2, n + 2)}, precision[1], precision[n + 2]
    )


def _counts(types: dict[str, str]) -> str:
    n: dict[str, int] = {}
    for t in types.values():
        n[t] = n.get(t, 0) + 1
    return ", ".join(f"{c} {t}" for t, c in sorted(n.items(), key=lambda x: -x[1]))


class _Judge:
    """Writes and measures plans on the reference's windows; a plan met before is
    measured once; the source itself is not measured again."""

    def __init__(
        self, source, layout, ref, raw_metrics, tmp: Path, imatrix_path, gptq=None
    ):
        self.source, self.layout, self.ref = source, layout, ref
        self.raw = raw_metrics
        self.out = tmp / "m.gguf"
        self.imatrix_path = imatrix_path
        self.gptq = gptq  # `ewq quantize`'s calibration options for GPTQ rounding
        self.seen: dict[tuple, dict[str, float]] = {}

    def tensors(
        self, types: dict[str, str], with_imatrix: bool, gptq: bool = False
    ) -> dict[str, float]:
        from ewq.evaluate.backends import LlamaCppModel
        from ewq.evaluate.reference import text_metrics

        key = (tuple(sorted(types.items())), with_imatrix, gptq)
        if key in self.seen:
            return self.seen[key]
        doc = _doc(
            self.layout, {b.exec_index: Precision.RAW for b in self.layout.blocks}
        )
        doc["tensors"] = [{"name": n, "type": t} for n, t in types.items()]
        api.quantize(
            self.source,
            doc,
            self.out,
            imatrix=self.imatrix_path if with_imatrix else None,
            **(self.gptq if gptq else {"rounding": "nearest"}),
        )
        model = LlamaCppModel(self.out, self.ref.ctx)
        m = self.seen[key] = text_metrics(model, self.ref)
        del model
        return m


def _presets(path, presets, imatrix: Imatrix | None, judge, ref, log) -> list[dict]:
    from ewq.evaluate.backends import LlamaCppModel
    from ewq.evaluate.reference import text_metrics
    from ewq.quant.gguf import quantize_preset
    from ewq.sources.gguf import read_header

    rows = []
    variants = [None] + ([imatrix] if imatrix is not None else [])
    for preset in presets:
        for m_ in variants:
            if m_ is None and preset in IMATRIX_PRESETS:
                continue  # llama.cpp refuses it without an importance matrix
            types = quantize_preset(path, preset, judge.out, imatrix=m_)
            nbytes = sum(
                tensor_bytes(shape, qtype)
                for _, shape, qtype, _ in read_header(judge.out).tensors
            )
            model = LlamaCppModel(judge.out, ref.ctx)
            m = text_metrics(model, ref)
            del model
            name = f"llama.cpp {preset}" + (" + imatrix" if m_ is not None else "")
            rows.append(
                {
                    "size_of": preset,
                    "plan": name,
                    "bytes": nbytes,
                    "types": _counts(types),
                    **m,
                }
            )
            log(f"{name}: {nbytes / 1e6:.3f} MB, KL {m['kl_mean']:.5f}")
    return rows


def compare(
    source: str,
    out_dir: str | Path,
    config: CompareConfig,
    log: Log = lambda message: None,
) -> dict[str, Any]:
    """Run the head-to-head and write ``out_dir`` (compare.json, README.md, plot).
    With a calibration text and ``config.gptq``, the calibrated plan is also written
    as `ewq quantize --calibration` writes it (GPTQ rounding, row "ewq kl +
    GPTQ")."""
    from ewq.evaluate.reference import Reference, text_metrics

    started = time.perf_counter()
    cfg = config
    criteria = cfg.criteria_list()
    unknown = sorted(set(criteria) - set(CRITERIA))
    if unknown:
        raise EwqError(
            f"unknown criterion {', '.join(unknown)} (one of {', '.join(CRITERIA)})"
        )
    if "kl" in criteria and cfg.calibration is None:
        raise EwqError("the kl criterion needs --calibration TEXT")
    eval_text = load_text(cfg.text)
    analysis = api.analyze(source)
    index, layout = analysis.index, analysis.layout
    if index.format != "gguf":
        raise EwqError(
            f"{source}: ewq compare runs GGUF decoders (use compare_encoder)"
        )
    path = Path(index.files[0])
    im = None
    if cfg.imatrix is not None:
        im = api.load_imatrix(cfg.imatrix, index, layout, source)
    elif cfg.calibration is not None:
        log("importance matrix of the calibration text (cached after the first run)")
        im = api.imatrix(source, cfg.calibration, documents=cfg.documents.value)
    sens = _sensitivities(source, analysis, criteria, cfg, im, log)
    ref = Reference(
        path, eval_text, ctx=cfg.ctx, windows=cfg.windows, documents=cfg.documents
    )
    raw_metrics = text_metrics(ref.model, ref)
    del ref.model
    with tempfile.TemporaryDirectory(prefix="ewq-compare-") as tmp:
        imatrix_path = None
        if im is not None:
            imatrix_path = write_imatrix(im, Path(tmp) / "imatrix.gguf")
        judge = _Judge(
            source, layout, ref, raw_metrics, Path(tmp), imatrix_path, _gptq(cfg)
        )
        rows = _presets(path, cfg.presets_list(), im, judge, ref, log)
        rows += _plans(source, analysis, sens, im, rows, judge, log, _options(cfg))
    result = _record(source, index, cfg, im, ref) | {
        "criterion_seconds": {k: v.seconds for k, v in sens.items()},
        "source_metrics": raw_metrics,
        "rows": rows,
        "seconds": time.perf_counter() - started,
    }
    write_compare(result, Path(out_dir))
    return result


def _gptq(cfg: CompareConfig) -> dict[str, Any] | None:
    """`ewq quantize`'s options for GPTQ rounding on the calibration text."""
    if not cfg.gptq or cfg.calibration is None:
        return None
    return {
        "calibration": cfg.calibration,
        "calibration_ctx": cfg.calib_ctx,
        "documents": cfg.documents,
        "rounding": "gptq",
    }


def _options(cfg: CompareConfig) -> dict[str, dict[str, Any]]:
    """`ewq plan`'s options for the error (data-free) and kl (calibrated) plans."""
    out: dict[str, dict[str, Any]] = {"ewq error": {"criterion": "error", "context": 0}}
    if cfg.calibration is not None and "kl" in cfg.criteria_list():
        out["ewq kl"] = {
            "criterion": "kl",
            "context": 0,
            "calibration": cfg.calibration,
            "imatrix": cfg.imatrix,
            "calibration_tokens": cfg.calib_tokens,
            "calibration_ctx": cfg.calib_ctx,
            "documents": cfg.documents,
            "type_probes": cfg.type_probes,
        }
    return out


def _record(source, index, cfg: CompareConfig, im, ref) -> dict[str, Any]:
    """What the comparison was made of: the source, the texts and windows, the
    importance matrix."""
    return {
        "schema_version": 2,
        "kind": "ewq-compare",
        "source": source,
        "model_name": api.features(source).model_name,
        "source_tensor_bytes": sum(t.nbytes for t in index.tensors),
        "source_types": _counts({t.name: t.dtype for t in index.tensors}),
        "eval": {
            "text": Path(cfg.text).name,
            "windows": len(ref.seqs),
            "ctx": cfg.ctx,
            "documents": cfg.documents.value,
            "tokens": int(sum(len(s) for s in ref.seqs)),
        },
        "calibration": {
            "text": Path(cfg.calibration).name if cfg.calibration else None,
            "tokens": cfg.calib_tokens,
            "ctx": cfg.calib_ctx,
        },
        "imatrix": None
        if im is None
        else {
            "file": str(cfg.imatrix) if cfg.imatrix else None,
            "sha256": im.digest(),
            "chunks": im.chunk_count,
            "chunk_size": im.chunk_size,
        },
    }


def _sensitivities(
    source, analysis, criteria, cfg: CompareConfig, im, log
) -> dict[str, Sensitivity]:
    """The criteria by plan name (random once per seed). error is data-free (the user
    without calibration); kl is calibrated, with the importance matrix."""
    sens: dict[str, Sensitivity] = {}
    for c in criteria:
        if c == "random":
            for k in range(cfg.seeds):
                sens[f"ewq random seed {k}"] = api.sensitivity(source, "random", seed=k)
            continue
        if c == "kl":
            log("kl criterion (cached after the first run)")
            sens["ewq kl"] = api.sensitivity(
                source,
                "kl",
                calibration=cfg.calibration,
                imatrix=im,
                tokens=cfg.calib_tokens,
                ctx=cfg.calib_ctx,
                documents=cfg.documents.value,
                type_probes=cfg.type_probes,
            )
            continue
        sens[f"ewq {c}"] = api.sensitivity(source, c, analysis=analysis)
    return sens


def _plans(
    source, analysis, sens, im, preset_rows, judge, log, plan_options
) -> list[dict]:
    """ewq's plans at each preset's exact bytes: for the kl and error criteria,
    `ewq plan`'s own (``plan_options``), the others through the allocator."""
    layout = analysis.layout
    rows = []
    budgets: dict[int, list[str]] = {}
    for r in preset_rows:
        budgets.setdefault(r["bytes"], []).append(r["size_of"])
    ladder = _ladder_plans(analysis, budgets)
    for budget, names in sorted(budgets.items(), reverse=True):
        size_of = names[0]
        first = len(rows)
        for name, s in sens.items():
            uses = im if name == "ewq kl" else None
            machines = [Machine("m", budget)]
            predicted = None
            if name in plan_options:  # what `ewq plan` gives, measured selection too
                planned = api.plan(source, machines, **plan_options[name])
                r, predicted = planned.result, predicted_kl(planned)
            else:
                r = api.fit_tensors("gguf", layout, s, uses, None, machines, None, None)
            if not r.fits:
                rows.append(
                    {"size_of": size_of, "plan": name, "bytes": None, "budget": budget}
                )
                continue
            types = {n: str(o.precision) for n, o in r.tensors.items()}
            changed = {n: t for n, t in types.items() if t != _own(layout, n)}
            m = judge.raw if not changed else judge.tensors(types, uses is not None)
            rows.append(
                {
                    "size_of": size_of,
                    "plan": name,
                    "budget": budget,
                    "bytes": r.total_bytes,
                    "types": _counts(types),
                    "predicted_kl": predicted,
                    **m,
                }
            )
            log(
                f"  at {size_of} {name}: {r.total_bytes / 1e6:.3f} MB, "
                f"KL {m['kl_mean']:.5f} (predicted {r.damage:.5f})"
            )
            if uses is not None and judge.gptq is not None and changed:
                g = judge.tensors(types, True, gptq=True)
                rows.append({**rows[-1], "plan": f"{name} + GPTQ", **g})
                log(f"  at {size_of} {name} + GPTQ: KL {g['kl_mean']:.5f}")
        lad = ladder.get(budget)
        if lad is not None:
            m = judge.tensors(lad[1], False)
            rows.append(
                {
                    "size_of": size_of,
                    "plan": "paper ladder (entropy)",
                    "budget": budget,
                    "bytes": lad[0],
                    "types": _counts(lad[1]),
                    **m,
                }
            )
        rows += _shared(rows[first:], names)
    return rows


def _shared(planned: list[dict], names: list[str]) -> list[dict]:
    """Presets of the same bytes (SmolLM2's Q2_K falls back to Q3_K_S's types)
    share the plans made at that budget: each gets them under its own name."""
    others = [n for n in dict.fromkeys(names) if n != names[0]]
    return [{**r, "size_of": n} for n in others for r in planned]


def _own(layout, name: str) -> str:
    for b in layout.blocks:
        for t in b.tensors:
            if t.name == name:
                return t.dtype
    return ""


def _ladder_plans(analysis, budgets) -> dict[int, tuple[int, dict[str, str]]]:
    """The paper's Algorithm 1 at each budget: (bytes, per-tensor types)."""
    from ewq.formats import output_format
    from ewq.planning import block_specs

    layout = analysis.layout
    specs = {s.exec_index: s for s in block_specs("gguf", layout)}
    blocks = [b.exec_index for b in layout.transformer_blocks]
    emb, head = layout.blocks[0].exec_index, layout.blocks[-1].exec_index
    form = output_format("gguf")
    out = {}
    for budget in budgets:
        d = analysis.decision
        r = fit(
            [specs[i] for i in blocks],
            specs[emb],
            specs[head],
            d.precision,
            d.priority,
            [Machine("m", budget)],
        )
        if not r.fits:
            continue
        types = {}
        for b in layout.blocks:
            for info, key in zip(b.tensors, b.keys, strict=True):
                e = form.encoding(info, key, r.precision[b.exec_index])
                if e is not None and e.quantizable:
                    types[info.name] = e.type
        out[budget] = (r.total_bytes, types)
    return out


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
    criterion's per-tensor plan at the same bytes, by embedding cosine to the source."""
    from ewq.bench import is_encoder
    from ewq.evaluate import tasks
    from ewq.evaluate.backends import TransformersEncoder
    from ewq.planning import block_specs

    started = time.perf_counter()
    if not is_encoder(source):
        raise EwqError(f"{source}: not a Hugging Face encoder folder")
    sentences_text = load_text(text)
    analysis = api.analyze(source)
    layout = analysis.layout
    specs = {s.exec_index: s for s in block_specs("hf", layout)}
    blocks = [b.exec_index for b in layout.transformer_blocks]
    sens: dict[str, Sensitivity] = {
        f"ewq {c}": api.sensitivity(source, c, analysis=analysis)
        for c in ("error", "entropy", "position")
    }
    for k in range(seeds):
        sens[f"ewq random seed {k}"] = api.sensitivity(source, "random", seed=k)
    reference = TransformersEncoder(Path(analysis.index.files[0]).parent)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ewq-compare-") as tmp:

        def measure(
            name: str, size_of: str, doc: dict, nbytes: int, types: str
        ) -> None:
            out = fresh_dir(Path(tmp) / "m")
            api.quantize(source, doc, out, format="hf")
            m = tasks.embedding_fidelity(
                reference, TransformersEncoder(out), sentences_text, limit=sentences
            )
            rows.append(
                {"size_of": size_of, "plan": name, "bytes": nbytes, "types": types, **m}
            )
            log(
                f"  at {size_of} {name}: {nbytes / 1e6:.2f} MB, "
                f"cosine {m['cosine_mean']:.5f}"
            )

        for p in (Precision.Q8, Precision.Q4, Precision.Q3):
            uniform = {i: (p if i in blocks else Precision.RAW) for i in specs}
            budget = sum(specs[i].bytes[uniform[i]] for i in specs)
            label = f"uniform {p.value}"
            measure(label, label, _doc(layout, uniform), budget, label)
            for name, sv in sens.items():
                r = api.fit_tensors(
                    "hf", layout, sv, None, None, [Machine("m", budget)], None, None
                )
                if r.fits:
                    types = {n: str(o.precision) for n, o in r.tensors.items()}
                    doc = _doc(layout, {i: Precision.RAW for i in specs})
                    doc["tensors"] = [{"name": n, "type": t} for n, t in types.items()]
                    measure(name, label, doc, r.total_bytes, _counts(types))
    result = {
        "schema_version": 2,
        "kind": "ewq-compare-encoder",
        "source": source,
        "model_name": api.features(source).model_name,
        "sentences": sentences,
        "rows": rows,
        "seconds": time.perf_counter() - started,
    }
    write_compare_encoder(result, Path(out_dir), Path(text).name)
    return result
