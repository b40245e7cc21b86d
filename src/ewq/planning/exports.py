"""A placement in the syntax of the runtimes: llama.cpp's RPC cluster, vLLM's
pipeline stages. Each is derived from the runtime's own rule for where layers go.

llama.cpp (bundled build; ``src/llama.cpp`` and ``src/llama-model.cpp``):

* devices: RPC servers come first, in ``--rpc`` order ("add RPC servers at the front
  of the list to minimize network transfers"); a CPU-only main machine has no device
  of its own, and layers that are not offloaded stay on its CPU.
* ``-ngl N`` offloads the last N of the n_layer + 1 layers (the output layer counts
  as layer n_layer): layers below ``i_gpu_start = n_layer + 1 - N`` stay on the main
  machine's CPU, as does the input embedding (always, "there is very little benefit
  to offloading the input layer").
* ``--tensor-split`` gives the offloaded layers to the devices in proportion: layer
  ``il`` goes to the first device whose cumulative share exceeds
  ``(il - i_gpu_start) / N``. With integer counts that is exactly those counts, in
  device order; the output layer is the last one counted.

So a pipeline main -> s1 -> ... -> sk runs as ``--rpc s1,...,sk -ngl (layers not on
the main) + 1 --tensor-split c1,...,ck`` with ci the transformer blocks of si and the
output layer added to ck. This assumes the main machine computes on its CPU: a GPU
of its own would be a device after the RPC servers and take a share.

vLLM: ``--pipeline-parallel-size`` ranks in order, rank 0 on the first machine;
``VLLM_PP_LAYER_PARTITION`` counts decoder layers only; the embedding sits on the
first rank, the final norm and LM head on the last. Its compressed-tensors WNA16
kernels serve 4- and 8-bit integer weights only.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from typing import Any

from ewq.formats import FORMATS, GGUF, OutputFormat
from ewq.planning.budget import Machine
from ewq.planning.ladder import FitResult
from ewq.types import Precision

__all__ = ["RPC_PORT", "VLLM_SERVES", "exports", "llama_cpp_split"]

RPC_PORT = 50052  # llama.cpp rpc-server's default


#: what vLLM's compressed-tensors WNA16 kernels serve: 4- and 8-bit integer weights
VLLM_SERVES = frozenset({Precision.RAW, Precision.Q8, Precision.Q4})

#: the runtime behind each export, as a refusal names it
_RUNTIMES = {"llama_cpp": "llama.cpp", "vllm": "vLLM"}


def _stages(result: FitResult, transformer: Sequence[int]) -> list[tuple[str, int]]:
    """(machine, transformer blocks) for each machine of the pipeline, in order."""
    blocks = set(transformer)
    return [
        (a.name, sum(1 for i in a.exec_indices if i in blocks))
        for a in result.assignments
        if a.exec_indices
    ]


def llama_cpp_split(counts: Sequence[int]) -> tuple[int, list[int]]:
    """``-ngl`` and ``--tensor-split`` (one count per RPC server, in ``--rpc``
    order) that make llama.cpp put each stage's transformer blocks (``counts``, in
    pipeline order, the main machine first) where the plan put them."""
    if len(counts) < 2:
        return 0, []
    split = list(counts[1:])
    split[-1] += 1  # the output layer, with the last stage
    return sum(counts) - counts[0] + 1, split


def endpoint(machine: Machine) -> str:
    """host:port of a machine's RPC server (its name when no host is given)."""
    host = machine.host or machine.name
    return host if ":" in host.rsplit("]", 1)[-1] else f"{host}:{RPC_PORT}"


def exports(
    result: FitResult,
    machines: Sequence[Machine],
    transformer: Sequence[int],
    form: OutputFormat | None = None,
    kv_cache: str = "f16",
) -> dict[str, Any]:
    """The commands that run the plan on llama.cpp (GGUF) and vLLM (Hugging Face),
    or the reason a runtime cannot serve it."""
    if not result.fits:
        return {}
    by_name: Mapping[str, Machine] = {m.name: m for m in machines}
    out = {
        "llama_cpp": _llama_cpp(result, by_name, transformer, kv_cache),
        "vllm": _vllm(result, transformer),
    }
    unserved = sorted(
        {p.value for p in result.precision.values()} - {p.value for p in VLLM_SERVES}
    )
    serves = (form or GGUF).served_by
    for name in out:
        if name != serves:
            other = next(f for f in FORMATS.values() if f.served_by == name)
            out[name] = {
                "command": None,
                "refused": f"{_RUNTIMES[name]} serves {other.label} (plan with "
                f"--format {other.name})",
            }
    if serves == "vllm" and unserved:
        out["vllm"] = {
            "command": None,
            "refused": f"vLLM's compressed-tensors kernels serve 4- and 8-bit weights, "
            f"not {', '.join(unserved)}",
        }
    return out


def _llama_cpp(
    result: FitResult,
    by_name: Mapping[str, Machine],
    transformer: Sequence[int],
    kv_cache: str = "f16",
) -> dict[str, Any]:
    stages = _stages(result, transformer)
    ngl, split = llama_cpp_split([n for _, n in stages])
    rpc = [endpoint(by_name[name]) for name, _ in stages[1:]]
    args = ["llama-server", "-m", "MODEL.gguf", "-ngl", str(ngl)]
    if kv_cache != "f16":  # a quantized V cache needs flash attention
        args += ["--cache-type-k", kv_cache, "--cache-type-v", kv_cache, "-fa", "on"]
    if rpc:
        args += ["--split-mode", "layer", "--rpc", ",".join(rpc)]
        args += ["--tensor-split", ",".join(map(str, split))]
    workers = []
    for (name, _), ep in zip(stages[1:], rpc, strict=True):
        port = ep.rsplit(":", 1)[1]
        workers.append(
            {
                "machine": name,
                "endpoint": ep,
                "command": f"rpc-server --host 0.0.0.0 --port {port}",
                "ewq": f"ewq worker --host 0.0.0.0 --port {port}",
            }
        )
    return {
        "main": stages[0][0],
        "rpc": rpc,
        "n_gpu_layers": ngl,
        "tensor_split": split,
        "command": shlex.join(args),
        "workers": workers,
    }


def _vllm(result: FitResult, transformer: Sequence[int]) -> dict[str, Any]:
    stages = _stages(result, transformer)
    layers = [n for _, n in stages]
    partition = ",".join(map(str, layers))
    out: dict[str, Any] = {
        "pipeline_parallel_size": len(stages),
        "VLLM_PP_LAYER_PARTITION": partition,
        "ranks": [
            {"rank": r, "machine": name, "layers": n}
            for r, (name, n) in enumerate(stages)
        ],
        "command": (
            f"VLLM_PP_LAYER_PARTITION={partition} vllm serve MODEL "
            f"--pipeline-parallel-size {len(stages)}"
        ),
    }
    if 0 in layers:
        out["note"] = "a stage holds no decoder layer; vLLM needs at least one each"
    return out
