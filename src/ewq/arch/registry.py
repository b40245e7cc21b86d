"""Architecture tables: loaded on first use, validated strictly, compiled to flat dicts.

Each ``tables/*.toml`` lists module-path templates (``layers.{N}.self_attn.q_proj``)
with their role. Compiling expands every template under each of the table's prefixes
and adds the ``.weight`` / ``.bias`` suffixes, so resolving a tensor name is: replace
its numeric path parts by ``{N}`` (block) and ``{E}`` (expert), then one dict lookup.
"""

from __future__ import annotations

import functools
import importlib.resources
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from ewq.types import ParamKind, Role

__all__ = [
    "ArchTable",
    "CompiledTable",
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


class ArchTable(BaseModel):
    """One model family's tensor names, as written in its TOML file."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    description: str
    extends: str | None = None
    architectures: list[str] = Field(default_factory=list)
    model_types: list[str] = Field(default_factory=list)
    formats: list[str] = Field(default_factory=list)
    num_blocks_keys: list[str] = Field(default_factory=list)
    prefixes: list[str] = Field(default_factory=list)
    tensors: dict[str, Role] = Field(default_factory=dict)


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


def _resolved(name: str) -> ArchTable:
    """The table with its ancestors' fields filled in (the child wins)."""
    tables = load_tables()
    table = tables[name]
    if table.extends is None:
        return table
    parent = _resolved(table.extends)
    return table.model_copy(
        update={
            "num_blocks_keys": table.num_blocks_keys or parent.num_blocks_keys,
            "prefixes": table.prefixes or parent.prefixes,
            "tensors": {**parent.tensors, **table.tensors},
        }
    )


@functools.cache
def compiled(name: str) -> CompiledTable:
    table = _resolved(name)
    lookup: dict[str, tuple[Role, ParamKind]] = {}
    for prefix in table.prefixes:
        for template, role in table.tensors.items():
            key = prefix + template
            lookup[key] = (role, ParamKind.OTHER)
            for suffix, kind in _SUFFIXES.items():
                lookup[key + suffix] = (role, kind)
    return CompiledTable(table, lookup)


def find_table(
    architectures: list[str], model_type: str | None, fmt: str
) -> str | None:
    """Name of the table for a model, by format, then architecture class, then model_type."""
    tables = load_tables()
    for table in tables.values():
        if fmt in table.formats:
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
