"""Quantize: plans written as GGUF by llama.cpp, exact sizes, provenance, bad plans."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import gguf
import numpy as np
import pytest
from test_cli import run

from ewq import api
from ewq.formats import gguf_target, tensor_bytes
from ewq.planfile import PlanError, plan_doc, plan_from_doc
from ewq.sources import default_model_path, open_source
from ewq.types import Precision

pytest.importorskip("llama_cpp")

PRECISIONS = [p.value for p in Precision]
# signal-to-quantization-noise floors (dB) on Gaussian weights; measured: Q8_0 45,
# Q4_K 23, Q3_K 16, Q2_K 10.5, TQ1_0 1.8 (ternary is for ternary-trained models)
SQNR_FLOOR = {
    "8-bit": 40,
    "6-bit": 30,
    "5-bit": 25,
    "4-bit": 20,
    "3-bit": 14,
    "2-bit": 8,
    "1.58-bit": 1,
}


def uniform_plan(precision: str, n_blocks: int) -> dict:
    return {
        "schema_version": 1,
        "blocks": [
            {"exec_index": i, "precision": precision} for i in range(2, n_blocks + 2)
        ],
        "embedding": {"precision": precision},
        "head": {"precision": precision},
    }


def sqnr(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x.astype(np.float64), y.astype(np.float64)
    noise = ((x - y) ** 2).sum()
    return float("inf") if noise == 0 else float(10 * np.log10((x**2).sum() / noise))


@pytest.mark.parametrize("precision", PRECISIONS)
def test_round_trip_every_precision(precision, llama_f16_gguf, tmp_path):
    q = api.quantize(llama_f16_gguf, uniform_plan(precision, 2), tmp_path / "o.gguf")
    reader = gguf.GGUFReader(q.out)  # read back with gguf-py, not our own parser
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types == q.written == {t.name: t.type for t in q.targets}
    assert sum(int(t.n_bytes) for t in reader.tensors) == q.predicted_bytes
    with open_source(llama_f16_gguf) as a, open_source(q.out) as b:
        out = {i.name: i for i in b.index.tensors}
        for info in a.index.tensors:
            x, y = a.read(info), b.read(out[info.name])
            if len(info.shape) < 2 or precision == "raw":
                assert np.array_equal(x, y), info.name  # copied bit for bit
                continue
            expected = gguf_target(
                info.name, info.shape, info.dtype, Precision(precision)
            )
            assert out[info.name].dtype == expected[0].name
            assert sqnr(x, y) >= SQNR_FLOOR[precision], (info.name, sqnr(x, y))


def test_default_model_mixed_plan_runs_in_llama_cpp(tmp_path):
    import llama_cpp

    analysis = api.analyze("default")
    d = analysis.decision.precision
    plan = plan_doc(analysis.layout.num_blocks, dict(d))
    q = api.quantize("default", plan, tmp_path / "mixed.gguf")
    # the decision's 4-bit block: ffn_down rows (1536) fit Q4_K, rows of 576 fall
    # back to Q5_0, as llama.cpp's own tensor_type_fallback does
    four = [i for i, p in d.items() if p is Precision.Q4]
    assert four == [29]
    block = {t.name: t for t in q.targets if t.exec_index == 29}
    assert block["blk.27.ffn_down.weight"].type == "Q4_K"
    assert block["blk.27.attn_q.weight"].type == "Q5_0"
    assert block["blk.27.attn_q.weight"].fallback
    for t in q.targets:  # read back with gguf-py
        assert q.written[t.name] == t.type
    reader = gguf.GGUFReader(q.out)
    assert {t.name: t.tensor_type.name for t in reader.tensors} == q.written
    # sizes: tensor data exactly as predicted; the rest is metadata (the vocabulary)
    data = sum(int(t.n_bytes) for t in reader.tensors)
    assert data == q.predicted_bytes
    src_size = default_model_path().stat().st_size
    with open_source("default") as src:
        src_meta = src_size - src.index.nbytes
    assert (
        abs(q.file_bytes - (q.predicted_bytes + src_meta)) <= 0.005 * q.predicted_bytes
    )
    # raw blocks are the source's bytes
    with open_source("default") as a, open_source(q.out) as b:
        out = {i.name: i for i in b.index.tensors}
        info = next(i for i in a.index.tensors if i.name == "blk.5.attn_q.weight")
        assert np.array_equal(a.read(info), b.read(out[info.name]))
    model = llama_cpp.Llama(str(q.out), n_ctx=128, verbose=False, seed=0)
    text = model("The capital of France is", max_tokens=8, temperature=0)
    assert "Paris" in text["choices"][0]["text"]


def test_size_function_matches_ggml_block_sizes():
    # 4096 x 4096: Q8_0 = 34 bytes per 32; Q4_K = 144 per 256; TQ1_0 = 54 per 256
    n = 4096 * 4096
    assert tensor_bytes((4096, 4096), gguf.GGMLQuantizationType.Q8_0) == n // 32 * 34
    assert tensor_bytes((4096, 4096), gguf.GGMLQuantizationType.Q4_K) == n // 256 * 144
    assert tensor_bytes((4096, 4096), gguf.GGMLQuantizationType.TQ1_0) == n // 256 * 54
    with pytest.raises(ValueError, match="do not fit"):
        tensor_bytes((10, 100), gguf.GGMLQuantizationType.Q4_K)


def test_cli_writes_model_and_provenance(monkeypatch, capsys, tmp_path, llama_f16_gguf):
    plan = tmp_path / "plan.json"
    doc = uniform_plan("8-bit", 2)
    doc["blocks"][1]["precision"] = "4-bit"
    plan.write_text(json.dumps(doc))
    out = tmp_path / "m.gguf"
    code, stdout, err = run(
        monkeypatch,
        capsys,
        "quantize",
        str(llama_f16_gguf),
        "--plan",
        str(plan),
        "--out",
        str(out),
    )
    assert code == 0, err
    record = json.loads((tmp_path / "m.gguf.ewq.json").read_text())
    assert record["kind"] == "ewq-quantized" and record["source"] == str(llama_f16_gguf)
    assert record["ewq_version"] and record["plan"]["blocks"][1]["precision"] == "4-bit"
    assert record["predicted_tensor_bytes"] == sum(
        t["bytes"] for t in record["tensors"]
    )
    types = {t["name"]: t["type"] for t in record["tensors"]}
    assert (
        types["blk.1.attn_q.weight"] == "Q4_K"
        and types["blk.0.attn_q.weight"] == "Q8_0"
    )
    args = shlex.split(record["llama_quantize_command"])
    assert args[0] == "llama-quantize" and args[-3:] == [
        str(llama_f16_gguf),
        str(out),
        "q8_0",
    ]
    assert "^blk\\.1\\.=q4_k" in args and "^blk\\.0\\.=q8_0" in args
    assert "blk.1" not in stdout or "4-bit" in stdout


def test_an_analysis_json_is_a_plan_of_ewqs_decision():
    """The JSON of `ewq analyze` plans each block at EWQ's decision for it (the
    paper's unbudgeted result); the embedding and the head stay as they are."""
    doc = {
        "schema_version": 1,
        "kind": "ewq-analysis",
        "source": "x",
        "num_blocks": 3,
        "alpha": 0.5,
        "blocks": [
            {"exec_index": 2, "decision": "4-bit", "num_parameters": 10},
            {"exec_index": 3, "decision": "raw", "num_parameters": 10},
        ],
    }
    plan = plan_from_doc(doc)
    assert [(b.exec_index, b.precision.value) for b in plan.blocks] == [
        (2, "4-bit"),
        (3, "raw"),
    ]
    assert plan.embedding.precision.value == "raw" and plan.alpha == 0.5
    with pytest.raises(PlanError, match="decision|precision"):
        plan_from_doc({**doc, "blocks": [{"exec_index": 2, "decision": "5-bit?"}]})


