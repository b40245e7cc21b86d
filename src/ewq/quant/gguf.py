"""GGUF output through llama.cpp's own quantizer (llama-cpp-python).

``llama_model_quantize`` runs with ``pure`` (no type heuristics of its own),
``allow_requantize`` (the sources are GGUF files that are often quantized already)
and one type override per block or tensor. A raw tensor is overridden to its own
type, which llama.cpp copies bit for bit. The written file is read back and every
tensor's type compared with the prediction before the file is moved into place.
"""

from __future__ import annotations

import ctypes
import re
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from ewq.errors import EwqError, FormatError
from ewq.fileio import atomic_path_for_native
from ewq.formats import GGML_TYPES
from ewq.imatrix import Imatrix
from ewq.native import LLAMA_CPP_PIN
from ewq.quant.targets import TensorTarget, overrides
from ewq.sources.gguf import read_header

__all__ = [
    "LLAMA_CPP_PIN",
    "imatrix_metadata",
    "preset_recipes",
    "quantize_gguf",
    "quantize_preset",
]

_PROGRESS = re.compile(r"\[\s*(\d+)/\s*(\d+)\]\s+(\S+)")
# a tensor's line of llama-quantize's --dry-run (src/llama-quant.cpp): its name,
# its type, and "-> ... (new type)" when it is quantized
_DRY = re.compile(
    r"\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[[^\]]*\], type =\s*(\S+), size =[^\n(]*"
    r"(?:\((\w+)\))?"
)
_lock = threading.Lock()  # llama.cpp's logger is process-wide
_ABANDONED: list = []  # callbacks of runs interrupted while llama.cpp still logs


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise EwqError(
            f"GGUF output needs llama.cpp's quantizer: pip install {LLAMA_CPP_PIN} "
            "(scripts/setup.sh installs it)"
        ) from None
    return llama_cpp


def quantize_gguf(
    source: str | Path,
    targets: list[TensorTarget],
    out: str | Path,
    *,
    threads: int | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    before_commit: Callable[[Path, dict[str, str]], None] | None = None,
    metadata: Mapping[str, str | int] | None = None,
    imatrix: Imatrix | None = None,
) -> dict[str, str]:
    """Write ``source`` quantized as ``targets`` say; return the types written.

    ``before_commit(tmp, written)`` runs after the check and before the rename (the
    caller writes the provenance record there, so a model never sits beside a
    missing or stale record). ``metadata``: keys llama.cpp writes into the output's
    own GGUF metadata (its quantizer's ``kv_overrides``: strings up to 127 bytes,
    longer ones are cut, and integers). ``imatrix``: handed to llama.cpp's quantizer
    (its ``imatrix`` entries, as ``llama-quantize --imatrix`` hands them), and its
    ``quantize.imatrix.*`` keys written as llama-quantize writes them.

    Raises :class:`FormatError` (and writes nothing) if llama.cpp fails or writes a
    type other than predicted.
    """
    lc = _llama_cpp()
    metadata = dict(metadata or {})
    keep: list = []  # the C data must outlive the call: ctypes keeps only pointers
    params = lc.llama_model_quantize_default_params()
    if imatrix is not None:
        params.imatrix = _imatrix_entries(lc, imatrix, targets, keep)
        metadata |= imatrix_metadata(imatrix)
    else:
        _refuse_without_imatrix(targets)
    params.ftype = lc.LLAMA_FTYPE_MOSTLY_Q8_0  # unused: every tensor is overridden
    params.allow_requantize = True
    params.pure = True
    params.nthread = threads or 0
    params.tt_overrides = _type_table(lc, targets, keep)
    if metadata:
        params.kv_overrides = _kv_table(lc, metadata, keep)

    with _lock, atomic_path_for_native(out) as tmp:
        _run(lc, source, tmp, params, progress)
        written = _check_written(tmp, targets)
        if before_commit is not None:
            before_commit(tmp, written)
    return written


def _type_table(lc, targets: list[TensorTarget], keep: list):
    """llama.cpp's per-tensor type overrides (``--tensor-type`` patterns), ended by
    an empty pattern; the C strings are kept alive in ``keep``."""
    pairs = overrides(targets)
    table = (lc.llama_model_tensor_override * (len(pairs) + 1))()
    for i, (pattern, qtype) in enumerate(pairs):
        raw = pattern.encode()
        keep.append(raw)
        table[i].pattern = raw
        table[i].type = _ggml_type(qtype)
    table[len(pairs)].pattern = None
    keep.append(table)
    return ctypes.cast(table, ctypes.POINTER(lc.llama_model_tensor_override))


