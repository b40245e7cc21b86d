"""FastEWQ's classifiers: the study (six models, metrics, ablations), and the stored
classifier that plans from metadata.

Storage is numpy arrays (ewq.fast.forest), never pickle: a .npz is read with
allow_pickle=False, so a file from an untrusted source cannot run code. A .skops file
of an older ewq still loads: its types are listed first and any outside
:data:`TRUSTED` refused.
"""

from __future__ import annotations

import functools
import json
import platform
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np

from ewq.errors import EwqError, SourceNotFoundError

__all__ = [
    "CLASSIFIERS",
    "FEATURES",
    "TRUSTED",
    "Study",
    "default_model_path",
    "load_model",
    "predict",
    "save_model",
    "study",
]

FEATURES = ("num_parameters", "exec_index", "num_blocks")
CLASSIFIERS = (
    "logistic regression",
    "SVM",
    "random forest",
    "XGB",
    "kNN",
    "Gaussian naive Bayes",
)
FORESTS = ("fast", "fast-train")
MODEL_SCHEMA = 1

#: every type a stored FastEWQ classifier may contain (a scikit-learn pipeline of a
#: StandardScaler and a random forest of decision trees)
TRUSTED = [
    "sklearn.pipeline.Pipeline",
    "sklearn.preprocessing._data.StandardScaler",
    "sklearn.ensemble._forest.RandomForestClassifier",
    "sklearn.tree._classes.DecisionTreeClassifier",
    "sklearn.tree._tree.Tree",
    "numpy.dtype",
    "numpy.ndarray",
    "builtins.dict",
    "builtins.list",
    "builtins.tuple",
    "builtins.str",
    "builtins.int",
    "builtins.float",
    "builtins.bool",
    "builtins.NoneType",
]


def _estimator(name: str, seed: int) -> Any:
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.naive_bayes import GaussianNB
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.svm import SVC

    if name == "logistic regression":
        return LogisticRegression(max_iter=1000)
    if name == "SVM":
        return SVC(random_state=seed)  # ROC from its decision function
    if name == "random forest":
        return RandomForestClassifier(
            n_estimators=50, min_samples_leaf=2, random_state=seed, n_jobs=1
        )
    if name == "XGB":
        from xgboost import XGBClassifier

        return XGBClassifier(
            n_estimators=100, max_depth=3, random_state=seed, n_jobs=1, verbosity=0
        )
    if name == "kNN":
        return KNeighborsClassifier(n_neighbors=5)
    if name == "Gaussian naive Bayes":
        return GaussianNB()
    raise ValueError(f"unknown classifier {name!r}")


def _pipeline(name: str, seed: int) -> Any:
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    # the scaler is fitted inside the pipeline: on the training rows only
    return Pipeline([("scale", StandardScaler()), ("clf", _estimator(name, seed))])


def _xy(rows: Sequence[Mapping[str, Any]], features: Sequence[str] = FEATURES):
    x = np.array([[float(r[f]) for f in features] for r in rows], dtype=np.float64)
    y = np.array([int(r["quantized"]) for r in rows], dtype=np.int64)
    return x, y


@dataclass
class Result:
    """One classifier on the 30% test split."""

    report: dict[str, Any]  # sklearn classification_report, output_dict=True
    confusion: list[list[int]]  # [[tn, fp], [fn, tp]]
    roc: tuple[list[float], list[float]]  # fpr, tpr
    auc: float
    ablation: dict[str, float]  # accuracy without each feature
    lomo: float  # leave-one-model-out accuracy (all rows)


@dataclass
class Study:
    seed: int
    n_rows: int
    n_models: int
    n_train: int
    n_test: int
    class_counts: dict[int, int]
    results: dict[str, Result] = field(default_factory=dict)
    importances: dict[str, float] = field(default_factory=dict)
    #: the two stored forests, by the method that uses each (fast, fast-train)
    forests: dict[str, Any] = field(default_factory=dict)


