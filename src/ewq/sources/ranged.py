"""Hub models read by the rows a sampled pass asks for, nothing else.

Each file of the repository is mirrored as a sparse local file of its full size in
ewq's cache (``hub-ranges/<owner>/<name>/<commit>/``); HTTP range requests fill in
its headers first, then the byte ranges of the rows read. What was fetched is listed
beside each file (``.have``, byte intervals), so a second pass over the same sample
fetches nothing. The local GGUF and safetensors readers then read the mirror as a
local model, and every read is preceded by a fetch of the bytes it covers: a range
never fetched is never read as zeros.

Written here because huggingface_hub downloads whole files (``hf_hub_download``)
or serves one range per call (``HfFileSystem``) without keeping them; neither keeps
a file's scattered ranges for the next run.
"""

from __future__ import annotations

import bisect
import json
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ewq.errors import FormatError
from ewq.fileio import atomic_write_text
from ewq.sources.gguf import GGUFSource, HeaderTruncated, parse_header
from ewq.sources.safetensors import SafetensorsSource
from ewq.types import TensorInfo

__all__ = ["RemoteFile", "open_ranged"]

# Ranges closer than this are fetched as one request. A request costs the hub's
# latency (50-100 ms) while 64 KiB more of a range costs about a millisecond at
# 50 MB/s: below this gap, fetching the bytes between two sampled rows is cheaper
# than asking twice. (Rows of a 70B model are 16-57 KB and a 1% sample leaves
# megabytes between them: there every row is still its own request.)
_GAP = 1 << 16
_SMALL = 1 << 22  # files this small (json, tokenizer) are fetched whole
# range requests in flight at once (16 made the pass over the local test hub 3x
# slower than 8: benchmarks/hub_sampled.py)
REQUESTS = 8
_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    """One pool of request threads for the process (not one per read: a sampled
    pass makes hundreds of reads)."""
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(REQUESTS, thread_name_prefix="ewq-range")
    return _POOL


