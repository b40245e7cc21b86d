"""The error criterion's measurement, cached: its key (ewq.cache: content or, for a
sampled pass, identity), the reader it measures through (a local file, the GGUF a
Hugging Face checkpoint converts to, or a hub model's range mirror), and the pass."""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import os
import threading
from pathlib import Path

from ewq.arch import ModelLayout, resolve
from ewq.cache import code_digest, key, load_entry, runtime_id, store_entry
from ewq.formats import output_format
from ewq.sensitivity import criterion as criterion_spec
from ewq.sources import open_source
from ewq.types import ModelIndex


def damage_of(doc) -> dict[str, dict[str, float]]:
    return {
        str(n): {str(t): float(v) for t, v in row.items()} for n, row in doc.items()
    }


def cache_key(index: ModelIndex, kind: str, params: dict, content: bool = True) -> str:
    spec = criterion_spec(kind) if kind in ("error", "kl") else None
    code = code_digest(
        *(spec.code if spec else ("ewq.evaluate.activations", "ewq.imatrix"))
    )
    return key(
        {"kind": kind, "params": params, "code": code, "runtime": runtime_id()},
        [] if index.metadata_only else index.files,
        content,
    )


def measured_errors(
    source,
    index,
    layout,
    fmt,
    imatrix,
    revision,
    progress,
    sample=None,
    threads=None,
    only=None,
):
    """The relative errors per tensor and type (cached): (errors, seconds, cached,
    the sample's intervals per tensor: {} when every row was read). ``only``: of
    these tensors alone."""
    from ewq.sensitivity.error import relative_errors

    params = {
        "format": fmt,
        "imatrix": imatrix.digest() if imatrix else None,
        "sample": dataclasses.asdict(sample) if sample is not None else None,
    }
    if only is not None:
        params["only"] = sorted(only)
    with _error_source(source, index, layout, fmt, revision) as (src, m_layout):
        # a sampled pass names the files without reading them all (see ewq.cache)
        k = cache_key(src.index, "error", params, content=sample is None)
        doc = load_entry("error", k)
        if doc is not None:
            try:
                errors, seconds = damage_of(doc["errors"]), float(doc["seconds"])
                return errors, seconds, True, dict(doc.get("intervals") or {})
            except (KeyError, TypeError, ValueError):
                pass
        import time

        started = time.perf_counter()
        intervals: dict[str, dict] = {}
        how = {
            "progress": progress,
            "sample": sample,
            "intervals": intervals,
            "threads": threads or os.cpu_count() or 1,
            "only": only,
        }
        w = imatrix if output_format(fmt).calibrated else None
        errors = relative_errors(src, m_layout, fmt, imatrix=w, **how)
        seconds = time.perf_counter() - started
        fetched = getattr(src, "bytes_fetched", None)
    doc = {"errors": errors, "seconds": seconds, "intervals": intervals}
    if fetched is not None:
        doc["bytes_fetched"] = fetched
    store_entry("error", k, doc)
    return errors, seconds, False, intervals


@contextlib.contextmanager
def _error_source(source, index, layout, fmt, revision):
    """The reader and layout the error criterion measures: a hub model opened by
    its headers only (a sampled pass) is read through a sparse mirror filled by
    range requests (ewq.sources.ranged), the rows it samples and nothing else;
    GGUF output from a Hugging Face checkpoint, through the converted GGUF."""
    form = output_format(fmt)
    if index.metadata_only and form.container == index.container:
        from ewq.sources.ranged import open_ranged

        with open_ranged(source, revision=revision) as src:
            yield src, resolve(src.index)
        return
    if form.needs_conversion(index.container):
        if index.metadata_only:  # the converter needs the whole checkpoint
            with open_source(source, download=True, revision=revision) as full:
                index, layout = full.index, resolve(full.index)
        with (
            as_gguf(source, index, layout) as (g_index, g_layout),
            open_source(g_index.files[0]) as gsrc,
        ):
            yield gsrc, g_layout
        return
    with open_source(source, download=True, revision=revision) as src:
        yield src, layout


@contextlib.contextmanager
def as_gguf(source, index: ModelIndex, layout: ModelLayout):
    """The GGUF the criteria measure: the source itself, or a Hugging Face checkpoint
    converted to a scratch GGUF in ewq's cache folder (:data:`_SCRATCH`)."""
    if index.container == "gguf":
        yield index, layout
        return
    with _SCRATCH.use(source, index, layout) as found:
        yield found


class _Scratch:
    """Scratch conversions of Hugging Face checkpoints, kept while this process
    needs them: one plan measures the converted GGUF several times (the errors, each
    growth round, the anchor's recipes) and each conversion reads and writes the
    whole model. The last one stays until another checkpoint is converted or the
    process ends; files a killed ewq left behind are removed when a new one is
    made."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._held: dict[tuple, list] = {}  # key -> [path, (index, layout), users]
        self._made = 0
        atexit.register(self.clear)

    def use(self, source, index: ModelIndex, layout: ModelLayout):
        """A context giving the conversion of ``index``'s checkpoint (its GGUF
        index and layout), made now unless this process holds it."""
        return self._entry(index, lambda: self._convert(source, index, layout))

    def held(self, index: ModelIndex):
        """A context giving the conversion of ``index``'s checkpoint this process
        holds, as the checkpoint is now, or None (nothing is converted)."""
        return self._entry(index, None)

    @contextlib.contextmanager
    def _entry(self, index: ModelIndex, make):
        with self._lock:
            which = _which(index)
            if which not in self._held and make is not None:
                self._evict()
                self._held[which] = [*make(), 0]
            entry = self._held.get(which)
            if entry is not None:
                entry[2] += 1  # in use: not evicted until released
        try:
            yield entry[1] if entry is not None else None
        finally:
            if entry is not None:
                with self._lock:
                    entry[2] -= 1

    def _convert(self, source, index, layout):
        from ewq.cache import cache_dir
        from ewq.quant.convert import convert_checked, scratch_name

        where = cache_dir() / "scratch"
        where.mkdir(parents=True, exist_ok=True)
        _remove_orphans(where)
        self._made += 1
        path = where / scratch_name(source, index, self._made)
        try:
            return path, convert_checked(source, index, layout, path)
        except BaseException:
            path.unlink(missing_ok=True)
            raise

    def _evict(self) -> None:
        for held, (path, _, users) in list(self._held.items()):
            if users == 0:
                path.unlink(missing_ok=True)
                del self._held[held]

    def clear(self) -> None:
        """Remove every scratch file no caller is reading."""
        with self._lock:
            self._evict()


def _which(index: ModelIndex) -> tuple:
    from ewq.quant.convert import checkpoint_identity

    return (checkpoint_identity(Path(index.files[0]).parent), index.files)


def held_conversion(index: ModelIndex):
    """The scratch conversion of ``index``'s checkpoint this process made for its
    measurements (a context giving its index and layout), or None: `api.quantize`
    after `api.plan` in one process writes from it instead of converting again."""
    return _SCRATCH.held(index)


def _remove_orphans(where: Path) -> None:
    """Scratch conversions whose process is gone (killed before it cleaned up)."""
    for path in where.glob(".*.converted.gguf"):
        pid = path.name.rsplit(".", 3)[-3].split("-")[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            path.unlink(missing_ok=True)
        except OSError:
            pass  # alive, or another user's


_SCRATCH = _Scratch()
