"""Per-tensor plans: the file schema, the budgets, what llama.cpp writes for them, the
windows of a text, and the WordPiece rule of the converter."""

from __future__ import annotations

import json

import gguf
import pytest
from models import byte_vocab_llama, f16_gguf
from test_cli import run

from ewq import api
from ewq.evaluate.windows import text_windows
from ewq.planfile import PlanError, plan_from_doc
from ewq.planning import Machine

pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def llama256(tmp_path_factory):
    return byte_vocab_llama(tmp_path_factory.mktemp("l256") / "m.gguf")


def _plan(types: dict[str, str], n: int = 2) -> dict:
    return {
        "schema_version": 2,
        "num_blocks": n,
        "blocks": [{"exec_index": i, "precision": "raw"} for i in range(2, n + 2)],
        "tensors": [{"name": k, "type": v} for k, v in types.items()],
    }


def test_a_tensor_planned_twice_is_refused():
    doc = _plan({"blk.0.attn_q.weight": "Q4_K"})
    doc["tensors"].append({"name": "blk.0.attn_q.weight", "type": "Q8_0"})
    with pytest.raises(PlanError, match="planned twice"):
        plan_from_doc(doc)


@pytest.mark.parametrize(
    ("types", "message"),
    [
        ({"blk.9.attn_q.weight": "Q4_K"}, "which the model does not have"),
        ({"blk.0.attn_q.weight": "Q9_9"}, "cannot write tensor 'blk.0.attn_q.weight'"),
        ({"blk.0.attn_q.weight": "int4/g128"}, "as int4/g128"),
    ],
)
def test_a_type_the_tensor_cannot_take_is_one_line(
    monkeypatch, capsys, tmp_path, llama256, types, message
):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(_plan(types)))
    code, _, err = run(
        monkeypatch,
        capsys,
        "quantize",
        str(llama256),
        "--plan",
        str(plan),
        "--out",
        str(tmp_path / "o.gguf"),
    )
    lines = [x for x in err.splitlines() if x.startswith("ewq: error:")]
    assert code == 1 and len(lines) == 1 and message in lines[0], err
    assert not (tmp_path / "o.gguf").exists()


def test_a_k_quant_on_rows_it_does_not_fit_is_refused(tmp_path):
    """Rows of 64: llama.cpp would fall back; a per-tensor plan names what is
    written, so Q4_K there is an error, not a silent fallback."""
    src = f16_gguf(tmp_path / "m.gguf")
    with pytest.raises(PlanError, match="as Q4_K"):
        api.quantize(src, _plan({"blk.0.attn_q.weight": "Q4_K"}), tmp_path / "o.gguf")


@pytest.mark.parametrize("bpw", [3.0, 4.5, 6.0])
def test_bpw_is_a_budget_llama_cpp_confirms(llama256, tmp_path, bpw):
    """--bpw B: the file llama.cpp writes holds at most B bits per parameter (its
    tensors' bytes x 8 / their elements, as llama.cpp's BPW counts them), and every
    tensor has the type the plan says."""
    p = api.plan(llama256, [Machine("m", 1 << 40)], bpw=bpw, context=0)
    assert p.result.fits
    from ewq.reports.plan import plan_json

    doc = plan_json(p, "test")
    out = tmp_path / "o.gguf"
    api.quantize(llama256, doc, out)
    r = gguf.GGUFReader(out)
    nbytes = sum(int(t.n_bytes) for t in r.tensors)
    params = sum(int(t.n_elements) for t in r.tensors)
    assert 8 * nbytes / params <= bpw
    assert 8 * nbytes / params == pytest.approx(doc["bits_per_weight"])
    written = {t.name: t.tensor_type.name for t in r.tensors}
    assert all(written[t["name"]] == t["type"] for t in doc["tensors"])


def test_more_bits_never_more_predicted_damage(llama256):
    last = float("inf")
    for bpw in (2.5, 3.5, 4.5, 6.0, 9.0):
        r = api.plan(llama256, [Machine("m", 1 << 40)], bpw=bpw, context=0).result
        assert r.damage <= last + 1e-12
        last = r.damage


