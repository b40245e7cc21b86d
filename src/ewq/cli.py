"""The `ewq` command: a thin shell over ewq.api. Parse, call, render, set the exit code."""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from ewq import __version__, api
from ewq.analysis import DEFAULT_ALPHA, Variant
from ewq.errors import EwqError
from ewq.fileio import atomic_write_text
from ewq.outputs import check_output
from ewq.reports.analysis import analysis_json, analysis_table, write_plot
from ewq.reports.features import features_json, features_table
from ewq.reports.inspect import inspection_json, inspection_table
from ewq.reports.plan import placement_table, plan_json, plan_table
from ewq.reports.quantize import provenance_json, provenance_path, quantize_table

__all__ = ["app", "main"]

app = typer.Typer(
    name="ewq",
    help="Entropy-Weighted Quantization: fit large language models to the machines you have.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)

SourceArg = Annotated[
    str,
    typer.Argument(
        help="A Hugging Face model folder, a .safetensors or GGUF file, a hub id "
        "(owner/name), or 'default' (SmolLM2-135M-Instruct, bundled)."
    ),
]


RevisionOpt = Annotated[str | None, typer.Option(help="Hub branch, tag or commit.")]
FileOpt = Annotated[
    str | None,
    typer.Option(
        "--file",
        help="For hub repositories with several GGUF models: the file, or a tag in "
        "its name such as Q4_K_M (the same as owner/name:FILE).",
    ),
]


def _spec(source: str, file: str | None) -> str:
    """The source with a hub file chosen (owner/name:FILE, as llama.cpp's -hf)."""
    return source if file is None else f"{source}:{file}"


@contextlib.contextmanager
def _progress(description: str) -> Iterator[api.Progress]:
    """A byte-based progress bar on stderr, fed by the API's progress callback."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int, name: str) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def _outputs(inputs: tuple, **outputs: Path | None) -> None:
    """Refuse, before any work, outputs that would overwrite an input or a file ewq
    does not own (ewq.outputs); keyword names are the options, as the user typed
    them (json_path: --json)."""
    for option, path in outputs.items():
        if path is not None:
            name = "--" + option.removesuffix("_path").replace("_", "-")
            check_output(path, inputs, option=name)


def _write_json(path: Path, doc: dict) -> None:
    atomic_write_text(path, json.dumps(doc, indent=2) + "\n")
    err.print(f"wrote {path}")


@app.command(
    epilog="Examples:\n\n  ewq inspect default\n\n  ewq inspect ./Llama-3.2-1B --json blocks.json"
    "\n\n  ewq inspect Qwen/Qwen2.5-7B   (reads config.json and headers only)"
)
def inspect(
    source: SourceArg,
    json_path: Annotated[
        Path | None,
        typer.Option("--json", help="Also write the blocks as JSON to this path."),
    ] = None,
    download: Annotated[
        bool,
        typer.Option(help="For hub ids: download the weights instead of headers only."),
    ] = False,
    revision: RevisionOpt = None,
    file: FileOpt = None,
    verify: Annotated[
        bool,
        typer.Option(help="Also read every tensor once and check it for NaN and Inf."),
    ] = False,
) -> None:
    """List a model's blocks (exec_index, tensors, parameters, bytes) without reading weights."""
    _outputs((source,), json_path=json_path)
    bar = _progress("reading tensors") if verify else contextlib.nullcontext(None)
    with bar as progress:
        result = api.inspect(
            _spec(source, file),
            download=download,
            revision=revision,
            verify=verify,
            progress=progress,
        )
    out.print(inspection_table(result))
    if json_path is not None:
        _write_json(json_path, inspection_json(result, __version__))


@app.command(
    epilog="Examples:\n\n  ewq analyze default --json analysis.json --plot entropy.png"
    "\n\n  ewq analyze ./Llama-3.2-1B --alpha 1.0 --variant 8bit"
    "\n\n  ewq analyze model.gguf --eps 0.01   (the paper's eps variant)"
)
def analyze(
    source: SourceArg,
    alpha: Annotated[
        float,
        typer.Option(
            help="Threshold T = mean - alpha * std: blocks below T go to 4-bit. "
            "1.25 reproduces the paper's share of 4-bit blocks (about 11%)."
        ),
    ] = DEFAULT_ALPHA,
    eps: Annotated[
        float,
        typer.Option(
            help="H = -sum p log(p + eps). 0 (default) is the exact entropy; the paper "
            "used a small eps such as 0.01."
        ),
    ] = 0.0,
    variant: Annotated[
        Variant,
        typer.Option(
            help="4bit/8bit: below T to 4-bit, below the mean to 8-bit. "
            "8bit: every block below the mean to 8-bit."
        ),
    ] = Variant.MIXED_4_8,
    json_path: Annotated[
        Path | None,
        typer.Option("--json", help="Write the analysis as JSON (usable as a plan)."),
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option(help="Write a PNG of entropy by block, with mean and threshold."),
    ] = None,
    download: Annotated[
        bool,
        typer.Option(
            help="For hub ids: download the weights (the analysis reads them)."
        ),
    ] = False,
    revision: RevisionOpt = None,
    file: FileOpt = None,
    workers: Annotated[
        int | None,
        typer.Option(
            min=1, help="Threads reading and reducing tensors (default: all cores)."
        ),
    ] = None,
) -> None:
    """Measure each block's weight entropy and decide raw / 8-bit / 4-bit per block (EWQ)."""
    # check parameters before reading a byte, so bad input costs nothing
    from ewq.analysis.decision import check_alpha
    from ewq.analysis.profile import check_eps

    check_alpha(alpha)
    check_eps(eps)
    _outputs((source,), json_path=json_path, plot=plot)
    with _progress("analysing") as progress:
        result = api.analyze(
            _spec(source, file),
            alpha=alpha,
            eps=eps,
            variant=variant,
            download=download,
            revision=revision,
            workers=workers,
            progress=progress,
        )
    out.print(analysis_table(result))
    if json_path is not None:
        _write_json(json_path, analysis_json(result, __version__))
    if plot is not None:
        write_plot(result, plot)
        err.print(f"wrote {plot}")


@app.command(
    epilog="Examples:\n\n  ewq features ./Llama-3.2-1B/config.json"
    "\n\n  ewq features Qwen/Qwen2.5-7B --json features.json   (headers only)"
)
def features(
    source: Annotated[
        str,
        typer.Argument(
            help="A config.json file, a model folder, a safetensors or GGUF file, "
            "a hub id, or 'default'."
        ),
    ],
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the rows as JSON.")
    ] = None,
    analytic: Annotated[
        bool,
        typer.Option(
            help="Count parameters from config.json even where headers exist."
        ),
    ] = False,
    revision: RevisionOpt = None,
    file: FileOpt = None,
) -> None:
    """FastEWQ's features per transformer block (num_blocks, exec_index, num_parameters)."""
    _outputs((source,), json_path=json_path)
    result = api.features(_spec(source, file), analytic=analytic, revision=revision)
    out.print(features_table(result))
    if json_path is not None:
        _write_json(json_path, features_json(result, __version__))


