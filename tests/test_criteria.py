"""Sensitivity criteria and the precision registry, checked against llama.cpp itself."""

from __future__ import annotations

import re

import gguf
import numpy as np
import pytest
from models import Q, gguf_tensors, write_gguf

from ewq import api
from ewq.formats import GGUF_FALLBACK, PRECISIONS, offered
from ewq.types import Precision

llama_cpp = pytest.importorskip("llama_cpp")

# llama.cpp's ftype whose plain type is each K/ternary type (llama-quant.cpp maps
# the ftype to its default type; with `pure` no per-tensor mixture is applied)
_FTYPE = {
    Q.Q6_K: "Q6_K",
    Q.Q5_K: "Q5_K_S",
    Q.Q4_K: "Q4_K_S",
    Q.Q3_K: "Q3_K_S",
    Q.Q2_K: "Q2_K",
    Q.TQ1_0: "TQ1_0",
}


@pytest.fixture(scope="module")
def rows_96_gguf(tmp_path_factory):
    """An F16 Llama whose rows (96) are a multiple of 32 but not of 256."""
    t = gguf_tensors("llama", 1, hidden=96)
    t = {k: (v[0], Q.F32 if v[1] == Q.F32 else Q.F16) for k, v in t.items()}
    return write_gguf(tmp_path_factory.mktemp("r96") / "m.gguf", "llama", 1, t, 96)


@pytest.mark.parametrize("qtype", list(_FTYPE), ids=lambda q: q.name)
def test_fallback_table_is_what_llama_cpp_writes(rows_96_gguf, tmp_path, qtype):
    """Ask llama.cpp (pure, no overrides) for a 256-block type on rows of 96 and read
    back what it wrote: ewq's table must name the same fallback."""
    from ewq.quant.gguf import quantize_preset

    out = tmp_path / "q.gguf"
    written = quantize_preset(rows_96_gguf, _FTYPE[qtype], out, pure=True)
    fell_back = {t for n, t in written.items() if n.endswith("attn_q.weight")}
    assert fell_back == {GGUF_FALLBACK[qtype].name}


def test_every_gguf_precision_has_a_fallback_that_fits_32():
    for spec in PRECISIONS.values():
        if gguf.GGML_QUANT_SIZES[spec.gguf][0] > 32:
            assert gguf.GGML_QUANT_SIZES[GGUF_FALLBACK[spec.gguf]][0] == 32


@pytest.mark.parametrize(
    "precision", [p for p in offered("gguf") if p is not Precision.RAW]
)
def test_roundtrip_equals_the_values_llama_cpp_writes(
    llama_f16_gguf, tmp_path, precision
):
    """The error criterion's round trip (ggml's quantize + dequantize) gives exactly
    the values of the tensor llama.cpp's quantizer writes, read back by gguf-py."""
    from ewq.quant import ggml

    out = tmp_path / "q.gguf"
    n = 2
    plan = {
        "schema_version": 1,
        "num_blocks": n,
        "blocks": [
            {"exec_index": i, "precision": precision.value} for i in range(2, n + 2)
        ],
    }
    api.quantize(llama_f16_gguf, plan, out)
    src = {t.name: t for t in gguf.GGUFReader(llama_f16_gguf).tensors}
    got = {t.name: t for t in gguf.GGUFReader(out).tensors}
    name = "blk.0.ffn_up.weight"
    t = got[name]
    assert t.tensor_type == PRECISIONS[precision].gguf  # rows of 256: no fallback
    written = gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1, 256)
    values = np.asarray(src[name].data, dtype=np.float32).reshape(-1, 256)
    back = ggml.roundtrip(values, int(t.tensor_type), threads=2)
    np.testing.assert_array_equal(back, written)


def test_error_criterion_grows_as_bits_shrink(llama_f16_gguf, monkeypatch, tmp_path):
    monkeypatch.setenv("EWQ_CACHE", str(tmp_path / "cache"))
    s = api.sensitivity(llama_f16_gguf, "error")
    order = [
        Precision.Q8,
        Precision.Q6,
        Precision.Q5,
        Precision.Q4,
        Precision.Q3,
        Precision.Q2,
    ]
    for i in (2, 3):
        row = s.damage[i]
        assert row[Precision.RAW] == 0
        values = [row[p] for p in order]
        assert values == sorted(values) and values[0] > 0
        # relative error of Q8_0 on Gaussian weights: about 1e-5 per matrix
        assert 1e-6 < row[Precision.Q8] / 7 < 1e-4
    assert s.details["cached"] is False
    again = api.sensitivity(llama_f16_gguf, "error")
    assert again.details["cached"] is True and again.damage == s.damage


def _llama_cpp_buffers(path, n_ctx: int, **params) -> dict[str, float]:
    """The buffer sizes llama.cpp logs while creating a context (MiB)."""
    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def cb(level, text, user):
        lines.append(text.decode(errors="replace"))

    llama_cpp.llama_log_set(cb, None)
    try:
        m = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=512, verbose=True, **params)
        del m
    finally:
        from llama_cpp import _logger

        llama_cpp.llama_log_set(_logger.llama_log_callback, None)
    text = "".join(lines)
    found = {}
    for key, pattern in (
        ("kv", r"KV buffer size =\s+([\d.]+) MiB"),
        ("compute", r"compute buffer size =\s+([\d.]+) MiB"),
        ("output", r"output buffer size =\s+([\d.]+) MiB"),
    ):
        found[key] = sum(float(v) for v in re.findall(pattern, text))
    return found