def study(
    rows: Sequence[Mapping[str, Any]], *, seed: int = 42, test_size: float = 0.3
) -> Study:
    """Train and evaluate the six classifiers; fit the two stored forests."""
    from sklearn.model_selection import train_test_split

    x, y = _xy(rows)
    if len(set(y.tolist())) < 2:
        raise EwqError("the dataset needs both quantized and raw blocks to train on")
    groups = np.array([r["model_name"] for r in rows])
    idx = np.arange(len(rows))
    train, test = train_test_split(
        idx, test_size=test_size, random_state=seed, stratify=y
    )
    out = Study(
        seed=seed,
        n_rows=len(rows),
        n_models=len(set(groups.tolist())),
        n_train=len(train),
        n_test=len(test),
        class_counts={
            int(k): int(v)
            for k, v in zip(*np.unique(y, return_counts=True), strict=True)
        },
    )
    for name in CLASSIFIERS:
        out.results[name], model = _evaluated(name, seed, x, y, train, test, groups)
        if name == "random forest":
            forest = model.named_steps["clf"]
            out.importances = dict(
                zip(FEATURES, map(float, forest.feature_importances_), strict=True)
            )
            out.forests["fast-train"] = model
    out.forests["fast"] = _pipeline("random forest", seed).fit(x, y)
    return out


def _evaluated(name: str, seed: int, x, y, train, test, groups) -> tuple[Result, Any]:
    """One classifier trained on ``train`` and measured on ``test``: its report,
    confusion, ROC, each feature's ablation, and leave-one-model-out accuracy."""
    from sklearn.metrics import (
        accuracy_score,
        classification_report,
        confusion_matrix,
        roc_auc_score,
        roc_curve,
    )
    from sklearn.model_selection import LeaveOneGroupOut, cross_val_predict

    model = _pipeline(name, seed).fit(x[train], y[train])
    pred = model.predict(x[test])
    proba = (
        model.predict_proba(x[test])[:, 1]
        if hasattr(model, "predict_proba")
        else model.decision_function(x[test])
    )
    fpr, tpr, _ = roc_curve(y[test], proba)
    ablation = {}
    for k, feature in enumerate(FEATURES):
        keep = [j for j in range(len(FEATURES)) if j != k]
        m = _pipeline(name, seed).fit(x[train][:, keep], y[train])
        ablation[feature] = float(accuracy_score(y[test], m.predict(x[test][:, keep])))
    lomo_pred = cross_val_predict(
        _pipeline(name, seed), x, y, groups=groups, cv=LeaveOneGroupOut()
    )
    result = Result(
        report=classification_report(
            y[test],
            pred,
            output_dict=True,
            zero_division=0,
            target_names=["raw", "quantized"],
        ),
        confusion=confusion_matrix(y[test], pred, labels=[0, 1]).tolist(),
        roc=(fpr.tolist(), tpr.tolist()),
        auc=float(roc_auc_score(y[test], proba)),
        ablation=ablation,
        lomo=float(accuracy_score(y, lomo_pred)),
    )
    return result, model


def versions() -> dict[str, str]:
    import sklearn

    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scikit-learn": sklearn.__version__,
    }


def save_model(st: Study, path: str | Path, dataset: str) -> None:
    """Both forests as arrays (ewq.fast.forest), with the feature schema and the
    library versions that trained them, in one .npz."""
    from ewq.fast.forest import Forest
    from ewq.fileio import atomic_path

    path = Path(path)
    if path.suffix != ".npz":
        raise EwqError(
            f"{path}: a FastEWQ classifier is stored as .npz (numpy arrays, no pickle)"
        )
    meta = {
        "schema_version": MODEL_SCHEMA,
        "kind": "ewq-fastewq-classifier",
        "classifier": "random forest",
        "features": list(FEATURES),
        "target": "quantized",
        "dataset": dataset,
        "n_rows": st.n_rows,
        "seed": st.seed,
        "versions": versions(),
    }
    arrays = {"meta": np.array(json.dumps(meta))}
    for v in FORESTS:
        arrays |= Forest.from_pipeline(st.forests[v]).arrays(v)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, **arrays)


def default_model_path() -> Path:
    return Path(str(files("ewq.fast") / "data" / "fastewq.npz"))


MAX_INFLATED = 256 * 2**20


