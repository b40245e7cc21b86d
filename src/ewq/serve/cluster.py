"""Run a plan's placement on llama.cpp: the main process loads the GGUF with its
layers split over RPC workers exactly as the plan placed them, and reports where
llama.cpp put what (read from llama.cpp's own log: the device of every layer and
every buffer's size), beside what the plan said."""

from __future__ import annotations

import contextlib
import functools
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ewq.errors import EwqError
from ewq.planfile import Plan
from ewq.planning.exports import llama_cpp_split
from ewq.serve import rpc

__all__ = ["ClusterModel", "Layout", "Stage", "complete", "load", "stages_of"]

_LAYER = re.compile(r"layer\s+(\d+) assigned to device (\S+?),")
_DEVICE = re.compile(r"using device (\S+) \(([^)]*)\)")
_BUFFER = re.compile(
    r"^(\w+):\s+(\S+) (model|KV|compute|output) buffer size =\s+([0-9.]+) MiB"
)
_MIB = 1 << 20
_KEEP: list[object] = []  # log callbacks handed to llama.cpp, never freed


@dataclass(frozen=True)
class Stage:
    """One machine of the plan's pipeline: its name, its RPC endpoint (None for the
    main process), its blocks and the weights the plan gives it."""

    machine: str
    endpoint: str | None
    exec_indices: tuple[int, ...]
    weights_bytes: int


@dataclass
class Layout:
    """Where llama.cpp put things, per endpoint ("main" for this process's CPU)."""

    layers: dict[int, str] = field(default_factory=dict)  # layer -> endpoint/main
    buffers: dict[str, dict[str, float]] = field(default_factory=dict)  # MiB


def stages_of(plan: Plan, endpoints: Sequence[str] | None = None) -> list[Stage]:
    """The plan's pipeline with the endpoint of each worker (from the plan's export,
    or ``endpoints`` given in the same order)."""
    machines = [m for m in plan.machines if m.exec_indices]
    llama = plan.exports.llama_cpp
    if not machines or llama is None or not llama.command:
        why = (
            llama.refused
            if llama is not None and llama.refused
            else "it has no llama.cpp placement (plan with ewq plan)"
        )
        raise EwqError(f"the plan cannot run on llama.cpp: {why}")
    rpc_eps = list(endpoints) if endpoints else list(llama.rpc)
    if len(rpc_eps) != len(machines) - 1:
        raise EwqError(
            f"the plan places blocks on {len(machines)} machines: give the "
            f"{len(machines) - 1} worker endpoint(s) in pipeline order "
            f"(--rpc host:port,...), not {len(rpc_eps)}"
        )
    for ep in rpc_eps:
        rpc.split_endpoint(ep)
    return [
        Stage(m.name, ep, tuple(m.exec_indices), m.weights_bytes)
        for m, ep in zip(machines, [None, *rpc_eps], strict=True)
    ]


class ClusterModel:
    """A GGUF model loaded by llama.cpp over the plan's workers.

    ``build(n_gpu_layers, tensor_split)`` makes what holds the model (a
    ``llama_cpp.Llama``, or llama-cpp-python's OpenAI-compatible server app, which
    loads it); by default a ``Llama``. The workers' devices are registered first,
    and llama.cpp's log of the load is read for ``layout``.
    """

    def __init__(
        self,
        model: str | Path,
        stages: Sequence[Stage],
        num_blocks: int,
        *,
        n_ctx: int = 2048,
        threads: int | None = None,
        logits_all: bool = False,
        repack: bool = True,
        kv_cache: str = "f16",
        build: Callable[[int, list[float]], Any] | None = None,
        beat: Callable[[], None] = lambda: None,
    ):
        import llama_cpp

        self.stages = list(stages)
        endpoints = [s.endpoint for s in stages if s.endpoint]
        rpc.on_abort(_describer(stages))
        rpc.add_workers(endpoints)
        blocks = range(2, num_blocks + 2)  # exec_index 2.. are llama.cpp's layers 0..
        ngl, split = llama_cpp_split(
            [sum(1 for i in s.exec_indices if i in blocks) for s in stages]
        )
        tensor_split = [float(c) for c in split]

        def llama(ngl: int, tensor_split: list[float]) -> Any:
            return llama_cpp.Llama(
                str(model),
                n_gpu_layers=ngl,
                split_mode=llama_cpp.LLAMA_SPLIT_MODE_LAYER,
                tensor_split=tensor_split or None,
                n_ctx=n_ctx,
                n_threads=threads,
                logits_all=logits_all,
                **cache_params(kv_cache),
                verbose=False,
            )

        make = functools.partial(build or llama, ngl, tensor_split)
        self.model, log = _load_logged(model, make, repack, beat)
        self.layout = _read_layout(log)
        self.n_gpu_layers, self.tensor_split = ngl, tensor_split

    def report(self) -> list[dict[str, Any]]:
        """Per stage: the plan's weights and llama.cpp's buffers and layers."""
        rows = []
        for s in self.stages:
            key = s.endpoint or "main"
            buf = self.layout.buffers.get(key, {})
            layers = sorted(il for il, d in self.layout.layers.items() if d == key)
            rows.append(
                {
                    "machine": s.machine,
                    "endpoint": s.endpoint,
                    "layers": layers,
                    "planned_weights_mib": s.weights_bytes / _MIB,
                    "model_mib": buf.get("model"),
                    "kv_mib": buf.get("KV"),
                    "compute_mib": buf.get("compute"),
                }
            )
        return rows


