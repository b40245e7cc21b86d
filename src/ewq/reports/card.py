"""The model card (README.md) of a Hugging Face output: what was quantized, how, by
which ewq, from which source and revision.

The front matter uses the hub's model-card keys (``base_model``,
``base_model_relation: quantized``, ``library_name``, ``tags``), so a pushed folder
is listed as a quantization of its source. The source's own card is not copied: it
describes the unquantized model.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

from ewq.planfile import Plan
from ewq.quant.targets import TensorTarget
from ewq.reports.inspect import human_bytes

__all__ = ["hub_revision", "model_card"]

_SNAPSHOT = re.compile(r"/snapshots/([0-9a-f]{40})(/|$)")


def hub_revision(folder: str) -> str | None:
    """The commit of a folder in the huggingface_hub cache (``.../snapshots/SHA``)."""
    m = _SNAPSHOT.search(folder.replace("\\", "/"))
    return m.group(1) if m else None


def _yaml_str(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def model_card(
    *,
    source: str,
    revision: str | None,
    hub_id: str | None,
    plan: Plan,
    targets: Sequence[TensorTarget],
    predicted_bytes: int,
    ewq_version: str,
    record: str,
) -> str:
    """The README.md text for a compressed-tensors folder written from ``plan``."""
    counts = Counter(b.precision.value for b in plan.blocks)
    forms = Counter(t.type for t in targets if t.quantizable and t.type[:3] == "int")
    front = ["---"]
    if hub_id:
        front += [f"base_model: {_yaml_str(hub_id)}", "base_model_relation: quantized"]
    front += [
        "library_name: transformers",
        "tags: [ewq, compressed-tensors, quantized, mixed-precision]",
        "---",
    ]
    blocks = ", ".join(f"{n} {p}" for p, n in counts.most_common())
    lines = [
        *front,
        "",
        f"# {source.rstrip('/').split('/')[-1]}, quantized block by block by ewq",
        "",
        f"- source: `{source}`" + (f" at revision `{revision}`" if revision else ""),
        f"- written by: ewq {ewq_version} (`ewq quantize`, plan method `{plan.method}`)",
        f"- transformer blocks: {blocks}",
        f"- embedding: {plan.embedding.precision.value}; head: "
        f"{plan.head.precision.value}",
        f"- tensor data: {human_bytes(predicted_bytes)} ({predicted_bytes:,} bytes)",
        "- format: compressed-tensors `pack-quantized`: symmetric integer weights "
        "rounded to nearest, one scale per group of columns, no calibration data",
    ]
    if forms:
        lines.append(
            "- quantized Linear weights: "
            + ", ".join(f"{n} as {f}" for f, n in sorted(forms.items()))
        )
    lines += [
        "",
        f"Every tensor's planned and written type is in `{record}`, the provenance "
        "record `ewq quantize` writes beside this folder.",
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        "model = AutoModelForCausalLM.from_pretrained('PATH')  # needs compressed-tensors",
        "```",
        "",
        "or `vllm serve PATH` (vLLM runs the 4- and 8-bit groups natively).",
        "",
    ]
    return "\n".join(lines)
