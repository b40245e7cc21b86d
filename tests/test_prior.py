"""The data-free criterion's sensitivity table (ewq/sensitivity/prior.toml)."""

from __future__ import annotations

import math

from ewq import api
from ewq.formats import GGUF, HF
from ewq.sensitivity import tensor_candidates
from ewq.sensitivity.prior import family, prior, table
from ewq.types import BlockKind, Role


def _families(path) -> dict[str, str]:
    layout = api.inspect(path).layout
    tied = not any(k.role is Role.LM_HEAD for b in layout.blocks for k in b.keys)
    form = GGUF if str(path).endswith(".gguf") else HF
    return {
        name: family(key.role, tied)
        for name, (_, key, _) in tensor_candidates(form, layout).items()
        if key.block_kind is BlockKind.TRANSFORMER
    }


def test_every_tensor_ewq_quantizes_has_a_measured_row(tiny_models, tiny_ggufs):
    """Every family of the architecture map: each matrix of a transformer block a
    plan can quantize falls in a family the table was fitted for (none silently takes
    the catch-all row, which is left to what no model here measures: a BERT pooler,
    learned positions)."""
    for kind in ("free", "imatrix"):
        rows = table()[kind]
        for path in [*tiny_models.values(), *tiny_ggufs.values()]:
            for name, fam in _families(path).items():
                assert fam in rows and fam != "other", (path.name, name, fam)
            weights = prior(api.inspect(path).layout, weighted=kind == "imatrix")
            assert all(math.isfinite(v) and v > 0 for v in weights.values())


def test_the_output_head_is_the_most_sensitive_family():
    """llama.cpp's rule: every K-quant preset writes output.weight (or the tied
    embedding that serves as it) with at least Q6_K, as many bits as any other tensor
    gets (src/llama-quant.cpp, llama_tensor_get_type_impl: `new_type =
    GGML_TYPE_Q6_K` for the output tensor); the fitted table ranks no family above
    it."""
    for kind in ("free", "imatrix"):
        rows = table()[kind]
        head = min(rows["embed_tied"])
        for fam, levels in rows.items():
            if fam not in ("embed_tied", "head", "other"):
                assert max(levels) <= head, (kind, fam)