dataset_app = typer.Typer(help="The FastEWQ dataset.", no_args_is_help=True)
fast_app = typer.Typer(help="FastEWQ classifiers.", no_args_is_help=True)
app.add_typer(dataset_app, name="dataset")
app.add_typer(fast_app, name="fast")


@dataset_app.command("build")
def dataset_build(
    sources: Annotated[
        list[str] | None, typer.Argument(help="Models to analyse (any SOURCE).")
    ] = None,
    out_path: Annotated[
        Path, typer.Option("--out", help="The dataset CSV to write.")
    ] = Path("dataset.csv"),
    paper: Annotated[
        Path | None,
        typer.Option(
            help="Folder of the paper's tables (table2, table8 CSVs): add their labels."
        ),
    ] = None,
    alpha: Annotated[float, typer.Option(help="EWQ threshold factor.")] = DEFAULT_ALPHA,
) -> None:
    """Analyse each model and write one labelled row per block (the paper's six columns)."""
    _outputs(tuple(sources), out=out_path)
    from ewq.analysis.decision import check_alpha
    from ewq.fast.dataset import write_dataset

    check_alpha(alpha)
    rows = api.build_dataset(
        sources or [],
        paper_tables=paper,
        alpha=alpha,
        progress=lambda s: err.print(f"analysing {s}"),
    )
    n = write_dataset(rows, out_path)
    models = len({r["model_name"] for r in rows})
    err.print(f"wrote {out_path}: {n} rows from {models} models")


