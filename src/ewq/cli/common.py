"""What every command shares: the consoles, the source argument, progress bars,
output checks, and :func:`configured`, which turns a config record's fields
(ewq.config) into the command's options, so each option is declared once."""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

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

from ewq.config import Config, configure
from ewq.fileio import atomic_write_text
from ewq.outputs import check_output
from ewq.types import Progress as ProgressCallback

__all__ = [
    "SourceArg",
    "configured",
    "err",
    "out",
    "outputs",
    "progress_bar",
    "count_bar",
    "step_bar",
    "write_json",
]

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
        help="A Hugging Face model folder, a .safetensors or GGUF file (or the first "
        "of llama.cpp's split files), a hub id (owner/name, owner/name:FILE), or "
        "'default' (SmolLM2-135M-Instruct, bundled)."
    ),
]


def configured(
    kind: type[Config],
    *,
    only: tuple[str, ...] | None = None,
    without: tuple[str, ...] = (),
):
    """Decorate a command taking ``config: kind``: its CLI options become the
    record's fields (name, type, default, help and bounds from the record; the flag
    from the field name, or the record's ``cli.flag``), and the command receives the
    validated record. ``only`` keeps some fields, ``without`` leaves some out (they
    keep their defaults)."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        hints = typing.get_type_hints(fn, include_extras=True)
        own = [
            p.replace(annotation=hints.get(p.name, p.annotation))
            for p in inspect.signature(fn).parameters.values()
            if p.name != "config"
        ]
        fields = {
            n: f
            for n, f in kind.model_fields.items()
            if (only is None or n in only) and n not in without
        }
        params = [*own]
        for name, f in fields.items():
            extra = f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}
            cli = extra.get("cli") or {}
            decls = [cli["flag"]] if cli.get("flag") else []
            bounds = {}
            for m in f.metadata:  # pydantic's Field(ge=..., le=...) constraints
                if getattr(m, "ge", None) is not None:
                    bounds["min"] = m.ge
                if getattr(m, "le", None) is not None:
                    bounds["max"] = m.le
            option = typer.Option(*decls, help=f.description, **bounds)
            default = inspect.Parameter.empty if f.is_required() else f.default
            params.append(
                inspect.Parameter(
                    name,
                    inspect.Parameter.KEYWORD_ONLY,
                    default=default,
                    annotation=Annotated[f.annotation, option],
                )
            )

        @functools.wraps(
            fn, assigned=("__module__", "__name__", "__qualname__", "__doc__")
        )
        def command(**kwargs: Any) -> Any:
            values = {n: kwargs.pop(n) for n in fields}
            return fn(**kwargs, config=configure(kind, None, values))

        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return wrap


@contextlib.contextmanager
def progress_bar(description: str) -> Iterator[ProgressCallback]:
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


@contextlib.contextmanager
def count_bar(description: str, unit: str = "") -> Iterator[ProgressCallback]:
    """A progress bar counting items (tensors, questions, windows) on stderr."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}" + (f" {unit}" if unit else "")),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task(description, total=None)
        yield lambda done, total, name: bar.update(task, completed=done, total=total)


@contextlib.contextmanager
def step_bar(description: str) -> Iterator[ProgressCallback]:
    """A progress bar over the steps of a long run, naming the step just done."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int, name: str) -> None:
            bar.update(task, completed=done, total=total, description=name[:60])
            err.print(name, markup=False, highlight=False)

        yield update


def outputs(inputs: tuple, **paths: Path | None) -> None:
    """Refuse, before any work, outputs that would overwrite an input or a file ewq
    does not own (ewq.outputs); keyword names are the options, as the user typed
    them (json_path: --json)."""
    for option, path in paths.items():
        if path is not None:
            name = "--" + option.removesuffix("_path").replace("_", "-")
            check_output(path, inputs, option=name)


def write_json(path: Path, doc: dict) -> None:
    atomic_write_text(path, json.dumps(doc, indent=2) + "\n")
    err.print(f"wrote {path}")
