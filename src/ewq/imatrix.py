"""Importance matrices: per weight matrix and input column, the mean of the squared
activations that multiply it (per expert for MoE), in the two file formats
llama.cpp's own tools write and ``llama-quantize --imatrix`` reads.

* GGUF (llama.cpp's default since 2025; ``tools/imatrix/imatrix.cpp``,
  ``save_imatrix``): ``general.type = "imatrix"``, the string array
  ``imatrix.datasets``, ``imatrix.chunk_count`` and ``imatrix.chunk_size`` (u32),
  and per weight ``NAME.in_sum2`` (F32, ne = [columns, matrices]: the sums of
  squared activations) and ``NAME.counts`` (F32, ne = [1, matrices]: the rows
  summed, i.e. tokens, per matrix).
* Legacy ``.dat`` (``save_imatrix_legacy``): int32 entry count; per entry an int32
  name length, the name, int32 ``ncall``, int32 value count and float32 values
  ``sum / count * ncall``; then optionally int32 chunk count, int32 length and the
  dataset name.

What the quantizer is given (``tools/quantize/quantize.cpp``, ``load_imatrix``):
GGUF sums divided by their matrix's count (a matrix never reached gives 1s);
legacy values divided by ``ncall``. :meth:`Imatrix.weights` gives exactly that.

Pure: numpy and gguf-py, no llama.cpp. Why by hand: gguf-py reads and writes GGUF
but knows nothing of the imatrix layout, and nothing on PyPI reads the ``.dat``.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ewq.errors import FormatError, SourceNotFoundError
from ewq.fileio import atomic_path

__all__ = ["Entry", "Imatrix", "ImatrixError", "read_imatrix", "write_imatrix"]

_MAX_ENTRIES = 1 << 20
_MAX_NAME = 1 << 12
_MAX_VALUES = 1 << 31


class ImatrixError(FormatError):
    """An importance matrix that is unreadable, or not for this model."""


@dataclass(frozen=True)
class Entry:
    """One weight's statistics: ``sums`` (matrices, columns) float32 sums of
    squared activations, ``counts`` (matrices,) tokens summed per matrix."""

    sums: np.ndarray
    counts: np.ndarray

    @property
    def columns(self) -> int:
        return int(self.sums.shape[1])

    @property
    def matrices(self) -> int:
        return int(self.sums.shape[0])

    def weights(self) -> np.ndarray:
        """What llama.cpp's quantizer takes (flat float32, matrix after matrix)."""
        counts = self.counts.astype(np.float32)[:, None]
        out = np.where(counts > 0, self.sums / np.where(counts > 0, counts, 1), 1.0)
        return np.ascontiguousarray(out, dtype=np.float32).ravel()


@dataclass(frozen=True)
class Imatrix:
    """An importance matrix: entries by weight name, and how it was made."""

    entries: Mapping[str, Entry]
    datasets: tuple[str, ...] = ()
    chunk_count: int = 0
    chunk_size: int = 0
    file: str | None = None  # where it was read from
    info: Mapping[str, str] = field(default_factory=dict)

    def digest(self) -> str:
        """SHA-256 of the data the quantizer is given (name order fixed)."""
        h = hashlib.sha256()
        for name in sorted(self.entries):
            h.update(name.encode() + b"\0")
            h.update(self.entries[name].weights().tobytes())
        return h.hexdigest()

    def weights(self) -> dict[str, np.ndarray]:
        return {n: e.weights() for n, e in self.entries.items()}

    def check(self, shapes: Mapping[str, tuple[int, ...]], origin: str) -> None:
        """Refuse an importance matrix that does not belong to a model whose weights
        (GGUF names) have ``shapes`` (row-major: the last is the row length)."""
        if not self.entries:
            raise ImatrixError(f"{origin}: the importance matrix has no entries")
        unknown = sorted(n for n in self.entries if n not in shapes)
        if unknown:
            more = f" and {len(unknown) - 1} more" if len(unknown) > 1 else ""
            raise ImatrixError(
                f"{origin}: the importance matrix is for another model: it has "
                f"'{unknown[0]}'{more}, which this model does not"
            )
        for name, e in self.entries.items():
            shape = shapes[name]
            matrices = shape[0] if len(shape) == 3 else 1
            if e.columns != shape[-1] or e.matrices not in (1, matrices):
                raise ImatrixError(
                    f"{origin}: the importance matrix has {e.matrices} x {e.columns} "
                    f"values for '{name}', whose rows are {shape[-1]} wide"
                    + (f" in {matrices} experts" if matrices > 1 else "")
                )