@fast_app.command("train")
def fast_train(
    dataset: Annotated[Path, typer.Argument(help="A dataset CSV (ewq dataset build).")],
    out_path: Annotated[
        Path, typer.Option("--out", help="Where to store the classifier (.skops).")
    ],
    report: Annotated[
        Path | None,
        typer.Option(
            help="Folder for report.md and its plots (default: beside --out)."
        ),
    ] = None,
    paper: Annotated[
        Path | None,
        typer.Option(
            help="Folder of the paper's tables, to set its figures beside ours."
        ),
    ] = None,
    seed: Annotated[
        int, typer.Option(help="Seed of the 70/30 split and the models.")
    ] = 42,
) -> None:
    """Train the six classifiers, write the report, store the random forest."""
    _outputs((dataset,), out=out_path)
    report_dir = report or out_path.with_suffix("").with_name(out_path.stem + "-report")
    if report_dir.exists() and not report_dir.is_dir():
        raise EwqError(f"--report {report_dir} is a file; the report is a folder")
    st, path = api.train_fastewq(
        dataset, out_path, report_dir=report_dir, paper_tables=paper, seed=seed
    )
    table = Table(
        title=f"FastEWQ classifiers on {dataset.name}: {st.n_rows} rows, {st.n_models} models"
    )
    for col in ("classifier", "test accuracy", "AUC", "leave-one-model-out"):
        table.add_column(col, justify="left" if col == "classifier" else "right")
    for name, r in st.results.items():
        table.add_row(
            name, f"{r.report['accuracy']:.1%}", f"{r.auc:.3f}", f"{r.lomo:.1%}"
        )
    out.print(table)
    err.print(f"wrote {out_path} and {path}")


class Task(enum.StrEnum):
    mmlu = "mmlu"
    perplexity = "perplexity"
    kld = "kld"
    embedding = "embedding"


@app.command(
    "eval",
    epilog="Examples:\n\n  ewq eval default --task perplexity --data wiki.txt --limit 20"
    "\n\n  ewq eval default --plan plan.json --task kld --data wiki.txt --limit 20"
    "\n\n  ewq eval default --task mmlu --data mmlu_val.jsonl --limit 200",
)
def eval_cmd(
    source: SourceArg,
    task: Annotated[Task, typer.Option(help="What to measure.")],
    data: Annotated[
        Path | None,
        typer.Option(
            help="Text file (perplexity, kld) or MMLU data (JSONL, CSV folder, arrow "
            "folder, or a hub dataset id)."
        ),
    ] = None,
    quantized: Annotated[
        Path | None,
        typer.Option(help="A quantized model to evaluate (or compare, kld)."),
    ] = None,
    plan: Annotated[
        Path | None, typer.Option(help="Quantize the source by this plan first.")
    ] = None,
    shots: Annotated[
        int, typer.Option(min=0, help="MMLU examples from the dev split.")
    ] = 0,
    limit: Annotated[
        int | None, typer.Option(min=1, help="At most this many questions or windows.")
    ] = None,
    ctx: Annotated[int, typer.Option(min=8, help="Context window in tokens.")] = 512,
    stride: Annotated[
        int | None,
        typer.Option(
            min=1, help="Perplexity window stride (default: the window, no overlap)."
        ),
    ] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the result as JSON.")
    ] = None,
) -> None:
    """Measure MMLU accuracy, text perplexity, KL divergence to the unquantized model,
    or (encoders) the cosine similarity of sentence embeddings to the unquantized ones."""
    if data is None:
        raise typer.BadParameter("--data is required (a text file or MMLU data)")
    _outputs((source, data, quantized, plan), json_path=json_path)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err, transient=True) as bar:
        t = bar.add_task(task.value, total=None)
        result = api.evaluate(
            source,
            task.value,
            data=data if data.exists() else str(data),
            quantized=quantized,
            plan=plan,
            shots=shots,
            limit=limit,
            ctx=ctx,
            stride=stride,
            progress=lambda d, n, what: bar.update(t, completed=d, total=n),
        )
    metrics = result["metrics"]
    table = Table(
        title=f"{source}: {task.value}"
        + (f" (quantized: {quantized or plan})" if (quantized or plan) else "")
    )
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in metrics.items():
        if not isinstance(v, dict | list):
            table.add_row(k, f"{v:.6g}" if isinstance(v, float) else str(v))
    out.print(table)
    if json_path is not None:
        _write_json(
            json_path,
            {"schema_version": 1, "kind": "ewq-eval", "ewq_version": __version__}
            | result,
        )


