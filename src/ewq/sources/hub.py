"""Models on the Hugging Face hub, by repository id.

Two modes. Metadata-only reads config.json and the safetensors headers (HTTP range
requests, a few hundred kilobytes even for a 70B model) and downloads no weight:
enough to inspect, plan and run FastEWQ. Full mode downloads the repository into the
huggingface_hub cache and then reads it as a local folder.

``HF_ENDPOINT`` (or the ``endpoint`` argument) points everything at another server,
which is how the tests stand a local HTTP server in for the hub.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
from typing import Any

from ewq.errors import FormatError, HubUnavailableError
from ewq.sources.base import TensorSource
from ewq.sources.documents import check_config, load_json
from ewq.sources.safetensors import SafetensorsSource, tensor_infos_from_header
from ewq.types import ModelIndex, TensorInfo

__all__ = ["HubMetadataSource", "is_hub_id", "open_hub"]

log = logging.getLogger(__name__)

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]


_TIMEOUTS_SET = False


def _timeout() -> float:
    try:
        value = float(os.environ.get("EWQ_HUB_TIMEOUT", "30"))
    except ValueError:
        return 30.0
    return value if value > 0 else 30.0


def _within_deadline(call, endpoint: str):
    """``call()``, or a one-line error when the hub has not answered within four
    read timeouts: huggingface_hub retries a stalled request five times with
    backoff, which alone can take minutes. The abandoned request runs on in a
    daemon thread and ends with the process."""
    import threading

    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            outcome["error"] = exc

    worker = threading.Thread(target=work, name="ewq-hub", daemon=True)
    worker.start()
    deadline = 4 * _timeout()
    worker.join(deadline)
    if worker.is_alive():
        raise HubUnavailableError(
            f"the hub at {endpoint} did not answer within {deadline:g} s "
            "(EWQ_HUB_TIMEOUT sets the seconds per read)"
        )
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _ensure_timeouts() -> None:
    """huggingface_hub's HTTP client waits forever by default (``timeout=None``): a
    server that accepts and never answers hung ewq. Give its shared client connect
    and read timeouts: ``EWQ_HUB_TIMEOUT`` seconds per read (default 60), 10 s to
    connect. A timeout ends in the same one-line hub error as a refused connection."""
    global _TIMEOUTS_SET
    if _TIMEOUTS_SET:
        return
    from huggingface_hub.utils import _http

    read = _timeout()
    factory = _http.default_client_factory

    def with_timeouts():
        client = factory()
        timeout_cls = type(client.timeout)
        client.timeout = timeout_cls(read, connect=min(10.0, read))
        return client

    _http.set_client_factory(with_timeouts)
    _TIMEOUTS_SET = True


def is_hub_id(spec: str) -> bool:
    """True for ``owner/name`` (and ``hf://owner/name``) that is not a local path."""
    return bool(_REPO_ID.match(spec.removeprefix("hf://")))


def _endpoint(endpoint: str | None) -> str:
    from huggingface_hub import constants

    return (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _hub_error(repo_id: str, endpoint: str, exc: BaseException) -> Exception:
    from huggingface_hub import errors

    if isinstance(exc, errors.RevisionNotFoundError):
        return HubUnavailableError(
            f"hub repository '{repo_id}' has no such revision ({endpoint})"
        )
    if isinstance(exc, errors.RepositoryNotFoundError):
        return HubUnavailableError(
            f"hub repository '{repo_id}' not found at {endpoint} (or it is private or gated)"
        )
    if isinstance(exc, errors.NotASafetensorsRepoError):
        return FormatError(
            f"hub repository '{repo_id}' has neither model.safetensors nor "
            "model.safetensors.index.json"
        )
    if isinstance(exc, errors.SafetensorsParsingError):
        return FormatError(f"hub repository '{repo_id}': {exc}")
    return HubUnavailableError(
        f"cannot reach the Hugging Face hub at {endpoint} to read '{repo_id}' (offline?): "
        f"{type(exc).__name__}; use a local folder, or set HF_ENDPOINT to a reachable mirror"
    )


def _transport_errors() -> tuple[type[BaseException], ...]:
    """HTTP client errors: huggingface_hub 2.x talks through httpx2, 1.x through httpx."""
    found = []
    for module in ("httpx2", "httpx"):
        try:
            found.append(importlib.import_module(module).HTTPError)
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def _hub_exceptions() -> tuple[type[BaseException], ...]:
    from huggingface_hub import errors

    return (
        *_transport_errors(),
        errors.HfHubHTTPError,
        errors.EntryNotFoundError,
        errors.OfflineModeIsEnabled,
        errors.NotASafetensorsRepoError,
        errors.SafetensorsParsingError,
        OSError,
    )


class HubMetadataSource(TensorSource):
    """A hub repository seen through its config.json and safetensors headers only."""

    def __init__(
        self, repo_id: str, *, revision: str | None = None, endpoint: str | None = None
    ):
        from huggingface_hub import HfApi, errors, hf_hub_download

        _ensure_timeouts()
        endpoint = _endpoint(endpoint)
        try:
            api = HfApi(endpoint=endpoint)
            # model_info first: it tells a missing repository from a repository
            # without safetensors, and pins the commit for the reads that follow.
            info = _within_deadline(
                lambda: api.model_info(repo_id, revision=revision), endpoint
            )
            meta = _within_deadline(
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
        except _hub_exceptions() as exc:
            raise _hub_error(repo_id, endpoint, exc) from exc
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
            format="safetensors",
            files=tuple(sorted(meta.files_metadata)),
            tensors=tuple(infos),
            config=config,
            metadata_only=True,
        )

    def read(self, info: TensorInfo) -> Any:
        raise AssertionError("unreachable: iter_tensors refuses metadata-only sources")


def open_hub(
    repo_id: str,
    *,
    revision: str | None = None,
    download: bool = False,
    endpoint: str | None = None,
) -> TensorSource:
    """Open a hub repository, metadata-only unless ``download``."""
    repo_id = repo_id.removeprefix("hf://")
    if not download:
        return HubMetadataSource(repo_id, revision=revision, endpoint=endpoint)
    from huggingface_hub import snapshot_download

    _ensure_timeouts()
    endpoint = _endpoint(endpoint)
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            endpoint=endpoint,
            allow_patterns=_DOWNLOAD_PATTERNS,
        )
    except _hub_exceptions() as exc:
        raise _hub_error(repo_id, endpoint, exc) from exc
    return SafetensorsSource(folder, source=repo_id)
