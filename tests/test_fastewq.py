"""FastEWQ: the dataset, the classifier study, safe storage, and Algorithm 2 plans."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st_
from models import shared_data
from test_cli import run

from ewq import api
from ewq.errors import EwqError, SourceNotFoundError
from ewq.fast.classify import (
    CLASSIFIERS,
    FEATURES,
    FORESTS,
    default_model_path,
    load_model,
    predict,
    study,
)
from ewq.fast.dataset import COLUMNS, DatasetError, paper_rows, read_dataset
from ewq.planning import Machine
from ewq.types import Precision

pytest.importorskip("sklearn")
PAPER = shared_data() / "paper"
COMMITTED = Path(__file__).parents[1] / "results" / "fastewq" / "dataset.csv"


def test_paper_rows_follow_tables_8_and_2():
    rows = paper_rows(PAPER)
    llama = [
        r for r in rows if r["model_name"] == "meta-llama/Meta-Llama-3.1-8B-Instruct"
    ]
    assert len(llama) == 32 and sum(r["quantized"] for r in llama) == 13
    assert {r["exec_index"] for r in llama if r["quantization_type"] == "4-bit"} == {
        13,
        33,
    }
    assert {r["num_parameters"] for r in llama} == {
        218_112_000
    }  # from the public config
    gemma = [r for r in rows if r["model_name"] == "google/gemma-2-9b-it"]
    assert len(gemma) == 42 and sum(r["quantized"] for r in gemma) == 17
    table2 = [r for r in rows if r["label_source"] == "paper-table2"]
    assert len(table2) == 14  # 17 sample rows, 3 of them already in Table 8's models
    assert len(rows) == 134 + 14


def test_dataset_build_cli(monkeypatch, capsys, tmp_path):
    out = tmp_path / "d.csv"
    code, _, err = run(
        monkeypatch,
        capsys,
        "dataset",
        "build",
        "default",
        "--paper",
        str(PAPER),
        "--out",
        str(out),
    )
    assert code == 0, err
    rows = read_dataset(out)
    with open(out) as fh:
        assert tuple(next(csv.reader(fh))) == COLUMNS
    ours = [r for r in rows if r["label_source"] == "ewq"]
    assert [r["exec_index"] for r in ours] == list(range(2, 32))
    assert {r["num_blocks"] for r in ours} == {30}
    assert (
        sum(r["quantized"] for r in ours) == 6
    )  # the analysis: 5 at 8-bit, 1 at 4-bit
    assert len(rows) == 30 + 148


def test_committed_dataset_is_current():
    rows = read_dataset(COMMITTED)
    assert {r["label_source"] for r in rows} == {"ewq", "paper-table8", "paper-table2"}
    smol = [r for r in rows if r["label_source"] == "ewq" and r["num_blocks"] == 30]
    analysis = api.analyze("default")
    assert [r["quantization_type"] for r in smol] == [
        analysis.decision.precision[i].value for i in range(2, 32)
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "model_name,num_blocks,exec_index\nx,1,2\n",
            "missing column(s) num_parameters",
        ),
        (",".join(COLUMNS) + "\nx,2,2,10,9-bit,1,ewq\n", "line 2"),
        (",".join(COLUMNS) + "\nx,2,2,10,raw,7,ewq\n", "quantized must be 0 or 1"),
        (",".join(COLUMNS) + "\n", "no rows"),
    ],
)
def test_bad_datasets(tmp_path, text, message):
    path = tmp_path / "d.csv"
    path.write_text(text)
    with pytest.raises(
        DatasetError, match=message.replace("(", r"\(").replace(")", r"\)")
    ):
        read_dataset(path)
    with pytest.raises(SourceNotFoundError):
        read_dataset(tmp_path / "absent.csv")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("fast")
    st, report = api.train_fastewq(
        COMMITTED, out / "m.npz", report_dir=out / "report", paper_tables=PAPER
    )
    return st, report, out


def test_study_reports_every_classifier(trained):
    st, report, out = trained
    assert list(st.results) == list(CLASSIFIERS)
    assert (st.n_train, st.n_test) == (141, 61) and st.n_rows == 202
    for r in st.results.values():
        assert {
            "raw",
            "quantized",
            "accuracy",
            "macro avg",
            "weighted avg",
        } <= r.report.keys()
        assert sum(map(sum, r.confusion)) == st.n_test
        assert 0 <= r.auc <= 1 and 0 <= r.lomo <= 1
        assert set(r.ablation) == set(FEATURES)
    assert set(st.importances) == set(FEATURES)
    assert abs(sum(st.importances.values()) - 1) < 1e-9
    text = report.read_text()
    for png in ("confusion.png", "roc.png", "importances.png"):
        assert (report.parent / png).read_bytes()[:4] == b"\x89PNG" and png in text
    assert "80%" in text and "leave-one-model-out" in text
    # same data, same seed: the same figures
    again = study(read_dataset(COMMITTED))
    assert (
        again.results["random forest"].confusion
        == st.results["random forest"].confusion
    )


def test_stored_model_round_trip(trained):
    st, _, out = trained
    doc = load_model(out / "m.npz")
    assert doc["features"] == list(FEATURES) and doc["n_rows"] == 202
    assert {"python", "scikit-learn", "numpy"} <= doc["versions"].keys()
    rows = read_dataset(COMMITTED)[:40]
    x = [[r[f] for f in FEATURES] for r in rows]
    assert predict(doc, "fast", rows) == [
        bool(v) for v in st.forests["fast"].predict(x)
    ]
    assert predict(doc, "fast", []) == []
    with pytest.raises(EwqError, match="stored as .npz"):  # before any training
        api.train_fastewq(COMMITTED, out / "m.skops")
    assert not (out / "m.skops").exists()


@settings(max_examples=30, deadline=None)
@given(seed=st_.integers(0, 2**32 - 1))
def test_forest_predicts_as_scikit_learn_does(trained, seed):
    """ewq's own prediction from the stored arrays against scikit-learn's
    predict_proba on the pipelines that were stored: equal bit for bit, on the
    dataset's rows and on random rows (thresholds hit exactly included)."""
    study_, _, out = trained
    doc = load_model(out / "m.npz")
    rng = np.random.default_rng(seed)
    rows = np.array(
        [[r[f] for f in FEATURES] for r in read_dataset(COMMITTED)], dtype=np.float64
    )
    rand = np.column_stack(
        [
            rng.integers(0, 10**10, 200).astype(np.float64),
            rng.integers(0, 200, 200),
            rng.integers(1, 200, 200),
        ]
    )
    for variant in ("fast", "fast-train"):
        pipe, forest = study_.forests[variant], doc[variant]
        # a row exactly on a threshold: x scaled back from a split of the first tree
        f, t = int(forest.feature[0]), float(forest.threshold[0])
        edge = rows[:5].copy()
        edge[:, f] = t * forest.scale[f] + forest.mean[f]
        for x in (rows, rand, edge):
            assert np.array_equal(forest.predict_proba(x), pipe.predict_proba(x))
            assert np.array_equal(forest.predict(x), pipe.predict(x))