#: the largest mean squared activation an importance matrix may hold: activations of
#: 1e15 are no model's (float32 products of such weights overflow on the way)
MAX_WEIGHT = 1e30


def _finite(name: str, sums: np.ndarray, counts: np.ndarray, origin: str) -> None:
    if not (np.isfinite(sums).all() and np.isfinite(counts).all()):
        raise ImatrixError(f"{origin}: '{name}' holds NaN or infinite values")
    if (sums < 0).any() or (counts < 0).any():
        raise ImatrixError(f"{origin}: '{name}' holds negative sums of squares")
    means = sums.astype(np.float64) / np.maximum(counts.reshape(-1, 1), 1)
    if means.size and float(means.max()) > MAX_WEIGHT:
        raise ImatrixError(
            f"{origin}: '{name}' holds a mean squared activation of "
            f"{float(means.max()):.3g}, which no model computes (a damaged file?)"
        )


def read_imatrix(path: str | os.PathLike[str]) -> Imatrix:
    """Read a GGUF or legacy ``.dat`` importance matrix; one :class:`ImatrixError`
    line for anything that is not a complete, finite one."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except FileNotFoundError:
        raise SourceNotFoundError(f"no such importance matrix: {path}") from None
    except OSError as exc:
        raise ImatrixError(f"{path}: cannot read it ({exc.strerror})") from None
    if magic == b"GGUF":
        return _read_gguf(path)
    return _read_dat(path)


def _read_gguf(path: Path) -> Imatrix:
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # noqa: BLE001 - gguf-py raises many kinds on bad files
        raise ImatrixError(f"{path}: not a readable GGUF file ({exc})") from None
    fields = reader.fields

    def scalar(key: str) -> int | None:
        f = fields.get(key)
        return int(f.parts[f.data[0]][0]) if f is not None and f.data else None

    kind = fields.get("general.type")
    if kind is not None and bytes(kind.parts[kind.data[0]]).decode() != "imatrix":
        raise ImatrixError(f"{path}: a GGUF file, but not an importance matrix")
    datasets: tuple[str, ...] = ()
    ds = fields.get("imatrix.datasets")
    if ds is not None:
        datasets = tuple(bytes(ds.parts[i]).decode("utf-8", "replace") for i in ds.data)
    if scalar("imatrix.chunk_count") is None or ds is None:
        # llama-quantize refuses a GGUF imatrix without its metadata
        raise ImatrixError(f"{path}: the importance matrix has no imatrix.* metadata")
    tensors = {t.name: t for t in reader.tensors}
    entries = {}
    for name, t in tensors.items():
        if not name.endswith(".in_sum2"):
            continue
        base = name[: -len(".in_sum2")]
        c = tensors.get(base + ".counts")
        if c is None:
            raise ImatrixError(f"{path}: '{base}' has sums but no counts")
        if t.tensor_type.name != "F32" or c.tensor_type.name != "F32":
            raise ImatrixError(f"{path}: '{base}': sums and counts must be F32")
        sums = np.array(t.data, dtype=np.float32).reshape(-1, int(t.shape[0]))
        counts = np.rint(np.array(c.data, dtype=np.float64).ravel())
        if len(counts) != sums.shape[0]:
            raise ImatrixError(
                f"{path}: '{base}' has {sums.shape[0]} matrices of sums and "
                f"{len(counts)} counts"
            )
        _finite(base, sums, counts, str(path))
        entries[base] = Entry(sums, counts.astype(np.int64))
    orphans = [n for n in tensors if n.endswith(".counts") and n[:-7] not in entries]
    if orphans:
        raise ImatrixError(f"{path}: '{orphans[0][:-7]}' has counts but no sums")
    if not entries:
        raise ImatrixError(f"{path}: the importance matrix has no entries")
    return Imatrix(
        entries,
        datasets,
        scalar("imatrix.chunk_count") or 0,
        scalar("imatrix.chunk_size") or 0,
        str(path),
    )


def _read_dat(path: Path) -> Imatrix:
    data = path.read_bytes()
    pos = 0

    def take(code: str, what: str):
        nonlocal pos
        size = struct.calcsize(code)
        if pos + size > len(data):
            raise ImatrixError(
                f"{path}: not an importance matrix, or cut short (in {what})"
            )
        out = struct.unpack_from(code, data, pos)
        pos += size
        return out

    (n,) = take("<i", "the entry count")
    if not 0 < n <= _MAX_ENTRIES:
        raise ImatrixError(f"{path}: not an importance matrix ({n} entries)")
    entries = {}
    for k in range(n):
        (length,) = take("<i", f"entry {k + 1}")
        if not 0 < length <= _MAX_NAME:
            raise ImatrixError(f"{path}: entry {k + 1} has a name of {length} bytes")
        name = take(f"<{length}s", f"entry {k + 1}")[0].decode("utf-8", "replace")
        ncall, nval = take("<ii", f"'{name}'")
        if not 0 < nval <= _MAX_VALUES or ncall < 0:
            raise ImatrixError(f"{path}: '{name}' declares {nval} values")
        if pos + 4 * nval > len(data):
            raise ImatrixError(f"{path}: cut short in the values of '{name}'")
        vals = np.frombuffer(data, dtype="<f4", count=nval, offset=pos).copy()
        pos += 4 * nval
        # ncall 0: llama-quantize takes the values as they are (a count of 1 here)
        counts = np.array([ncall if ncall > 0 else 1], dtype=np.int64)
        _finite(name, vals, counts, str(path))
        # legacy values are sum/count*ncall: with counts = ncall, weights() gives
        # sum/count, what llama-quantize computes (values / ncall)
        entries[name] = Entry(vals.reshape(1, -1), counts)
    chunks, datasets = 0, ()
    if pos + 4 <= len(data):
        (chunks,) = take("<i", "the chunk count")
        if pos + 4 <= len(data):
            (length,) = take("<i", "the dataset name")
            if 0 < length <= _MAX_NAME and pos + length <= len(data):
                datasets = (data[pos : pos + length].decode("utf-8", "replace"),)
    return Imatrix(entries, datasets, max(0, chunks), 0, str(path))


def write_imatrix(
    imatrix: Imatrix, path: str | os.PathLike[str], *, legacy: bool = False
) -> Path:
    """Write ``imatrix`` atomically: GGUF (as llama-imatrix writes it), or the
    legacy ``.dat`` with ``legacy``."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if legacy:
            tmp.write_bytes(_dat_bytes(imatrix))
        else:
            _write_gguf(imatrix, tmp)
    return path


