"""The `ewq` command: a thin shell over ewq.api. Parse, call, render, set the exit code.

Each command's options come from its config record (ewq.config, through
:func:`ewq.cli.common.configured`); the commands live in the modules beside.
"""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import typer

from ewq import __version__
from ewq.cli.common import app, err, out
from ewq.errors import EwqError, one_line

__all__ = ["app", "main", "one_line"]


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
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
    _stage_lines(verbose or not sys.stderr.isatty())
    if version:
        out.print(f"ewq {__version__}")
        raise typer.Exit()
    if ctx.invoked_subcommand is None:  # `ewq -v` alone: the help, as `ewq` gives
        out.print(ctx.get_help())
        raise typer.Exit(2)


def _stage_lines(shown: bool) -> None:
    """A line per stage of long work (ewq.stages) on stderr where no progress bar
    is seen (stderr not a terminal, as in a pipe or a job queue) or with -v."""
    from ewq.stages import LOGGER

    log = logging.getLogger(LOGGER)
    log.handlers.clear()
    log.propagate = False
    if shown:
        handler = _StderrHandler()
        # a prefix of their own: a log's reader (or grep) tells them from messages
        handler.setFormatter(_OneLineFormatter("[ewq] %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO if shown else logging.WARNING)


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
    import warnings

    def one_line_warning(message, category, *_args, **_kw) -> None:
        err.print(
            f"warning: {one_line(str(message))}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )

    shown = warnings.showwarning
    warnings.showwarning = one_line_warning
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
        warnings.showwarning = shown
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# the commands: importing each module adds its commands to `app`, in help order
from ewq.cli import model, study, cluster  # noqa: E402, F401, I001
