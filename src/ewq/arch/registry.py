"""Architecture tables: loaded on first use, validated strictly, compiled to flat dicts.

One ``tables/*.toml`` per family lists module-path templates
(``layers.{N}.self_attn.q_proj``), each with its role and, for families whose shapes
follow from config.json, the shape of its ``.weight`` / ``.bias`` as expressions over
the config (read by :mod:`ewq.arch.shapes`). Compiling expands every template under
each of the table's prefixes and adds the suffixes, so resolving a tensor name is:
replace its numeric path parts by ``{N}`` (block) and ``{E}`` (expert), then one dict
lookup.
"""

from __future__ import annotations

import functools
import importlib.resources
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ewq.types import ParamKind, Role

__all__ = [
    "ArchTable",
    "CompiledTable",
    "Shape",
    "ShapeRule",
    "TensorEntry",
    "GenericTable",
    "compiled",
    "find_table",
    "generic_table",
    "load_tables",
    "param_kind",
    "template_of",
]

_NUMBER = re.compile(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)")
_SUFFIXES = {".weight": ParamKind.WEIGHT, ".bias": ParamKind.BIAS}


class Shape(BaseModel):
    """One tensor's shape as expressions over the config (:mod:`ewq.arch.expr`);
    ``when`` keeps the tensor only where it is true, ``experts`` repeats it per
    expert (``{E}`` in the template)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    shape: list[str]
    when: str | None = None
    experts: str | None = None


# a shape: its expressions alone, with conditions, or ``false``: the family has no
# such tensor although the table it extends does
ShapeField = list[str] | Shape | Literal[False] | None


class TensorEntry(BaseModel):
    """A module (or, with ``tensor``, a bare parameter or buffer) of one family."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    role: Role | None = None
    weight: ShapeField = None
    bias: ShapeField = None
    tensor: ShapeField = None  # the template names the tensor itself (no suffix)
    top: bool = False  # outside the base model (lm_head): no shapes.prefix


class ShapeRule(BaseModel):
    """How a family's config gives its shapes: the prefix transformers writes the
    base model under, and values the config may lack or leave null (``defaults``,
    as transformers' config classes fill them) or computes (``derived``; those naming
    ``N`` are evaluated per layer)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prefix: str | None = None
    defaults: dict[str, str] = Field(default_factory=dict)
    derived: dict[str, str] = Field(default_factory=dict)


class ArchTable(BaseModel):
    """One model family's tensors, as written in its TOML file."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    description: str
    extends: str | None = None
    architectures: list[str] = Field(default_factory=list)
    model_types: list[str] = Field(default_factory=list)
    containers: list[str] = Field(default_factory=list)  # a source container it names
    num_blocks_keys: list[str] = Field(default_factory=list)
    prefixes: list[str] = Field(default_factory=list)
    shapes: ShapeRule | None = None
    tensors: dict[str, TensorEntry] = Field(default_factory=dict)

    @field_validator("tensors", mode="before")
    @classmethod
    def _bare_roles(cls, value: object) -> object:
        """``"template" = "role"``: an entry with a role and no shape."""
        if isinstance(value, dict):
            return {
                k: {"role": v} if isinstance(v, str) else v for k, v in value.items()
            }
        return value


class GenericTable(BaseModel):
    """The fallback table: role keywords for names no family table knows."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    description: str
    embedding_words: list[str]
    keywords: dict[str, Role]


@dataclass(frozen=True)
class CompiledTable:
    """A family table with ``extends`` resolved and templates expanded to full keys."""

    table: ArchTable
    lookup: Mapping[str, tuple[Role, ParamKind]]

    @property
    def analytic(self) -> bool:
        """Whether config.json alone gives this family's shapes."""
        return self.table.shapes is not None

    @property
    def name(self) -> str:
        return self.table.name


def param_kind(name: str) -> ParamKind:
    """``.weight`` -> WEIGHT, ``.bias`` -> BIAS, anything else (buffers) -> OTHER."""
    for suffix, kind in _SUFFIXES.items():
        if name.endswith(suffix):
            return kind
    return ParamKind.OTHER