@pytest.mark.slow
def test_a_plan_predicting_a_broken_model_warns(monkeypatch, capsys, tmp_path):
    """The default model at 5% above the least it can take (measured: KL 2.2 nats
    per token for this plan) warns in one line; at 240 MB it does not."""
    code, _, err = run(
        monkeypatch, capsys, "plan", "default", "--memory", "70MB", "--context", "0"
    )
    assert code == 0, err
    lines = [x for x in err.splitlines() if x.startswith("warning:")]
    assert len(lines) == 1 and "may be broken" in lines[0], err
    code, _, err = run(
        monkeypatch, capsys, "plan", "default", "--memory", "240MB", "--context", "0"
    )
    assert code == 0 and "warning:" not in err


def test_bpw_with_the_ladder_is_one_line(monkeypatch, capsys, llama256):
    code, _, err = run(
        monkeypatch,
        capsys,
        "plan",
        str(llama256),
        "--bpw",
        "4",
        "--allocator",
        "ladder",
    )
    assert code == 1 and "--bpw budgets the optimal allocator" in err


def test_lines_never_straddle_documents():
    def tok(text: str) -> list[int]:
        return [ord(c) for c in text if c != " "]

    text = "ab cd\n\nefgh\nij\n" + "k" * 40
    lines = text_windows(tok, 1, text, 8, "lines")
    assert lines == [
        [1, *map(ord, "abcd")],
        [1, *map(ord, "efgh")],
        [1, *map(ord, "ij")],
        [1] + [ord("k")] * 7,
    ]
    stream = text_windows(tok, None, text, 8, "stream")
    assert [len(w) for w in stream] == [8] * 6 + [6]  # 54 tokens in all
    assert (
        sum(len(w) for w in text_windows(tok, None, text, 8, "lines", max_tokens=9))
        == 8
    )


def test_a_decoder_with_a_wordpiece_vocabulary_converts(tmp_path):
    """llama.cpp's converter would refuse a GPT-2 with a BERT vocabulary (an unknown
    BPE pre-tokenizer); ewq's rule writes it as llama.cpp's WordPiece vocabulary, and
    llama.cpp then tokenizes text as the Hugging Face tokenizer does: added tags whole,
    case kept."""
    from models import wordpiece_gpt2

    from ewq.evaluate.backends import LlamaCppModel

    out, tok = wordpiece_gpt2(tmp_path)
    text = "[HEAVY] [HUMAN] E V Q L V E S G"
    want = tok(text, add_special_tokens=False)["input_ids"]
    assert LlamaCppModel(out, 64).tokenize(text) == want
    assert tok.unk_token_id not in want


@pytest.mark.parametrize(
    ("text", "outcome"),
    [
        ("hello world " * 40, "error"),  # every letter unknown to the vocabulary
        ("E V Q L V E S G K hello " * 20, "warning"),  # 1 token in 10 unknown
        ("E V Q L V E S G " * 40, None),
    ],
)
def test_text_the_vocabulary_cannot_read_is_named(
    monkeypatch, capsys, tmp_path, text, outcome
):
    """A text whose tokens are mostly the vocabulary's UNKNOWN is refused in one line
    (a KL on it measures the unknown token); a few unknown tokens warn."""
    from models import wordpiece_gpt2

    model, _ = wordpiece_gpt2(tmp_path)
    data = tmp_path / "t.txt"
    data.write_text(text)
    code, _, err = run(
        monkeypatch,
        capsys,
        "eval",
        str(model),
        "--task",
        "perplexity",
        "--data",
        str(data),
        "--ctx",
        "32",
    )
    errors = [x for x in err.splitlines() if x.startswith("ewq: error:")]
    warnings = [x for x in err.splitlines() if "unknown to the model" in x]
    if outcome == "error":
        assert code == 1 and len(errors) == 1 and "unknown" in errors[0], err
    elif outcome == "warning":
        assert code == 0 and len(warnings) == 1 and warnings[0].startswith("warning:")
    else:
        assert code == 0 and not warnings, err
