"""Output formats: what each tensor can become in each, and its exact size in bytes.

Pure: no I/O. The quantizers write what these rules say, and the planner counts what
they say, so a plan's sizes are the written sizes. One registry entry per format
(:data:`FORMATS`): code that needs a format looks it up, it never compares names.

Two ways to ask:

* per tensor and type (:meth:`OutputFormat.candidates`, :meth:`OutputFormat.of_type`):
  every type the format can write for a tensor, with its exact bytes. Per-tensor
  plans choose from these.
* per precision (:meth:`OutputFormat.encoding`): the one type a whole precision is
  written as (the per-block view: the paper's decision and ladder, FastEWQ).

GGUF (llama.cpp), per precision, with llama.cpp's fallback for rows that are not a
multiple of the type's block (``ewq.formats.ggml_types``):

==========  ============  ==========
precision   type          fallback
==========  ============  ==========
raw         its own type  -
8-bit       Q8_0          -
6-bit       Q6_K          Q8_0
5-bit       Q5_K          Q5_1
4-bit       Q4_K          Q5_0
3-bit       Q3_K          Q4_0
2-bit       Q2_K          Q4_0
1.58-bit    TQ1_0         Q4_0
==========  ============  ==========

ewq passes the final type to llama.cpp as an explicit override, so what it writes is
what is predicted. A row that fits no type (not a multiple of 32) keeps its own type
(where llama.cpp would write F16). Tensors llama.cpp never quantizes keep their type
whatever the plan says.

Hugging Face: compressed-tensors' ``pack-quantized`` (``ewq.formats.hf_rules``).
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf

from ewq.errors import EwqError
from ewq.formats.ggml_types import (
    GGML_TYPES,
    PRECISION_TYPE,
    GgmlType,
    gguf_quantizable,
    source_type,
    tensor_bytes,
    written_type,
)
from ewq.formats.hf_rules import (
    HF_BITS,
    hf_form,
    hf_group_size,
    hf_quantizable,
    hf_tensor_bytes,
)
from ewq.types import INT_DTYPES, ParamKind, Precision, TensorInfo, TensorKey

__all__ = [
    "FLOAT_TYPES",
    "FORMATS",
    "GGML_TYPES",
    "GGUF",
    "HF",
    "hook",
    "GGUF_FALLBACK",
    "HF_BITS",
    "PRECISIONS",
    "Encoding",
    "GgmlType",
    "OutputFormat",
    "encoding",
    "format_for",
    "gguf_quantizable",
    "gguf_target",
    "hf_group_size",
    "hf_quantizable",
    "hf_tensor_bytes",
    "offered",
    "output_format",
    "tensor_bytes",
]

#: storage types that hold plain floats (a tensor llama.cpp multiplies without
#: rounding its activations)
FLOAT_TYPES = frozenset({"F64", "F32", "F16", "BF16"})

T = gguf.GGMLQuantizationType

#: every quantized precision, most precise first, and the GGML type it is written as
PRECISIONS: dict[Precision, GgmlType] = {
    p: GGML_TYPES[name] for p, name in PRECISION_TYPE.items()
}
#: llama.cpp's fallbacks (tensor_type_fallback), by GGML type
GGUF_FALLBACK: dict[T, T] = {
    t.qtype: T[t.fallback] for t in GGML_TYPES.values() if t.fallback is not None
}


@dataclass(frozen=True)
class Encoding:
    """What one tensor becomes in one format: a type (GGML type name for gguf;
    ``int4/g128``-style form or the tensor's own dtype for hf), whether that is a
    fallback, its exact bytes, and whether the format's quantizer would quantize it."""

    type: str
    fallback: bool
    nbytes: int
    quantizable: bool
    precision: Precision = Precision.RAW  # the bit class of ``type``
    needs_imatrix: bool = False


class OutputFormat:
    """One output format (a registry entry)."""

    name: str
    label: str  # what a message calls its output
    folder: bool  # the output is a folder, not a file
    suffix: str  # of an output file ("" for folders)
    #: the source container its writer reads as it is, and those converted to it
    #: first (by llama.cpp's converter, ewq.quant.convert)
    container: str
    converts: tuple[str, ...] = ()
    #: lazy "module:function" (ewq.api._quantize) writing a plan in this format:
    #: (job, index, layout, imatrix) -> Quantized
    writer: str
    #: what quantizes it, as the provenance record says
    quantizer: str
    #: lazy "module:function": (rows, type, *, threads, imatrix) -> the rows
    #: quantized to ``type`` and back, as the writer would (the error criterion)
    roundtrip: str
    #: its quantizer and runtime take calibration data: an importance matrix,
    #: GPTQ rounding, the kl criterion's probes
    calibrated: bool = False
    #: the export (ewq.planning.exports) whose runtime serves it, and whether that
    #: runtime relays hidden states through the main machine and returns logits
    #: (llama.cpp's RPC) or sends one sampled token back (vLLM's pipeline)
    served_by: str
    relay: bool = False
    #: lazy "module:function" giving a runtime's own recipes for a source (a
    #: plan's anchor, ewq.api._anchor), or None where the runtime has none
    recipes: str | None = None

    def reads(self, container: str) -> bool:
        """Whether its writer takes a source of ``container`` (as it is, or
        converted first)."""
        return container == self.container or container in self.converts

    def needs_conversion(self, container: str) -> bool:
        return container != self.container and container in self.converts

    def offered(self) -> tuple[Precision, ...]:
        """The precisions it writes, raw first, then most precise first."""
        raise NotImplementedError

    def encoding(
        self, info: TensorInfo, key: TensorKey | None, precision: Precision
    ) -> Encoding | None:
        """What the tensor becomes at ``precision``; None: not written at all."""
        raise NotImplementedError

    def candidates(
        self, info: TensorInfo, key: TensorKey | None, imatrix: bool = False
    ) -> list[Encoding]:
        """Every way the format can write the tensor (its own type first); types
        that need an importance matrix only with ``imatrix``."""
        raise NotImplementedError

    def of_type(
        self, info: TensorInfo, key: TensorKey | None, type_name: str
    ) -> Encoding | None:
        """The encoding of an explicit type (a per-tensor plan's), or None when the
        format cannot write the tensor so."""
        for e in self.candidates(info, key, imatrix=True):
            if e.type == type_name:
                return e
        return None


class _Gguf(OutputFormat):
    name, label, folder, suffix = "gguf", "GGUF files", False, ".gguf"
    container, converts = "gguf", ("safetensors",)
    writer = "ewq.api._quantize:write_gguf"
    quantizer = "llama.cpp llama_model_quantize (pure, allow_requantize)"
    roundtrip = "ewq.quant.ggml:roundtrip_type"
    calibrated = True
    served_by, relay = "llama_cpp", True
    recipes = "ewq.quant.gguf:preset_recipes"

    def offered(self) -> tuple[Precision, ...]:
        return (Precision.RAW, *PRECISIONS)

    def _own(self, info: TensorInfo, quantizable: bool) -> Encoding:
        own = source_type(info.dtype)
        return Encoding(own.name, False, tensor_bytes(info.shape, own), quantizable)

    def encoding(self, info, key, precision):
        quantizable = gguf_quantizable(info.name, info.shape)
        if precision is Precision.RAW or not quantizable:
            return self._own(info, quantizable)  # norms, routers: not a fallback
        name, fallback = written_type(info.shape[-1], PRECISIONS[precision].name)
        if name is None:
            own = self._own(info, True)
            return Encoding(own.type, True, own.nbytes, True)
        spec = GGML_TYPES[name]
        return Encoding(
            name,
            fallback,
            tensor_bytes(info.shape, spec.qtype),
            True,
            precision,
            spec.needs_imatrix,
        )

    def candidates(self, info, key, imatrix=False):
        quantizable = gguf_quantizable(info.name, info.shape)
        out = [self._own(info, quantizable)]
        if not quantizable:
            return out
        row = info.shape[-1]
        for spec in GGML_TYPES.values():
            if spec.name == out[0].type or row % spec.block:
                continue
            if spec.needs_imatrix and not imatrix:
                continue
            out.append(
                Encoding(
                    spec.name,
                    False,
                    tensor_bytes(info.shape, spec.qtype),
                    True,
                    spec.precision,
                    spec.needs_imatrix,
                )
            )
        return out


class _Hf(OutputFormat):
    name, label, folder, suffix = "hf", "the Hugging Face output", True, ""
    container = "safetensors"
    writer = "ewq.api._quantize:write_hf"
    quantizer = "compressed-tensors pack-quantized, symmetric round-to-nearest"
    roundtrip = "ewq.quant.rtn:roundtrip"
    served_by = "vllm"

    def offered(self) -> tuple[Precision, ...]:
        return (Precision.RAW, *HF_BITS)

    @staticmethod
    def _linear(info: TensorInfo, key: TensorKey | None) -> bool:
        weight = key is not None and key.kind is ParamKind.WEIGHT
        return key is not None and hf_quantizable(key.role, info.shape, weight)

    def encoding(self, info, key, precision):
        # integer buffers of old checkpoints (BERT's position_ids): transformers
        # rebuilds them and does not save them
        if info.dtype in INT_DTYPES:
            return None
        linear = self._linear(info, key)
        if precision is Precision.RAW or not linear:
            is_weight = key is not None and key.kind is ParamKind.WEIGHT
            fallback = (
                precision is not Precision.RAW and is_weight and len(info.shape) >= 2
            )
            return Encoding(info.dtype, fallback, info.nbytes, linear)
        if precision not in HF_BITS:
            raise ValueError(f"{precision.value} is not offered for the hf format")
        return self._quantized(info, precision)

    def _quantized(self, info: TensorInfo, precision: Precision) -> Encoding:
        bits = HF_BITS[precision]
        itemsize = info.nbytes // max(1, info.num_elements)
        return Encoding(
            hf_form(bits, info.shape[-1]),
            precision is Precision.TERNARY,
            hf_tensor_bytes(info.shape, bits, itemsize),
            True,
            precision,
        )

    def candidates(self, info, key, imatrix=False):
        own = self.encoding(info, key, Precision.RAW)
        if own is None:
            return []
        if not self._linear(info, key):
            return [own]
        # one candidate per integer width (ternary is written as 2-bit)
        return [own] + [
            self._quantized(info, p) for p in HF_BITS if p is not Precision.TERNARY
        ]


#: the registry: adding a format is one entry
FORMATS: dict[str, OutputFormat] = {f.name: f for f in (_Gguf(), _Hf())}
#: llama.cpp's format, named where only it will do: the kl criterion and the
#: importance matrix run the model through llama.cpp, whatever is written
GGUF: OutputFormat = FORMATS["gguf"]
#: the Hugging Face output (what the encoder comparisons write)
HF: OutputFormat = FORMATS["hf"]


def hook(spec: str):
    """The function a registry entry names lazily as "module:function" (imported on
    first use, so that a format's heavy runtime loads only when it is needed)."""
    import importlib

    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def output_format(name: str | OutputFormat) -> OutputFormat:
    if isinstance(name, OutputFormat):
        return name
    try:
        return FORMATS[str(getattr(name, "value", name))]
    except KeyError:
        raise EwqError(
            f"unknown format {name!r} (one of {', '.join(FORMATS)})"
        ) from None


def format_for(container: str) -> OutputFormat:
    """The format a source of ``container`` is written in unless told: the one
    whose writer reads it as it is (a GGUF stays GGUF), else Hugging Face output."""
    for form in FORMATS.values():
        if form.container == container:
            return form
    return FORMATS["hf"]


def offered(fmt: str) -> tuple[Precision, ...]:
    """The precisions ``fmt`` can write, raw first, then most precise first."""
    return output_format(fmt).offered()


def encoding(
    fmt: str, info: TensorInfo, key: TensorKey | None, precision: Precision
) -> Encoding | None:
    """The one rule both the quantizers and the planner use; None: not written."""
    return output_format(fmt).encoding(info, key, precision)


def gguf_target(
    name: str, shape: tuple[int, ...], dtype: str, precision: Precision
) -> tuple[T, bool]:
    """The GGML type a tensor is written as at ``precision``, and whether that is a
    fallback."""
    e = FORMATS["gguf"].encoding(
        TensorInfo(name, dtype, shape, 0, "", 0), None, precision
    )
    assert e is not None
    return T[e.type], e.fallback
