"""Models on the Hugging Face hub, by repository id.

Two modes. Metadata-only reads config.json and the safetensors headers (HTTP range
requests, a few hundred kilobytes even for a 70B model) and downloads no weight:
enough to inspect, plan and run FastEWQ. Full mode downloads the repository into the
huggingface_hub cache and then reads it as a local folder.

``HF_ENDPOINT`` (or the ``endpoint`` argument) points everything at another server,
which is how the tests stand a local HTTP server in for the hub.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from ewq.errors import FormatError, SourceNotFoundError
from ewq.sources.base import TensorSource
from ewq.sources.documents import check_config, load_json
from ewq.sources.gguf import (
    GGUFSource,
    HeaderTruncated,
    check_splits,
    gguf_models,
    parse_header,
    tensor_infos,
)
from ewq.sources.hub_http import (
    endpoint_of,
    ensure_timeouts,
    hub_error,
    hub_exceptions,
    within_deadline,
)
from ewq.sources.safetensors import SafetensorsSource, tensor_infos_from_header
from ewq.types import Container, ModelIndex, TensorInfo

__all__ = [
    "HubGGUFSource",
    "HubMetadataSource",
    "choose_gguf",
    "is_hub_id",
    "is_remote",
    "open_hub",
    "split_spec",
]

log = logging.getLogger(__name__)

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.+-]+)?$")
_DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]


def is_hub_id(spec: str) -> bool:
    """True for ``owner/name`` (also ``hf://owner/name`` and ``owner/name:FILE``)."""
    return bool(_REPO_ID.match(spec.removeprefix("hf://")))


def is_remote(spec) -> bool:
    """A hub id that names no local file or folder (open_source's own order)."""
    text = str(spec)
    return is_hub_id(text) and not Path(text).expanduser().exists()


class HubMetadataSource(TensorSource):
    """A hub repository seen through its config.json and safetensors headers only."""

    def __init__(
        self, repo_id: str, *, revision: str | None = None, endpoint: str | None = None
    ):
        from huggingface_hub import HfApi, errors, hf_hub_download

        ensure_timeouts()
        endpoint = endpoint_of(endpoint)
        try:
            api = HfApi(endpoint=endpoint)
            # model_info first: it tells a missing repository from a repository
            # without safetensors, and pins the commit for the reads that follow.
            info = within_deadline(
                lambda: api.model_info(repo_id, revision=revision), endpoint
            )
            meta = within_deadline(
                lambda: api.get_safetensors_metadata(
                    repo_id, revision=info.sha or revision
                ),
                endpoint,
            )
            try:
                path = hf_hub_download(
                    repo_id,
                    "config.json",
                    revision=info.sha or revision,
                    endpoint=endpoint,
                )
                with open(path, "rb") as fh:
                    config: dict[str, Any] = check_config(
                        load_json(
                            fh.read(), f"hub repository '{repo_id}': config.json"
                        ),
                        f"hub repository '{repo_id}': config.json",
                    )
            except errors.EntryNotFoundError:
                log.warning("hub repository '%s' has no config.json", repo_id)
                config = {}
        except hub_exceptions() as exc:
            raise hub_error(repo_id, endpoint, exc) from exc
        except json.JSONDecodeError as exc:
            raise FormatError(
                f"hub repository '{repo_id}': config.json is not JSON"
            ) from exc
        infos: list[TensorInfo] = []
        for filename in sorted(meta.files_metadata):
            header = {
                name: {
                    "dtype": t.dtype,
                    "shape": list(t.shape),
                    "data_offsets": list(t.data_offsets),
                }
                for name, t in meta.files_metadata[filename].tensors.items()
            }
            infos.extend(tensor_infos_from_header(header, 0, None, filename))
        self.index = ModelIndex(
            source=repo_id,
            container="safetensors",
            files=tuple(sorted(meta.files_metadata)),
            tensors=tuple(infos),
            config=config,
            metadata_only=True,
        )

    def read(self, info: TensorInfo) -> Any:
        raise AssertionError("unreachable: iter_tensors refuses metadata-only sources")


_HEADER_CHUNK = 1 << 20  # first range read of a GGUF header; doubled until it fits


def split_spec(spec: str) -> tuple[str, str | None]:
    """``owner/name`` and the file asked for in ``owner/name:FILE`` (llama.cpp's
    ``-hf owner/name:Q4_K_M`` form: a file name, or a tag such as a quant type)."""
    spec = spec.removeprefix("hf://")
    repo, sep, file = spec.partition(":")
    return repo, (file or None) if sep else None


def choose_gguf(repo_id: str, names: list[str], file: str | None) -> list[str] | None:
    """The GGUF files of the one model to read from a repository's file list (split
    files in order), or None for a repository to read as safetensors.

    ``file`` is a file name (or any one split of it) or a tag matched, case
    blind, inside the names (``Q4_K_M``); without it, a repository with
    safetensors is read as safetensors, and one with a single GGUF model as that."""
    ggufs = [n for n in names if n.endswith(".gguf")]
    models = gguf_models(ggufs)
    if file is None:
        if any(n.endswith(".safetensors") for n in names) or not models:
            return None
        # projector files of vision models are not a language model to plan
        models = {k: v for k, v in models.items() if "mmproj" not in k.lower()}
        if len(models) == 1:
            return next(iter(models.values()))
        raise SourceNotFoundError(
            f"hub repository '{repo_id}' holds {len(models)} GGUF models "
            f"({_listed(models)}); choose one with --file NAME or {repo_id}:NAME"
        )
    exact = [m for m in models.values() if file in m or file.removesuffix(".gguf") in m]
    if not exact:
        tag = file.lower()
        exact = [v for k, v in models.items() if tag in k.lower()]
    if len(exact) == 1:
        return exact[0]
    if not exact:
        raise SourceNotFoundError(
            f"hub repository '{repo_id}' has no GGUF file matching '{file}'"
            + (f" (it holds {_listed(models)})" if models else " (it holds no GGUF)")
        )
    raise SourceNotFoundError(
        f"hub repository '{repo_id}': '{file}' matches {len(exact)} GGUF models "
        f"({_listed({m[0]: m for m in exact})}); give the full file name"
    )


def _listed(models: dict[str, list[str]]) -> str:
    names = [
        m[0] if len(m) == 1 else f"{m[0]} (+{len(m) - 1} splits)"
        for m in models.values()
    ]
    return ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")


def _range(url: str, start: int, stop: int, headers: dict[str, str]) -> bytes:
    """Bytes [start, stop) of a hub file, by one HTTP range request. A server that
    ignores the range (200, the whole file) is read only up to ``stop``: the
    download stops there, it is never held whole."""
    from huggingface_hub.utils import get_session, hf_raise_for_status

    rng = {**headers, "range": f"bytes={start}-{stop - 1}"}
    with get_session().stream("GET", url, headers=rng) as r:
        if r.status_code >= 400:
            r.read()
            hf_raise_for_status(r)
        whole = r.status_code == 200  # the range was ignored: the body starts at 0
        want = stop if whole else stop - start
        body = bytearray()
        for chunk in r.iter_bytes():
            body += chunk
            if len(body) >= want:
                break
    return bytes(body[start:stop] if whole else body[:want])


class HubGGUFSource(TensorSource):
    """A GGUF model on the hub (one file or llama.cpp's splits) seen through its
    headers only: each read by range requests, 1 MiB first (64 KiB for later
    splits) and doubled while the header (vocabulary included) runs on, into the
    commit's sparse mirror (ewq.sources.ranged), where a sampled pass of the same
    run, or a later run, finds them. No tensor data is downloaded."""

    def __init__(
        self,
        repo_id: str,
        files: list[str],
        sizes: dict[str, int],
        *,
        revision: str,
        endpoint: str,
    ):
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import build_hf_headers

        from ewq.sources.ranged import RemoteFile, gguf_header, mirror_root

        headers = build_hf_headers()
        root = mirror_root(repo_id, revision)
        parsed = []
        for no, name in enumerate(files):
            url = hf_hub_url(repo_id, name, revision=revision, endpoint=endpoint)
            size = sizes.get(name) or 0
            # the first file holds the vocabulary; later splits, tensor infos only
            first = _HEADER_CHUNK if no == 0 else _HEADER_CHUNK // 16
            if size:  # into the commit's sparse mirror: a sampled pass reuses it
                f = RemoteFile(url, size, root / name, headers, endpoint)
                parsed.append(gguf_header(f, first))
                continue
            buf, want = b"", first
            while True:  # a size the hub did not list: read until the header ends
                start, stop = len(buf), want
                got = within_deadline(
                    lambda a=start, b=stop, u=url: _range(u, a, b, headers), endpoint
                )
                buf += got
                try:
                    parsed.append(parse_header(buf, f"{repo_id}/{name}"))
                    break
                except HeaderTruncated:
                    if len(got) < stop - start:  # the file ended inside its header
                        raise
                    want *= 2
        if len(files) > 1:
            check_splits(parsed, [f"{repo_id}/{n}" for n in files])
        infos: list[TensorInfo] = []
        for name, header in zip(files, parsed, strict=True):
            infos.extend(tensor_infos(header, name, sizes.get(name) or 1 << 62))
        self.index = ModelIndex(
            source=repo_id,
            container=Container.GGUF,
            files=tuple(files),
            tensors=tuple(infos),
            config=parsed[0].metadata,
            metadata_only=True,
        )

    def read(self, info: TensorInfo) -> Any:
        raise AssertionError("unreachable: iter_tensors refuses metadata-only sources")


def _repo_files(repo_id: str, revision: str | None, endpoint: str):
    """The repository's commit and its files with their sizes."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint)
    info = within_deadline(
        lambda: api.model_info(repo_id, revision=revision, files_metadata=True),
        endpoint,
    )
    sizes = {s.rfilename: s.size or 0 for s in info.siblings or ()}
    return info.sha or revision, sizes


def open_hub(
    repo_id: str,
    *,
    revision: str | None = None,
    download: bool = False,
    endpoint: str | None = None,
) -> TensorSource:
    """Open a hub repository (``owner/name`` or ``owner/name:FILE`` for one of its
    GGUF models), metadata-only unless ``download``."""
    repo_id, file = split_spec(repo_id)
    ensure_timeouts()
    endpoint = endpoint_of(endpoint)
    try:
        sha, sizes = _repo_files(repo_id, revision, endpoint)
        ggufs = choose_gguf(repo_id, list(sizes), file)
        if ggufs is not None and not download:
            commit = sha or revision or "main"  # the mirror open_ranged uses
            return HubGGUFSource(
                repo_id, ggufs, sizes, revision=commit, endpoint=endpoint
            )
    except hub_exceptions() as exc:
        raise hub_error(repo_id, endpoint, exc) from exc
    if not download:
        return HubMetadataSource(repo_id, revision=revision, endpoint=endpoint)
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(
            repo_id,
            revision=sha or revision,
            endpoint=endpoint,
            allow_patterns=_DOWNLOAD_PATTERNS if ggufs is None else ggufs,
        )
    except hub_exceptions() as exc:
        raise hub_error(repo_id, endpoint, exc) from exc
    if ggufs is not None:
        return GGUFSource(Path(folder) / ggufs[0], source=f"{repo_id}:{ggufs[0]}")
    return SafetensorsSource(folder, source=repo_id)