def bad_quantize(monkeypatch, capsys, tmp_path, source, plan_doc, *extra) -> str:
    plan = tmp_path / "plan.json"
    plan.write_text(plan_doc if isinstance(plan_doc, str) else json.dumps(plan_doc))
    out = tmp_path / "out.gguf"
    code, _, err = run(
        monkeypatch,
        capsys,
        "quantize",
        str(source),
        "--plan",
        str(plan),
        "--out",
        str(out),
        *extra,
    )
    assert code == 1, err
    assert not out.exists() and not (tmp_path / "out.gguf.ewq.json").exists()
    assert not list(tmp_path.glob(".out.gguf*"))
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("ewq: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_bad_unknown_block(monkeypatch, capsys, tmp_path, llama_f16_gguf):
    doc = uniform_plan("8-bit", 2)
    doc["blocks"].append({"exec_index": 9, "precision": "8-bit"})
    assert "names block 9, which" in bad_quantize(
        monkeypatch, capsys, tmp_path, llama_f16_gguf, doc
    )


def test_bad_unknown_precision(monkeypatch, capsys, tmp_path, llama_f16_gguf):
    doc = uniform_plan("8-bit", 2)
    doc["blocks"][0]["precision"] = "7-bit"
    line = bad_quantize(monkeypatch, capsys, tmp_path, llama_f16_gguf, doc)
    assert "blocks.0.precision" in line and "'4-bit'" in line


def test_bad_plan_for_another_model(monkeypatch, capsys, tmp_path, llama_f16_gguf):
    doc = uniform_plan("8-bit", 30) | {"num_blocks": 30}
    line = bad_quantize(monkeypatch, capsys, tmp_path, llama_f16_gguf, doc)
    assert "made for a model with 30 transformer blocks" in line
    doc = uniform_plan("8-bit", 2)
    doc["blocks"][0]["num_parameters"] = 3_540_096  # a SmolLM2 block
    line = bad_quantize(monkeypatch, capsys, tmp_path, llama_f16_gguf, doc)
    assert "made for another model: block 2 has" in line


def test_bad_missing_block_and_json(monkeypatch, capsys, tmp_path, llama_f16_gguf):
    doc = uniform_plan("8-bit", 2)
    doc["blocks"].pop()
    assert "no precision for block(s) 3" in bad_quantize(
        monkeypatch, capsys, tmp_path, llama_f16_gguf, doc
    )
    assert "not valid JSON" in bad_quantize(
        monkeypatch, capsys, tmp_path, llama_f16_gguf, "{"
    )
    doc = uniform_plan("8-bit", 2) | {"schema_version": 7}
    assert "schema_version 7" in bad_quantize(
        monkeypatch, capsys, tmp_path, llama_f16_gguf, doc
    )


def test_hf_source_the_converter_refuses_is_one_line(
    monkeypatch, capsys, tmp_path, tiny_models
):
    """A Hugging Face folder goes to GGUF through llama.cpp's converter; one it
    cannot convert (this tiny model has no tokenizer) ends in one line, and the
    temporary converted file is gone."""
    line = bad_quantize(
        monkeypatch, capsys, tmp_path, tiny_models["llama"], uniform_plan("8-bit", 2)
    )
    assert "llama.cpp's converter cannot convert it" in line
    assert not [p for p in tmp_path.rglob("*.converted.gguf")]


def test_interrupted_write_leaves_nothing(monkeypatch, tmp_path, llama_f16_gguf):
    import ewq.quant.gguf as qg

    def interrupt(path, targets):
        assert path.exists()  # llama.cpp has written the temporary file
        raise KeyboardInterrupt

    monkeypatch.setattr(qg, "_check_written", interrupt)
    with pytest.raises(KeyboardInterrupt):
        api.quantize(llama_f16_gguf, uniform_plan("4-bit", 2), tmp_path / "o.gguf")
    assert list(tmp_path.iterdir()) == []


def test_plan_error_type():
    with pytest.raises(PlanError):
        plan_from_doc([1, 2])


# ---------------------------------------------------------------- Hugging Face output

HF_SQNR_FLOOR = {"8-bit": 38, "4-bit": 16, "3-bit": 10, "2-bit": 3.5}
# MiniLM, mean cosine of the last hidden states; measured 0.9997, 0.943, 0.80, 0.30
HF_COSINE_FLOOR = {"8-bit": 0.999, "4-bit": 0.9, "3-bit": 0.7, "2-bit": 0.2}


@pytest.fixture(scope="module")
def minilm_reference(minilm):
    import torch
    from transformers import AutoModel

    torch.manual_seed(0)
    ids = torch.randint(1000, 20000, (2, 24))
    model = AutoModel.from_pretrained(minilm).eval()
    with torch.no_grad():
        return model, ids, model(input_ids=ids).last_hidden_state


@pytest.mark.parametrize("precision", ["8-bit", "4-bit", "3-bit", "2-bit"])
def test_hf_minilm_every_bit_width(precision, minilm, minilm_reference, tmp_path):
    import torch
    from safetensors import safe_open
    from transformers import AutoModel

    ref, ids, want = minilm_reference
    plan = uniform_plan(precision, 6)
    q = api.quantize(minilm, plan, tmp_path / "out", format="hf")
    files = list((tmp_path / "out").glob("*.safetensors"))
    with safe_open(files[0], "pt") as f:
        keys = set(f.keys())
        assert (
            f.get_slice(
                "encoder.layer.0.attention.self.query.weight_packed"
            ).get_dtype()
            == "I32"
        )
    assert "encoder.layer.0.attention.self.query.weight" not in keys
    assert "embeddings.word_embeddings.weight" in keys  # an Embedding stays as it is
    assert q.predicted_bytes < 22_713_728 * 4
    model = AutoModel.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():  # the first forward decompresses the weights
        got = model(input_ids=ids).last_hidden_state
    w0 = ref.encoder.layer[3].intermediate.dense.weight
    w1 = model.encoder.layer[3].intermediate.dense.weight
    assert sqnr(w0.detach().numpy(), w1.detach().numpy()) >= HF_SQNR_FLOOR[precision]
    cos = torch.nn.functional.cosine_similarity(want.flatten(0, 1), got.flatten(0, 1))
    assert cos.mean().item() >= HF_COSINE_FLOOR[precision]


def test_hf_llama_mixed_plan_loads_and_sizes_are_exact(tiny_models, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from ewq.sources.safetensors import read_header

    src = tiny_models["llama"]
    doc = uniform_plan("8-bit", 2)
    doc["blocks"][1]["precision"] = "3-bit"
    doc["head"]["precision"] = "4-bit"
    q = api.quantize(src, doc, tmp_path / "out", format="hf")
    header, _ = read_header(tmp_path / "out" / "model.safetensors")
    data = sum(
        e["data_offsets"][1] - e["data_offsets"][0]
        for k, e in header.items()
        if k != "__metadata__"
    )
    assert data == q.predicted_bytes  # every byte accounted for by the size function
    forms = {t.name: t.type for t in q.targets}
    assert forms["model.layers.0.self_attn.q_proj.weight"].startswith("int8/")
    assert forms["model.layers.1.mlp.down_proj.weight"].startswith("int3/")
    assert forms["model.layers.0.input_layernorm.weight"] == "F32"
    ref = AutoModelForCausalLM.from_pretrained(src).eval()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, ref.config.vocab_size, (1, 16))
    with torch.no_grad():
        a, b = ref(ids).logits, model(ids).logits
    assert ((a - b).norm() / a.norm()).item() < 0.5
    assert torch.isfinite(b).all()
    # the error criterion's round trip for this format (ewq.formats' entry) is what
    # compressed-tensors decompresses from the written folder, value for value
    from compressed_tensors.compressors.pack_quantized.helpers import (
        unpack_from_int32,
    )
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    from ewq.formats import hook, output_format

    roundtrip = hook(output_format("hf").roundtrip)
    written, modules = model.state_dict(), dict(model.named_modules())
    original = ref.state_dict()
    checked = 0
    for name, form in forms.items():
        if not form.startswith("int"):
            continue
        ours = roundtrip(original[name].numpy(), form)
        if name in written:  # decompressed as it was loaded (the head)
            assert np.array_equal(
                written[name].float().numpy(), ours.astype(np.float32)
            )
            checked += 1
            continue
        stem = name.removesuffix(".weight")
        packed = written[f"{name}_packed"]
        shape = torch.Size(written[f"{name}_shape"].tolist())
        values = unpack_from_int32(packed, int(form[3 : form.index("/")]), shape)
        args = modules[stem].quantization_scheme.weights
        got = dequantize(values, written[f"{name}_scale"], None, args=args)
        assert np.array_equal(got.float().numpy(), ours.astype(np.float32)), name
        checked += 1
    assert checked >= 14  # 7 matrices x 2 blocks, at int8 and int3


def test_hf_ternary_is_a_recorded_2bit_fallback(tiny_models, tmp_path):
    q = api.quantize(
        tiny_models["llama"], uniform_plan("1.58-bit", 2), tmp_path / "o", format="hf"
    )
    q_proj = next(
        t for t in q.targets if t.name == "model.layers.0.self_attn.q_proj.weight"
    )
    assert q_proj.type.startswith("int2/") and q_proj.fallback


def test_hf_interrupted_write_leaves_nothing(monkeypatch, tiny_models, tmp_path):
    import ewq.quant.hf as qh

    def interrupt(folder, targets):
        raise KeyboardInterrupt

    monkeypatch.setattr(qh, "_check_written", interrupt)
    with pytest.raises(KeyboardInterrupt):
        api.quantize(
            tiny_models["llama"], uniform_plan("4-bit", 2), tmp_path / "o", format="hf"
        )
    assert list(tmp_path.iterdir()) == []


def test_hf_output_never_replaces_a_foreign_folder(
    monkeypatch, capsys, tiny_models, tmp_path
):
    """A folder ewq did not write is left whole (it used to be swapped away); an
    earlier ewq output is replaced only with --force."""
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(uniform_plan("4-bit", 2)))
    args = ["quantize", str(tiny_models["llama"]), "--plan", str(plan)]
    args += ["--out", str(out), "--format", "hf"]
    code, _, err = run(monkeypatch, capsys, *args)
    assert code == 1 and "was not written by ewq" in err
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o", "plan.json"]

    fresh = tmp_path / "q"
    code, _, err = run(monkeypatch, capsys, *args[:-3], str(fresh), "--format", "hf")
    assert code == 0, err
    record = json.loads((tmp_path / "q.ewq.json").read_text())
    assert record["format"] == "hf" and record["llama_quantize_command"] is None
    assert (
        json.loads((fresh / "config.json").read_text())["quantization_config"]["format"]
        == "pack-quantized"
    )
    (fresh / "stale.txt").write_text("old")
    code, _, err = run(monkeypatch, capsys, *args[:-3], str(fresh), "--format", "hf")
    assert code == 1 and "--force" in err and (fresh / "stale.txt").exists()
    code, _, err = run(
        monkeypatch, capsys, *args[:-3], str(fresh), "--format", "hf", "--force"
    )
    assert code == 0, err
    assert not (fresh / "stale.txt").exists() and (fresh / "config.json").exists()