class RemoteFile:
    """A hub file mirrored sparsely at ``local``: :meth:`ensure` fetches the byte
    ranges not held yet, by HTTP range requests."""

    def __init__(self, url: str, size: int, local: Path, headers: dict, endpoint: str):
        self.url, self.size, self.local = url, size, local
        self.headers, self.endpoint = headers, endpoint
        self.fetched = 0  # bytes fetched by this process
        self._have_path = local.with_name(local.name + ".have")
        self._lock = threading.Lock()
        local.parent.mkdir(parents=True, exist_ok=True)
        self._have: list[list[int]] = []
        if local.is_file() and local.stat().st_size == size:
            try:
                self._have = _merged(
                    [list(map(int, s)) for s in json.loads(self._have_path.read_text())]
                )
            except (OSError, ValueError, TypeError):
                self._have = []
        else:
            with open(local, "wb") as fh:  # sparse: no block is written yet
                fh.truncate(size)

    def _missing(self, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """The parts of ``spans`` not held, merged across gaps under ``_GAP``.
        ``_have`` is sorted and disjoint: each span finds its first overlap by
        bisection (a sample asks for thousands of spans against thousands held)."""
        starts = [h[0] for h in self._have]
        out: list[tuple[int, int]] = []

        def add(a: int, b: int) -> None:
            if out and a - out[-1][1] < _GAP:
                out[-1] = (out[-1][0], max(out[-1][1], b))
            else:
                out.append((a, b))

        for a, b in sorted(spans):
            a, b = max(0, a), min(self.size, b)
            i = max(0, bisect.bisect_right(starts, a) - 1)
            pos = a
            while i < len(self._have) and self._have[i][0] < b and pos < b:
                h0, h1 = self._have[i]
                if h1 > pos:
                    if h0 > pos:
                        add(pos, h0)
                    pos = h1
                i += 1
            if pos < b:
                add(pos, b)
        return out

    def ensure(self, spans: list[tuple[int, int]]) -> None:
        """Fetch whatever of ``spans`` (byte ranges [a, b)) is not held yet."""
        from ewq.sources.hub import _range
        from ewq.sources.hub_http import within_deadline

        with self._lock:
            todo = self._missing(spans)
            if not todo:
                return

            def get(span: tuple[int, int]) -> bytes:
                a, b = span
                body = within_deadline(
                    lambda: _range(self.url, a, b, self.headers), self.endpoint
                )
                if len(body) != b - a:
                    raise FormatError(
                        f"{self.url}: the hub sent {len(body)} bytes for range "
                        f"{a}-{b - 1}"
                    )
                return body

            fd = os.open(self.local, os.O_WRONLY)
            try:
                # requests in flight together: a sample is thousands of small ranges,
                # each bound by the hub's latency, not by bandwidth
                for (a, b), body in zip(todo, _pool().map(get, todo), strict=True):
                    os.pwrite(fd, body, a)
                    self.fetched += len(body)
                    self._have.append([a, b])
            finally:
                os.close(fd)
                self._have = _merged(self._have)
                atomic_write_text(self._have_path, json.dumps(self._have))


def _merged(spans: list[list[int]]) -> list[list[int]]:
    out: list[list[int]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


class _Ranged:
    """What the ranged readers add to the local ones: a fetch before every read."""

    remote: dict[str, RemoteFile]

    def _ensure(self, info: TensorInfo, byte_start: int, byte_stop: int) -> None:
        self.remote[info.file].ensure(
            [(info.offset + byte_start, info.offset + byte_stop)]
        )

    def prefetch(self, info: TensorInfo, rows: np.ndarray) -> None:
        total = info.num_elements // info.shape[-1]
        width = info.nbytes // total
        self.remote[info.file].ensure(
            [
                (info.offset + int(r) * width, info.offset + (int(r) + 1) * width)
                for r in rows
            ]
        )

    def map_range(self, info, start, stop):
        return None  # a mapping would read unfetched bytes: read_range fetches them

    def read(self, info):
        self._ensure(info, 0, info.nbytes)
        return super().read(info)  # type: ignore[misc]

    def read_range(self, info, start, stop, buffer=None):
        per = info.nbytes / info.num_elements
        self._ensure(info, int(start * per), int(np.ceil(stop * per)))
        return super().read_range(info, start, stop, buffer)  # type: ignore[misc]

    def read_blocks(self, info, start, stop, buffer=None):
        per = info.nbytes / info.num_elements
        self._ensure(info, int(start * per), int(np.ceil(stop * per)))
        return super().read_blocks(info, start, stop, buffer)  # type: ignore[misc]

    @property
    def bytes_fetched(self) -> int:
        return sum(f.fetched for f in self.remote.values())


class RangedGGUFSource(_Ranged, GGUFSource):
    pass


class RangedSafetensorsSource(_Ranged, SafetensorsSource):
    pass


def mirror_root(repo_id: str, commit: str) -> Path:
    """Where a hub commit's files are mirrored (sparsely) in ewq's cache."""
    from ewq.cache import cache_dir

    return cache_dir() / "hub-ranges" / repo_id / re.sub(r"[^\w.-]", "_", commit)


def gguf_header(f: RemoteFile, first: int = 1 << 20):
    """A GGUF file's parsed header, its bytes fetched into the mirror (``first``
    bytes, doubled while the header runs on), so a later reader of the same commit
    fetches none of them again."""
    want = first
    while True:
        f.ensure([(0, min(want, f.size))])
        with open(f.local, "rb") as fh:
            buf = fh.read(min(want, f.size))
        try:
            header = parse_header(buf, f.url)
            break
        except HeaderTruncated:
            if want >= f.size:
                raise
            want *= 2
    f.ensure([(0, min(header.data_offset, f.size))])
    return header


def _safetensors_header(f: RemoteFile) -> None:
    f.ensure([(0, 8)])
    with open(f.local, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
    if n <= 0 or 8 + n > f.size:
        raise FormatError(f"{f.url}: not a safetensors file (header of {n} bytes)")
    f.ensure([(0, 8 + n)])


def open_ranged(spec: str, *, revision: str | None = None, endpoint: str | None = None):
    """A hub model (``owner/name``, ``owner/name:FILE``) as a local reader over a
    sparse mirror: headers and small files fetched now, tensor bytes when read."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    from ewq.sources.hub import _repo_files, choose_gguf, split_spec
    from ewq.sources.hub_http import (
        endpoint_of,
        ensure_timeouts,
        hub_error,
        hub_exceptions,
    )

    repo_id, file = split_spec(spec)
    ensure_timeouts()
    endpoint = endpoint_of(endpoint)
    headers = build_hf_headers()
    try:
        sha, sizes = _repo_files(repo_id, revision, endpoint)
        ggufs = choose_gguf(repo_id, list(sizes), file)
        commit = sha or revision or "main"
        root = mirror_root(repo_id, commit)

        def remote(name: str) -> RemoteFile:
            url = hf_hub_url(repo_id, name, revision=commit, endpoint=endpoint)
            return RemoteFile(url, sizes[name], root / name, headers, endpoint)

        if ggufs is not None:
            files = {n: remote(n) for n in ggufs}
            for f in files.values():
                gguf_header(f)
            src = RangedGGUFSource(root / ggufs[0], source=f"{repo_id}:{ggufs[0]}")
        else:
            files = {}
            for n in sorted(sizes):
                if n.endswith(".safetensors"):
                    files[n] = remote(n)
                    _safetensors_header(files[n])
                elif n.endswith(".json") and sizes[n] <= _SMALL:
                    small = remote(n)
                    small.ensure([(0, small.size)])
            src = RangedSafetensorsSource(root, source=repo_id)
    except hub_exceptions() as exc:
        raise hub_error(repo_id, endpoint, exc) from exc
    src.remote = {str(f.local): f for f in files.values()}
    return src
