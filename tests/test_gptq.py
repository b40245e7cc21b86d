"""GPTQ rounding inside llama.cpp's types (ewq.quant.gptq, `ewq quantize
--calibration`): the bytes are llama.cpp's format, read back by ggml and by
llama.cpp itself, and they lower the output error the rounding is for."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from ewq import api
from ewq.evaluate.activations import compute_hessians
from ewq.quant import ggml
from ewq.quant.gptq import rounded
from ewq.sources.gguf import GGUFSource


@pytest.fixture(scope="module")
def model_and_text(tmp_path_factory):
    from models import byte_vocab_llama, shared_data

    root = tmp_path_factory.mktemp("gptq")
    src = byte_vocab_llama(root / "m.gguf")
    text = root / "t.txt"
    text.write_text((shared_data() / "wikitext-2" / "valid.txt").read_text()[:6000])
    return src, text


def _output_error(w, back, h):
    e = (w - back).astype(np.float64)
    return float(np.einsum("ij,jk,ik->", e, h, e))


@pytest.mark.parametrize("type_name", ["Q4_K", "IQ4_XS", "Q3_K", "Q5_0"])
def test_gptq_bytes_decode_to_less_output_error(model_and_text, type_name):
    """ggml decodes the bytes (the same size as its own quantizer's), and on the
    activations llama.cpp computes for real text their output error tr(E H E^T) is
    below that of ggml's own rounding given the same importance (H's diagonal)."""
    src, text = model_and_text
    from ewq.evaluate.data import load_text

    _, hessians = compute_hessians(src, load_text(text), ctx=64, chunks=8)
    qtype = int(gguf.GGMLQuantizationType[type_name])
    with GGUFSource(src) as s:
        info = next(t for t in s.index.tensors if t.name == "blk.1.ffn_down.weight")
    w = ggml.tensor_values(info)
    h = hessians[info.name]
    ours = rounded(w, h, qtype)
    plain = ggml.quantize(w, qtype, imatrix=np.diag(h).astype(np.float32))
    assert ours.nbytes == plain.nbytes == w.shape[0] * ggml.row_bytes(qtype, w.shape[1])
    back = ggml.dequantize(ours, qtype, w.size).reshape(w.shape)
    back_plain = ggml.dequantize(plain, qtype, w.size).reshape(w.shape)
    assert _output_error(w, back, h) < 0.95 * _output_error(w, back_plain, h)


def test_quantize_with_calibration_writes_what_llama_cpp_runs(model_and_text, tmp_path):
    """`ewq quantize --calibration`: llama.cpp loads the file, its metadata says how
    it was rounded, the provenance counts the tensors, and llama.cpp's KL from the
    source is below that of the same types rounded by llama.cpp."""
    src, text = model_and_text
    layout = api.inspect(src).layout
    plan = {
        "schema_version": 2,
        "num_blocks": layout.num_blocks,
        "blocks": [
            {"exec_index": b.exec_index, "precision": "raw"}
            for b in layout.transformer_blocks
        ],
        "tensors": [
            {"name": info.name, "type": "Q3_K"}
            for b in layout.transformer_blocks
            for info in b.tensors
            if len(info.shape) == 2
        ],
    }
    near, gptq = tmp_path / "near.gguf", tmp_path / "gptq.gguf"
    api.quantize(src, plan, near)
    q = api.quantize(src, plan, gptq, calibration=text, calibration_ctx=64)
    assert q.rounding["method"] == "gptq"
    assert q.rounding["tensors"] == len(plan["tensors"])
    meta = gguf.GGUFReader(gptq).fields["ewq.rounding"].contents()
    assert meta == "gptq"
    kl = {}
    for name, path in (("near", near), ("gptq", gptq)):
        r = api.evaluate(src, "kld", data=text, quantized=path, limit=4, ctx=64)
        kl[name] = r.metrics["kl_mean"]
    assert 0 < kl["gptq"] < kl["near"]


def test_gptq_needs_a_calibration_text(model_and_text, tmp_path, monkeypatch, capsys):
    from test_cli import run

    src, _ = model_and_text
    plan = tmp_path / "p.json"
    code, _, err = run(
        monkeypatch, capsys, "plan", str(src), "--bpw", "4", "--json", str(plan)
    )
    assert code == 0, err
    code, _, err = run(
        monkeypatch,
        capsys,
        "quantize",
        str(src),
        "--plan",
        str(plan),
        "--out",
        str(tmp_path / "q.gguf"),
        "--rounding",
        "gptq",
    )
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert code == 1 and len(lines) == 1 and "calibration text" in lines[0]
    assert not (tmp_path / "q.gguf").exists()


def test_second_moments_agree_with_the_importance_matrix(model_and_text):
    """X^T X of each weight's inputs, summed over windows held and multiplied out
    together: its diagonal is the importance matrix's per-column sums of squared
    activations (computed per window in float64), and it is symmetric."""
    from ewq.evaluate import activations
    from ewq.evaluate.data import load_text

    src, text = model_and_text
    limit = activations.PENDING_BYTES
    activations.PENDING_BYTES = 1 << 16  # multiplied out many times on the way
    try:
        m, hessians = compute_hessians(src, load_text(text), ctx=64, chunks=8)
    finally:
        activations.PENDING_BYTES = limit
    assert len(hessians) == 14  # 7 dense weights in each of 2 blocks
    for name, h in hessians.items():
        np.testing.assert_allclose(np.diag(h), m.entries[name].sums[0], rtol=1e-5)
        np.testing.assert_allclose(h, h.T, rtol=1e-6)