@app.command(
    epilog="Example:\n\n  ewq bench default --mmlu mmlu.jsonl --text wiki.txt --out results/smollm2"
)
def bench(
    source: SourceArg,
    text: Annotated[
        Path, typer.Option(help="Text for perplexity and KL (encoders: sentences).")
    ],
    out_dir: Annotated[Path, typer.Option("--out", help="Results folder.")],
    mmlu: Annotated[
        Path | None,
        typer.Option(help="MMLU data (any layout `ewq eval` reads); for decoders."),
    ] = None,
    questions: Annotated[
        int, typer.Option(min=1, help="MMLU questions per variant.")
    ] = 40,
    windows: Annotated[int, typer.Option(min=1, help="Text windows per variant.")] = 8,
    ctx: Annotated[int, typer.Option(min=16, help="Tokens per text window.")] = 256,
    seeds: Annotated[int, typer.Option(min=1, help="Random orders at equal size.")] = 3,
    budgets: Annotated[int, typer.Option(min=1, help="Budgets at equal size.")] = 6,
) -> None:
    """The paper's Tables 6, 7 and 14 on one model, and EWQ against random and
    position-only block choices at equal size."""
    from ewq.bench import BenchConfig, bench_encoder, is_encoder
    from ewq.bench import bench as run_bench

    if is_encoder(source):
        enc = bench_encoder(source, text, out_dir, log=lambda m: err.print(m))
        for r in enc["variants"]:
            out.print(
                f"{r['variant']:18s} {r['blocks']:22s} cosine {r['cosine_mean']:.5f}"
            )
        err.print(f"wrote {out_dir}/README.md, bench.json")
        return
    if mmlu is None:
        raise typer.BadParameter("--mmlu is required for decoders")
    cfg = BenchConfig(mmlu, text, questions, windows, ctx, seeds, budgets)
    result = run_bench(source, cfg, out_dir, log=lambda m: err.print(m))
    table = Table(title=f"{result['model_name']}")
    for col in ("variant", "MMLU", "cloze", "text ppl", "KL mean", "MB", "raw/8/4"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for v in result["variants"]:
        table.add_row(
            v["variant"],
            f"{v['mmlu_accuracy']:.3f}",
            f"{v['mmlu_cloze_accuracy']:.3f}",
            f"{v['text_perplexity']:.2f}",
            f"{v['text_kl_mean']:.4f}",
            f"{v['total_bytes'] / 1e6:.1f}",
            v["raw_8bit_4bit_blocks"],
        )
    out.print(table)
    err.print(f"wrote {out_dir}/README.md, bench.json, table6/7/14.csv, size_vs_kl.png")


@app.command(
    epilog="Example:\n\n  ewq compare default --text wiki.valid.txt --calibration "
    "enwiki.xml.bz2 --out results/smollm2-135m/compare"
)
def compare(
    source: SourceArg,
    text: Annotated[Path, typer.Option(help="Evaluation text (KL, perplexity).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Results folder.")],
    calibration: Annotated[
        Path | None,
        typer.Option(
            help="Calibration text for the kl criterion (another text; decoders)."
        ),
    ] = None,
    windows: Annotated[int, typer.Option(min=1, help="Evaluation windows.")] = 8,
    ctx: Annotated[int, typer.Option(min=16, help="Tokens per window.")] = 512,
    seeds: Annotated[int, typer.Option(min=1, help="Random criteria (seeds).")] = 3,
    extra: Annotated[
        int,
        typer.Option(min=0, help="Budgets below the smallest preset (criteria only)."),
    ] = 3,
    criteria: Annotated[
        str, typer.Option(help="Criteria compared, comma-separated.")
    ] = "entropy,error,kl,random,position",
    presets: Annotated[
        str, typer.Option(help="llama.cpp presets, comma-separated.")
    ] = ",".join(
        ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_K_S", "Q3_K_M", "Q3_K_S", "Q2_K")
    ),
) -> None:
    """ewq's plans against llama.cpp's presets at equal bytes (KL, perplexity); for
    a Hugging Face encoder, against uniform precisions (embedding cosine)."""
    from ewq.bench import is_encoder
    from ewq.compare import compare as run_compare
    from ewq.compare import compare_encoder, summary

    log = lambda m: err.print(m, markup=False, highlight=False)  # noqa: E731
    if is_encoder(source):
        compare_encoder(source, text, out_dir, seeds=seeds, log=log)
        err.print(f"wrote {out_dir}/README.md, compare.json")
        return
    if calibration is None:
        raise typer.BadParameter("--calibration is required for decoders")
    result = run_compare(
        source,
        text,
        calibration,
        out_dir,
        windows=windows,
        ctx=ctx,
        seeds=seeds,
        extra=extra,
        criteria=[c.strip() for c in criteria.split(",") if c.strip()],
        presets=[p.strip() for p in presets.split(",") if p.strip()],
        log=log,
    )
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
    out.print(table)
    err.print(f"wrote {out_dir}/README.md, compare.json, size_vs_kl.png")


class OutFormat(enum.StrEnum):
    gguf = "gguf"
    hf = "hf"


@app.command(
    epilog="Examples:\n\n  ewq analyze default --json plan.json"
    "\n\n  ewq quantize default --plan plan.json --out smollm2-ewq.gguf"
)
def quantize(
    source: SourceArg,
    plan: Annotated[
        Path,
        typer.Option(help="Plan JSON: from `ewq plan`, or the JSON of `ewq analyze`."),
    ],
    out_path: Annotated[Path, typer.Option("--out", help="Where to write the model.")],
    format: Annotated[
        OutFormat | None,
        typer.Option(
            "--format",
            help="gguf: one file for llama.cpp (from a GGUF or a Hugging Face "
            "source). hf: a folder transformers and vLLM load (compressed-tensors, "
            "from a Hugging Face folder). Default: the format the plan was sized for, "
            "else gguf.",
        ),
    ] = None,
    revision: RevisionOpt = None,
    file: FileOpt = None,
    threads: Annotated[
        int | None, typer.Option(min=1, help="Quantizer threads (default: all cores).")
    ] = None,
    force: Annotated[
        bool,
        typer.Option(help="Replace an earlier ewq output folder at --out (hf)."),
    ] = False,
) -> None:
    """Write the model quantized block by block as the plan says, with a provenance record."""
    record = provenance_path(out_path)  # written first, then the model renamed
    _outputs((source, plan), out_path=record)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} tensors"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task("quantizing", total=None)
        result = api.quantize(
            _spec(source, file),
            plan,
            out_path,
            format=format.value if format else None,
            revision=revision,
            threads=threads,
            force=force,
            record=lambda q: _write_json(record, provenance_json(q, __version__)),
            progress=lambda done, total, name: bar.update(
                task, completed=done, total=total
            ),
        )
    out.print(quantize_table(result))
    err.print(f"wrote {result.out}")
    if result.llama_quantize_args:
        err.print(f"the llama-quantize command doing the same is in {record.name}")