def test_outputs_that_would_destroy_an_input_or_a_device(
    monkeypatch, capsys, tmp_path, llama_f16_gguf
):
    import os
    import shutil

    src = tmp_path / "src.gguf"
    shutil.copy(llama_f16_gguf, src)
    before = src.read_bytes()
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(uniform_plan("4-bit", 2)))
    for out in (src, plan):  # --out is the model, or the plan
        code, _, err = run(
            monkeypatch,
            capsys,
            "quantize",
            str(src),
            "--plan",
            str(plan),
            "--out",
            str(out),
        )
        assert code == 1 and "would overwrite the input" in err, err
    assert src.read_bytes() == before and json.loads(plan.read_text())
    # --json into the model it analyses, into a FIFO, into a folder: refused first
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for target, message in (
        (src, "would overwrite the input"),
        (fifo, "not a regular file"),
        (tmp_path, "is a folder"),
    ):
        code, _, err = run(
            monkeypatch, capsys, "analyze", str(src), "--json", str(target)
        )
        assert code == 1 and message in err, err
    assert src.read_bytes() == before and fifo.is_fifo()
    # a plot path that cannot be written is refused before the JSON is written
    js = tmp_path / "a.json"
    code, _, err = run(
        monkeypatch,
        capsys,
        "analyze",
        str(src),
        "--json",
        str(js),
        "--plot",
        str(tmp_path),
    )
    assert code == 1 and not js.exists()


