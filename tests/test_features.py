"""FastEWQ features: exact parameter counts from config.json or headers, no weights."""

from __future__ import annotations

import csv
import json

import pytest
from models import shared_data
from test_cli import run

from ewq import api
from ewq.arch import resolve
from ewq.arch.shapes import analytic_families, index_from_config
from ewq.errors import FormatError, UnknownArchitectureError
from ewq.fast.features import features_from_config
from ewq.sources import open_source

PAPER_CONFIGS = json.loads(
    (
        __import__("importlib.resources").resources.files("ewq.fast")
        / "data"
        / "paper_configs.json"
    ).read_text()
)


def test_config_shapes_equal_the_checkpoints_of_every_family(tiny_models):
    assert set(analytic_families()) >= {
        "llama",
        "qwen2",
        "qwen3",
        "gemma",
        "gemma2",
        "gemma3",
        "phi3",
        "stablelm",
        "mixtral",
        "deepseek_v2",
        "gpt2",
        "bert",
    }
    for family, folder in tiny_models.items():
        config = json.loads((folder / "config.json").read_text())
        synthetic = index_from_config(config, family)
        with open_source(folder) as src:
            real = {
                t.name: t.shape
                for t in src.index.tensors
                if not t.dtype.startswith("I")
            }
            layout = resolve(src.index)
        assert {t.name: t.shape for t in synthetic.tensors} == real, family
        by_config = features_from_config(config, family)
        assert [b.num_parameters for b in by_config.blocks] == [
            b.num_parameters for b in layout.transformer_blocks
        ]


def table2():
    with open(shared_data() / "paper" / "table2_dataset_sample.csv") as fh:
        return list(csv.DictReader(fh))


# The paper's counts for these rows match no analytic count of the public configs;
# the differences are constant per family (see README, "FastEWQ features").
PAPER_DIFFERS = {
    "microsoft/Phi-3-mini-128k-instruct": 78_643_200,  # ours 113,252,352 (fused qkv, gate_up)
    "microsoft/Phi-3.5-mini-instruct": 78_643_200,
    "deepseek-ai/DeepSeek-V2-Lite": 8_388_608,  # ours 584,847,872 (MLA + 64 experts)
    "deepseek-ai/DeepSeek-Coder-V2-Lite-Instruct": 8_388_608,  # ours 81,007,104 (dense)
}


@pytest.mark.parametrize(
    "row", table2(), ids=lambda r: f"{r['model_name']}:{r['exec_index']}"
)
def test_table2_rows(row):
    f = features_from_config(PAPER_CONFIGS[row["model_name"]], row["model_name"])
    assert f.num_blocks == int(row["num_blocks"])
    block = next(b for b in f.blocks if b.exec_index == int(row["exec_index"]))
    paper = int(row["num_parameters"])
    assert paper - block.num_parameters == PAPER_DIFFERS.get(row["model_name"], 0)


def test_llama_3_1_8b_by_hand():
    # 2 x 4096^2 (q, o) + 2 x 1024 x 4096 (k, v: 8 kv heads of 128)
    # + 3 x 14336 x 4096 (gate, up, down) + 2 x 4096 (norms) = 218,112,000
    f = features_from_config(PAPER_CONFIGS["meta-llama/Llama-3.1-8B-Instruct"], "x")
    assert [b.exec_index for b in f.blocks] == list(range(2, 34))
    assert {b.num_parameters for b in f.blocks} == {218_112_000}


def test_local_features_read_no_weight(monkeypatch, small_llama):
    from ewq.sources.safetensors import SafetensorsSource

    def refuse(*args, **kwargs):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(SafetensorsSource, "read", refuse)
    monkeypatch.setattr(SafetensorsSource, "read_range", refuse)
    read = []
    real_open = open

    class Counting:
        def __init__(self, fh):
            self.fh = fh

        def read(self, n=-1):
            data = self.fh.read(n)
            read.append(len(data))
            return data

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    def counting_open(file, mode="r", *args, **kwargs):
        fh = real_open(file, mode, *args, **kwargs)
        return (
            Counting(fh) if "b" in mode and str(file).endswith(".safetensors") else fh
        )

    monkeypatch.setattr("builtins.open", counting_open)
    f = api.features(small_llama)
    weights = (small_llama / "model.safetensors").stat().st_size
    assert f.method == "headers" and sum(read) < 0.01 * weights


def test_gguf_features_match_inspect():
    f = api.features("default")
    assert f.num_blocks == 30 and {b.num_parameters for b in f.blocks} == {3_540_096}


def test_cli_features_json(monkeypatch, capsys, tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(PAPER_CONFIGS["google/gemma-2-2b-it"]))
    js = tmp_path / "f.json"
    code, out, err = run(monkeypatch, capsys, "features", str(cfg), "--json", str(js))
    assert code == 0, err
    doc = json.loads(js.read_text())
    assert {"schema_version", "source", "num_blocks", "blocks"} <= doc.keys()
    assert doc["num_blocks"] == 26 and doc["method"] == "config"
    assert doc["blocks"][22] == {"exec_index": 24, "num_parameters": 77_865_984}


@pytest.mark.parametrize(
    ("config", "error", "message"),
    [
        (
            {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2},
            FormatError,
            "lacks 'hidden_size'",
        ),
        (
            {"architectures": ["MambaForCausalLM"], "model_type": "mamba"},
            UnknownArchitectureError,
            "no analytic parameter rule for MambaForCausalLM",
        ),
        (
            {
                "model_type": "llama",
                "hidden_size": 8,
                "num_attention_heads": 2,
                "num_hidden_layers": "x",
                "intermediate_size": 4,
                "vocab_size": 4,
            },
            FormatError,
            "config values do not give shapes",
        ),
    ],
)
def test_bad_configs(config, error, message):
    with pytest.raises(error, match=message):
        features_from_config(config, "cfg")


def test_bad_config_file_cli(monkeypatch, capsys, tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{nope")
    code, _, err = run(monkeypatch, capsys, "features", str(bad))
    assert code == 1 and "not valid JSON" in err
    bad.write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    code, _, err = run(monkeypatch, capsys, "features", str(bad))
    assert code == 1 and "lacks" in err