@pytest.mark.parametrize("n_ctx", [512, 4096])
def test_runtime_memory_matches_what_llama_cpp_allocates(n_ctx):
    from ewq.planning import runtime_memory

    r = api.inspect("default")
    rt = runtime_memory(r.index, r.layout, n_ctx)
    got = _llama_cpp_buffers(r.index.files[0], n_ctx)
    mib = 2**20
    assert sum(rt.kv_bytes.values()) / mib == pytest.approx(got["kv"], rel=0.10)
    assert rt.compute_bytes / mib == pytest.approx(got["compute"], rel=0.10)
    assert rt.output_bytes / mib == pytest.approx(got["output"], rel=0.10)


@pytest.mark.parametrize("kv_cache", ["q8_0", "q4_0"])
def test_a_quantized_kv_cache_is_what_llama_cpp_allocates(kv_cache):
    """--kv-cache q8_0 / q4_0: the KV bytes llama.cpp reports for the same cache
    types (with the flash attention they need) are the prediction, to its 0.01
    MiB; and the plan's llama.cpp command asks for them."""
    from ewq.planning import runtime_memory, single_machine
    from ewq.serve.cluster import cache_params

    r = api.inspect("default")
    rt = runtime_memory(r.index, r.layout, 2048, cache_type=kv_cache)
    got = _llama_cpp_buffers(r.index.files[0], 2048, **cache_params(kv_cache))
    assert sum(rt.kv_bytes.values()) / 2**20 == pytest.approx(got["kv"], abs=0.01)
    f16 = runtime_memory(r.index, r.layout, 2048)
    ratio = sum(rt.kv_bytes.values()) / sum(f16.kv_bytes.values())
    assert ratio == pytest.approx({"q8_0": 34 / 64, "q4_0": 18 / 64}[kv_cache])
    p = api.plan(
        "default",
        [single_machine("400MB")],
        criterion="entropy",
        kv_cache=kv_cache,
    )
    command = p.exports["llama_cpp"]["command"]
    assert f"--cache-type-k {kv_cache} --cache-type-v {kv_cache} -fa on" in command
    assert p.runtime.kv_cache == kv_cache


def test_plan_with_context_leaves_room_for_the_runtime(monkeypatch, tmp_path):
    from ewq.planning import single_machine

    monkeypatch.setenv("EWQ_CACHE", str(tmp_path / "cache"))
    weights_only = api.plan(
        "default", [single_machine("230MB")], criterion="error", context=0
    )
    with_ctx = api.plan(
        "default", [single_machine("230MB")], criterion="error", context=2048
    )
    rt = with_ctx.runtime
    assert rt is not None and rt.context == 2048
    used = with_ctx.result.total_bytes + sum(rt.kv_bytes.values()) + rt.buffers_bytes
    assert used <= 230_000_000
    assert weights_only.runtime is None
    assert all(p.value == "raw" for p in weights_only.result.precision.values())
    assert with_ctx.result.total_bytes < weights_only.result.total_bytes


def test_every_family_plans_with_its_runtime(
    tiny_models, tiny_ggufs, monkeypatch, tmp_path
):
    """Every architecture of the map sizes its KV cache from its own metadata (or
    says why not in one line): no family falls through to a traceback."""
    from ewq.errors import EwqError
    from ewq.planning import single_machine

    monkeypatch.setenv("EWQ_CACHE", str(tmp_path / "cache"))
    for name, path in {**tiny_models, **tiny_ggufs}.items():
        try:
            planned = api.plan(path, [single_machine("1GB")], context=4096)
        except EwqError as exc:
            assert "--context 0" in str(exc), (name, exc)
            continue
        rt = planned.runtime
        assert planned.result.fits, name
        assert rt.cells == 4096 and len(rt.kv_bytes) == planned.layout.num_blocks
        assert all(v > 0 for v in rt.kv_bytes.values()), name


@pytest.mark.slow
def test_kl_criterion_is_the_kl_ewq_eval_measures(monkeypatch, tmp_path):
    """A probe's damage is the KL divergence `ewq eval --task kld` measures for the
    model with that one block at 4-bit (same windows); other precisions follow the
    error criterion's ratios."""
    monkeypatch.setenv("EWQ_CACHE", str(tmp_path / "cache"))
    from models import shared_data

    text = shared_data() / "wikitext-2" / "valid.txt"
    s = api.sensitivity("default", "kl", calibration=text, windows=1, ctx=64)
    assert s.details["probes"] == 31 and s.details["probe"] == "4-bit"
    err = api.sensitivity("default", "error")
    for i in (2, 16):
        row = s.damage[i]
        assert row[Precision.RAW] == 0 and row[Precision.Q4] > 0
        ratio = row[Precision.Q4] / err.damage[i][Precision.Q4]
        assert row[Precision.Q3] == pytest.approx(ratio * err.damage[i][Precision.Q3])
    n = 30
    plan = {
        "schema_version": 1,
        "num_blocks": n,
        "blocks": [
            {"exec_index": i, "precision": "4-bit" if i == 16 else "raw"}
            for i in range(2, n + 2)
        ],
    }
    measured = api.evaluate("default", "kld", data=text, plan=plan, limit=1, ctx=64)
    assert s.damage[16][Precision.Q4] == pytest.approx(
        measured["metrics"]["kl_mean"], rel=1e-3, abs=1e-6
    )
