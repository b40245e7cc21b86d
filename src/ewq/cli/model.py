"""The commands along one model's path: inspect, analyze, features, plan, quantize."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Annotated

import typer

from ewq import __version__
from ewq.cli.common import (
    SourceArg,
    app,
    configured,
    count_bar,
    err,
    out,
    outputs,
    progress_bar,
    write_json,
)
from ewq.config import AnalysisConfig, MakeConfig, PlanConfig, SourceConfig
from ewq.errors import EwqError, one_line
from ewq.fileio import atomic_write_text

#: the budget a plan is made for (`ewq plan`, and `ewq quantize` without --plan)
MemoryOpt = Annotated[
    str | None, typer.Option(help="One machine's memory, e.g. 8GB or 7.5GiB.")
]
DiskOpt = Annotated[
    str | None,
    typer.Option(help="Its free disk (capacity is the smaller of the two)."),
]
ClusterOpt = Annotated[
    Path | None,
    typer.Option(
        help="YAML file of machines (name, memory, disk, speed, host, reserve, "
        "memory_bandwidth, network, links)."
    ),
]
ReserveOpt = Annotated[
    str | None,
    typer.Option(
        help="Keep this much more free on every machine (other programs); the "
        "runtime's KV cache and buffers are counted by --context."
    ),
]
JsonOpt = Annotated[
    Path | None, typer.Option("--json", help="Write the result as JSON to this path.")
]


@app.command(
    epilog="Examples:\n\n  ewq inspect default\n\n  ewq inspect ./Llama-3.2-1B --json blocks.json"
    "\n\n  ewq inspect Qwen/Qwen2.5-7B   (reads config.json and headers only)"
)
@configured(SourceConfig)
def inspect(
    source: SourceArg,
    json_path: JsonOpt = None,
    verify: Annotated[
        bool,
        typer.Option(help="Also read every tensor once and check it for NaN and Inf."),
    ] = False,
    *,
    config: SourceConfig,
) -> None:
    """List a model's blocks (exec_index, tensors, parameters, bytes) without reading weights."""
    from ewq import api
    from ewq.reports.inspect import inspection_json, inspection_table

    outputs((source,), json_path=json_path)
    bar = progress_bar("reading tensors") if verify else contextlib.nullcontext(None)
    with bar as progress:
        result = api.inspect(source, config, verify=verify, progress=progress)
    out.print(inspection_table(result))
    if json_path is not None:
        write_json(json_path, inspection_json(result, __version__))


@app.command(
    epilog="Examples:\n\n  ewq analyze default --json analysis.json --plot entropy.png"
    "\n\n  ewq analyze ./Llama-3.2-1B --alpha 1.0 --variant 8bit"
    "\n\n  ewq analyze model.gguf --eps 0.01   (the paper's eps variant)"
)
@configured(AnalysisConfig)
def analyze(
    source: SourceArg,
    json_path: JsonOpt = None,
    plot: Annotated[
        Path | None,
        typer.Option(help="Write a PNG of entropy by block, with mean and threshold."),
    ] = None,
    *,
    config: AnalysisConfig,
) -> None:
    """Measure each block's weight entropy and decide raw / 8-bit / 4-bit per block (EWQ)."""
    from ewq import api
    from ewq.analysis.decision import check_alpha
    from ewq.reports.analysis import analysis_json, analysis_table, write_plot

    check_alpha(config.alpha)  # before reading a byte, so bad input costs nothing
    outputs((source,), json_path=json_path, plot=plot)
    with progress_bar("analysing") as progress:
        result = api.analyze(source, config, progress=progress)
    out.print(analysis_table(result))
    if json_path is not None:
        write_json(json_path, analysis_json(result, __version__))
    if plot is not None:
        write_plot(result, plot)
        err.print(f"wrote {plot}")


