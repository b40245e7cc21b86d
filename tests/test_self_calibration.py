"""Calibration text sampled from the model itself (ewq.calibration.generate): seeded,
decoded in batches by llama.cpp, from BOS or through the model's chat template, and
a model that gives nothing to calibrate on is one clear line."""

from __future__ import annotations

import pytest
from models import byte_vocab_llama

from ewq.calibration.generate import SelfCalibration, prompts, sample_text
from ewq.errors import EwqError

pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return byte_vocab_llama(tmp_path_factory.mktemp("selfcal") / "m.gguf")


def _tokens(path, text: str) -> int:
    from ewq.evaluate.backends import LlamaCppModel

    return len(LlamaCppModel(path, 64).tokenize(text))


def test_the_same_seed_gives_the_same_text_and_another_seed_another(tiny):
    how = SelfCalibration(tokens=300, length=40, slots=4, seed=3)
    a = sample_text(tiny, how)
    assert sample_text(tiny, how).text == a.text
    other = sample_text(tiny, SelfCalibration(tokens=300, length=40, slots=4, seed=4))
    assert other.text != a.text
    # every sampled token is a byte of the text (a byte vocabulary: one per byte);
    # samples end at EOS or after 40 tokens, and are joined by blank lines
    assert 250 <= len(a.text.encode()) <= 300 + 2 * 300 // 1 + 1
    assert "seed 3" in a.name and a.path is None


def test_lines_mode_gives_one_sample_per_line(tiny):
    how = SelfCalibration(tokens=200, length=30, slots=4, documents="lines")
    text = sample_text(tiny, how).text
    lines = text.splitlines()
    assert len(lines) >= 200 // 30 and all(line.strip() for line in lines)


def test_a_chat_model_answers_the_bundled_prompts():
    """The bundled model has a chat template: samples are its replies to the
    prompts, rendered by llama.cpp's template code (no template markup in them)."""
    from ewq.sources import default_model_path

    how = SelfCalibration(tokens=96, length=24, slots=4, seed=0)
    text = sample_text(default_model_path(), how).text
    assert text.strip() and "<|im_start|>" not in text
    assert len(prompts()) >= 20


def test_a_model_that_ends_every_sample_at_once_is_one_line(tiny, monkeypatch):
    import llama_cpp

    monkeypatch.setattr(llama_cpp, "llama_vocab_is_eog", lambda vocab, tok: True)
    with pytest.raises(EwqError, match="ends every sample at once"):
        sample_text(tiny, SelfCalibration(tokens=100, length=20, slots=2))


def test_nonsense_settings_are_one_line(tiny):
    with pytest.raises(EwqError, match="tokens >= 1"):
        sample_text(tiny, SelfCalibration(tokens=0))


def test_one_command_with_the_models_own_text(tiny, tmp_path, monkeypatch, capsys):
    """`ewq quantize SOURCE --bpw B --calibration self --out X`: the text sampled
    from the model is written beside the plan and is what the plan's importance
    matrix was computed on; the output is rounded by GPTQ on it; a second plan on
    the same settings reads the text from the cache."""
    import json

    from test_cli import run

    from ewq.imatrix import read_imatrix

    common = ["--calibration", "self", "--calibration-tokens", "512"]
    common += ["--calibration-ctx", "64", "--criterion", "error"]
    out = tmp_path / "q.gguf"
    code, _, err = run(
        monkeypatch, capsys, "quantize", str(tiny), "--bpw", "4.5", *common,
        "--no-select", "--no-anchor", "--out", str(out),
    )  # fmt: skip
    assert code == 0, err
    text = tmp_path / "q.gguf.plan.calibration.txt"
    assert text.stat().st_size > 400
    m = read_imatrix(tmp_path / "q.gguf.plan.imatrix.gguf")
    assert m.datasets and "self-calibration" in m.datasets[0]
    record = json.loads((tmp_path / "q.gguf.ewq.json").read_text())
    assert record["rounding"]["method"] == "gptq"
    code, _, err = run(
        monkeypatch, capsys, "plan", str(tiny), "--bpw", "4.5", *common,
        "--json", str(tmp_path / "p.json"),
    )  # fmt: skip
    assert code == 0, err
    assert "reused from the cache" in err
    assert (tmp_path / "p.calibration.txt").read_text() == text.read_text()


def test_the_sampling_kv_cache_stays_within_its_budget():
    """Llama-2-7B's shapes (32 blocks, width 4096, 32 KV heads): an F16 KV cache of
    512 tokens is 268 MB a sequence, so 1 GiB holds 4 of them; Llama-3-8B's 8 KV
    heads hold 16; a tiny model keeps all 32."""
    from ewq.calibration.generate import fitting_slots

    def cfg(kv: int, blocks: int = 32, width: int = 4096) -> dict:
        return {
            "general.architecture": "llama",
            "llama.block_count": blocks,
            "llama.embedding_length": width,
            "llama.attention.head_count": 32,
            "llama.attention.head_count_kv": kv,
        }

    how = SelfCalibration()
    assert fitting_slots(cfg(32), how) == 4
    assert fitting_slots(cfg(8), how) == 16
    assert fitting_slots(cfg(4, blocks=2, width=256), how) == 32
    assert fitting_slots({}, how) == 32