def template_of(name: str) -> tuple[str, tuple[int, ...]]:
    """``model.layers.3.mlp.experts.7.w1.weight`` -> (``model.layers.{N}.mlp.experts.{E}.w1.weight``, (3, 7))."""
    numbers: list[int] = []

    def repl(match: re.Match[str]) -> str:
        numbers.append(int(match.group()))
        return "{N}" if len(numbers) == 1 else "{E}"

    return _NUMBER.sub(repl, name), tuple(numbers)


def _read(filename: str) -> dict:
    return tomllib.loads(
        importlib.resources.files("ewq.arch.tables")
        .joinpath(filename)
        .read_text("utf-8")
    )


@functools.cache
def load_tables() -> dict[str, ArchTable]:
    """Every family table shipped with ewq, by name (``extends`` not yet applied)."""
    tables: dict[str, ArchTable] = {}
    for entry in importlib.resources.files("ewq.arch.tables").iterdir():
        if not entry.name.endswith(".toml") or entry.name == "generic.toml":
            continue
        table = ArchTable.model_validate(_read(entry.name))
        if table.name in tables:
            raise ValueError(f"two architecture tables are named {table.name!r}")
        tables[table.name] = table
    for table in tables.values():
        if table.extends is not None and table.extends not in tables:
            raise ValueError(
                f"table {table.name!r} extends unknown table {table.extends!r}"
            )
    return tables


@functools.cache
def generic_table() -> GenericTable:
    return GenericTable.model_validate(_read("generic.toml"))


def _merged(parent: BaseModel | None, child: BaseModel | None) -> BaseModel | None:
    """``child`` over ``parent``, field by field: what the child sets wins."""
    if parent is None or child is None:
        return child or parent
    return parent.model_copy(
        update={k: getattr(child, k) for k in child.model_fields_set}
    )


def _resolved(name: str) -> ArchTable:
    """The table with its ancestors' fields filled in (the child wins, per tensor
    field: a child may add a bias to its parent's module and keep its role)."""
    tables = load_tables()
    table = tables[name]
    if table.extends is None:
        return table
    parent = _resolved(table.extends)
    tensors = dict(parent.tensors)
    for template, entry in table.tensors.items():
        tensors[template] = _merged(tensors.get(template), entry)
    shapes = _merged(parent.shapes, table.shapes)
    if shapes is not None and parent.shapes is not None and table.shapes is not None:
        shapes = shapes.model_copy(
            update={
                "defaults": {**parent.shapes.defaults, **table.shapes.defaults},
                "derived": {**parent.shapes.derived, **table.shapes.derived},
            }
        )
    return table.model_copy(
        update={
            "num_blocks_keys": table.num_blocks_keys or parent.num_blocks_keys,
            "prefixes": table.prefixes or parent.prefixes,
            "shapes": shapes,
            "tensors": tensors,
        }
    )


@functools.cache
def compiled(name: str) -> CompiledTable:
    table = _resolved(name)
    lookup: dict[str, tuple[Role, ParamKind]] = {}
    for template, entry in table.tensors.items():
        if entry.role is None:
            raise ValueError(
                f"table {name!r}: {template} has a shape but no role (none inherited)"
            )
        for prefix in table.prefixes:
            key = prefix + template
            lookup[key] = (entry.role, ParamKind.OTHER)
            for suffix, kind in _SUFFIXES.items():
                lookup[key + suffix] = (entry.role, kind)
    return CompiledTable(table, lookup)


def find_table(
    architectures: list[str], model_type: str | None, container: str
) -> str | None:
    """Name of the table for a model, by its source container, then architecture
    class, then model_type."""
    tables = load_tables()
    for table in tables.values():
        if container in table.containers:
            return table.name
    for arch in architectures:
        for table in tables.values():
            if arch in table.architectures:
                return table.name
    if model_type:
        for table in tables.values():
            if model_type in table.model_types:
                return table.name
    return None