def test_bad_gguf_source_for_hf(monkeypatch, capsys, tmp_path, llama_f16_gguf):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(uniform_plan("4-bit", 2)))
    code, _, err = run(
        monkeypatch,
        capsys,
        "quantize",
        str(llama_f16_gguf),
        "--plan",
        str(plan),
        "--out",
        str(tmp_path / "o"),
        "--format",
        "hf",
    )
    assert code == 1 and "needs a Hugging Face model folder" in err
    assert not (tmp_path / "o").exists()


def test_hf_refuses_a_precision_it_does_not_offer(
    monkeypatch, capsys, tmp_path, tiny_models
):
    """6-bit is a GGUF precision (Q6_K); compressed-tensors output does not offer it."""
    doc = uniform_plan("8-bit", 2)
    doc["blocks"][0]["precision"] = "6-bit"
    line = bad_quantize(
        monkeypatch, capsys, tmp_path, tiny_models["llama"], doc, "--format", "hf"
    )
    assert "does not offer 6-bit" in line


@pytest.fixture(scope="module")
def big_f16_gguf(tmp_path_factory):
    """An F16 Llama large enough (8 blocks of 1024) that quantizing takes seconds."""
    from models import f16_gguf

    return f16_gguf(tmp_path_factory.mktemp("big") / "big.gguf", 8, hidden=1024)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [2, 15], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_quantize_at_once_and_leaves_nothing(
    big_f16_gguf, tmp_path, signum
):
    import os
    import signal
    import subprocess
    import sys
    import time

    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(uniform_plan("2-bit", 8)))
    out = tmp_path / "o.gguf"
    cmd = [sys.executable, "-m", "ewq", "quantize", str(big_f16_gguf)]
    proc = subprocess.Popen(
        [*cmd, "--plan", str(plan), "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".o.gguf.*")) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    assert list(tmp_path.glob(".o.gguf.*")), "quantizing never started"
    sent = time.monotonic()
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=30)
    took = time.monotonic() - sent
    assert proc.returncode == 128 + signum, err.decode()
    assert took < 2.0, took
    assert "Traceback" not in err.decode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]
    assert signal.Signals(signum).name in ("SIGINT", "SIGTERM") and os.path.exists(
        big_f16_gguf
    )