def _write_gguf(imatrix: Imatrix, tmp: Path) -> None:
    import gguf

    writer = gguf.GGUFWriter(tmp, arch="")
    # llama-imatrix writes no architecture (gguf-py's writer always adds one)
    writer.kv_data[0].pop("general.architecture", None)
    writer.add_string("general.type", "imatrix")
    writer.add_array("imatrix.datasets", list(imatrix.datasets))
    writer.add_uint32("imatrix.chunk_count", imatrix.chunk_count)
    writer.add_uint32("imatrix.chunk_size", imatrix.chunk_size)
    for name in sorted(imatrix.entries):  # the tool's deterministic order
        e = imatrix.entries[name]
        sums = np.ascontiguousarray(e.sums, np.float32)
        counts = e.counts.astype(np.float32).reshape(e.matrices, 1)
        if e.matrices == 1:  # ggml writes a dimension of 1 at the end as none
            sums, counts = sums.reshape(-1), counts.reshape(1)
        writer.add_tensor(f"{name}.in_sum2", sums)
        writer.add_tensor(f"{name}.counts", counts)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _dat_bytes(imatrix: Imatrix) -> bytes:
    chunk = max(1, imatrix.chunk_size)
    parts = [struct.pack("<i", len(imatrix.entries))]
    for name in sorted(imatrix.entries):
        e = imatrix.entries[name]
        raw = name.encode()
        ncall = math.ceil(int(e.counts.max()) / chunk) if e.counts.size else 0
        vals = e.weights() * np.float32(ncall)
        parts += [
            struct.pack("<i", len(raw)),
            raw,
            struct.pack("<ii", ncall, vals.size),
            vals.astype("<f4").tobytes(),
        ]
    parts.append(struct.pack("<i", imatrix.chunk_count))
    ds = (imatrix.datasets[-1] if imatrix.datasets else "").encode()
    parts += [struct.pack("<i", len(ds)), ds]
    return b"".join(parts)
