"""JSON documents from files, read with limits, and config.json checked where it
enters.

Python's json module raises RecursionError on deep nesting and ValueError on an
integer of more than 4,300 digits, and accepts NaN and Infinity: :func:`load_json`
turns all of these into one :class:`FormatError` naming the file. :func:`check_config`
refuses a config.json whose well-known keys have the wrong type or an absurd value
(a vocabulary of Infinity, a head count of 0, architectures that are not strings,
a tie flag that is the string "false"), so no later stage meets them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from ewq.errors import FormatError

__all__ = ["check_config", "load_json"]

MAX_DEPTH = 64
MAX_INT = (
    2**53
)  # larger counts cannot be sizes of a real model (and lose float precision)

_COUNTS = (  # non-negative integers wherever they appear (text_config included)
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "max_position_embeddings",
    "num_experts",
    "num_local_experts",
    "n_routed_experts",
    "n_shared_experts",
    "moe_intermediate_size",
    "kv_lora_rank",
    "q_lora_rank",
    "qk_rope_head_dim",
    "qk_nope_head_dim",
    "v_head_dim",
    "n_embd",
    "n_head",
    "n_layer",
    "n_inner",
    "sliding_window",
    "first_k_dense_replace",
)
_POSITIVE = ("num_attention_heads", "n_head", "hidden_size", "n_embd")


def _depth(doc: Any, limit: int = MAX_DEPTH) -> int:
    stack = [(doc, 1)]
    deepest = 0
    while stack:
        node, d = stack.pop()
        deepest = max(deepest, d)
        if d > limit:
            return d
        if isinstance(node, dict):
            stack.extend((v, d + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, d + 1) for v in node)
    return deepest


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number JSON allows")


def load_json(text: str | bytes, origin: str) -> Any:
    """Decode ``text``; any malformed, too deep, too large or non-finite document is
    a :class:`FormatError` naming ``origin``."""
    try:
        doc = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise FormatError(f"{origin}: JSON nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        first = str(exc).splitlines()[0][:200]
        raise FormatError(f"{origin}: not valid JSON ({first})") from None
    if _depth(doc) > MAX_DEPTH:
        raise FormatError(f"{origin}: JSON nested deeper than {MAX_DEPTH} levels")
    return doc


def check_config(config: Any, origin: str) -> dict[str, Any]:
    """``config`` if its well-known keys are usable, else a one-line FormatError."""
    if not isinstance(config, dict):
        raise FormatError(f"{origin}: not a JSON object")
    _check_level(config, origin)
    text = config.get("text_config")
    if text is not None:
        if not isinstance(text, dict):
            raise FormatError(f"{origin}: text_config is not an object")
        _check_level(text, f"{origin} (text_config)")
    return config


def _check_level(cfg: Mapping[str, Any], origin: str) -> None:
    archs = cfg.get("architectures")
    if archs is not None and (
        not isinstance(archs, list) or not all(isinstance(a, str) for a in archs)
    ):
        raise FormatError(f"{origin}: architectures must be a list of names")
    for key in ("model_type", "torch_dtype", "dtype"):
        value = cfg.get(key)
        if value is not None and not isinstance(value, str):
            raise FormatError(f"{origin}: {key} must be a string, not {value!r:.40}")
    tie = cfg.get("tie_word_embeddings")
    if tie is not None and not isinstance(tie, bool):
        raise FormatError(
            f"{origin}: tie_word_embeddings must be true or false, not {tie!r:.40}"
        )
    for key in _COUNTS:
        value = cfg.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and math.isfinite(value) and value.is_integer():
                continue  # 4096.0: some exporters write counts as floats
            raise FormatError(
                f"{origin}: {key} must be a whole number, not {value!r:.40}"
            )
        if not 0 <= value <= MAX_INT:
            raise FormatError(f"{origin}: {key} = {value:.3g} is out of range")
        if key in _POSITIVE and value == 0:
            raise FormatError(f"{origin}: {key} must be at least 1")
