"""`ewq bench`: the statistics by hand, and a smoke run on the default model."""

from __future__ import annotations

import csv
import json
import math

import pytest
from models import shared_data
from test_cli import run

from ewq.evaluate.stats import paired as _paired
from ewq.records import BenchRecord
from ewq.reports.bench import verdict as _verdict

MMLU = shared_data() / "mmlu" / "mmlu_val_zero_shot.jsonl"
WIKI = shared_data() / "wikitext-2" / "valid.txt"


def test_paired_t_and_cohens_d_by_hand():
    a, b = [1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 2.0, 4.0]
    per_q = {
        "fast 8bit mixed": a,
        "fast train 8bit mixed": b,
        "fast 4bit/8bit mixed": a,
        "fast train 4bit/8bit mixed": a,
    }
    s = _paired(per_q)
    # differences 1, 1, 1, 0: mean 0.75, sd 0.5, t = 0.75 / (0.5 / 2) = 3
    assert s["8bit mixed"]["t"] == pytest.approx(3.0)
    # pooled sd = sqrt((var a + var b) / 2) = sqrt((5/3 + 35/12) / 2)
    pooled = math.sqrt((5 / 3 + 35 / 12) / 2)
    assert s["8bit mixed"]["cohens_d"] == pytest.approx(0.75 / pooled)
    assert s["4bit/8bit mixed"] == {
        "composite_fast": 2.5,
        "composite_fast_train": 2.5,
        "t": 0.0,
        "p": 1.0,
        "cohens_d": 0.0,
        "questions": 4,
    }


def test_verdict_says_what_the_points_show():
    points = [
        {"budget_bytes": 1, "order": "ewq (entropy)", "kl_mean": 0.1},
        {"budget_bytes": 1, "order": "random seed 0", "kl_mean": 0.2},
        {"budget_bytes": 1, "order": "random seed 1", "kl_mean": 0.05},
        {
            "budget_bytes": 1,
            "order": "position (highest exec_index first)",
            "kl_mean": 0.3,
        },
        {"budget_bytes": 2, "order": "ewq (entropy)", "kl_mean": 0.4},
        {"budget_bytes": 2, "order": "random seed 0", "kl_mean": 0.3},
        {
            "budget_bytes": 2,
            "order": "position (highest exec_index first)",
            "kl_mean": 0.1,
        },
    ]
    assert _verdict(points) == (
        "At 2 equal-size budgets, EWQ's entropy order gave a lower mean KL than the "
        "average of the random orders at 1 and than the position-only order at 1."
    )


