"""Tensor shapes from config.json alone: what FastEWQ needs without any weight.

One ``shape_tables/*.toml`` per family (keyed like the architecture tables) lists every
tensor a checkpoint of that family holds, with its shape as expressions over the
config (:mod:`ewq.arch.expr`). :func:`index_from_config` turns a config into a
metadata-only :class:`ModelIndex`, which the architecture map then groups into
blocks like any other source: per-block parameter counts follow exactly.
"""

from __future__ import annotations

import functools
import importlib.resources
import tomllib
from collections.abc import Mapping
from math import prod
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ewq.arch.expr import ExprError, evaluate, names_in
from ewq.arch.registry import find_table
from ewq.errors import FormatError, UnknownArchitectureError
from ewq.types import MAX_BLOCKS, ModelIndex, TensorInfo

_MAX_DIM = 2**40  # no tensor dimension of a real model comes near
_MAX_EXPERTS = 4096

__all__ = ["analytic_families", "index_from_config"]

_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "float64": "F64"}
_ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8}


class Entry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    shape: list[str] = Field(default_factory=list)
    when: str | None = None
    experts: str | None = None
    drop: bool = False


class ShapeTable(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    family: str
    extends: str | None = None
    layers: str | None = None
    defaults: dict[str, str] = Field(default_factory=dict)
    derived: dict[str, str] = Field(default_factory=dict)
    tensors: dict[str, Entry | list[str]] = Field(default_factory=dict)


@functools.cache
def _tables() -> dict[str, ShapeTable]:
    out = {}
    for entry in importlib.resources.files("ewq.arch.shape_tables").iterdir():
        if entry.name.endswith(".toml"):
            table = ShapeTable.model_validate(tomllib.loads(entry.read_text("utf-8")))
            out[table.family] = table
    return out


@functools.cache
def _resolved(family: str) -> ShapeTable:
    table = _tables()[family]
    if table.extends is None:
        return table
    parent = _resolved(table.extends)
    tensors = dict(parent.tensors)
    for name, entry in table.tensors.items():
        if isinstance(entry, Entry) and entry.drop:
            tensors.pop(name, None)
        else:
            tensors[name] = entry
    return ShapeTable(
        family=family,
        layers=table.layers or parent.layers,
        defaults={**parent.defaults, **table.defaults},
        derived={**parent.derived, **table.derived},
        tensors=tensors,
    )


def analytic_families() -> list[str]:
    return sorted(_tables())


def _plain(v: Any) -> bool:
    """A value an expression may read: a scalar, or a list of scalars (a config's
    list of layer numbers, such as Qwen2-MoE's mlp_only_layers)."""
    if isinstance(v, list):
        return all(isinstance(x, int | float | str | bool) for x in v)
    return not isinstance(v, dict)


def _names(config: Mapping[str, Any], table: ShapeTable) -> dict[str, Any]:
    names = {k: v for k, v in config.items() if _plain(v)}
    text_config = config.get("text_config")  # multimodal wrappers (Gemma-3, Llava)
    if isinstance(text_config, dict):
        names = {**names, **{k: v for k, v in text_config.items() if _plain(v)}}
    for key, expr in table.defaults.items():
        if names.get(key) is None:
            names[key] = evaluate(expr, names)
    return names


def index_from_config(config: Mapping[str, Any], source: str) -> ModelIndex:
    """A metadata-only index of every tensor ``config`` implies (shapes, sizes).

    Raises :class:`UnknownArchitectureError` for a family without a shape table and
    :class:`FormatError` for a config missing a key its family needs.
    """
    family = _family(config, source)
    table = _resolved(family)
    dtype = _DTYPES.get(
        str(config.get("torch_dtype") or config.get("dtype") or ""), "BF16"
    )
    try:
        tensors = _tensors(config, table, dtype, source)
    except ExprError as exc:
        if exc.missing:
            raise FormatError(
                f"{source}: config.json lacks '{exc.missing}', which a {family} "
                "model's shapes need"
            ) from None
        raise FormatError(f"{source}: {exc}") from None
    except (TypeError, ValueError, OverflowError, ZeroDivisionError) as exc:
        raise FormatError(
            f"{source}: config values do not give shapes ({exc})"
        ) from None
    return ModelIndex(
        source=source,
        container="config",
        files=(source,),
        tensors=tuple(tensors),
        config=dict(config),
        metadata_only=True,
    )


def _family(config: Mapping[str, Any], source: str) -> str:
    archs = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    model_type = config.get("model_type")
    family = find_table(
        archs, model_type if isinstance(model_type, str) else None, "config"
    )
    if family is None or family not in _tables():
        raise UnknownArchitectureError(
            f"{source}: no analytic parameter rule for "
            f"{(archs or [model_type or 'this model'])[0]} (rules exist for "
            f"{', '.join(analytic_families())}); use the safetensors headers instead "
            "(a model folder or a hub id)"
        )
    return family


def _tensors(
    config: Mapping[str, Any], table: Any, dtype: str, source: str
) -> list[TensorInfo]:
    """Every tensor the table's templates give for this config, in table order."""
    names = _names(config, table)
    n_layers = int(evaluate(table.layers or "num_hidden_layers", names))
    if not 1 <= n_layers <= MAX_BLOCKS:
        raise FormatError(
            f"config.json declares {n_layers} layers; ewq plans models of 1 to "
            f"{MAX_BLOCKS} (Llama-3.1-405B has 126)"
        )
    # names that change from layer to layer: N and what is derived from it
    per_layer = {"N"}
    for key, expr in table.derived.items():
        if names_in(expr) & per_layer:
            per_layer.add(key)
    base = dict(names, N=-1)
    for key, expr in table.derived.items():
        if key not in per_layer:
            base[key] = evaluate(expr, base)
    tensors = []
    for template, raw in table.tensors.items():
        entry = raw if isinstance(raw, Entry) else Entry(shape=raw)
        exprs = [*entry.shape, entry.when or "True", entry.experts or "1"]
        varies = any(names_in(e) & per_layer for e in exprs)
        cached = None
        for n in range(n_layers) if "{N}" in template else [None]:
            if cached is None or varies:
                scope = base
                if varies:
                    scope = dict(base, N=n if n is not None else -1)
                    for key in table.derived:
                        if key in per_layer:
                            scope[key] = evaluate(table.derived[key], scope)
                cached = _shape(template, entry, scope, source)
            keep, shape, count = cached
            if not keep:
                continue
            nbytes = prod(shape) * _ITEMSIZE[dtype]
            for e in range(count):
                name = template.replace("{N}", str(n)).replace("{E}", str(e))
                tensors.append(TensorInfo(name, dtype, shape, nbytes, source, 0))
    return tensors


def _shape(
    template: str, entry: Entry, scope: Mapping[str, Any], source: str
) -> tuple[bool, tuple[int, ...], int]:
    """Whether the tensor exists in ``scope``, its shape, and its count of experts."""
    keep = entry.when is None or bool(evaluate(entry.when, scope))
    shape = tuple(int(evaluate(e, scope)) for e in entry.shape) if keep else ()
    count = int(evaluate(entry.experts, scope)) if entry.experts and keep else 1
    if any(d < 0 or d > _MAX_DIM for d in shape) or not 0 <= count <= _MAX_EXPERTS:
        raise FormatError(
            f"{source}: config values give {template} the shape {shape} x {count}, "
            "which no model has"
        )
    return keep, shape, count