def load_model(path: str | Path | None = None) -> dict[str, Any]:
    """Load a stored classifier: the .npz ewq writes, or a .skops file of an older
    ewq (only the types in :data:`TRUSTED`)."""

    path = Path(path) if path is not None else default_model_path()
    if not path.is_file():
        raise SourceNotFoundError(f"no such classifier file: {path}")
    st = path.stat()  # in the key: a file rewritten in place is loaded again
    return _load(str(path), st.st_mtime_ns, st.st_size)


@functools.cache
def _load(path: str, mtime_ns: int, size: int) -> dict[str, Any]:
    # a zip bomb (a few MB that inflate to gigabytes) is refused before anything
    # is inflated: the shipped classifier holds under 2 MB uncompressed
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            inflated = sum(i.file_size for i in zf.infolist())
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise EwqError(f"{path}: not a readable classifier file ({exc})") from None
    if inflated > MAX_INFLATED:
        raise EwqError(
            f"{path}: refusing to load: it inflates to {inflated:,} bytes (at most "
            f"{MAX_INFLATED:,})"
        )
    doc = _load_skops(path) if "schema.json" in names else _load_npz(path)
    if not isinstance(doc, dict) or doc.get("kind") != "ewq-fastewq-classifier":
        raise EwqError(f"{path}: not an ewq FastEWQ classifier")
    if doc.get("features") != list(FEATURES):
        raise EwqError(
            f"{path}: made for features {doc.get('features')}, not {list(FEATURES)}"
        )
    return doc


def _load_npz(path: str) -> dict[str, Any]:
    from ewq.fast.forest import Forest

    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        meta = json.loads(str(arrays["meta"][()]))
    except Exception as exc:  # noqa: BLE001 - a damaged zip fails in many ways
        raise EwqError(f"{path}: not a readable classifier file ({exc})") from None
    if not isinstance(meta, dict):
        raise EwqError(f"{path}: not an ewq FastEWQ classifier")
    try:
        forests = {v: Forest.from_arrays(arrays, v) for v in FORESTS}
    except EwqError as exc:
        raise EwqError(f"{path}: {exc}") from None
    if any(f.n_features != len(FEATURES) for f in forests.values()):
        raise EwqError(
            f"{path}: its forests take other than FastEWQ's {len(FEATURES)} features"
        )
    return meta | forests


def _load_skops(path: str) -> dict[str, Any]:
    """An older ewq's skops file: its types listed first, any outside TRUSTED
    refused, then its pipelines turned into arrays."""
    import skops.io as sio

    from ewq.fast.forest import Forest

    try:
        untrusted = [t for t in sio.get_untrusted_types(file=path) if t not in TRUSTED]
    except Exception as exc:  # noqa: BLE001 - any failure to parse is a bad file
        raise EwqError(f"{path}: not a readable skops file ({exc})") from None
    if untrusted:
        raise EwqError(
            f"{path}: refusing to load: it holds types outside the trusted list "
            f"({', '.join(sorted(untrusted)[:5])})"
        )
    try:
        doc = sio.load(path, trusted=TRUSTED)
    except Exception as exc:  # noqa: BLE001
        raise EwqError(f"{path}: cannot load the classifier ({exc})") from None
    if isinstance(doc, dict) and doc.get("kind") == "ewq-fastewq-classifier":
        try:
            doc |= {v: Forest.from_pipeline(doc[v]) for v in FORESTS}
        except (KeyError, AttributeError, IndexError, TypeError) as exc:
            raise EwqError(f"{path}: not an ewq FastEWQ classifier ({exc})") from None
    return doc


def predict(
    doc: Mapping[str, Any], forest: str, rows: Sequence[Mapping[str, Any]]
) -> list[bool]:
    """Quantize (True) or not, per feature row, with the ``fast`` or ``fast-train`` model."""
    if forest not in FORESTS:
        raise EwqError(f"unknown FastEWQ forest '{forest}' (fast or fast-train)")
    if not rows:
        return []
    x, _ = _xy([{**r, "quantized": 0} for r in rows])
    return [bool(v) for v in doc[forest].predict(x)]