@app.command(
    epilog="Examples:\n\n  ewq features ./Llama-3.2-1B/config.json"
    "\n\n  ewq features Qwen/Qwen2.5-7B --json features.json   (headers only)"
)
@configured(SourceConfig, only=("revision", "file"))
def features(
    source: Annotated[
        str,
        typer.Argument(
            help="A config.json file, a model folder, a safetensors or GGUF file, "
            "a hub id, or 'default'."
        ),
    ],
    json_path: JsonOpt = None,
    analytic: Annotated[
        bool,
        typer.Option(
            help="Count parameters from config.json even where headers exist."
        ),
    ] = False,
    *,
    config: SourceConfig,
) -> None:
    """FastEWQ's features per transformer block (num_blocks, exec_index, num_parameters)."""
    from ewq import api
    from ewq.reports.features import features_json, features_table

    outputs((source,), json_path=json_path)
    result = api.features(source, config, analytic=analytic)
    out.print(features_table(result))
    if json_path is not None:
        write_json(json_path, features_json(result, __version__))


@app.command(
    epilog="Examples:\n\n  ewq quantize ./Llama-3.2-1B --memory 2GB --format gguf "
    "--out llama-ewq.gguf"
    "\n\n  ewq quantize ./Llama-3.2-1B --memory 2GB --format gguf --calibration wiki.txt "
    "--out llama-ewq.gguf"
    "\n\n  ewq analyze default --json analysis.json   (EWQ's own decision)"
    "\n\n  ewq quantize default --plan analysis.json --out smollm2-ewq.gguf"
    "\n\n  ewq plan ./Llama-3.2-1B --memory 2GB --format gguf --json llama.json"
    "\n\n  ewq quantize ./Llama-3.2-1B --plan llama.json --out llama-ewq.gguf"
)
@configured(MakeConfig, without=("download",))  # it always downloads
def quantize(
    source: SourceArg,
    out_path: Annotated[Path, typer.Option("--out", help="Where to write the model.")],
    plan: Annotated[
        Path | None,
        typer.Option(
            help="Plan JSON: from `ewq plan`, or the JSON of `ewq analyze`. Without "
            "it, give a budget (--memory, --cluster or --bpw): the plan is made as "
            "`ewq plan` makes it and written beside the output (OUT.plan.json)."
        ),
    ] = None,
    memory: MemoryOpt = None,
    disk: DiskOpt = None,
    cluster: ClusterOpt = None,
    reserve: ReserveOpt = None,
    *,
    config: MakeConfig,
) -> None:
    """Write the model quantized: as a plan made earlier says (--plan), or planned
    for a budget and written in one go, with a provenance record."""
    from ewq import api
    from ewq.reports.quantize import provenance_path, quantize_table

    record = provenance_path(out_path)  # api.quantize writes it beside the model
    budget = {"memory": memory, "disk": disk, "cluster": cluster, "reserve": reserve}
    if plan is not None:
        given = [k for k, v in budget.items() if v is not None]
        given += config.planned_options()
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise typer.BadParameter(
                f"{flag} is for making a plan; --plan {plan} is made already"
            )
        outputs((source, plan), out_path=record)
    else:
        inputs = (
            source,
            cluster,
            config.calibration,
            config.classifier,
            config.imatrix,
        )
        plan = out_path.with_name(out_path.name + ".plan.json")
        outputs(inputs, out_path=record, plan_path=plan)
        _own_plan_file(plan)
        _make_plan(
            source,
            _budget(memory, disk, cluster, reserve, config.bpw),
            config.planning(),
            plan,
            inputs,
        )
    with count_bar("quantizing", "tensors") as progress:
        result = api.quantize(
            source, plan, out_path, config.writing(), progress=progress
        )
    err.print(f"wrote {record}")
    out.print(quantize_table(result))
    err.print(f"wrote {result.out}")
    if result.rounding.get("method") == "gptq":
        r = result.rounding
        passes = r.get("passes", 1)
        tokens = r.get("tokens")
        cap = r.get("calibration_tokens")
        of_text = f"{tokens:,} tokens of " if tokens else ""
        capped = f" (--calibration-tokens {cap:,})" if cap else ""
        err.print(
            f"{r['tensors']} tensors rounded against {of_text}the calibration text"
            f"{capped} (GPTQ; "
            f"{passes} pass{'es' if passes != 1 else ''} over it, second moments of "
            f"at most {r.get('peak_moment_bytes', 0) / 2**30:.2f} GiB at once); "
            f"{record.name} has the llama-quantize command for the same types with "
            "llama.cpp's own rounding"
        )
    elif result.llama_quantize_args:
        err.print(f"the llama-quantize command doing the same is in {record.name}")