@contextlib.contextmanager
def model_params(**fields: Any) -> Iterator[None]:
    """Load models with these ``llama_model_params`` fields (llama-cpp-python sets
    no hook for them: its ``Llama`` takes llama.cpp's defaults and loads at once).

    ``use_extra_bufts=False`` is llama-server's ``--no-repack``: the main machine's
    CPU then runs the same kernels as the workers, whose RPC buffers are never
    repacked; with repacking (the default, faster) its results differ by rounding.
    """
    import llama_cpp.llama_cpp as c

    with _params_lock:
        default = c.llama_model_default_params

        def patched() -> Any:
            p = default()
            for k, v in fields.items():
                setattr(p, k, v)
            return p

        c.llama_model_default_params = patched
        try:
            yield
        finally:
            c.llama_model_default_params = default


_params_lock = threading.Lock()


def _read_layout(log: str) -> Layout:
    """Parse llama.cpp's load log: ``using device RPC0 (host:port)``, ``layer N
    assigned to device RPC0``, ``RPC0[host:port] model buffer size = X MiB``."""
    out = Layout()
    endpoint_of = {"CPU": "main"}
    for line in log.splitlines():
        if m := _DEVICE.search(line):
            endpoint_of[m.group(1)] = m.group(2)
        elif m := _LAYER.search(line):
            dev = m.group(2)
            out.layers[int(m.group(1))] = endpoint_of.get(dev, dev)
        elif m := _BUFFER.match(line.strip()):
            name, kind, mib = m.group(2), m.group(3), float(m.group(4))
            ep = name[name.index("[") + 1 : -1] if "[" in name else "main"
            out.buffers.setdefault(ep, {})
            out.buffers[ep][kind] = out.buffers[ep].get(kind, 0.0) + mib
    return out


def cache_params(kv_cache: str) -> dict[str, Any]:
    """llama-cpp-python's parameters for a KV cache type: the ggml type of K and V,
    and flash attention, which a quantized V cache needs (llama-server's
    ``--cache-type-k/-v X -fa on``)."""
    if kv_cache == "f16":
        return {}
    import gguf

    qtype = int(gguf.GGMLQuantizationType[kv_cache.upper()])
    return {"type_k": qtype, "type_v": qtype, "flash_attn": True}


def _describer(stages: Sequence[Stage]) -> Callable[[str], str]:
    """What a llama.cpp abort message becomes: the workers no longer reachable, by
    name, or llama.cpp's own reason."""
    by_endpoint = {s.endpoint: s.machine for s in stages if s.endpoint}

    def describe(message: str) -> str:
        message = re.sub(r"^\S+\.(?:c|cpp|h):\d+: ", "", message)  # the source line
        time.sleep(0.3)  # a worker that just died may still be closing its port
        lost = [ep for ep in by_endpoint if rpc.check_reachable(ep, 1.0) is not None]
        names = ", ".join(f"{by_endpoint[ep]} ({ep})" for ep in lost)
        if lost:
            return f"lost the worker(s) {names}: {message}"
        return f"llama.cpp stopped: {message}"

    return describe


def _load_logged(
    model: str | Path, make: Callable[[], Any], repack: bool, beat: Callable[[], None]
) -> tuple[Any, str]:
    """``make()`` with llama.cpp's log collected (the layout is read from it) and
    ``beat`` called as it loads and logs; quiet afterwards."""
    import llama_cpp

    lines: list[str] = []
    lock = threading.Lock()

    @llama_cpp.llama_log_callback
    def collect(level: int, text: bytes, user: object) -> None:
        beat()
        with lock:
            lines.append(text.decode("utf-8", "replace"))

    @llama_cpp.llama_progress_callback
    def loaded(fraction: float, user: object) -> bool:
        beat()  # llama.cpp calls it as it loads tensors (over RPC: sends them)
        return True

    _KEEP.extend((collect, loaded))  # C keeps the pointers for the process's life
    llama_cpp.llama_log_set(collect, None)
    try:
        with model_params(use_extra_bufts=repack, progress_callback=loaded):
            held = make()
    except (ValueError, RuntimeError) as exc:
        raise EwqError(f"{model}: llama.cpp cannot load it ({exc})") from None
    finally:  # quiet from here on, as verbose=False (the callback stays alive)
        quiet = llama_cpp.llama_log_callback(lambda level, text, user: None)
        _KEEP.append(quiet)
        llama_cpp.llama_log_set(quiet, None)
    return held, "".join(lines)


def load(
    model: str | Path,
    plan: Plan,
    *,
    endpoints: Sequence[str] | None = None,
    n_ctx: int = 2048,
    threads: int | None = None,
    logits_all: bool = False,
    repack: bool = True,
    build: Callable[[int, list[float]], Any] | None = None,
    beat: Callable[[], None] = lambda: None,
) -> ClusterModel:
    """Load ``model`` (the GGUF ``ewq quantize`` wrote from ``plan``) over the plan's
    workers; the workers must be running (``ewq worker``)."""
    stages = stages_of(plan, endpoints)
    kv_cache = plan.runtime.kv_cache if plan.runtime is not None else "f16"
    if plan.num_blocks is None:
        raise EwqError("the plan does not say how many blocks the model has")
    return ClusterModel(
        model,
        stages,
        plan.num_blocks,
        n_ctx=n_ctx,
        threads=threads,
        logits_all=logits_all,
        repack=repack,
        kv_cache=kv_cache,
        build=build,
        beat=beat,
    )


def complete(
    cm: ClusterModel,
    prompt: str,
    max_tokens: int,
    *,
    beat: Callable[[], None] = lambda: None,
) -> str:
    """The greedy completion of ``prompt``, calling ``beat`` at every token."""
    parts = []
    for chunk in cm.model.create_completion(
        prompt, max_tokens=max_tokens, temperature=0, stream=True
    ):
        beat()
        parts.append(chunk["choices"][0]["text"])
    return "".join(parts)