def test_the_record_is_in_place_before_the_model(monkeypatch, tmp_path, llama_f16_gguf):
    """The provenance record is written before the model is renamed into place, so
    a kill between the two leaves no new model beside a missing or stale record."""
    import os

    from ewq import api

    out = tmp_path / "o.gguf"
    seen = []
    real = os.replace

    def spy(a, b):
        if str(b) == str(out):
            seen.append((tmp_path / "o.gguf.ewq.json").exists())
        return real(a, b)

    monkeypatch.setattr(os, "replace", spy)
    api.quantize(llama_f16_gguf, uniform_plan("8-bit", 2), out)  # the API writes it
    assert seen == [True]
    record = json.loads((tmp_path / "o.gguf.ewq.json").read_text())
    assert record["file_bytes"] == out.stat().st_size


def test_gguf_output_carries_its_provenance_in_its_metadata(tmp_path):
    """ewq.* keys in the GGUF's own metadata, as gguf-py reads them, and the file
    still loads in llama.cpp."""
    import hashlib

    import gguf

    from ewq import __version__
    from ewq.evaluate.backends import LlamaCppModel
    from ewq.planfile import plan_from_doc

    doc = {
        "schema_version": 1,
        "num_blocks": 30,
        "embedding": {"precision": "8-bit"},
        "blocks": [
            {"exec_index": i, "precision": "4-bit" if i < 12 else "raw"}
            for i in range(2, 32)
        ],
    }
    out = tmp_path / "q.gguf"
    api.quantize("default", doc, out)
    fields = gguf.GGUFReader(out).fields
    got = {k: fields[k].contents() for k in fields if k.startswith("ewq.")}
    plan = plan_from_doc(doc)
    assert got == {
        "ewq.version": __version__,
        "ewq.source": "default",
        "ewq.plan.method": "ewq",
        "ewq.plan.blocks": "10 4-bit, 20 raw",
        "ewq.plan.embedding": "8-bit",
        "ewq.plan.head": "raw",
        "ewq.plan.sha256": hashlib.sha256(
            json.dumps(plan.to_doc(), sort_keys=True).encode()
        ).hexdigest(),
    }
    assert fields["general.architecture"].contents() == "llama"
    assert LlamaCppModel(out, 64).vocab_size == 49152


