"""Writing a model quantized block by block as a plan says (GGUF or Hugging Face)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ewq.api._gptq import calibrated, gptq_then, rounds, staged
from ewq.api._sensitivity import own_text
from ewq.arch import resolve
from ewq.config import Format, QuantizeConfig, configure
from ewq.errors import EwqError
from ewq.evaluate.backends import offload
from ewq.formats import FORMATS, OutputFormat, hook, output_format
from ewq.imatrix import Imatrix, read_imatrix
from ewq.outputs import check_output
from ewq.planfile import Plan, load_plan, plan_from_doc
from ewq.quant.targets import (
    check_plan,
    llama_quantize_args,
    plan_targets,
)
from ewq.records import Quantized
from ewq.sources import open_source
from ewq.stages import stage
from ewq.types import Progress

log = logging.getLogger("ewq.api")

__all__ = ["quantize"]


def quantize(
    source: str | Path,
    plan: Plan | dict | str | Path,
    out: str | Path,
    config: QuantizeConfig | None = None,
    *,
    record: Callable[[Quantized], None] | None = None,
    progress: Progress | None = None,
    **options,
) -> Quantized:
    """Write ``source`` quantized block by block as ``plan`` says, in ``format``
    (default: the format the plan was sized for, else gguf). Options are
    :class:`ewq.config.QuantizeConfig`'s (format, threads, force, and the hub's
    revision and file), as a record or as keywords.

    The plan is checked against the model before anything is written; the output
    appears atomically (temporary file, then rename) or not at all. An output that
    would overwrite an input, or an existing folder, is refused (ewq.outputs);
    ``force`` replaces an earlier ewq output folder. The provenance record
    (``OUT.ewq.json``) is written after the output is checked and before it is
    renamed into place, so a model never sits beside a missing or stale one; then
    ``record(result)``, if given.
    """
    cfg = configure(QuantizeConfig, config, options)
    source = cfg.spec(source)
    cfg = own_text(cfg, source, progress)
    plan_path = plan if isinstance(plan, (str, Path)) else None
    plan = _read_plan(plan)
    form = _output_format(cfg, plan)
    out = Path(out)
    # a hub id is downloaded into the hub cache: quantizing reads every weight
    with open_source(source, download=True, revision=cfg.revision) as src:
        index = src.index
        layout = resolve(index)
    check_plan(plan, layout, str(source))
    imatrix = _plan_imatrix(plan, cfg.imatrix, plan_path)
    if imatrix is not None and not form.calibrated:
        raise EwqError(f"an importance matrix is for {_calibrated_formats()}")
    inputs = (*index.files, plan_path, str(source))
    check_output(out, inputs, folder=form.folder, force=cfg.force)
    _check_offered(plan, form)
    rounds(cfg, form)  # one line now, before anything is written
    recorded = _with_provenance(out, inputs, record)
    job = _Job(source, plan, form, out, cfg, recorded, progress)
    with offload(cfg.gpu_layers):  # GPTQ's passes over the calibration text
        return hook(form.writer)(job, index, layout, imatrix)


def _calibrated_formats() -> str:
    """``GGUF files (--format gguf)``: the formats whose quantizer takes one."""
    forms = [f for f in FORMATS.values() if f.calibrated]
    return " or ".join(f"{f.label} (--format {f.name})" for f in forms)


def write_gguf(job: _Job, index, layout, imatrix: Imatrix | None) -> Quantized:
    """The GGUF format's writer (ewq.formats): a GGUF source as it is; a Hugging
    Face checkpoint converted by llama.cpp's converter first (the plan's scratch
    conversion when this process made one, else a temporary file beside the
    output)."""
    from ewq.quant.convert import converted, held_conversion

    if not job.form.needs_conversion(index.container):
        return _quantize_gguf(job, index, layout, imatrix)
    source, plan = job.source, job.plan
    shown = f"{Path(str(source)).name}-converted.gguf"
    with held_conversion(index) as held:
        if held is not None:  # planned in this process: converted already
            check_plan(plan, held[1], str(source))
            return _quantize_gguf(job, *held, imatrix, shown)
    with converted(source, index, layout, job.out.parent) as (index, layout):
        check_plan(plan, layout, str(source))
        return _quantize_gguf(job, index, layout, imatrix, shown)


@dataclass(frozen=True)
class _Job:
    """What one `ewq quantize` writes, from what, and whom it tells."""

    source: str | Path
    plan: Plan
    form: OutputFormat
    out: Path
    cfg: QuantizeConfig
    record: Callable[[Quantized], None]
    progress: Progress | None


def _read_plan(plan: Plan | dict | str | Path) -> Plan:
    if isinstance(plan, (str, Path)):
        return load_plan(plan)
    if isinstance(plan, dict):
        return plan_from_doc(plan)
    return plan


def _output_format(cfg: QuantizeConfig, plan: Plan) -> OutputFormat:
    """The format the plan was sized for, unless told otherwise (then a warning:
    the sizes will differ)."""
    form = output_format(cfg.format or plan.format or Format.GGUF)
    if plan.format is not None and plan.format != form.name:
        log.warning(
            "the plan sized its blocks as %s; writing %s, the sizes will differ",
            plan.format,
            form.name,
        )
    return form


def _check_offered(plan: Plan, form: OutputFormat) -> None:
    """One line when the plan asks for a precision the format does not offer."""
    wanted = {b.precision for b in plan.blocks} | {
        plan.embedding.precision,
        plan.head.precision,
    }
    missing = sorted(p.value for p in wanted - set(form.offered()))
    if missing:
        raise EwqError(
            f"the {form.name} format does not offer {', '.join(missing)} (it offers "
            f"{', '.join(p.value for p in form.offered())})"
        )


def _with_provenance(out: Path, inputs, record):
    """``record`` preceded by writing the provenance record beside the output
    (``OUT.ewq.json``: ewq's version, the source, the plan, every tensor's type, the
    equivalent llama-quantize command), before the output is renamed into place."""
    from ewq import __version__
    from ewq.fileio import atomic_write_text
    from ewq.reports.quantize import provenance_json, provenance_path

    path = provenance_path(out)
    check_output(path, inputs)

    def write(q: Quantized) -> None:
        doc = provenance_json(q, __version__)
        atomic_write_text(path, json.dumps(doc, indent=2) + "\n")
        if record is not None:
            record(q)

    return write


def _plan_imatrix(plan: Plan, given: Path | None, plan_path) -> Imatrix | None:
    """The importance matrix to quantize with: ``given`` (--imatrix), else the one
    the plan records, found where it says (beside the plan file); one error line when
    the plan needs one that cannot be found, or a given one is not the plan's."""
    rec = plan.imatrix
    if given is not None:
        m = read_imatrix(given)
        if rec is not None and m.digest() != rec.sha256:
            raise EwqError(
                f"{given} is not the importance matrix the plan was made with "
                f"(sha256 {rec.sha256[:12]}...); quantize with that one"
            )
        return m
    if rec is None:
        return None
    where: list[Path] = []
    if rec.file:
        f = Path(rec.file)
        if plan_path is not None and not f.is_absolute():
            where.append(Path(plan_path).parent / f)  # beside the plan first
        where.append(f)
    for f in where:
        if f.is_file():
            m = read_imatrix(f)
            if m.digest() == rec.sha256:
                return m
    raise EwqError(
        "the plan was made with an importance matrix "
        f"({rec.file or 'sha256 ' + rec.sha256[:12] + '...'}), which is not found: "
        "give it with --imatrix FILE"
    )


