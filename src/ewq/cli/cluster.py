"""`ewq worker` and `ewq serve`: a plan run across machines on llama.cpp's RPC
backend (the commands of ewq.cli that run a cluster; ewq.serve does the work)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated

import typer

from ewq import __version__
from ewq.cli.common import app, configured, err, out, write_json
from ewq.config import ServeConfig
from ewq.errors import EwqError
from ewq.serve.watch import Watchdog


@app.command(
    epilog="Examples:\n\n  ewq worker --host 0.0.0.0 --port 50052"
    "\n\n  (then, on the main machine: ewq serve plan.json --model model.gguf)"
)
def worker(
    host: Annotated[
        str,
        typer.Option(
            help="Address to listen on: 0.0.0.0 for every interface (trusted "
            "networks only: the protocol has no authentication)."
        ),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")] = 50052,
    threads: Annotated[
        int | None, typer.Option(min=1, help="CPU threads (default: all cores).")
    ] = None,
) -> None:
    """Lend this machine's CPU and memory to a plan: llama.cpp's RPC server."""
    from ewq.serve import rpc

    thread = rpc.start_worker(host, port, threads)
    if host not in ("127.0.0.1", "localhost"):
        err.print(
            "ewq: warning: anyone who can reach this port can run code on the "
            "worker's memory; keep it on a trusted network",
            markup=False,
        )
    err.print(f"worker listening on {host}:{port}; stop with Ctrl-C", markup=False)
    try:
        while thread.is_alive():  # wait here, where Ctrl-C and SIGTERM are handled
            thread.join(0.5)
    except KeyboardInterrupt:  # a server's normal end
        err.print("worker stopped", markup=False)


@app.command(
    epilog="Examples:\n\n  ewq serve plan.json --model model.gguf --prompt 'Hello'"
    "\n\n  ewq serve plan.json --model model.gguf --port 8080"
)
@configured(ServeConfig)
def serve(
    plan: Annotated[Path, typer.Argument(help="Plan JSON from `ewq plan --cluster`.")],
    model: Annotated[
        Path, typer.Option(help="The GGUF `ewq quantize` wrote from the plan.")
    ],
    json_path: Annotated[
        Path | None,
        typer.Option("--json", help="Write the placement and the completion as JSON."),
    ] = None,
    *,
    config: ServeConfig,
) -> None:
    """Run a plan across machines: the model here, its layers on the plan's workers.

    Without --prompt, serves llama-cpp-python's OpenAI-compatible HTTP API.
    """
    from ewq.planfile import load_plan
    from ewq.reports.serve import served_json, served_table
    from ewq.serve import cluster

    if not model.is_file():
        raise EwqError(f"no such model file: {model}")
    p = load_plan(plan)
    ctx = _context(p, config.ctx)
    endpoints = config.endpoints()
    workers = {
        s.endpoint: s.machine for s in cluster.stages_of(p, endpoints) if s.endpoint
    }
    load = functools.partial(
        cluster.load, model, p, endpoints=endpoints, n_ctx=ctx, repack=config.repack
    )
    with Watchdog(config.rpc_timeout, workers) as dog:
        if config.prompt is not None:
            cm = load(threads=config.threads, beat=dog.beat)
            out.print(served_table(cm))
            text = cluster.complete(cm, config.prompt, config.max_tokens, beat=dog.beat)
            out.print(text, markup=False, highlight=False)
            if json_path is not None:
                write_json(json_path, served_json(cm, config.prompt, text, __version__))
            return
        build = _http_app(model, ctx, config)
        cm = load(build=build, beat=dog.beat)
        dog.armed = False  # idle between requests: the watchdog guards the load
        out.print(served_table(cm))
        if json_path is not None:
            write_json(json_path, served_json(cm, None, None, __version__))
        _run_http(cm, config.host, config.port)


def _context(plan, asked: int | None) -> int:
    """The context to run: as asked (warning when beyond what the plan sized the KV
    cache for), else the plan's, else 2048."""
    planned = plan.runtime.context if plan.runtime is not None else None
    if asked is None:
        return planned if isinstance(planned, int) and planned > 0 else 2048
    if isinstance(planned, int) and asked > planned:
        err.print(
            f"ewq: warning: the plan sized the KV cache for {planned} tokens, "
            f"not {asked}: a machine may run out of memory",
            markup=False,
        )
    return asked


def _http_app(model: Path, ctx: int, config: ServeConfig):
    """What builds llama-cpp-python's OpenAI-compatible server over the workers."""
    try:
        import uvicorn  # noqa: F401 - run by _run_http
        from llama_cpp.server.app import create_app
        from llama_cpp.server.settings import ModelSettings, ServerSettings
    except ImportError:
        raise EwqError(
            "serving HTTP needs llama-cpp-python[server] (scripts/setup.sh installs "
            "it); or give --prompt"
        ) from None

    def build(ngl: int, split: list[float]):
        settings = ModelSettings(
            model=str(model),
            n_gpu_layers=ngl,
            split_mode=1,  # LLAMA_SPLIT_MODE_LAYER
            tensor_split=split or None,
            n_ctx=ctx,
            n_threads=config.threads or ModelSettings.model_fields["n_threads"].default,
            verbose=False,
        )
        return create_app(
            server_settings=ServerSettings(host=config.host, port=config.port),
            model_settings=[settings],
        )

    return build


def _run_http(cm, host: str, port: int) -> None:
    import uvicorn
    from llama_cpp.server import app as server_app

    err.print(f"serving on http://{host}:{port}/v1 (OpenAI API); stop with Ctrl-C")
    uvicorn.run(cm.model, host=host, port=port, log_level="warning")
    if server_app._llama_proxy is not None:  # free the model while its workers live
        server_app._llama_proxy.free()
