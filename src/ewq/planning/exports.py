"""A placement in the syntax of the runtimes: vLLM pipeline stages, llama.cpp RPC."""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from typing import Any

from ewq.planning.budget import Machine
from ewq.planning.ladder import FitResult
from ewq.types import Precision

__all__ = ["exports"]

RPC_PORT = 50052  # llama.cpp rpc-server's default


#: what vLLM's compressed-tensors WNA16 kernels serve: 4- and 8-bit integer weights
VLLM_SERVES = frozenset({Precision.RAW, Precision.Q8, Precision.Q4})


def exports(
    result: FitResult,
    machines: Sequence[Machine],
    transformer: Sequence[int],
    fmt: str = "gguf",
) -> dict[str, Any]:
    """vLLM's ``VLLM_PP_LAYER_PARTITION`` and llama.cpp's ``--rpc``/``--tensor-split``.

    Only machines that hold blocks are stages; each stage's number is its count of
    transformer blocks (vLLM and llama.cpp place the embedding with the first stage
    and the head with the last, as the contiguous placement does).
    """
    if not result.fits:
        return {}
    out = _exports(result, machines, transformer)
    unserved = sorted(
        {p.value for p in result.precision.values()} - {p.value for p in VLLM_SERVES}
    )
    if fmt != "hf":
        out["vllm"] = {
            "command": None,
            "refused": "vLLM serves the Hugging Face output (plan with --format hf)",
        }
    elif unserved:
        out["vllm"] = {
            "command": None,
            "refused": f"vLLM's compressed-tensors kernels serve 4- and 8-bit weights, "
            f"not {', '.join(unserved)}",
        }
    if fmt != "gguf":
        out["llama_cpp"] = {
            "command": None,
            "refused": "llama.cpp serves GGUF files (plan with --format gguf)",
        }
    return out


def _exports(
    result: FitResult, machines: Sequence[Machine], transformer: Sequence[int]
) -> dict[str, Any]:
    blocks = set(transformer)
    by_name: Mapping[str, Machine] = {m.name: m for m in machines}
    stages = [
        (a.name, sum(1 for i in a.exec_indices if i in blocks))
        for a in result.machines
        if a.exec_indices
    ]
    layers = [n for _, n in stages]
    vllm: dict[str, Any] = {
        "pipeline_parallel_size": len(stages),
        "VLLM_PP_LAYER_PARTITION": ",".join(map(str, layers)),
        "command": (
            f"VLLM_PP_LAYER_PARTITION={','.join(map(str, layers))} vllm serve MODEL "
            f"--pipeline-parallel-size {len(stages)}"
        ),
    }
    if 0 in layers:
        vllm["note"] = (
            "a stage holds no transformer block; vLLM needs at least one each"
        )
    hosts = []
    for name, _ in stages[1:]:
        host = by_name[name].host or name
        hosts.append(host if ":" in host else f"{host}:{RPC_PORT}")
    args = ["llama-server", "-m", "MODEL.gguf", "--split-mode", "layer"]
    if hosts:
        args += ["--rpc", ",".join(hosts)]
    args += ["--tensor-split", ",".join(map(str, layers))]
    llama = {
        "main": stages[0][0],
        "rpc": hosts,
        "tensor_split": layers,
        "command": shlex.join(args),
        "rpc_servers": [
            f"on {name}: rpc-server --host 0.0.0.0 --port {h.rsplit(':', 1)[1]}"
            for (name, _), h in zip(stages[1:], hosts, strict=True)
        ],
    }
    return {"vllm": vllm, "llama_cpp": llama}