class Mode(enum.StrEnum):
    m84 = "8/4"
    m43 = "4/3"
    m42 = "4/2"


@app.command(
    "plan",
    epilog="Examples:\n\n  ewq plan default --memory 230MB --json plan.json"
    "\n\n  ewq plan ./Llama-3.1-8B --memory 12GiB --disk 40GB --reserve 1GiB"
    "\n\n  ewq plan ./Llama-3.1-8B --cluster cluster.yaml --json plan.json"
    "\n\n  cluster.yaml:  machines: [{name: a, memory: 8GB, host: 10.0.0.2}, "
    "{name: b, memory: 6GiB, disk: 20GB, speed: 0.5}]",
)
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
            help="YAML file of machines (name, memory, disk, speed, host, reserve)."
        ),
    ] = None,
    reserve: Annotated[
        str | None,
        typer.Option(
            help="Keep this much more free on every machine (other programs); the "
            "runtime's KV cache and buffers are counted by --context."
        ),
    ] = None,
    method: Annotated[
        str,
        typer.Option(
            help="Block selection: ewq (reads every weight), or fast / fast-train "
            "(FastEWQ classifier, reads metadata only; the paper's ladder)."
        ),
    ] = "ewq",
    criterion: Annotated[
        str | None,
        typer.Option(
            help="Damage estimate per block and precision: error (round trip through "
            "the real quantizer, data-free; the default), kl (calibrated on the "
            "--calibration text; the default when one is given), entropy (the "
            "paper's score), random, position."
        ),
    ] = None,
    allocator: Annotated[
        str | None,
        typer.Option(
            help="optimal (least total damage within the budget; default) or ladder "
            "(the paper's Algorithm 1; default with --criterion entropy)."
        ),
    ] = None,
    calibration: Annotated[
        Path | None,
        typer.Option(
            help="Text for --criterion kl (UTF-8 text, or a Wikipedia .xml.bz2 dump)."
        ),
    ] = None,
    context: Annotated[
        int,
        typer.Option(
            min=0,
            help="Tokens of context the runtime must hold: adds its KV cache and "
            "compute buffers (llama.cpp's rules) to every machine; 0: weights only.",
        ),
    ] = api.DEFAULT_CONTEXT,
    classifier: Annotated[
        Path | None,
        typer.Option(
            help="FastEWQ classifier (.skops); default: the one shipped with ewq."
        ),
    ] = None,
    mode: Annotated[
        Mode,
        typer.Option(
            help="Moderate/aggressive precisions: 8/4, or 4/3 and 4/2 for edge devices."
        ),
    ] = Mode.m84,
    alpha: Annotated[float, typer.Option(help="EWQ threshold factor.")] = DEFAULT_ALPHA,
    variant: Annotated[Variant, typer.Option(help="EWQ variant.")] = Variant.MIXED_4_8,
    format: Annotated[
        OutFormat | None,
        typer.Option(
            "--format",
            help="Count sizes as this output format writes them "
            "(default: gguf for GGUF sources, hf otherwise).",
        ),
    ] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the plan (for `ewq quantize`).")
    ] = None,
    download: Annotated[
        bool,
        typer.Option(
            help="For hub ids: download the weights (the analysis reads them)."
        ),
    ] = False,
    revision: RevisionOpt = None,
    file: FileOpt = None,
) -> None:
    """Fit a model into a machine or a cluster: per block precision and machine (Algorithm 1)."""
    from ewq.analysis.decision import check_alpha
    from ewq.planning import load_cluster, single_machine

    if (memory is None) == (cluster is None):
        raise typer.BadParameter("give either --memory (one machine) or --cluster FILE")
    _outputs((source, cluster, calibration, classifier), json_path=json_path)
    if disk is not None and memory is None:
        raise typer.BadParameter("--disk goes with --memory")
    check_alpha(alpha)
    if cluster is not None:
        machines = load_cluster(cluster, reserve)
    else:
        machines = (single_machine(memory, disk, reserve),)
    bar = _progress("analysing") if method == "ewq" else contextlib.nullcontext(None)
    with bar as progress:
        planned = api.plan(
            _spec(source, file),
            machines,
            method=method,
            criterion=criterion,
            allocator=allocator,
            calibration=calibration,
            context=context,
            classifier=classifier,
            mode=mode.value,
            alpha=alpha,
            variant=variant,
            format=format.value if format else None,
            download=download,
            revision=revision,
            progress=progress,
        )
    r = planned.result
    if not r.fits:
        from ewq.reports.inspect import human_bytes

        rt = planned.runtime
        memory = sum(
            m.memory if m.disk is None else min(m.memory, m.disk) for m in machines
        )
        runtime = (
            f" and the runtime {human_bytes(sum(rt.kv_bytes.values()) + rt.stage_bytes * len(machines) + rt.head_bytes)} "
            f"for {rt.context} tokens of context (KV cache and buffers; --context)"
            if rt is not None
            else ""
        )
        raise EwqError(
            f"cannot fit {source} into {human_bytes(memory)} on {len(machines)} "
            f"machine(s): the weights need at least {human_bytes(r.smallest_bytes)} "
            f"({r.smallest_bytes:,} bytes"
            + (", before splitting them across machines" if len(machines) > 1 else "")
            + f"){runtime}"
        )
    out.print(plan_table(planned))
    placement = placement_table(planned)
    if placement is not None:
        out.print(placement)
    for name, export in planned.exports.items():
        if not export.get("command"):
            out.print(f"{name}: not exported: {export['refused']}")
            continue
        for w in export.get("workers", ()):
            out.print(f"{name}: on {w['machine']}: {w['command']}")
        out.print(f"{name}: {export['command']}")
    if json_path is not None:
        _write_json(json_path, plan_json(planned, __version__))


