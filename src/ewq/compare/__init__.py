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
from pathlib import Path
from typing import Any

from ewq import api
from ewq.calibration.text import token_cap
from ewq.compare._common import Log, _counts, _doc
from ewq.compare._encoder import compare_encoder
from ewq.compare._plans import _plans
from ewq.compare._plans import _shared as _shared  # tests/test_bench.py
from ewq.config import IMATRIX_PRESETS, PRESETS, CompareConfig
from ewq.errors import EwqError
from ewq.evaluate.backends import offload
from ewq.evaluate.data import load_text
from ewq.formats import tensor_bytes
from ewq.imatrix import Imatrix, write_imatrix
from ewq.reports.compare import write_compare
from ewq.sampling import chosen
from ewq.sensitivity import Sensitivity
from ewq.sources.hub import is_remote
from ewq.types import Container, Precision

__all__ = ["IMATRIX_PRESETS", "PRESETS", "compare", "compare_encoder"]

CRITERIA = ("kl", "error", "entropy", "position", "random")


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
    imatrices = [None] + ([imatrix] if imatrix is not None else [])
    for preset in presets:
        for m_ in imatrices:
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
    with offload(config.gpu_layers):
        return _compared(source, out_dir, config, log)


def _compared(source, out_dir, config: CompareConfig, log: Log) -> dict[str, Any]:
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
    if index.container != Container.GGUF:
        raise EwqError(
            f"{source}: ewq compare runs GGUF decoders (use compare_encoder)"
        )
    path = Path(index.files[0])
    im = None
    if cfg.imatrix is not None:
        im = api.load_imatrix(cfg.imatrix, index, layout, source)
    elif cfg.calibration is not None:
        log("importance matrix of the calibration text (cached after the first run)")
        im = api.imatrix(
            source,
            cfg.calibration,
            documents=cfg.documents.value,
            tokens=token_cap(cfg.calibration_tokens, index),
        )
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
        "calibration_tokens": cfg.calibration_tokens,
        "documents": cfg.documents,
        "rounding": "gptq",
    }


def _options(cfg: CompareConfig) -> dict[str, dict[str, Any]]:
    """`ewq plan`'s options for the error (data-free) and kl (calibrated) plans."""
    error = {"criterion": "error", "context": 0, "sample": cfg.sample}
    out: dict[str, dict[str, Any]] = {"ewq error": error}
    if cfg.calibration is not None and "kl" in cfg.criteria_list():
        out["ewq kl"] = {
            "criterion": "kl",
            "context": 0,
            "calibration": cfg.calibration,
            "imatrix": cfg.imatrix,
            "probe_tokens": cfg.calib_tokens,
            "calibration_tokens": cfg.calibration_tokens,
            "calibration_ctx": cfg.calib_ctx,
            "documents": cfg.documents,
            "type_probes": cfg.type_probes,
            "probes": cfg.probes,
            "sample": cfg.sample,
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
        # the error pass's share of rows (None: ewq.sampling's default)
        "error_sample": cfg.sample,
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
    sample = chosen(cfg.sample, is_remote(source))
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
                probes=cfg.probes,
                sample=sample,
            )
            continue
        sample_c = sample if c == "error" else None
        sens[f"ewq {c}"] = api.sensitivity(
            source, c, analysis=analysis, sample=sample_c
        )
    return sens
