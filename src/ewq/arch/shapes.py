"""Tensor shapes from config.json alone: what FastEWQ needs without any weight.

A family's table (``tables/*.toml``, :mod:`ewq.arch.registry`) gives each tensor
its shape as expressions over the config (:mod:`ewq.arch.expr`).
:func:`index_from_config` turns a config into a metadata-only :class:`ModelIndex`,
which the architecture map then groups into blocks like any other source: per-block
parameter counts follow exactly.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from math import prod
from typing import Any

from ewq.arch.expr import ExprError, evaluate, names_in
from ewq.arch.registry import ArchTable, Shape, compiled, find_table, load_tables
from ewq.errors import FormatError, UnknownArchitectureError
from ewq.types import MAX_BLOCKS, Container, ModelIndex, TensorInfo

_MAX_DIM = 2**40  # no tensor dimension of a real model comes near
_MAX_EXPERTS = 4096

__all__ = ["analytic_families", "index_from_config"]

_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "float64": "F64"}
_ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8}
_FIELDS = (("weight", ".weight"), ("bias", ".bias"), ("tensor", ""))


def analytic_families() -> list[str]:
    """The families whose tables give shapes from config.json."""
    return sorted(name for name in load_tables() if compiled(name).analytic)


def _shapes(table: ArchTable) -> Iterator[tuple[str, Shape]]:
    """Every (full tensor name template, shape) the table declares, in table order."""
    prefix = (table.shapes.prefix or "") if table.shapes else ""
    for template, entry in table.tensors.items():
        for field, suffix in _FIELDS:
            shape = getattr(entry, field)
            if shape is None or shape is False:
                continue
            if isinstance(shape, list):
                shape = Shape(shape=shape)
            yield ("" if entry.top else prefix) + template + suffix, shape


def _plain(v: Any) -> bool:
    """A value an expression may read: a scalar, or a list of scalars (a config's
    list of layer numbers, such as Qwen2-MoE's mlp_only_layers)."""
    if isinstance(v, list):
        return all(isinstance(x, int | float | str | bool) for x in v)
    return not isinstance(v, dict)


def _names(config: Mapping[str, Any], table: ArchTable) -> dict[str, Any]:
    names = {k: v for k, v in config.items() if _plain(v)}
    text_config = config.get("text_config")  # multimodal wrappers (Gemma-3, Llava)
    if isinstance(text_config, dict):
        names = {**names, **{k: v for k, v in text_config.items() if _plain(v)}}
    for key, expr in table.shapes.defaults.items():
        if names.get(key) is None:
            names[key] = evaluate(expr, names)
    return names


def index_from_config(config: Mapping[str, Any], source: str) -> ModelIndex:
    """A metadata-only index of every tensor ``config`` implies (shapes, sizes).

    Raises :class:`UnknownArchitectureError` for a family whose table gives no shapes and
    :class:`FormatError` for a config missing a key its family needs.
    """
    family = _family(config, source)
    table = compiled(family).table
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
        archs, model_type if isinstance(model_type, str) else None, Container.CONFIG
    )
    if family is None or not compiled(family).analytic:
        raise UnknownArchitectureError(
            f"{source}: no analytic parameter rule for "
            f"{(archs or [model_type or 'this model'])[0]} (rules exist for "
            f"{', '.join(analytic_families())}); use the safetensors headers instead "
            "(a model folder or a hub id)"
        )
    return family


def _layers(table: ArchTable, names: Mapping[str, Any]) -> int:
    for key in table.num_blocks_keys:
        if names.get(key) is not None:
            return int(evaluate(key, names))
    raise ExprError(
        f"no {' or '.join(table.num_blocks_keys)}", table.num_blocks_keys[0]
    )


def _tensors(
    config: Mapping[str, Any], table: ArchTable, dtype: str, source: str
) -> list[TensorInfo]:
    """Every tensor the table's templates give for this config, in table order."""
    names = _names(config, table)
    derived = table.shapes.derived
    n_layers = _layers(table, names)
    if not 1 <= n_layers <= MAX_BLOCKS:
        raise FormatError(
            f"config.json declares {n_layers} layers; ewq plans models of 1 to "
            f"{MAX_BLOCKS} (Llama-3.1-405B has 126)"
        )
    # names that change from layer to layer: N and what is derived from it
    per_layer = {"N"}
    for key, expr in derived.items():
        if names_in(expr) & per_layer:
            per_layer.add(key)
    base = dict(names, N=-1)
    for key, expr in derived.items():
        if key not in per_layer:
            base[key] = evaluate(expr, base)
    tensors = []
    for template, entry in _shapes(table):
        exprs = [*entry.shape, entry.when or "True", entry.experts or "1"]
        varies = any(names_in(e) & per_layer for e in exprs)
        cached = None
        for n in range(n_layers) if "{N}" in template else [None]:
            if cached is None or varies:
                scope = base
                if varies:
                    scope = dict(base, N=n if n is not None else -1)
                    for key in derived:
                        if key in per_layer:
                            scope[key] = evaluate(derived[key], scope)
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
    template: str, entry: Shape, scope: Mapping[str, Any], source: str
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