def test_quantize_writes_the_format_the_plan_was_sized_for(
    tiny_models, tmp_path, monkeypatch, capsys
):
    """A plan of a Hugging Face folder sizes it as hf by default; quantize without
    --format writes that format (a folder, at the planned bytes), not GGUF; asked for
    another format, it says the sizes will differ."""
    from test_cli import run

    src = tiny_models["llama"]
    plan = tmp_path / "plan.json"
    code, _, err = run(
        monkeypatch, capsys, "plan", str(src), "--memory", "1MB", "--context", "0",
        "--criterion", "entropy", "--json", str(plan),
    )  # fmt: skip
    assert code == 0, err
    doc = json.loads(plan.read_text())
    assert doc["format"] == "hf"
    out = tmp_path / "out"
    code, _, err = run(
        monkeypatch,
        capsys,
        "quantize",
        str(src),
        "--plan",
        str(plan),
        "--out",
        str(out),
    )
    assert code == 0, err
    assert out.is_dir() and (out / "config.json").is_file()
    record = json.loads((tmp_path / "out.ewq.json").read_text())
    assert record["format"] == "hf"
    # the plan's bytes are the bytes in the folder's safetensors (read back, not
    # recomputed): the planned format is the written one
    from ewq.sources.safetensors import read_header

    header, _ = read_header(out / "model.safetensors")
    written = sum(
        e["data_offsets"][1] - e["data_offsets"][0]
        for k, e in header.items()
        if k != "__metadata__"
    )
    sides = [doc["embedding"]["bytes"], doc["head"]["bytes"]]
    assert written == sum(b["bytes"] for b in doc["blocks"]) + sum(sides)
    import logging

    seen: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("ewq.api").addHandler(handler)
    try:
        with pytest.raises(api.EwqError):  # the tiny model has no tokenizer
            api.quantize(src, plan, tmp_path / "o.gguf", format="gguf")
    finally:
        logging.getLogger("ewq.api").removeHandler(handler)
    assert seen == [
        "the plan sized its blocks as hf; writing gguf, the sizes will differ"
    ]


