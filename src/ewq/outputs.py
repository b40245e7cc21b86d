"""What an output path may replace: never an input, never a foreign folder, never
something that is not a regular file.

Every command that writes checks its output paths here before any work is done:

* an output that resolves to one of the command's inputs (the model, the plan, the
  analysis it reads) is refused: writing it would destroy the input;
* an existing path that is neither a regular file nor a folder (a device such as
  /dev/full, a FIFO, a socket) is refused: renaming onto it would replace it;
* an existing folder is replaced only when it is an earlier ewq output (its record
  ``NAME.ewq.json`` beside it says so) and ``force`` is given; a folder of other
  files is never replaced;
* an existing regular file (an earlier output) is replaced, atomically.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from ewq.errors import EwqError

__all__ = ["OutputError", "check_output", "is_ewq_output"]


class OutputError(EwqError):
    """An output path that would destroy an input or a file ewq does not own."""


def is_ewq_output(path: Path) -> bool:
    """Is ``path`` something an earlier `ewq quantize` wrote (its record says so)?"""
    record = path.with_name(path.name + ".ewq.json")
    try:
        doc = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("kind") == "ewq-quantized"


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (
            a.exists() and b.exists() and os.path.samefile(a, b)
        )
    except OSError:
        return False


def _inside(path: Path, folder: Path) -> bool:
    try:
        return folder.is_dir() and path.resolve().is_relative_to(folder.resolve())
    except OSError:
        return False


def check_output(
    out: str | os.PathLike[str],
    inputs: Iterable[str | os.PathLike[str] | None] = (),
    *,
    folder: bool = False,
    force: bool = False,
    option: str = "--out",
) -> Path:
    """Refuse ``out`` if writing it could lose data (see the module docstring).

    ``folder``: the output is a folder (Hugging Face); else a file.
    """
    out = Path(out)
    if str(out) in ("", "."):
        raise OutputError(f"{option}: give a file name")
    for given in inputs:
        if given is None:
            continue
        src = Path(given)
        inside = folder and (_inside(src, out) or _inside(out, src))
        if _same(out, src) or inside:
            raise OutputError(
                f"{option} {out} would overwrite the input {src}; choose another path"
            )
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent  # the folder that will hold the new folders
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{option} {out}: {parent} is not writable")
    try:
        st = out.lstat()
    except FileNotFoundError:
        return out
    except OSError as exc:
        raise OutputError(
            f"{option} {out}: cannot be checked ({exc.strerror})"
        ) from None
    if stat.S_ISDIR(st.st_mode):
        if not folder:
            raise OutputError(f"{option} {out} is a folder; give a file name")
        if not is_ewq_output(out):
            raise OutputError(
                f"{option} {out} exists and was not written by ewq; it is left as it "
                "is (choose another path)"
            )
        if not force:
            raise OutputError(
                f"{option} {out} holds an earlier ewq output; give --force to replace it"
            )
        return out
    if not stat.S_ISREG(st.st_mode) and not stat.S_ISLNK(st.st_mode):
        raise OutputError(
            f"{option} {out} is not a regular file (a device, pipe or socket); "
            "ewq does not replace it"
        )
    if folder:
        raise OutputError(f"{option} {out} is a file; the output is a folder")
    return out
