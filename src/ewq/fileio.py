"""Atomic writes: a temporary file in the same folder, then a rename.

A reader never sees a half-written output, and an interrupted run leaves none behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

__all__ = ["atomic_path", "atomic_path_for_native", "atomic_write_text", "fresh_dir"]


def _publish(tmp_path: Path, target: Path) -> None:
    """Rename the finished file onto ``target`` with the usual permissions (mkstemp
    makes files private, 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    os.replace(tmp_path, target)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    On any exception the temporary file is removed and ``path`` is left untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=".tmp", dir=target.parent
    )
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _publish(tmp_path, target)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_path_for_native(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Like :func:`atomic_path`, for a writer that cannot be stopped (llama.cpp in a
    thread): the temporary file lives in a private folder beside ``path``. When the
    run is abandoned the folder goes, so a writer that opens its file later finds no
    folder and fails instead of leaving a file behind."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(
        tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    )
    tmp_path = folder / target.name
    try:
        yield tmp_path
        _publish(tmp_path, target)
    finally:
        for _ in range(50):  # the writer may still be creating the file: retry
            shutil.rmtree(folder, ignore_errors=True)
            if not folder.exists():
                break
            time.sleep(0.01)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        _write_and_sync(fh, text)


def _write_and_sync(fh: IO[str], text: str) -> None:
    fh.write(text)
    fh.flush()
    os.fsync(fh.fileno())


def fresh_dir(path: Path) -> Path:
    """A scratch output path of this run (a file or a folder inside ewq's own
    temporary folder), cleared for its next use."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    return path
