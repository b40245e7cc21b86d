"""ewq's cache folder, and keys that name everything that determines a value.

A cached value (a measured sensitivity, an importance matrix) is found again only
when every input that determines it is the same: the model's content (a SHA-256 of
its files), the setting (criterion, parameters, the calibration text's SHA-256), the
quantizer build it was measured with (:func:`runtime_id`), and the code that
computes it (:func:`code_digest`: a SHA-256 of those modules' source). A changed
criterion is therefore measured again, never read back stale.

Hashing a model's files reads them once; the digest is remembered per file
(resolved path, size, modification time and inode) in ``files/``, so a later key
costs a ``stat``, and a copy of the same model elsewhere finds the same entries.
A file in huggingface_hub's cache needs no hashing: an LFS blob is stored under
its content's SHA-256 (``blobs/<sha256>``, the hub's ETag for LFS files). A pass
that reads a sample of a file (``content=False``) must not read all of it to name
it: its key names the file by identity (path, size, modification time, inode),
which a rewrite of the file changes; a hub file mirrored by range requests
(ewq.sources.ranged) by its repository, commit and name, which pin its content.

The folder is ``$EWQ_CACHE`` or ``$XDG_CACHE_HOME/ewq`` (``~/.cache/ewq``). An entry
that cannot be read is computed again, never trusted; a read-only folder only costs
a new computation next time.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path
from typing import Any

from ewq.fileio import atomic_write_text

__all__ = [
    "cache_dir",
    "code_digest",
    "file_digest",
    "file_identity",
    "key",
    "load_entry",
    "runtime_id",
    "store_entry",
]

_CHUNK = 1 << 24


def cache_dir() -> Path:
    if os.environ.get("EWQ_CACHE"):
        return Path(os.environ["EWQ_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ewq"


def _hub_blob(p: Path) -> str | None:
    """The SHA-256 a huggingface_hub cache blob is named by, else None."""
    name = p.name
    if p.parent.name == "blobs" and len(name) == 64:
        try:
            int(name, 16)
        except ValueError:
            return None
        return name.lower()
    return None


def _identity(p: Path) -> str:
    st = p.stat()
    return f"{p}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}"


def file_identity(path: str | os.PathLike[str]) -> str:
    """A name for a file that costs a ``stat``: a hub blob's SHA-256, else
    ``stat:`` and a hash of (path, size, mtime, inode)."""
    p = Path(path).resolve()
    blob = _hub_blob(p)
    if blob is not None:
        return blob
    mirrors = (cache_dir() / "hub-ranges").resolve()
    if p.is_relative_to(mirrors):  # ewq.sources.ranged: owner/name/commit/file
        return "hub:" + p.relative_to(mirrors).as_posix()
    return "stat:" + hashlib.sha256(_identity(p).encode()).hexdigest()


def file_digest(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's content, remembered by (path, size, mtime, inode)."""
    p = Path(path).resolve()
    blob = _hub_blob(p)
    if blob is not None:
        return blob
    ident = _identity(p)
    memo = cache_dir() / "files" / (hashlib.sha256(ident.encode()).hexdigest()[:32])
    try:
        found = memo.read_text(encoding="ascii").strip()
        if len(found) == 64:
            return found
    except OSError:
        pass
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(memo, digest + "\n")
    except OSError:
        pass
    return digest


@cache
def code_digest(*modules: str) -> str:
    """SHA-256 of the source of ``modules`` (dotted names): the code a cached value
    was computed by."""
    h = hashlib.sha256()
    for name in sorted(modules):
        mod = importlib.import_module(name)
        h.update(name.encode() + b"\0")
        h.update(Path(mod.__file__).read_bytes())
    return h.hexdigest()


@cache
def runtime_id() -> str:
    """The llama.cpp build measurements ran on: llama-cpp-python's version and a
    SHA-256 of the ggml and llama libraries it loads ("none" without it)."""
    try:
        import llama_cpp
    except ImportError:
        return "none"
    libdir = Path(llama_cpp.__file__).parent / "lib"
    h = hashlib.sha256(llama_cpp.__version__.encode())
    for lib in sorted(libdir.glob("lib*.so*")):
        if lib.is_file() and not lib.is_symlink():
            h.update(lib.name.encode() + b"\0")
            h.update(str(lib.stat().st_size).encode())
            h.update(lib.read_bytes()[: 1 << 20])
    return h.hexdigest()


def key(
    doc: Mapping[str, Any],
    files: Iterable[str | os.PathLike[str]] = (),
    content: bool = True,
) -> str:
    """The cache key of ``doc`` (JSON-able) plus the content of ``files`` (with
    ``content=False``: their :func:`file_identity`, for passes that read a sample)."""
    name = file_digest if content else file_identity
    full = {**doc, "files": sorted(name(f) for f in files)}
    return hashlib.sha256(json.dumps(full, sort_keys=True).encode()).hexdigest()[:32]


def load_entry(kind: str, k: str) -> Any | None:
    """The JSON entry ``kind/k``, or None when absent or unreadable."""
    try:
        return json.loads((cache_dir() / kind / f"{k}.json").read_text("utf-8"))
    except (OSError, ValueError):
        return None


def store_entry(kind: str, k: str, doc: Any) -> Path | None:
    path = cache_dir() / kind / f"{k}.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(doc) + "\n")
        return path
    except OSError:
        return None