def test_shipped_classifier_loads():
    doc = load_model()
    assert default_model_path().is_file() and doc["dataset"] == "dataset.csv"
    assert default_model_path().suffix == ".npz"
    with pytest.raises(EwqError, match="unknown FastEWQ forest"):
        predict(doc, "slow", [])


def test_older_skops_file_loads_and_untrusted_is_refused(
    trained, tmp_path, monkeypatch
):
    import os

    import skops.io as sio

    study_, _, out = trained
    meta = {k: v for k, v in load_model(out / "m.npz").items() if k not in FORESTS}
    old = tmp_path / "old.skops"
    sio.dump(meta | dict(study_.forests), old)
    rows = read_dataset(COMMITTED)[:40]
    assert predict(load_model(old), "fast-train", rows) == predict(
        load_model(out / "m.npz"), "fast-train", rows
    )

    path = tmp_path / "evil.skops"
    sio.dump({"kind": "ewq-fastewq-classifier", "payload": os.system}, path)

    def never(*args, **kwargs):
        raise AssertionError("skops.io.load must not be reached")

    monkeypatch.setattr(sio, "load", never)
    with pytest.raises(EwqError, match="refusing to load: it holds types outside"):
        load_model(path)
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"not a zip")
    with pytest.raises(EwqError, match="not a readable classifier file"):
        load_model(broken)


