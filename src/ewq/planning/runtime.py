"""The memory a runtime adds to the weights: KV cache and compute buffers.

Pure: hyperparameters from the model's metadata (GGUF keys or config.json), no
weight read. The rules are llama.cpp's (the bundled build; file names are its
sources), checked against the sizes it reports for the default model:

* KV cache (``src/llama-kv-cache.cpp``): per transformer layer, K and V rows of
  n_head_kv * head_dim elements for every cell, in the cache type (f16: 2 bytes;
  q8_0 and q4_0: 34 and 18 bytes per 32 values).
  The cells are the context rounded up to a multiple of 256
  (``src/llama-context.cpp``: ``GGML_PAD(n_ctx, 256)``). Sliding-window layers
  (Gemma-2/3) keep min(cells, pad256(window + n_ubatch)) cells, as llama-server does
  (``--swa-full`` off; ``src/llama-kv-cache-iswa.cpp``).
* Compute buffer (``sched_reserve``: the graph for one micro-batch of n_ubatch
  tokens, 512 by default, its tensors packed by ggml's allocator): the larger of the
  output phase, 4 * n_ubatch * (n_vocab + 3 * n_embd) bytes (float32 logits for
  every token of the batch), and the attention phase without flash attention,
  4 * n_ubatch * (n_head * cells + cells + n_ff + 3 * n_embd) (the float32 KQ
  matrix). Measured on SmolLM2-135M: 98.25, 99.38, 166.38 MiB at contexts 512,
  2048, 8192 against 99.38, 99.38, 166.38 predicted. With flash attention llama.cpp
  needs at most the same, within 4%.
* Output buffer: float32 logits for one sequence (n_vocab * 4 bytes).

In a cluster every machine runs its part of the graph: each holds the KV cache of
its own layers and a compute buffer of the attention phase; the output phase lands
on the machine of the head (measured with three RPC workers at context 512:
15.26 MiB on a worker without the head, 97.12 MiB with it, 16.38 MiB on the main
machine, against 16.38 and 99.38 predicted).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ewq.arch import ModelLayout
from ewq.formats import OutputFormat
from ewq.planning.placement import Route
from ewq.types import Container, ModelIndex, Role

__all__ = ["UBATCH", "Runtime", "model_dims", "route_for", "runtime_memory"]

UBATCH = 512  # llama.cpp's default micro-batch (n_ubatch)
_PAD = 256
# GGUF architectures whose layers alternate sliding-window and global attention:
# every n-th layer is global (llama.cpp's set_swa_pattern in src/llama-model.cpp)
_SWA_PATTERN = {"gemma2": 2, "gemma3": 6, "cohere2": 4}


@dataclass(frozen=True)
class Runtime:
    """What the runtime allocates beside the weights, for ``context`` tokens."""

    context: int
    cells: int  # KV cells of a global-attention layer
    kv_bytes: Mapping[int, int]  # per transformer block (exec_index)
    compute_bytes: int  # the compute buffer of the machine that holds the head
    output_bytes: int  # logits of one sequence
    attention_bytes: int = 0  # the compute buffer of every other machine
    kv_cache: str = "f16"  # the cache type (llama.cpp's --cache-type-k/-v)

    @property
    def buffers_bytes(self) -> int:
        """The head's machine's buffers (a single machine's)."""
        return self.compute_bytes + self.output_bytes

    @property
    def stage_bytes(self) -> int:
        """Every machine's buffers; the head's machine needs ``head_bytes`` more."""
        return max(self.attention_bytes, 0) + self.output_bytes

    @property
    def head_bytes(self) -> int:
        return self.buffers_bytes - self.stage_bytes


def _pad(n: int, to: int = _PAD) -> int:
    return -(-n // to) * to


def _int(value: Any, what: str) -> int:
    if isinstance(value, list):  # per-layer values (some GGUFs): take the largest
        value = max((v for v in value if isinstance(v, int)), default=None)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"no usable {what} in the model's metadata ({value!r})")
    return value


def _first(cfg: Mapping[str, Any], *keys: str) -> Any:
    """The first of ``keys`` config.json has (families name the same thing apart)."""
    return next((cfg[k] for k in keys if cfg.get(k) is not None), None)


def model_dims(index: ModelIndex, layout: ModelLayout) -> dict[str, Any]:
    """Hidden size, heads, vocabulary... from the metadata (ValueError if missing)."""
    cfg = index.config
    embed = next(
        (
            i
            for i, k in layout.keys.items()
            if k.role is Role.EMBED and k.kind.value == "weight"
        ),
        None,
    )
    shapes = {t.name: t.shape for t in index.tensors}
    if index.container == Container.GGUF:
        arch = cfg.get("general.architecture")
        get = lambda key, default=None: cfg.get(f"{arch}.{key}", default)  # noqa: E731
        n_embd = _int(get("embedding_length"), "embedding_length")
        n_head = _int(get("attention.head_count"), "attention.head_count")
        n_kv = _int(get("attention.head_count_kv", n_head), "head_count_kv")
        hd = n_embd // max(1, n_head)
        dk = _int(get("attention.key_length", hd), "attention.key_length")
        dv = _int(get("attention.value_length", hd), "attention.value_length")
        n_ff = _int(get("feed_forward_length", 4 * n_embd), "feed_forward_length")
        window = get("attention.sliding_window")
        pattern = _SWA_PATTERN.get(str(arch))
        n = layout.num_blocks
        swa = {il for il in range(n) if pattern and window and (il + 1) % pattern}
    else:
        n_embd = _int(_first(cfg, "hidden_size", "n_embd", "d_model"), "hidden_size")
        n_head = _int(
            _first(cfg, "num_attention_heads", "n_head", "num_heads"),
            "num_attention_heads",
        )
        n_kv = _int(
            _first(cfg, "num_key_value_heads", "n_head_kv", "num_kv_heads") or n_head,
            "num_key_value_heads",
        )
        dk = dv = _int(cfg.get("head_dim") or n_embd // max(1, n_head), "head_dim")
        n_ff = _int(
            _first(cfg, "intermediate_size", "n_inner", "ffn_dim") or 4 * n_embd,
            "intermediate_size",
        )
        window = cfg.get("sliding_window")
        types = cfg.get("layer_types")
        swa = (
            {i for i, t in enumerate(types) if t == "sliding_attention"}
            if isinstance(types, list)
            else set()
        )
    vocab = (
        shapes[embed][0] if embed in shapes else _int(cfg.get("vocab_size"), "vocab")
    )
    return {
        "n_embd": n_embd,
        "n_head": n_head,
        "kv_row": n_kv * (dk + dv),
        "n_ff": n_ff,
        "n_vocab": vocab,
        "window": window if isinstance(window, int) and window > 0 else None,
        "swa": swa,
    }


def runtime_memory(
    index: ModelIndex,
    layout: ModelLayout,
    context: int,
    *,
    ubatch: int = UBATCH,
    cache_type: str = "f16",
) -> Runtime:
    """KV cache per block and buffers for ``context`` tokens (llama.cpp's rules), the
    cache in ``cache_type`` (f16, q8_0 or q4_0: rows of head_dim values in that
    type's blocks, as ``llama_kv_cache`` allocates them)."""
    if context <= 0:
        raise ValueError("context must be > 0")
    d = model_dims(index, layout)
    row_bytes = _row_bytes(d["kv_row"], cache_type)
    cells = _pad(context)
    ub = min(ubatch, cells)
    kv = {}
    for il, block in enumerate(layout.transformer_blocks):
        n = cells
        if il in d["swa"] and d["window"]:
            n = min(cells, _pad(d["window"] + ub))
        kv[block.exec_index] = row_bytes * n
    output_phase = 4 * ub * (d["n_vocab"] + 3 * d["n_embd"])
    attention = 4 * ub * (d["n_head"] * cells + cells + d["n_ff"] + 3 * d["n_embd"])
    return Runtime(
        context=context,
        cells=cells,
        kv_bytes=kv,
        compute_bytes=max(output_phase, attention),
        output_bytes=4 * d["n_vocab"],
        attention_bytes=attention,
        kv_cache=cache_type,
    )


def _row_bytes(elements: int, cache_type: str) -> int:
    """Bytes of one KV cell's K and V rows (``elements`` values) in ``cache_type``."""
    import gguf

    try:
        qtype = gguf.GGMLQuantizationType[cache_type.upper()]
    except KeyError:
        raise ValueError(f"unknown KV cache type {cache_type!r}") from None
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    if elements % block:
        raise ValueError(
            f"a KV row of {elements} values does not fit {cache_type} blocks of {block}"
        )
    return elements // block * size


def route_for(
    index: ModelIndex,
    layout: ModelLayout,
    form: OutputFormat,
    runtime: Runtime | None = None,
) -> Route:
    """What crosses the network per token when ``form`` runs on its runtime:
    llama.cpp for GGUF (float32 hidden states and logits, relayed through the main
    machine), vLLM for Hugging Face output (hidden states, one sampled token back).
    Metadata without the sizes gives a route without bytes (latency only)."""
    tied = not any(k.role is Role.LM_HEAD for k in layout.blocks[-1].keys)
    last = runtime.head_bytes if runtime is not None else 0
    relay = form.relay
    try:
        d = model_dims(index, layout)
    except ValueError:
        return Route(relay=relay, tied=tied, last_bytes=last)
    if relay:
        return Route(4 * d["n_embd"], 4 * d["n_vocab"], True, tied, last)
    return Route(4 * d["n_embd"], 8, False, tied, last)
