"""Group a model's tensors into blocks numbered by execution order (exec_index).

exec_index 1 is the embedding block; transformer block N (counted from 0 in tensor
names) is N + 2; the head block (final norm, LM head, pooler) is L + 2.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

from ewq.arch.registry import (
    compiled,
    find_table,
    generic_table,
    param_kind,
    template_of,
)
from ewq.errors import FormatError, UnknownArchitectureError
from ewq.types import (
    MAX_BLOCKS,
    BlockKind,
    Container,
    ModelIndex,
    ParamKind,
    Role,
    TensorInfo,
    TensorKey,
)

__all__ = ["Block", "ModelLayout", "resolve"]

log = logging.getLogger(__name__)

_EMBEDDING_ROLES = {Role.EMBED, Role.POS_EMBED, Role.TYPE_EMBED, Role.EMBED_NORM}
EMBEDDING_EXEC_INDEX = 1
FIRST_BLOCK_EXEC_INDEX = 2


@dataclass(frozen=True)
class Block:
    """One block: the embedding, a transformer block, or the head."""

    exec_index: int
    kind: BlockKind
    tensors: tuple[TensorInfo, ...]
    keys: tuple[TensorKey, ...]

    @property
    def num_parameters(self) -> int:
        return sum(t.num_elements for t in self.tensors)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass(frozen=True)
class ModelLayout:
    """The block structure of a model.

    ``num_blocks`` counts transformer blocks only (the paper's feature); ``blocks``
    holds the embedding, the L transformer blocks and the head, in exec_index order.
    ``unassigned`` lists tensors outside the model's blocks (a vision tower, say).
    """

    architecture: str
    table: str
    num_blocks: int
    blocks: tuple[Block, ...]
    unassigned: tuple[TensorInfo, ...]
    keys: dict[str, TensorKey]

    def block(self, exec_index: int) -> Block:
        return self.blocks[exec_index - 1]

    @property
    def transformer_blocks(self) -> tuple[Block, ...]:
        return self.blocks[1:-1]


def _architecture(index: ModelIndex) -> tuple[str, list[str], str | None]:
    config = index.config
    if index.container == Container.GGUF:
        arch = str(config.get("general.architecture", "unknown"))
        return arch, [], arch
    archs = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    model_type = config.get("model_type")
    text_config = config.get("text_config")
    if isinstance(text_config, dict) and not archs:
        model_type = text_config.get("model_type", model_type)
    label = archs[0] if archs else str(model_type or "unknown")
    return label, archs, model_type if isinstance(model_type, str) else None


def _config_blocks(index: ModelIndex, keys: list[str], arch: str) -> int | None:
    configs = [index.config, index.config.get("text_config") or {}]
    for key in keys:
        key = key.replace("{arch}", arch)
        for config in configs:
            value = config.get(key) if isinstance(config, dict) else None
            if isinstance(value, int):
                return value
    return None


def _match_table(
    index: ModelIndex, table_name: str
) -> dict[str, tuple[Role, ParamKind, int | None]]:
    table = compiled(table_name)
    found = {}
    for t in index.tensors:
        template, numbers = template_of(t.name)
        hit = table.lookup.get(template)
        if hit is None:
            continue
        role, kind = hit
        block = numbers[0] if "{N}" in template else None
        found[t.name] = (role, kind, block)
    return found


def _layer_prefix(names: list[str]) -> str | None:
    """The commonest text before the first numeric path part, e.g. ``model.layers``."""
    prefixes = Counter()
    for name in names:
        template, numbers = template_of(name)
        if numbers:
            prefixes[template.split("{N}", 1)[0]] += 1
    return prefixes.most_common(1)[0][0] if prefixes else None


def _guess_role(name: str) -> Role:
    for word, role in generic_table().keywords.items():
        if word in name:
            return role
    return Role.OTHER


def _generic(index: ModelIndex, prefix: str | None, known: dict) -> dict:
    """Assign tensors the table did not know, by the ``<prefix>.<N>.`` pattern."""
    found = {}
    embed_words = generic_table().embedding_words
    for t in index.tensors:
        if t.name in known:
            continue
        template, numbers = template_of(t.name)
        if prefix is not None and numbers and template.startswith(prefix + "{N}"):
            found[t.name] = (_guess_role(t.name), param_kind(t.name), numbers[0])
        elif not numbers:
            is_embed = any(w in t.name for w in embed_words)
            role = Role.EMBED if is_embed else Role.OTHER
            found[t.name] = (role, param_kind(t.name), None)
    return found


def resolve(index: ModelIndex) -> ModelLayout:
    """Map every tensor of ``index`` to its block and role.

    Raises:
        UnknownArchitectureError: no block structure can be found in the names.
    """
    label, archs, model_type = _architecture(index)
    table_name = find_table(archs, model_type, index.container)
    names = [t.name for t in index.tensors]
    if table_name is None:
        log.warning(
            "unknown architecture %r: using the generic <prefix>.<N>.<rest> block pattern",
            label,
        )
        found: dict = {}
        prefix = _layer_prefix(names)
        table_label = "generic"
    else:
        found = _match_table(index, table_name)
        block_names = [n for n, (_, _, b) in found.items() if b is not None]
        prefix = _layer_prefix(block_names)
        table_label = table_name
    missed = [n for n in names if n not in found]
    if missed and table_name is not None:
        log.warning(
            "%d tensors of %s are not in the %r table (first: %s); placed by name pattern",
            len(missed),
            label,
            table_name,
            missed[0],
        )
    found.update(_generic(index, prefix, found))
    block_numbers = [b for (_, _, b) in found.values() if b is not None]
    if not block_numbers:
        raise UnknownArchitectureError(
            f"{index.source}: no transformer blocks found in {len(names)} tensor names "
            f"(architecture {label!r}; expected names like 'model.layers.0.…')"
        )
    num_blocks = max(block_numbers) + 1
    distinct = len(set(block_numbers))
    if num_blocks > min(distinct, MAX_BLOCKS):
        raise FormatError(
            f"{index.source}: tensor names number blocks up to {num_blocks - 1}, but "
            f"only {distinct} block numbers hold tensors (a model's blocks are "
            f"numbered 0..N-1, N at most {MAX_BLOCKS})"
        )
    declared = _config_blocks(index, table_keys(table_name), label)
    if declared is not None and declared != num_blocks:
        log.warning(
            "config declares %d blocks but the tensors hold %d", declared, num_blocks
        )
    return _assemble(index, label, table_label, num_blocks, found)


def table_keys(table_name: str | None) -> list[str]:
    if table_name is None:
        return ["num_hidden_layers", "n_layer"]
    return compiled(table_name).table.num_blocks_keys


def _assemble(
    index: ModelIndex, label: str, table: str, num_blocks: int, found: dict
) -> ModelLayout:
    head = num_blocks + FIRST_BLOCK_EXEC_INDEX
    members: list[list[tuple[TensorInfo, TensorKey]]] = [[] for _ in range(head)]
    unassigned = []
    keys: dict[str, TensorKey] = {}
    for t in index.tensors:
        hit = found.get(t.name)
        if hit is None:
            unassigned.append(t)
            continue
        role, kind, block = hit
        if block is not None:
            exec_index, block_kind = (
                block + FIRST_BLOCK_EXEC_INDEX,
                BlockKind.TRANSFORMER,
            )
        elif role in _EMBEDDING_ROLES:
            exec_index, block_kind = EMBEDDING_EXEC_INDEX, BlockKind.EMBEDDING
        else:
            exec_index, block_kind = head, BlockKind.HEAD
        key = TensorKey(exec_index, role, kind, block_kind)
        keys[t.name] = key
        members[exec_index - 1].append((t, key))
    kinds = (
        [BlockKind.EMBEDDING] + [BlockKind.TRANSFORMER] * num_blocks + [BlockKind.HEAD]
    )
    blocks = tuple(
        Block(i + 1, kinds[i], tuple(t for t, _ in m), tuple(k for _, k in m))
        for i, m in enumerate(members)
    )
    return ModelLayout(label, table, num_blocks, blocks, tuple(unassigned), keys)
