"""The commands that measure and study: eval, bench, compare, and FastEWQ's dataset
and classifiers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ewq.cli.common import (
    SourceArg,
    app,
    configured,
    count_bar,
    err,
    out,
    outputs,
    step_bar,
    write_json,
)
from ewq.config import DEFAULT_ALPHA, BenchConfig, CompareConfig, EvalConfig
from ewq.errors import EwqError

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
    from ewq import api

    outputs(tuple(sources), out=out_path)
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
        Path, typer.Option("--out", help="Where to store the classifier (.npz).")
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
    from rich.table import Table

    from ewq import api

    outputs((dataset,), out=out_path)
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


@app.command(
    "eval",
    epilog="Examples:\n\n  ewq eval default --task perplexity --data wiki.txt --limit 20"
    "\n\n  ewq plan default --memory 230MB --json plan.json"
    "\n\n  ewq eval default --plan plan.json --task kld --data wiki.txt --limit 20"
    "\n\n  ewq eval default --task mmlu --limit 200   (the MMLU setup installs)",
)
@configured(EvalConfig)
def eval_cmd(
    source: SourceArg,
    quantized: Annotated[
        Path | None,
        typer.Option(help="A quantized model to evaluate (or compare, kld)."),
    ] = None,
    plan: Annotated[
        Path | None, typer.Option(help="Quantize the source by this plan first.")
    ] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the result as JSON.")
    ] = None,
    *,
    config: EvalConfig,
) -> None:
    """Measure MMLU accuracy, text perplexity, KL divergence to the unquantized model,
    or (encoders) the cosine similarity of sentence embeddings to the unquantized ones."""
    from rich.table import Table

    from ewq import api

    data = Path(config.data) if config.data else None
    outputs((source, data, quantized, plan), json_path=json_path)
    task = config.task.value
    with count_bar(task) as progress:
        result = api.evaluate(
            source, None, config, quantized=quantized, plan=plan, progress=progress
        )
    table = Table(
        title=f"{source}: {task}"
        + (f" (quantized: {quantized or plan})" if (quantized or plan) else ""),
        caption=f"data: {result.data}"
        + (f", {result.split} split" if result.split else ""),
    )
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in result.metrics.items():
        if not isinstance(v, dict | list):
            table.add_row(k, f"{v:.6g}" if isinstance(v, float) else str(v))
    out.print(table)
    if json_path is not None:
        write_json(json_path, result.model_dump(mode="json"))


@app.command(
    epilog="Example:\n\n  ewq bench default --mmlu mmlu.jsonl --text wiki.txt --out results/smollm2"
)
@configured(BenchConfig)
def bench(
    source: SourceArg,
    out_dir: Annotated[Path, typer.Option("--out", help="Results folder.")],
    *,
    config: BenchConfig,
) -> None:
    """The paper's Tables 6, 7 and 14 on one model, and EWQ against random and
    position-only block choices at equal size."""
    from ewq.bench import bench as run_bench
    from ewq.reports.bench import bench_table

    with step_bar("bench") as progress:
        result = run_bench(source, config, out_dir, progress=progress)
    out.print(bench_table(result))
    err.print(f"wrote {out_dir}: README.md, bench.json and the tables it shows")


@app.command(
    epilog="Example:\n\n  ewq compare default --text wiki.valid.txt --calibration "
    "enwiki.xml.bz2 --out results/smollm2-135m/compare"
    "\n\n  ewq compare IgLM-F32.gguf --text eval.txt --calibration calibration.txt "
    "--documents lines --ctx 64 --windows 512 --out results/iglm/compare"
)
@configured(CompareConfig)
def compare(
    source: SourceArg,
    out_dir: Annotated[Path, typer.Option("--out", help="Results folder.")],
    *,
    config: CompareConfig,
) -> None:
    """ewq's plans against llama.cpp's presets (with the same importance matrix and
    without) at equal bytes (KL, perplexity); for a Hugging Face encoder, against
    uniform precisions (embedding cosine)."""
    from ewq.bench import is_encoder
    from ewq.compare import compare as run_compare
    from ewq.compare import compare_encoder
    from ewq.reports.compare import compare_table

    log = lambda m: err.print(m, markup=False, highlight=False)  # noqa: E731
    if is_encoder(source):
        compare_encoder(source, config.text, out_dir, seeds=config.seeds, log=log)
        err.print(f"wrote {out_dir}/README.md, compare.json")
        return
    if config.calibration is None and "kl" in config.criteria_list():
        raise typer.BadParameter("the kl criterion needs --calibration TEXT")
    result = run_compare(source, out_dir, config, log=log)
    table = compare_table(result)
    out.print(table)
    err.print(f"wrote {out_dir}/README.md, compare.json, size_vs_kl.png")
