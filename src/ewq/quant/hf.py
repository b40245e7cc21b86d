"""Hugging Face output: a compressed-tensors ``pack-quantized`` checkpoint.

Chosen among the maintained libraries with per-module bit widths because it runs
on CPU here, transformers loads it (decompressing on CPU), vLLM serves it natively
(4- and 8-bit), and it packs 2-, 3-, 4- and 8-bit integers densely, so a 3-bit block
really takes 3 bits per weight. torchao's CPU path stores sub-8-bit integers one
per byte, and HQQ sets bit widths per module name pattern, not per block.

Weights are rounded to nearest with symmetric max-abs scales per group (no
calibration data): compressed-tensors' own ``calculate_qparams`` computes the scales
from each group's min and max; ewq only chooses the groups.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from ewq.errors import EwqError, FormatError, NonFiniteTensorError
from ewq.quant.targets import TensorTarget
from ewq.sources.safetensors import read_header as read_st_header

__all__ = ["quantize_hf"]

# README.md: the source's card describes the unquantized model; ours replaces it
_SKIP = {
    "model.safetensors",
    "model.safetensors.index.json",
    "config.json",
    "README.md",
}
_SUFFIXES = ("_packed", "_scale", "_shape", "_zero_point", "_g_idx")


def _libraries():
    try:
        import compressed_tensors  # noqa: F401
        import torch
        import transformers
    except ImportError as exc:
        raise EwqError(
            f"Hugging Face output needs torch, transformers and compressed-tensors "
            f"(pip install 'ewq[torch]'): {exc}"
        ) from None
    return torch, transformers


def quantize_hf(
    folder: str | Path,
    targets: list[TensorTarget],
    out: str | Path,
    *,
    progress: Callable[[int, int, str], None] | None = None,
    before_commit: Callable[[Path, dict[str, int]], None] | None = None,
    card: str | None = None,
) -> dict[str, int]:
    """Write the checkpoint in ``folder`` quantized per ``targets`` into folder ``out``.

    Returns the bytes written per planned tensor, which must equal the prediction;
    the folder appears complete (renamed into place) or not at all. ``card`` is
    written as its README.md (the source's own card is not copied).
    """
    folder, out = Path(folder), Path(out)
    model = _load(folder)
    quantized = [t for t in targets if t.type.startswith("int")]
    groups = _schemes(folder, model, quantized)
    compressor = None
    if groups:
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.quantization import (
            QuantizationConfig,
            apply_quantization_config,
        )

        with _no_tqdm():
            apply_quantization_config(model, QuantizationConfig(config_groups=groups))
        _set_scales(model, quantized, progress)
        compressor = ModelCompressor.from_pretrained_model(
            model, quantization_format="pack-quantized"
        )
        with _no_tqdm():
            compressor.compress_model(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        if compressor is not None:
            compressor.update_config(str(tmp))
        for f in folder.iterdir():  # tokenizer and friends
            if (
                f.is_file()
                and f.name not in _SKIP
                and not f.name.endswith(".safetensors")
                and not (tmp / f.name).exists()
            ):
                shutil.copy2(f, tmp / f.name)
        if card is not None:
            (tmp / "README.md").write_text(card, encoding="utf-8")
        written = _check_written(tmp, targets)
        if before_commit is not None:
            before_commit(tmp, written)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return written


def _load(folder: Path):
    """The checkpoint through its transformers class; NaN or Inf refused (they
    would become NaN scales in a checkpoint that loads), on the weights already in
    memory (no second read of the model)."""
    torch, transformers = _libraries()
    config = json.loads((folder / "config.json").read_text())
    arch = (config.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise EwqError(f"{folder}: transformers has no class '{arch}' to load it with")
    transformers.utils.logging.disable_progress_bar()
    with _no_tqdm():
        model = cls.from_pretrained(folder, dtype="auto")
    for name, p in model.state_dict().items():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            n_nan, n_inf = int(torch.isnan(p).sum()), int(torch.isinf(p).sum())
            raise NonFiniteTensorError(
                f"{folder}: tensor '{name}' holds {n_nan} NaN and {n_inf} Inf values"
            )
    return model


def _schemes(folder: Path, model, quantized: list[TensorTarget]) -> dict:
    """compressed-tensors' config groups: one scheme per integer form (int4/g128,
    int8/ch), listing the Linear layers written in it."""
    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    modules = dict(model.named_modules())
    schemes: dict[str, list[str]] = {}
    for t in quantized:
        name = t.name.removesuffix(".weight")
        module = modules.get(name)
        if not isinstance(module, torch.nn.Linear):
            kind = type(module).__name__ if module is not None else "no module"
            raise EwqError(
                f"{folder}: '{t.name}' belongs to {kind}, not a torch Linear layer; "
                "compressed-tensors quantizes Linear layers only"
            )
        schemes.setdefault(t.type, []).append(name)
    groups = {}
    for form, names in sorted(schemes.items()):
        bits, grouping = form.removeprefix("int").split("/")
        args = QuantizationArgs(
            num_bits=int(bits),
            type="int",
            symmetric=True,
            strategy="group" if grouping.startswith("g") else "channel",
            group_size=int(grouping[1:]) if grouping.startswith("g") else None,
        )
        groups[f"ewq_{bits}bit_{grouping}"] = QuantizationScheme(
            targets=names, weights=args
        )
    return groups


def _set_scales(model, quantized: list[TensorTarget], progress) -> None:
    """Each quantized layer's scale and zero point from its weights' range (per
    group or per output channel), as compressed-tensors computes them."""
    import torch
    from compressed_tensors.quantization.utils import calculate_qparams

    modules = dict(model.named_modules())
    with torch.no_grad():
        for i, t in enumerate(quantized, 1):
            module = modules[t.name.removesuffix(".weight")]
            args = module.quantization_scheme.weights
            w = module.weight.detach()
            if args.group_size:
                w = w.unflatten(-1, (w.shape[-1] // args.group_size, args.group_size))
                lo, hi = w.amin(-1), w.amax(-1)
            else:
                lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
            scale, zero = calculate_qparams(lo, hi, args)
            module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
            module.weight_zero_point.data.copy_(
                zero.reshape(module.weight_zero_point.shape)
            )
            if progress is not None:
                progress(i, len(quantized), t.name)


@contextlib.contextmanager
def _no_tqdm():
    """compressed-tensors draws tqdm bars of its own on stderr; ewq draws one bar.

    Its failures are exceptions, not stderr text, so nothing is lost.
    """
    with contextlib.redirect_stderr(io.StringIO()):
        yield


def _check_written(folder: Path, targets: list[TensorTarget]) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for f in sorted(folder.glob("*.safetensors")):
        header, _ = read_st_header(f)
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            start, stop = entry["data_offsets"]
            sizes[name] = stop - start
    written = {}
    for t in targets:
        if t.type.startswith("int"):
            base = t.name.removesuffix(".weight") + ".weight"
            got = sum(sizes.pop(base + s, 0) for s in _SUFFIXES)
        else:
            got = sizes.pop(t.name, 0)
        if got != t.nbytes:
            raise FormatError(
                f"the checkpoint holds {got} bytes for '{t.name}', not the predicted "
                f"{t.nbytes}; nothing was written"
            )
        written[t.name] = got
    return written


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished folder onto ``out``; an old ``out`` goes only after."""
    os.chmod(tmp, 0o755)
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        os.replace(out, old / out.name)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
