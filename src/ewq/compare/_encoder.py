"""`ewq compare` for encoders: uniform precisions against the criteria's plans at
the same bytes, by the cosine of sentence embeddings."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from ewq import api
from ewq.compare._common import Log, _counts, _doc
from ewq.errors import EwqError
from ewq.evaluate.data import load_text
from ewq.fileio import fresh_dir
from ewq.formats import HF
from ewq.planning import Machine
from ewq.reports.compare import write_compare_encoder
from ewq.sensitivity import Sensitivity
from ewq.types import Precision


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

    started = time.perf_counter()
    if not is_encoder(source):
        raise EwqError(f"{source}: not a Hugging Face encoder folder")
    sentences_text = load_text(text)
    analysis = api.analyze(source)
    reference = TransformersEncoder(Path(analysis.index.files[0]).parent)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ewq-compare-") as tmp:
        for name, size_of, doc, nbytes, types in _encoder_plans(
            source, analysis, seeds
        ):
            out = fresh_dir(Path(tmp) / "m")
            api.quantize(source, doc, out, format=HF.name)
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


def _encoder_plans(source: str, analysis, seeds: int):
    """Uniform 8-, 4- and 3-bit blocks, and at each one's bytes every criterion's
    per-tensor plan: (plan, the size it is held to, plan doc, bytes, types)."""
    from ewq.planning import block_specs

    layout = analysis.layout
    specs = {s.exec_index: s for s in block_specs(HF, layout)}
    blocks = [b.exec_index for b in layout.transformer_blocks]
    sens: dict[str, Sensitivity] = {
        f"ewq {c}": api.sensitivity(source, c, analysis=analysis)
        for c in ("error", "entropy", "position")
    }
    for k in range(seeds):
        sens[f"ewq random seed {k}"] = api.sensitivity(source, "random", seed=k)
    for p in (Precision.Q8, Precision.Q4, Precision.Q3):
        uniform = {i: (p if i in blocks else Precision.RAW) for i in specs}
        budget = sum(specs[i].bytes[uniform[i]] for i in specs)
        label = f"uniform {p.value}"
        yield label, label, _doc(layout, uniform), budget, label
        for name, sv in sens.items():
            r = api.fit_tensors(
                HF, layout, sv, None, None, [Machine("m", budget)], None, None
            )
            if r.fits:
                types = {n: str(o.precision) for n, o in r.tensors.items()}
                doc = _doc(layout, {i: Precision.RAW for i in specs})
                doc["tensors"] = [{"name": n, "type": t} for n, t in types.items()]
                yield name, label, doc, r.total_bytes, _counts(types)
