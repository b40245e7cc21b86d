"""The commands along one model's path: inspect, analyze, features, plan, quantize."""

from __future__ import annotations

import contextlib
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
from ewq.config import AnalysisConfig, PlanConfig, QuantizeConfig, SourceConfig
from ewq.errors import EwqError

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
    epilog="Examples:\n\n  ewq analyze default --json plan.json"
    "\n\n  ewq quantize default --plan plan.json --out smollm2-ewq.gguf"
    "\n\n  ewq quantize ./Llama-3.2-1B --plan plan.json --out llama-ewq.gguf"
)
@configured(QuantizeConfig, without=("download",))  # it always downloads
def quantize(
    source: SourceArg,
    plan: Annotated[
        Path,
        typer.Option(help="Plan JSON: from `ewq plan`, or the JSON of `ewq analyze`."),
    ],
    out_path: Annotated[Path, typer.Option("--out", help="Where to write the model.")],
    *,
    config: QuantizeConfig,
) -> None:
    """Write the model quantized block by block as the plan says, with a provenance record."""
    from ewq import api
    from ewq.reports.quantize import provenance_json, provenance_path, quantize_table

    record = provenance_path(out_path)  # written first, then the model renamed
    outputs((source, plan), out_path=record)
    with count_bar("quantizing", "tensors") as progress:
        result = api.quantize(
            source,
            plan,
            out_path,
            config,
            record=lambda q: write_json(record, provenance_json(q, __version__)),
            progress=progress,
        )
    out.print(quantize_table(result))
    err.print(f"wrote {result.out}")
    if result.llama_quantize_args:
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
    memory: Annotated[
        str | None, typer.Option(help="One machine's memory, e.g. 8GB or 7.5GiB.")
    ] = None,
    disk: Annotated[
        str | None,
        typer.Option(help="Its free disk (capacity is the smaller of the two)."),
    ] = None,
    cluster: Annotated[
        Path | None,
        typer.Option(
            help="YAML file of machines (name, memory, disk, speed, host, reserve, "
            "memory_bandwidth, network, links)."
        ),
    ] = None,
    reserve: Annotated[
        str | None,
        typer.Option(
            help="Keep this much more free on every machine (other programs); the "
            "runtime's KV cache and buffers are counted by --context."
        ),
    ] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the plan (for `ewq quantize`).")
    ] = None,
    *,
    config: PlanConfig,
) -> None:
    """Fit a model into a machine or a cluster: per block precision and machine."""
    from ewq import api
    from ewq.analysis.decision import check_alpha
    from ewq.planning import load_cluster, single_machine
    from ewq.reports.plan import (
        export_lines,
        placement_table,
        plan_json,
        plan_table,
        unfit_message,
    )

    if (memory is None) == (cluster is None):
        raise typer.BadParameter("give either --memory (one machine) or --cluster FILE")
    inputs = (source, cluster, config.calibration, config.classifier)
    outputs(inputs, json_path=json_path)
    if disk is not None and memory is None:
        raise typer.BadParameter("--disk goes with --memory")
    check_alpha(config.alpha)
    if cluster is not None:
        machines = load_cluster(cluster, reserve)
    else:
        machines = (single_machine(memory, disk, reserve),)
    reads = config.method.value == "ewq"
    bar = progress_bar("analysing") if reads else contextlib.nullcontext(None)
    with bar as progress:
        planned = api.plan(source, machines, config, progress=progress)
    if not planned.result.fits:
        raise EwqError(unfit_message(planned, source))
    out.print(plan_table(planned))
    placement = placement_table(planned)
    if placement is not None:
        out.print(placement)
    for line in export_lines(planned):
        out.print(line)
    if json_path is not None:
        write_json(json_path, plan_json(planned, __version__))