def _quantize_gguf(
    job: _Job, index, layout, imatrix: Imatrix | None, shown: str | None = None
) -> Quantized:
    """GGUF -> per-block quantized GGUF by llama.cpp's quantizer; ``shown`` names the
    input in the llama-quantize command recorded (a converted file is temporary).
    With a calibration text and GPTQ rounding, each quantized ``blk.*`` matrix is then
    re-rounded against its inputs' second moments (ewq.quant.gptq) before the file is
    committed."""
    from ewq.quant.gguf import quantize_gguf

    arch = index.config.get("general.architecture")
    declared = index.config.get(f"{arch}.block_count")
    if declared != layout.num_blocks:
        # llama.cpp asserts on a block count that disagrees with the tensors
        # (SIGABRT): refuse it here, in one line
        raise EwqError(
            f"{job.source}: its metadata declares {arch}.block_count = {declared!r}, but "
            f"its tensors hold {layout.num_blocks} blocks; llama.cpp cannot load it"
        )
    targets = plan_targets(job.form, index, layout, job.plan)
    path = index.files[0]
    cfg, progress = job.cfg, job.progress
    run = None
    if rounds(cfg, job.form):
        run = calibrated(index, cfg, cfg.threads, progress, _work_folder(job.out))
        imatrix = imatrix or run.imatrix
    args = tuple(
        llama_quantize_args(
            targets, shown or path, str(job.out), imatrix.file if imatrix else None
        )
    )
    commit, made = _recorder(job, targets, args)
    meta = _gguf_provenance(job.source, job.plan)
    with contextlib.ExitStack() as stack:
        if run is not None:
            path, holes = stack.enter_context(
                staged(index, targets, run, _work_folder(job.out))
            )
            commit = gptq_then(commit, index, run, cfg, progress, holes)
            meta["ewq.rounding"] = "gptq"
        with stage("writing", f"{len(targets)} tensors by llama.cpp's quantizer"):
            quantize_gguf(
                path,
                targets,
                job.out,
                threads=cfg.threads,
                progress=progress,
                before_commit=commit,
                metadata=meta,
                imatrix=imatrix,
            )
    return made[0]