def _kv_table(lc, metadata: Mapping[str, str | int], keep: list):
    """llama.cpp's metadata overrides (``--override-kv``), ended by an empty key."""
    kv = (lc.llama_model_kv_override * (len(metadata) + 1))()
    for i, (key, value) in enumerate(metadata.items()):
        kv[i].key = _cut(key)
        if isinstance(value, int):
            kv[i].tag = lc.LLAMA_KV_OVERRIDE_TYPE_INT
            kv[i].value.val_i64 = value
        else:
            kv[i].tag = lc.LLAMA_KV_OVERRIDE_TYPE_STR
            kv[i].value.val_str = _cut(value)
    kv[len(metadata)].key = b""  # the end of the list
    keep.append(kv)
    return ctypes.cast(kv, ctypes.POINTER(lc.llama_model_kv_override))


def imatrix_metadata(imatrix: Imatrix) -> dict[str, str | int]:
    """The keys llama-quantize writes for an importance matrix
    (tools/quantize/quantize.cpp: LLM_KV_QUANTIZE_IMATRIX_*)."""
    meta: dict[str, str | int] = {
        "quantize.imatrix.file": imatrix.file or f"sha256:{imatrix.digest()}",
        "quantize.imatrix.entries_count": len(imatrix.entries),
    }
    if imatrix.datasets:
        meta["quantize.imatrix.dataset"] = imatrix.datasets[0]
    if imatrix.chunk_count > 0:
        meta["quantize.imatrix.chunks_count"] = imatrix.chunk_count
    return meta


def _refuse_without_imatrix(targets: list[TensorTarget]) -> None:
    needing = [t for t in targets if t.needs_imatrix]
    if needing:
        t = needing[0]
        raise FormatError(
            f"tensor '{t.name}' is planned as {t.type}, which llama.cpp writes only "
            "with an importance matrix: give --imatrix FILE (or plan with "
            "--calibration TEXT)"
        )


