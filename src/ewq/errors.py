"""The errors ``ewq`` raises on bad input. Each message is one line a user can act on."""

from __future__ import annotations

__all__ = [
    "one_line",
    "EwqError",
    "FormatError",
    "HubUnavailableError",
    "InvalidParameterError",
    "NonFiniteTensorError",
    "SourceNotFoundError",
    "UnknownArchitectureError",
]


class EwqError(Exception):
    """Base class: every error ewq raises on purpose."""


class SourceNotFoundError(EwqError):
    """A file, folder, shard or package the source needs is missing."""


class FormatError(EwqError):
    """A file is corrupt, truncated or inconsistent with its own header or index."""


class NonFiniteTensorError(FormatError):
    """A tensor holds NaN or Inf."""


class HubUnavailableError(EwqError):
    """The Hugging Face hub could not be reached, or the repository is not there."""


class UnknownArchitectureError(EwqError):
    """No block structure could be found in a model's tensor names."""


class InvalidParameterError(EwqError):
    """A parameter is out of range (alpha <= 0, a negative eps, ...)."""


def one_line(text: str) -> str:
    """``text`` as one line of printable characters: names taken from a file (a
    tensor name with a newline or an escape sequence) cannot break the error line
    or drive the user's terminal."""
    return "".join(
        ch
        if ch.isprintable()
        else ch.encode("unicode_escape", "backslashreplace").decode("ascii")
        for ch in text
    )
