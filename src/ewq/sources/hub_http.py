"""Talking to the hub: the endpoint (``HF_ENDPOINT``), timeouts on huggingface_hub's
client, a deadline over its retries, and its errors turned into one line each."""

from __future__ import annotations

import importlib
import os
from typing import Any

from ewq.errors import FormatError, HubUnavailableError

__all__ = [
    "endpoint_of",
    "ensure_timeouts",
    "hub_error",
    "hub_exceptions",
    "within_deadline",
]


_TIMEOUTS_SET = False


def _timeout() -> float:
    try:
        value = float(os.environ.get("EWQ_HUB_TIMEOUT", "30"))
    except ValueError:
        return 30.0
    return value if value > 0 else 30.0


def within_deadline(call, endpoint: str):
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


def ensure_timeouts() -> None:
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


def endpoint_of(endpoint: str | None) -> str:
    from huggingface_hub import constants

    return (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def hub_error(repo_id: str, endpoint: str, exc: BaseException) -> Exception:
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


def hub_exceptions() -> tuple[type[BaseException], ...]:
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
