"""The choices the records of ewq.config are made of: named values (enums) and
llama.cpp's presets."""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "ANCHOR_PRESETS",
    "DEFAULT_ALPHA",
    "CALIBRATION_TOKENS_PER_WIDTH",
    "DEFAULT_CALIBRATION_TOKENS",
    "DEFAULT_CONTEXT",
    "DEFAULT_PROBES",
    "IMATRIX_PRESETS",
    "PRESETS",
    "Allocator",
    "Criterion",
    "Documents",
    "Format",
    "KvCache",
    "Method",
    "Mode",
    "Rounding",
    "Task",
    "Variant",
]

DEFAULT_ALPHA = 1.25  # reproduces the paper's share of 4-bit blocks (about 11%)
DEFAULT_CONTEXT = 2048  # tokens the runtime holds, unless told otherwise
#: the fewest tokens of a calibration text the importance matrix and the second
#: moments are computed on by default: benchmarks/calibration_tokens.py measured the
#: smallest count whose output is within 5% of the KL of 4x as many at 4,096 on IgLM
#: and 8,192 on the default model (results/*/calibration_tokens.json)
DEFAULT_CALIBRATION_TOKENS = 8192
#: and at least this many per column of the widest input a weight multiplies: a
#: second moment X^T X of an input n wide has full rank only from n tokens on (not
#: measured: no unquantized model wider than 2,048 is at hand here)
CALIBRATION_TOKENS_PER_WIDTH = 4
#: tensors whose sensitivity the kl criterion measures, a pass each; the others' are
#: interpolated over depth, so that the passes do not grow with the tensor count (a
#: 7B model has 224 weight tensors, a 70B 560): benchmarks/probe_budget.py
DEFAULT_PROBES = 32

#: llama.cpp's presets `ewq compare` measures ewq against, largest first
PRESETS = (
    "Q6_K",
    "Q5_K_M",
    "Q5_K_S",
    "Q4_K_M",
    "Q4_K_S",
    "IQ4_XS",
    "Q3_K_L",
    "Q3_K_M",
    "Q3_K_S",
    "IQ3_XXS",
    "Q2_K",
    "IQ2_M",
)
#: llama.cpp's presets a GGUF plan is anchored to (ewq.api._anchor): every preset
#: ewq compares against, and Q8_0 above them
ANCHOR_PRESETS = ("Q8_0", *PRESETS)
#: the presets llama.cpp refuses to make without an importance matrix
#: (src/llama-quant.cpp, tensor_requires_imatrix)
IMATRIX_PRESETS = frozenset({"IQ3_XXS", "IQ2_M"})


class Variant(StrEnum):
    """The paper's two EWQ variants."""

    MIXED_4_8 = "4bit/8bit"  # both rules: below T to 4-bit, below mu to 8-bit
    MIXED_8 = "8bit"  # the 8-bit rule only: every block below mu to 8-bit


class Method(StrEnum):
    EWQ = "ewq"
    FAST = "fast"
    FAST_TRAIN = "fast-train"


class Criterion(StrEnum):
    ENTROPY = "entropy"
    ERROR = "error"
    KL = "kl"
    RANDOM = "random"
    POSITION = "position"


class Allocator(StrEnum):
    OPTIMAL = "optimal"
    LADDER = "ladder"


class Mode(StrEnum):
    M84 = "8/4"
    M43 = "4/3"
    M42 = "4/2"


class KvCache(StrEnum):
    """The runtime's KV cache type (llama.cpp's --cache-type-k and -v)."""

    F16 = "f16"
    Q8_0 = "q8_0"
    Q4_0 = "q4_0"


class Format(StrEnum):
    GGUF = "gguf"
    HF = "hf"


class Documents(StrEnum):
    """How a text is cut into windows (ewq.evaluate.windows)."""

    STREAM = "stream"
    LINES = "lines"


class Rounding(StrEnum):
    """How weights are rounded into their types (ewq.quant.gptq)."""

    AUTO = "auto"  # gptq with a calibration text, else nearest
    NEAREST = "nearest"  # llama.cpp's quantizer, per row (with the imatrix)
    GPTQ = "gptq"  # against the inputs' second moments on the calibration text


class Task(StrEnum):
    MMLU = "mmlu"
    PERPLEXITY = "perplexity"
    KLD = "kld"
    EMBEDDING = "embedding"
