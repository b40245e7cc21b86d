"""Sensitivity criteria and the precision registry, checked against llama.cpp itself."""

from __future__ import annotations

import re

import gguf
import numpy as np
import pytest
from models import Q, gguf_tensors, write_gguf

from ewq import api
from ewq.formats import GGML_TYPES

llama_cpp = pytest.importorskip("llama_cpp")

# llama.cpp's ftype whose plain type is each 256-block type (llama-quant.cpp maps
# the ftype to its default type; with `pure` no per-tensor mixture is applied)
_FTYPE = {
    "Q6_K": "Q6_K",
    "Q5_K": "Q5_K_S",
    "Q4_K": "Q4_K_S",
    "IQ4_XS": "IQ4_XS",
    "Q3_K": "Q3_K_S",
    "IQ3_S": "IQ3_S",
    "Q2_K": "Q2_K",
    "TQ1_0": "TQ1_0",
}


@pytest.fixture(scope="module")
def rows_96_gguf(tmp_path_factory):
    """An F16 Llama whose rows (96) are a multiple of 32 but not of 256."""
    t = gguf_tensors("llama", 1, hidden=96)
    t = {k: (v[0], Q.F32 if v[1] == Q.F32 else Q.F16) for k, v in t.items()}
    return write_gguf(tmp_path_factory.mktemp("r96") / "m.gguf", "llama", 1, t, 96)


@pytest.mark.parametrize("type_name", list(_FTYPE))
def test_fallback_table_is_what_llama_cpp_writes(rows_96_gguf, tmp_path, type_name):
    """Ask llama.cpp (pure, no overrides) for a 256-block type on rows of 96 and read
    back what it wrote: ewq's table must name the same fallback."""
    from ewq.quant.gguf import quantize_preset

    out = tmp_path / "q.gguf"
    written = quantize_preset(rows_96_gguf, _FTYPE[type_name], out, pure=True)
    fell_back = {t for n, t in written.items() if n.endswith("attn_q.weight")}
    assert fell_back == {GGML_TYPES[type_name].fallback}


def test_every_type_with_a_fallback_falls_back_to_a_32_block():
    for spec in GGML_TYPES.values():
        if spec.block > 32:
            assert spec.fallback is not None
            assert GGML_TYPES[spec.fallback].block == 32


def test_types_that_need_an_importance_matrix_are_llama_cpps():
    """ewq's list is llama.cpp's tensor_requires_imatrix list (IQ3_XXS, IQ2_S,
    IQ2_XS, IQ2_XXS, IQ1_M of the types offered), and includes every type ggml
    itself refuses to quantize without one."""
    from ewq.quant import ggml

    need = {n for n, t in GGML_TYPES.items() if t.needs_imatrix}
    assert need == {"IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M"}
    for name, t in GGML_TYPES.items():
        if ggml.requires_imatrix(int(t.qtype)):
            assert name in need


def _synthetic_imatrix(path, tmp_path):
    """An importance matrix for a GGUF's blk.* matrices: random positive column
    weights (what llama.cpp's quantizer does with them does not depend on how they
    were measured)."""
    from ewq.imatrix import Entry, Imatrix, write_imatrix

    rng = np.random.default_rng(1)
    entries = {}
    for t in gguf.GGUFReader(path).tensors:
        if t.name.startswith("blk.") and len(t.shape) == 2 and "norm" not in t.name:
            cols = int(t.shape[0])
            sums = rng.lognormal(0, 1, (1, cols)).astype(np.float32) * 100
            entries[t.name] = Entry(sums, np.array([100]))
    m = Imatrix(entries, ("synthetic",), 1, 100)
    return m, write_imatrix(m, tmp_path / "imatrix.gguf")


