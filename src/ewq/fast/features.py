"""The three FastEWQ features of every transformer block, without reading a weight.

Two ways to the parameter counts, both exact:

* ``headers``: the tensor index of a safetensors checkpoint (local, or a hub id in
  metadata-only mode: only the headers are fetched) or of a GGUF file;
* ``config``: config.json alone, through the shapes in the family's architecture table
  (:mod:`ewq.arch.shapes`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ewq.arch import ModelLayout, resolve
from ewq.arch.shapes import index_from_config
from ewq.errors import FormatError, SourceNotFoundError
from ewq.sources import open_source
from ewq.sources.documents import check_config, load_json
from ewq.types import ModelIndex

__all__ = ["BlockFeatures", "Features", "features", "features_from_config"]

FEATURES = ("num_blocks", "exec_index", "num_parameters")


@dataclass(frozen=True)
class BlockFeatures:
    exec_index: int
    num_parameters: int


@dataclass(frozen=True)
class Features:
    """One model's FastEWQ feature rows."""

    source: str
    model_name: str
    method: str  # "headers" or "config"
    num_blocks: int
    blocks: tuple[BlockFeatures, ...]
    index: ModelIndex
    layout: ModelLayout

    def rows(self) -> list[dict[str, object]]:
        return [
            {
                "model_name": self.model_name,
                "num_blocks": self.num_blocks,
                "exec_index": b.exec_index,
                "num_parameters": b.num_parameters,
            }
            for b in self.blocks
        ]


def _from_index(
    source: str, index: ModelIndex, method: str, name: str | None
) -> Features:
    layout = resolve(index)
    blocks = tuple(
        BlockFeatures(b.exec_index, b.num_parameters) for b in layout.transformer_blocks
    )
    config = index.config
    model_name = name or str(
        config.get("_name_or_path") or config.get("general.name") or source
    )
    return Features(
        source, model_name, method, layout.num_blocks, blocks, index, layout
    )


def _read_config(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SourceNotFoundError(f"no such file: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FormatError(f"{path}: cannot read ({exc})") from exc
    return check_config(load_json(text, str(path)), str(path))


def features_from_config(
    config: dict, source: str, name: str | None = None
) -> Features:
    """Features from a config mapping alone (no file needs to exist)."""
    return _from_index(source, index_from_config(config, source), "config", name)


def features(
    source: str | Path,
    *,
    analytic: bool = False,
    revision: str | None = None,
    name: str | None = None,
) -> Features:
    """Features of ``source``: a config.json file, a model folder, a safetensors or
    GGUF file, or a hub id (headers only). A folder with a config.json but no
    weights, or ``analytic=True``, uses the config; anything else the headers.
    """
    path = Path(source)
    if path.is_file() and path.suffix == ".json":
        return features_from_config(_read_config(path), str(source), name)
    if path.is_dir() and (path / "config.json").is_file():
        has_weights = any(path.glob("*.safetensors"))
        if analytic or not has_weights:
            return features_from_config(
                _read_config(path / "config.json"), str(source), name
            )
    with open_source(source, revision=revision) as src:
        index = src.index
    if analytic:
        if not index.config:
            raise FormatError(f"{source}: no config.json to compute parameters from")
        return features_from_config(dict(index.config), str(source), name)
    return _from_index(str(source), index, "headers", name)