@app.command(
    "plan",
    epilog="Examples:\n\n  ewq plan default --memory 230MB --json plan.json"
    "\n\n  ewq plan ./Llama-3.1-8B --memory 12GiB --disk 40GB --reserve 1GiB"
    "\n\n  ewq plan ./Llama-3.1-8B --format gguf --memory 8GB --json plan.json"
    "\n\n  ewq plan ./Llama-3.1-8B --cluster cluster.yaml --json plan.json"
    "\n\n  cluster.yaml:  machines: [{name: a, memory: 8GB, host: 10.0.0.2}, "
    "{name: b, memory: 6GiB, disk: 20GB, speed: 0.5}]",
)
@configured(PlanConfig)
def plan_cmd(
    source: SourceArg,
    memory: MemoryOpt = None,
    disk: DiskOpt = None,
    cluster: ClusterOpt = None,
    reserve: ReserveOpt = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the plan (for `ewq quantize`).")
    ] = None,
    *,
    config: PlanConfig,
) -> None:
    """Fit a model into a machine or a cluster: per tensor the type of least
    predicted damage (per block: its precision and machine)."""
    inputs = (source, cluster, config.calibration, config.classifier, config.imatrix)
    outputs(inputs, json_path=json_path)
    machines = _budget(memory, disk, cluster, reserve, config.bpw)
    _make_plan(source, machines, config, json_path, inputs)


def _own_plan_file(path: Path) -> None:
    """The plan written beside an output replaces only an earlier one (a file ewq
    wrote there, kind ewq-plan): the user never named it."""
    if not path.exists():
        return
    try:
        kind = json.loads(path.read_text(encoding="utf-8")).get("kind")
    except (OSError, ValueError, AttributeError):
        kind = None
    if kind != "ewq-plan":
        raise EwqError(
            f"{path} exists and is not a plan ewq wrote; it is left as it is "
            "(move it, or choose another --out)"
        )


def _make_plan(source, machines, config, json_path: Path | None, inputs: tuple):
    """Plan (as `ewq plan`): the plan shown, and with ``json_path`` written there
    with its importance matrix beside it."""
    from ewq import api
    from ewq.analysis.decision import check_alpha
    from ewq.reports.plan import plan_json
    from ewq.reports.plan_view import unfit_message

    check_alpha(config.alpha)
    reads = config.method.value == "ewq"
    bar = progress_bar("analysing") if reads else contextlib.nullcontext(None)
    with bar as progress:
        planned = api.plan(source, machines, config, progress=progress)
    if not planned.result.fits:
        raise EwqError(unfit_message(planned, source))
    if json_path is not None:
        planned = _imatrix_beside(planned, json_path, inputs)
        _own_text_beside(config, planned, json_path, inputs)
    _show_plan(planned)
    if json_path is not None:
        write_json(json_path, plan_json(planned, __version__))


def _budget(memory, disk, cluster: Path | None, reserve, bpw: float | None):
    """The machines --memory/--disk, --cluster or --bpw alone describe."""
    from ewq.planning import Machine, load_cluster, single_machine

    if memory is not None and cluster is not None:
        raise typer.BadParameter("give either --memory (one machine) or --cluster FILE")
    if memory is None and cluster is None and bpw is None:
        raise typer.BadParameter(
            "give --memory (one machine), --cluster FILE or --bpw BITS"
        )
    if disk is not None and memory is None:
        raise typer.BadParameter("--disk goes with --memory")
    if cluster is not None:
        return load_cluster(cluster, reserve)
    if memory is not None:
        return (single_machine(memory, disk, reserve),)
    return (Machine("local", 1 << 62),)  # --bpw alone: the bits are the budget