def _crafted(doc, variant, **change):
    arrays = {"meta": np.array(json.dumps({"kind": "ewq-fastewq-classifier"}))}
    for v in FORESTS:
        arrays |= doc[v].arrays(v)
    for k, fn in change.items():
        arrays[f"{variant}.{k}"] = fn(arrays[f"{variant}.{k}"].copy())
    return arrays


@pytest.mark.parametrize(
    ("field", "fn", "message"),
    [
        # a child pointing back at its parent would walk forever
        ("left", lambda a: np.where(a > 0, 0, a), "not a consistent random forest"),
        ("right", lambda a: np.where(a > 0, 10**6, a), "not a consistent random"),
        ("feature", lambda a: np.where(a >= 0, 7, a), "not a consistent random"),
        ("threshold", lambda a: a * np.nan, "finite floats expected"),
        ("offsets", lambda a: a[:-1], "not a consistent random forest"),
        ("left", lambda a: a.astype(np.float64), "integers expected"),
        ("value", lambda a: -a, "not a consistent random forest"),
        ("value", lambda a: np.array([object()]), "not a readable classifier"),
        ("mean", lambda a: a[:2], "not a consistent random forest"),
        # sound forests, but the metadata names no features
        ("threshold", lambda a: a, "made for features None"),
    ],
)
def test_crafted_forest_arrays_are_refused(trained, tmp_path, field, fn, message):
    _, _, out = trained
    doc = load_model(out / "m.npz")
    path = tmp_path / "c.npz"
    arrays = _crafted(doc, "fast", **{field: fn})
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)
    with pytest.raises(EwqError, match=message):
        load_model(path)


def test_fast_plan_from_a_bare_config(monkeypatch, capsys, tmp_path):
    from ewq.fast.dataset import paper_configs

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(paper_configs()["meta-llama/Meta-Llama-3.1-8B-Instruct"]))
    js = tmp_path / "plan.json"
    code, out, err = run(
        monkeypatch,
        capsys,
        "plan",
        str(cfg),
        "--memory",
        "14GiB",
        "--method",
        "fast",
        "--json",
        str(js),
    )
    assert code == 0, err
    doc = json.loads(js.read_text())
    assert doc["method"] == "fast" and doc["fits"] and doc["format"] == "hf"
    assert all(b["entropy"] is None for b in doc["blocks"])


def test_algorithm_2_order(tmp_path):
    """Predicted blocks start at 8-bit; as the budget tightens, the highest
    exec_index blocks go to 4-bit first (METHOD.md section 6)."""
    from ewq.fast.dataset import paper_configs
    from ewq.fast.features import features_from_config

    cfg = paper_configs()["meta-llama/Meta-Llama-3.1-8B-Instruct"]
    feats = features_from_config(cfg, "llama")
    predicted, decision, priority = api.fast_decision(feats, "fast", Precision.Q8)
    chosen = sorted((i for i, q in predicted.items() if q), reverse=True)
    assert chosen and list(priority[: len(chosen)]) == chosen
    assert all(decision[i] is Precision.Q8 for i in chosen)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    seen_mixed = False
    for gib in range(6, 17):
        r = api.plan(path, [Machine("m", gib * 2**30)], method="fast").result
        four = [i for i in chosen if r.precision[i] is Precision.Q4]
        eight = [i for i in chosen if r.precision[i] is Precision.Q8]
        if four and eight:
            seen_mixed = True
            assert min(four) > max(eight)  # the highest exec_index went first
    assert seen_mixed


def test_fast_train_cli(monkeypatch, capsys, tmp_path):
    model = tmp_path / "m.npz"
    code, out, err = run(
        monkeypatch,
        capsys,
        "fast",
        "train",
        str(COMMITTED),
        "--out",
        str(model),
        "--report",
        str(tmp_path / "r"),
        "--paper",
        str(PAPER),
    )
    assert code == 0, err
    assert "random forest" in out and load_model(model)["n_rows"] == 202
    assert (tmp_path / "r" / "report.md").is_file()
    bad = tmp_path / "bad.csv"
    bad.write_text("model_name,exec_index\nx,2\n")
    code, _, err = run(
        monkeypatch,
        capsys,
        "fast",
        "train",
        str(bad),
        "--out",
        str(tmp_path / "x.npz"),
    )
    assert (
        code == 1 and "missing column(s)" in err and not (tmp_path / "x.npz").exists()
    )