@pytest.mark.slow
def test_bench_smoke_on_the_default_model(monkeypatch, capsys, tmp_path):
    pytest.importorskip("llama_cpp")
    out = tmp_path / "bench"
    code, stdout, err = run(
        monkeypatch,
        capsys,
        "bench",
        "default",
        "--mmlu",
        str(MMLU),
        "--text",
        str(WIKI),
        "--out",
        str(out),
        "--questions",
        "1",
        "--windows",
        "1",
        "--ctx",
        "32",
        "--seeds",
        "1",
        "--budgets",
        "1",
    )
    assert code == 0, err
    doc = json.loads((out / "bench.json").read_text())
    names = [v["variant"] for v in doc["variants"]]
    assert names == [
        "raw",
        "4bit",
        "8bit",
        "8bit mixed",
        "4bit/8bit mixed",
        "fast 8bit mixed",
        "fast 4bit/8bit mixed",
        "fast train 8bit mixed",
        "fast train 4bit/8bit mixed",
    ]
    raw = doc["variants"][0]
    assert (
        raw["text_kl_mean"] == pytest.approx(0.0, abs=1e-6)  # float32 reference
        and raw["text_top1_agreement"] == 1.0
    )
    assert raw["raw_8bit_4bit_blocks"] == "30 / 0 / 0"
    assert doc["variants"][1]["raw_8bit_4bit_blocks"] == "0 / 0 / 30"
    # FastEWQ's two forests choose the same blocks on this model: the plan is
    # measured once and both rows carry its figures (a recomputation would give
    # the same: llama.cpp is deterministic on one machine)
    rows = {v["variant"]: v for v in doc["variants"]}
    fast, train = rows["fast 8bit mixed"], rows["fast train 8bit mixed"]
    if fast["raw_8bit_4bit_blocks"] == train["raw_8bit_4bit_blocks"]:
        assert fast | {"variant": "x", "table": "x"} == train | {
            "variant": "x",
            "table": "x",
        }
    with open(out / "table6.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["variant"] for r in rows] == [
        "raw",
        "4bit",
        "8bit",
        "8bit mixed",
        "4bit/8bit mixed",
    ]
    assert {
        "mmlu_accuracy",
        "mmlu_perplexity",
        "blocks_mb_over_total_mb",
        "raw_8bit_4bit_blocks",
    } <= rows[0].keys()
    with open(out / "table14.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 9
    assert (out / "size_vs_kl.png").read_bytes()[:4] == b"\x89PNG"
    assert (
        doc["equal_size"] and "EWQ's entropy order" in (out / "README.md").read_text()
    )


def test_bench_refuses_non_gguf(monkeypatch, capsys, tmp_path, tiny_models):
    code, _, err = run(
        monkeypatch,
        capsys,
        "bench",
        str(tiny_models["llama"]),
        "--mmlu",
        str(MMLU),
        "--text",
        str(WIKI),
        "--out",
        str(tmp_path / "b"),
    )
    assert code == 1 and "runs GGUF decoders" in err


def test_bench_missing_data_writes_nothing(monkeypatch, capsys, tmp_path):
    code, _, err = run(
        monkeypatch,
        capsys,
        "bench",
        "default",
        "--mmlu",
        str(tmp_path / "none.jsonl"),
        "--text",
        str(WIKI),
        "--out",
        str(tmp_path / "b"),
    )
    assert code == 1 and "no such MMLU data" in err
    assert not (tmp_path / "b").exists()


def test_encoder_bench_on_tiny_bert(monkeypatch, capsys, tmp_path, tiny_models):
    out = tmp_path / "enc"
    code, stdout, err = run(
        monkeypatch,
        capsys,
        "bench",
        str(tiny_models["bert"]),
        "--text",
        str(WIKI),
        "--out",
        str(out),
    )
    assert code == 0, err
    doc = json.loads((out / "bench.json").read_text())
    record = BenchRecord.model_validate(doc)  # the file is the typed record
    assert record.kind == "ewq-bench-encoder" and record.config.text == WIKI
    rows = {r["variant"]: r for r in doc["variants"]}
    assert rows["raw"]["cosine_mean"] == pytest.approx(1.0)
    assert rows["8bit"]["cosine_mean"] > rows["4bit"]["cosine_mean"] > 0
    assert rows["8bit"]["total_bytes"] < rows["raw"]["total_bytes"]
    # two blocks: one equal size (1 block at 4-bit), five orders (ewq, position, 3 seeds)
    assert [c["blocks_4bit"] for c in doc["equal_size"]] == [1] * 5
    assert len({c["bytes"] for c in doc["equal_size"]}) == 1
    assert "EWQ's entropy order kept the embeddings" in (out / "README.md").read_text()


def test_embedding_fidelity_by_hand():
    import numpy as np

    from ewq.evaluate.tasks import embedding_fidelity

    class Fixed:
        vocab_size = 10

        def __init__(self, vec):
            self.vec = np.array(vec, dtype=float)

        def embed(self, sentences):
            return np.tile(self.vec, (len(sentences), 1))

    text = "a sentence long enough to count\n" * 3
    r = embedding_fidelity(Fixed([1, 0]), Fixed([1, 1]), text)
    assert r["cosine_mean"] == pytest.approx(1 / math.sqrt(2)) and r["sentences"] == 3


@pytest.mark.slow
def test_compare_against_a_preset(monkeypatch, capsys, tmp_path):
    """ewq compare on the default model, reduced: one llama.cpp preset with and
    without the importance matrix of the calibration text, two criteria; every ewq
    plan within the preset's bytes."""
    text = shared_data() / "wikitext-2" / "valid.txt"
    calibration = tmp_path / "calibration.txt"  # the imatrix reads all of it
    calibration.write_text(text.read_text(encoding="utf-8")[-8_000:])
    out = tmp_path / "cmp"
    code, stdout, err = run(
        monkeypatch,
        capsys,
        "compare",
        "default",
        "--text",
        str(text),
        "--calibration",
        str(calibration),
        "--out",
        str(out),
        "--presets",
        "Q3_K_M",
        "--windows",
        "1",
        "--ctx",
        "64",
        "--seeds",
        "1",
        "--criteria",
        "error,position",
        "--sample",  # the error criterion from 2% of the rows: 40 s less
        "0.02",
    )
    assert code == 0, err
    doc = json.loads((out / "compare.json").read_text())
    assert doc["error_sample"] == 0.02
    presets = [r for r in doc["rows"] if r["plan"].startswith("llama.cpp Q3_K_M")]
    assert [r["plan"] for r in presets] == [
        "llama.cpp Q3_K_M",
        "llama.cpp Q3_K_M + imatrix",
    ]
    preset = presets[0]
    assert 80e6 < preset["bytes"] < doc["source_tensor_bytes"]
    assert doc["imatrix"]["chunks"] > 0
    plans = [r for r in doc["rows"] if r["size_of"] == "Q3_K_M" and r not in presets]
    assert {r["plan"] for r in plans} == {
        "ewq error",
        "ewq position",
        "paper ladder (entropy)",
    }
    assert all(r["bytes"] <= preset["bytes"] for r in plans)
    assert (out / "size_vs_kl.png").stat().st_size > 0
    assert "Head to head" in (out / "README.md").read_text()


def test_head_to_head_compares_ewq_within_the_smaller_preset():
    """llama.cpp's IQ4_XS with an importance matrix can be smaller than without
    (its fallback types change): ewq's plan at the smaller budget is the one
    compared, never a mean of both; presets of equal bytes share ewq's plans."""
    from ewq.compare import _shared
    from ewq.reports.compare import head_to_head

    def row(size_of, plan, kl, budget=None):
        r = {"size_of": size_of, "plan": plan, "bytes": budget or 100, "kl_mean": kl}
        return r | ({"budget": budget} if budget else {})

    rows = [
        row("IQ4_XS", "llama.cpp IQ4_XS", 0.2),
        row("IQ4_XS", "llama.cpp IQ4_XS + imatrix", 0.1),
        row("IQ4_XS", "ewq kl", 0.01, budget=900),
        row("IQ4_XS", "ewq kl", 0.03, budget=890),
        row("Q3_K_S", "llama.cpp Q3_K_S", 0.4),
        row("Q2_K", "llama.cpp Q2_K", 0.4),
    ]
    mine = [row("Q3_K_S", "ewq kl", 0.02, budget=860)]
    rows += mine + _shared(mine, ["Q3_K_S", "Q3_K_S", "Q2_K", "Q2_K"])
    h = {r["size_of"]: r for r in head_to_head({"rows": rows})}
    assert h["IQ4_XS"]["ewq_kl"] == 0.03
    assert h["IQ4_XS"]["kl_ratio"] == pytest.approx(0.3)
    assert h["Q2_K"]["ewq_kl"] == 0.02 and h["Q3_K_S"]["ewq_kl"] == 0.02
    assert len([r for r in rows if r["plan"] == "ewq kl"]) == 4