def _imatrix_beside(planned, json_path: Path, inputs: tuple):
    """An importance matrix computed from --calibration, written beside the plan
    (which names it) so that `ewq quantize` and llama-quantize can use it."""
    if planned.imatrix is None or planned.imatrix.file:
        return planned
    from ewq.imatrix import write_imatrix

    path = json_path.with_name(json_path.stem + ".imatrix.gguf")
    outputs(inputs, json_path=path)
    write_imatrix(planned.imatrix, path)
    err.print(f"wrote the importance matrix {path}")
    return dataclasses.replace(
        planned, imatrix=dataclasses.replace(planned.imatrix, file=path.name)
    )


def _own_text_beside(config, planned, json_path: Path, inputs: tuple) -> None:
    """With --calibration self, the text sampled from the model, written beside the
    plan (``PLAN.calibration.txt``) to be read and reused (--calibration FILE)."""
    from ewq.calibration.generate import is_self

    if not is_self(config.calibration) or planned.config.calibration is None:
        return
    path = json_path.with_name(json_path.stem + ".calibration.txt")
    outputs(inputs, json_path=path)
    atomic_write_text(path, Path(planned.config.calibration).read_text("utf-8"))
    err.print(f"wrote the calibration text sampled from the model {path}")


def _show_plan(planned) -> None:
    """The plan's table, its warnings, its placement and the runtimes' commands."""
    from ewq.reports.fit import idle_reasons
    from ewq.reports.plan import broken_warning
    from ewq.reports.plan_view import (
        export_lines,
        measured_line,
        placement_table,
        plan_table,
    )

    out.print(plan_table(planned))
    measured = measured_line(planned)
    if measured is not None:
        err.print(measured, markup=False, highlight=False)
    warning = broken_warning(planned)
    if warning is not None:
        err.print(warning, markup=False, highlight=False)
    placement = placement_table(planned)
    if placement is not None:
        out.print(placement)
    else:  # one machine used: the others' reasons, which the table would caption
        for name, why in idle_reasons(planned).items():
            out.print(one_line(f"{name} has no block: {why}"), markup=False)
    for line in export_lines(planned):
        out.print(line)


@app.command(
    "imatrix",
    epilog="Examples:\n\n  ewq imatrix default --calibration wiki.train.txt --out "
    "smollm2.imatrix.gguf"
    "\n\n  ewq imatrix IgLM-F32.gguf --calibration seqs.txt --documents lines "
    "--ctx 64 --out iglm.imatrix.gguf"
    "\n\n  llama-quantize --imatrix smollm2.imatrix.gguf ... (llama.cpp reads it)",
)
def imatrix_cmd(
    source: SourceArg,
    calibration: Annotated[
        Path,
        typer.Option(help="Calibration text, or 'self': text sampled from the model."),
    ],
    out_path: Annotated[
        Path, typer.Option("--out", help="Where to write it (.gguf; .dat: legacy).")
    ],
    ctx: Annotated[int, typer.Option(min=16, help="Tokens per chunk.")] = 512,
    documents: Annotated[
        str, typer.Option(help="stream (llama-imatrix's chunks) or lines.")
    ] = "stream",
    chunks: Annotated[
        int | None, typer.Option(min=1, help="Stop after this many chunks.")
    ] = None,
    gpu_layers: Annotated[
        int | None,
        typer.Option(
            min=-1,
            help="Layers llama.cpp offloads to a GPU (-1: all). Default: all where "
            "llama.cpp was built with a GPU backend, else none.",
        ),
    ] = None,
) -> None:
    """The importance matrix of a model on a text, computed in-process by llama.cpp
    as its llama-imatrix tool computes one, in the file format llama.cpp reads."""
    from ewq import api
    from ewq.imatrix import write_imatrix

    if documents not in ("stream", "lines"):
        raise typer.BadParameter("--documents is stream or lines")
    outputs((source, calibration), out_path=out_path)
    with count_bar("imatrix", "chunks") as progress:
        m = api.imatrix(
            source,
            calibration,
            ctx=ctx,
            documents=documents,
            chunks=chunks,
            gpu_layers=gpu_layers,
            progress=progress,
        )
    write_imatrix(m, out_path, legacy=out_path.suffix == ".dat")
    err.print(
        f"wrote {out_path}: {len(m.entries)} entries from {m.chunk_count} chunks of "
        f"{m.chunk_size} tokens"
    )