def _work_folder(out) -> Path:
    """Where working copies of the model go: the output's folder, or the nearest
    one of its parents that exists (where the user expects big files; a system
    temp folder may be memory)."""
    folder = Path(out).absolute().parent
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    return folder


def _gguf_provenance(source, plan: Plan) -> dict[str, str]:
    """``ewq.*`` keys for the GGUF's own metadata, beside llama.cpp's ``general.*``:
    readable by anything that reads GGUF (the full record is PATH.ewq.json)."""
    from ewq import __version__

    counts: dict[str, int] = {}
    for b in plan.blocks:
        counts[b.precision.value] = counts.get(b.precision.value, 0) + 1
    doc = json.dumps(plan.to_doc(), sort_keys=True).encode()
    name = str(source)
    return {
        "ewq.version": __version__,
        "ewq.source": name if len(name.encode()) <= 127 else Path(name).name,
        "ewq.plan.method": plan.method,
        "ewq.plan.blocks": ", ".join(f"{n} {p}" for p, n in counts.items()),
        "ewq.plan.embedding": plan.embedding.precision.value,
        "ewq.plan.head": plan.head.precision.value,
        "ewq.plan.sha256": hashlib.sha256(doc).hexdigest(),
    }


def _recorder(job: _Job, targets, llama_quantize_args: tuple[str, ...] = ()):
    """The hook a quantizer calls between its check and its rename: the result
    record (types written, file bytes of the temporary output), handed to
    ``record`` before the output appears."""
    made: list[Quantized] = []
    fields = {
        "source": str(job.source),
        "out": job.out,
        "format": job.form,
        "plan": job.plan,
        "targets": tuple(targets),
        "predicted_bytes": sum(t.nbytes for t in targets),
        "llama_quantize_args": llama_quantize_args,
        "rounding": {},
    }

    def commit(tmp: Path, written: Mapping[str, object]) -> None:
        fields["rounding"] = dict(commit.rounding)
        files = [tmp] if tmp.is_file() else [f for f in tmp.iterdir() if f.is_file()]
        made.append(
            Quantized(
                written=dict(written),
                file_bytes=sum(f.stat().st_size for f in files),
                **fields,
            )
        )
        job.record(made[0])

    commit.rounding = {}  # filled by a rounding step before the commit
    return commit, made


def write_hf(job: _Job, index, layout, imatrix: Imatrix | None) -> Quantized:
    """The Hugging Face format's writer (ewq.formats): compressed-tensors from a
    Hugging Face model folder (it takes no importance matrix)."""
    from ewq.quant.hf import quantize_hf

    folder = Path(index.files[0]).parent
    if index.container != "safetensors" or not (folder / "config.json").is_file():
        raise EwqError(
            f"{job.source}: Hugging Face output needs a Hugging Face model folder "
            "(config.json and safetensors weights)"
        )
    targets = plan_targets(job.form, index, layout, job.plan)
    commit, made = _recorder(job, targets)
    from ewq import __version__
    from ewq.reports.card import hub_revision, model_card
    from ewq.sources.hub import is_hub_id, split_spec

    name = str(job.source)
    card = model_card(
        source=name,
        revision=job.cfg.revision or hub_revision(str(folder)),
        hub_id=split_spec(name)[0]
        if is_hub_id(name) and not Path(name).exists()
        else None,
        plan=job.plan,
        targets=targets,
        predicted_bytes=sum(t.nbytes for t in targets),
        ewq_version=__version__,
        record=f"{job.out.name}.ewq.json",
    )

    def typed(tmp: Path, written: Mapping[str, int]) -> None:  # bytes -> types
        commit(tmp, {t.name: t.type for t in targets if t.name in written})

    with stage("writing", f"{len(targets)} tensors as compressed-tensors"):
        quantize_hf(
            folder,
            targets,
            job.out,
            progress=job.progress,
            before_commit=typed,
            card=card,
        )
    return made[0]