def test_the_tensors_ewq_never_quantizes_are_those_llama_cpp_keeps(
    tmp_path, llama_f16_gguf
):
    """llama.cpp's dry run of its Q8_0 preset on float models (src/llama-quant.cpp,
    tensor_allows_quantization) leaves a tensor in its own type exactly where ewq
    says llama.cpp never quantizes it (norms, 1-D tensors)."""
    pytest.importorskip("llama_cpp")
    from models import byte_vocab_llama

    from ewq.formats.ggml_types import gguf_quantizable
    from ewq.quant.gguf import preset_recipes
    from ewq.sources.gguf import read_header

    for path in (byte_vocab_llama(tmp_path / "f32.gguf"), llama_f16_gguf):
        recipe = preset_recipes(path, ["Q8_0"])["Q8_0"]
        header = read_header(path).tensors
        assert {q.name for _, _, q, _ in header} <= {"F32", "F16"}
        kept = {n for n, _, qtype, _ in header if recipe[n] == qtype.name}
        ours = {n for n, shape, _, _ in header if not gguf_quantizable(n, shape)}
        assert kept == ours
        assert ours and len(ours) < len(header)


@pytest.mark.parametrize("which", ["default", "minilm-gguf", "minilm-hf"])
def test_the_analysis_json_quantizes_as_documented(
    which, monkeypatch, capsys, tmp_path, minilm
):
    """The example of `ewq quantize --help` and the README: `ewq analyze SRC --json
    a.json`, then `ewq quantize SRC --plan a.json --out X` writes each block at
    EWQ's decision for it (GGUF from a GGUF and from a Hugging Face folder; the
    Hugging Face output from a folder)."""
    from test_cli import run

    src = "default" if which == "default" else str(minilm)
    analysis = tmp_path / "a.json"
    code, _, err = run(monkeypatch, capsys, "analyze", src, "--json", str(analysis))
    assert code == 0, err
    out = tmp_path / ("model.gguf" if which != "minilm-hf" else "model")
    extra = ["--format", "hf"] if which == "minilm-hf" else []
    args = ["quantize", src, "--plan", str(analysis), "--out", str(out), *extra]
    code, _, err = run(monkeypatch, capsys, *args)
    assert code == 0, err
    record = json.loads(Path(f"{out}.ewq.json").read_text())
    decided = {
        b["exec_index"]: b["decision"]
        for b in json.loads(analysis.read_text())["blocks"]
    }
    planned = {t["exec_index"]: t["precision"] for t in record["tensors"]}
    for i, p in decided.items():
        assert planned[i] == p
    assert set(decided.values()) - {"raw"}  # something was quantized
