"""The kind of record every option of ewq.config is a field of, and how options
given as keywords become one (validated, one line on error)."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ewq.errors import EwqError

__all__ = ["Config", "calibration_tokens_field", "cli", "configure", "gpu_layers_field"]


def cli(flag: str | None = None, **extra: Any) -> dict[str, Any]:
    """How the CLI spells a field, where not ``--field-name``."""
    return {"cli": {"flag": flag, **extra}}


def gpu_layers_field() -> Any:
    """The --gpu-layers option, the same for every command that runs llama.cpp."""
    return Field(
        None,
        ge=-1,
        description="Layers llama.cpp offloads to a GPU in its passes (-1: all). "
        "Default: all where llama.cpp was built with a GPU backend (CMAKE_ARGS, see "
        "the README), else none.",
    )


def calibration_tokens_field() -> Any:
    """The --calibration-tokens cap, the same for every command that calibrates."""
    from ewq.config._choices import (
        CALIBRATION_TOKENS_PER_WIDTH,
        DEFAULT_CALIBRATION_TOKENS,
    )

    return Field(
        None,
        ge=0,
        description="At most this many tokens of the calibration text (its first "
        "windows) for the importance matrix and GPTQ's second moments; 0: all of it. "
        f"Default: {DEFAULT_CALIBRATION_TOKENS}, or {CALIBRATION_TOKENS_PER_WIDTH} "
        "per column of the model's widest weight input if that is more.",
    )


class Config(BaseModel):
    """A frozen record that refuses unknown fields."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)
    schema_version: ClassVar[int] = 1


def configure(kind: type[Config], given: Config | None, options: dict[str, Any]):
    """``given`` (or the defaults) with ``options`` applied, validated: an unknown
    option or a value of the wrong kind is one :class:`EwqError` line."""
    base = given.model_dump() if given is not None else {}
    try:
        return kind.model_validate({**base, **options})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or kind.__name__
        if first["type"] == "extra_forbidden":
            names = ", ".join(kind.model_fields)
            raise EwqError(f"unknown option '{where}' (options: {names})") from None
        raise EwqError(f"{where}: {first['msg']}") from None