@app.callback()
def _root(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log details.")
    ] = False,
    version: Annotated[
        bool, typer.Option("--version", help="Print the version.")
    ] = False,
) -> None:
    handler = _StderrHandler()
    handler.setFormatter(_OneLineFormatter("ewq: %(levelname)s: %(message)s"))
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        handlers=[handler],
        force=True,
    )
    if version:
        out.print(f"ewq {__version__}")
        raise typer.Exit()


def one_line(text: str) -> str:
    """``text`` as one line of printable characters: names taken from a file (a
    tensor name with a newline or an escape sequence) cannot break the error line
    or drive the user's terminal."""
    return "".join(
        ch
        if ch.isprintable()
        else ch.encode("unicode_escape", "backslashreplace").decode("ascii")
        for ch in text
    )


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record is emitted, not to the one
    it was when the command started (in-process callers swap and close it)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _OneLineFormatter(logging.Formatter):
    """Log records as one escaped line each (their text may hold names from files)."""

    def format(self, record: logging.LogRecord) -> str:
        return one_line(super().format(record))


def main() -> None:
    """Console entry point: every ewq error is one line on stderr and exit status 1.

    Usage errors are click's (exit status 2); anything else is a bug and keeps its
    traceback.
    """
    import signal

    stopped: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        # unwind from wherever the main thread is: every temporary file is removed
        # by the code that made it; click turns the interrupt into its own exit 1,
        # which the handler below turns back into 128 + the signal number
        stopped.append(signum)
        raise KeyboardInterrupt

    previous = {
        signum: signal.signal(signum, on_signal)
        for signum in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        app()
    except EwqError as exc:
        err.print(
            f"ewq: error: {one_line(str(exc))}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(1)
    except (KeyboardInterrupt, SystemExit):
        if not stopped:
            raise
        err.print("ewq: interrupted; no partial output was left", markup=False)
        sys.exit(128 + stopped[0])
    finally:  # in-process callers (tests, notebooks) get their handlers back
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# `ewq worker` and `ewq serve` live beside: importing the module adds them to `app`
from ewq import cli_cluster  # noqa: E402, F401