@pytest.mark.parametrize("with_imatrix", [False, True], ids=["plain", "imatrix"])
def test_roundtrip_equals_the_values_llama_cpp_writes(
    llama_f16_gguf, tmp_path, with_imatrix
):
    """The error criterion's round trip (ggml's quantize + dequantize, with the
    importance matrix when given) gives exactly the values of the tensor
    llama.cpp's quantizer writes, read back by gguf-py, for every type offered."""
    from ewq.quant import ggml

    m, m_path = _synthetic_imatrix(llama_f16_gguf, tmp_path)
    name = "blk.0.ffn_up.weight"
    src = {t.name: t for t in gguf.GGUFReader(llama_f16_gguf).tensors}
    values = np.asarray(src[name].data, dtype=np.float32).reshape(-1, 256)
    out = tmp_path / "q.gguf"
    for type_name, spec in GGML_TYPES.items():
        if spec.needs_imatrix and not with_imatrix:
            continue
        plan = {
            "schema_version": 2,
            "num_blocks": 2,
            "blocks": [{"exec_index": i, "precision": "raw"} for i in (2, 3)],
            "tensors": [{"name": name, "type": type_name}],
        }
        api.quantize(
            llama_f16_gguf, plan, out, imatrix=m_path if with_imatrix else None
        )
        t = {x.name: x for x in gguf.GGUFReader(out).tensors}[name]
        assert t.tensor_type.name == type_name
        written = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(
            -1, 256
        )
        w = m.entries[name].weights() if with_imatrix else None
        back = ggml.roundtrip(values, int(t.tensor_type), threads=2, imatrix=w)
        np.testing.assert_array_equal(back, written, err_msg=type_name)


def test_error_criterion_grows_as_bits_shrink(llama_f16_gguf, fresh_cache):
    from ewq.sensitivity.prior import factor, prior

    s = api.sensitivity(llama_f16_gguf, "error")
    weights = prior(api.inspect(llama_f16_gguf).layout)
    order = ["Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K"]
    for name in ("blk.0.ffn_up.weight", "blk.1.attn_q.weight"):
        row = s.damage[name]
        assert "F16" not in row  # its own type does no damage
        values = [row[t] for t in order]
        assert values == sorted(values) and values[0] > 0
        # relative error of Q8_0 on Gaussian weights: about 1e-5
        error = row["Q8_0"] / (weights[name] * factor("Q8_0"))
        assert 1e-6 < error < 1e-4
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


def test_plan_with_context_leaves_room_for_the_runtime():
    from ewq.planning import single_machine

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


def test_every_family_plans_with_its_runtime(tiny_models, tiny_ggufs):
    """Every architecture of the map sizes its KV cache from its own metadata (or
    says why not in one line): no family falls through to a traceback."""
    from ewq.errors import EwqError
    from ewq.planning import single_machine

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


def test_kl_probe_is_the_kl_ewq_eval_measures(tmp_path):
    """A probe's damage is the KL divergence `ewq eval --task kld` measures for the
    model with that one tensor at the probe type (same windows, same importance
    matrix); unprobed types follow its slope times the imatrix-weighted error."""
    from models import byte_vocab_llama, shared_data

    src = byte_vocab_llama(tmp_path / "m.gguf")
    text = tmp_path / "t.txt"
    text.write_text((shared_data() / "wikitext-2" / "valid.txt").read_text()[:4000])
    m = api.imatrix(src, text, ctx=64, chunks=4)
    s = api.sensitivity(
        src, "kl", calibration=text, imatrix=m, tokens=64, ctx=64, type_probes=1
    )
    name = "blk.1.ffn_down.weight"
    row = s.damage[name]
    probe = "IQ4_XS"  # rows of 512: the candidate nearest 4.25 bits
    assert row[probe] > 0
    from ewq.imatrix import write_imatrix

    path = write_imatrix(m, tmp_path / "m.imatrix.gguf")
    plan = {
        "schema_version": 2,
        "num_blocks": 2,
        "blocks": [{"exec_index": i, "precision": "raw"} for i in range(2, 4)],
        "tensors": [{"name": name, "type": probe}],
    }
    out = tmp_path / "q.gguf"
    api.quantize(src, plan, out, imatrix=path)
    measured = api.evaluate(src, "kld", data=text, quantized=out, limit=1, ctx=64)
    assert measured.metrics["kl_mean"] > 1e-7
    assert row[probe] == pytest.approx(measured.metrics["kl_mean"], rel=1e-3)