def _imatrix_entries(lc, imatrix: Imatrix, targets: list[TensorTarget], keep: list):
    """llama.cpp's ``llama_model_imatrix_data`` array (name, data, size; a null name
    ends it): what llama-quantize gives its quantizer."""
    missing = [t for t in targets if t.needs_imatrix and t.name not in imatrix.entries]
    if missing:
        t = missing[0]
        raise FormatError(
            f"tensor '{t.name}' is planned as {t.type}, which llama.cpp writes only "
            "with an importance matrix, and the importance matrix has no entry for it"
        )
    weights = imatrix.weights()
    arr = (lc.llama_model_imatrix_data * (len(weights) + 1))()
    for i, (name, values) in enumerate(weights.items()):
        raw = name.encode()
        keep += [raw, values]
        arr[i].name = raw
        arr[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[i].size = values.size
    arr[len(weights)].name = None
    keep.append(arr)
    return ctypes.cast(arr, ctypes.POINTER(lc.llama_model_imatrix_data))


def _cut(text: str, limit: int = 127) -> bytes:
    """UTF-8 of ``text`` cut to ``limit`` bytes without splitting a character."""
    return text.encode()[:limit].decode("utf-8", "ignore").encode()


def quantize_preset(
    source: str | Path,
    preset: str,
    out: str | Path,
    *,
    pure: bool = False,
    threads: int | None = None,
    imatrix: Imatrix | None = None,
) -> dict[str, str]:
    """Write ``source`` as llama.cpp's own preset ``preset`` (Q4_K_M, Q3_K_S, ...):
    its per-tensor type mixture, exactly as `llama-quantize SRC OUT PRESET` makes it
    (``--allow-requantize``; with ``imatrix``, as ``--imatrix FILE`` does); with
    ``pure``, the preset's plain type for every tensor (`--pure`). Returns the types
    written."""
    lc = _llama_cpp()
    ftype = getattr(lc, f"LLAMA_FTYPE_MOSTLY_{preset.upper()}", None)
    if ftype is None:
        raise EwqError(f"llama.cpp has no preset {preset}")
    params = lc.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True
    params.pure = pure
    params.nthread = threads or 0
    keep: list = []
    if imatrix is not None:
        params.imatrix = _imatrix_entries(lc, imatrix, [], keep)
    with _lock, atomic_path_for_native(out) as tmp:
        _run(lc, source, tmp, params, None)
        header = read_header(tmp)
    return {name: qtype.name for name, _, qtype, _ in header.tensors}


def preset_recipes(
    source: str | Path, presets: Sequence[str], *, imatrix: Imatrix | None = None
) -> dict[str, dict[str, str]]:
    """llama.cpp's own type for every tensor of ``source`` under each preset, as
    `llama-quantize --dry-run SRC PRESET` decides it (``--allow-requantize``; with
    ``imatrix``, as with ``--imatrix``, which some of its rules look at): nothing
    is quantized or written. A preset llama.cpp would refuse without an importance
    matrix is left out when none is given."""
    lc = _llama_cpp()
    keep: list = []
    out: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory(prefix="ewq-dry-") as tmp:
        for preset in presets:
            ftype = getattr(lc, f"LLAMA_FTYPE_MOSTLY_{preset.upper()}", None)
            if ftype is None:
                raise EwqError(f"llama.cpp has no preset {preset}")
            params = lc.llama_model_quantize_default_params()
            params.ftype = ftype
            params.allow_requantize = True
            params.dry_run = True
            if imatrix is not None:
                params.imatrix = _imatrix_entries(lc, imatrix, [], keep)
            with _lock:
                log = _run(lc, source, Path(tmp) / "none.gguf", params, None)
            types = {
                m.group(1): (m.group(3) or m.group(2)).upper()
                for m in _DRY.finditer(log)
            }
            if imatrix is None and any(
                getattr(GGML_TYPES.get(t), "needs_imatrix", False)
                for t in types.values()
            ):
                continue  # llama.cpp refuses it without an importance matrix
            out[preset] = types
    return out


def _run(lc, source, tmp, params, progress) -> str:
    """llama_model_quantize with its log captured (progress, and the error line);
    returns the log."""
    log: list[str] = []

    def on_log(level: int, text: bytes, user: ctypes.c_void_p) -> None:
        line = text.decode("utf-8", "replace") if text else ""
        log.append(line)
        m = _PROGRESS.search(line)
        if m and progress is not None:
            try:
                progress(int(m.group(1)), int(m.group(2)), m.group(3))
            except Exception:  # noqa: BLE001 - never raise into C
                pass

    callback = lc.llama_log_callback(on_log)
    # The quantizer runs in a daemon thread so that Ctrl-C (KeyboardInterrupt) and
    # SIGTERM reach the main thread at once: the caller's cleanup removes the
    # temporary file, and the process exits without waiting for llama.cpp. (In the
    # main thread the interrupt was raised inside the log callback and swallowed by
    # ctypes, and the run finished with exit 0.)
    outcome: dict[str, object] = {}
    done = threading.Event()

    def work() -> None:
        try:
            outcome["rc"] = lc.llama_model_quantize(
                str(source).encode(), str(tmp).encode(), ctypes.byref(params)
            )
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            outcome["error"] = exc
        finally:
            done.set()

    lc.llama_log_set(callback, None)
    worker = threading.Thread(target=work, name="llama-quantize", daemon=True)
    worker.start()
    try:
        while not done.wait(0.1):
            pass
    except BaseException:
        # llama.cpp still runs and logs through the callback: keep it alive for
        # the rest of the process (the C side holds only a raw pointer)
        _ABANDONED.append((callback, params))
        raise
    # back to llama-cpp-python's own logger
    lc.llama_log_set(_restore_logger(lc), None)
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    rc = outcome["rc"]
    if rc != 0:
        errors = [
            ln.strip()
            for ln in "".join(log).splitlines()
            if "error" in ln.lower() or "failed" in ln.lower()
        ]
        raise FormatError(
            f"llama.cpp could not quantize {source}: "
            + (errors[-1] if errors else f"status {rc}")
        )
    return "".join(log)


def _restore_logger(lc):
    from llama_cpp import _logger

    return _logger.llama_log_callback


def _ggml_type(name: str) -> int:
    import gguf

    return int(gguf.GGMLQuantizationType[name])


def _check_written(path: Path, targets: list[TensorTarget]) -> dict[str, str]:
    header = read_header(path)
    written = {name: qtype.name for name, _, qtype, _ in header.tensors}
    if set(written) != {t.name for t in targets}:
        raise FormatError(
            f"llama.cpp wrote a different set of tensors than {len(targets)} planned; "
            "nothing was written"
        )
    for t in targets:
        got = written.get(t.name)
        if got != t.type:
            raise FormatError(
                f"llama.cpp wrote tensor '{t.name}' as {got}, not the predicted {t.type}; "
                "nothing was written"
            )
    return written
