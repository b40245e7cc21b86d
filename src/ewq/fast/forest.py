"""A trained FastEWQ pipeline (a StandardScaler, then a random forest) as plain arrays,
and its prediction.

Why by hand: scikit-learn predicts the same, but importing it and skops to load one
costs about 4 s (measured alone: ``sklearn.ensemble`` 1.6 s, ``skops.io`` 2.1 s, the
load 0.5 s), where FastEWQ's decision itself takes milliseconds. The arrays are kept
in a ``.npz`` read with ``allow_pickle=False``: a file holds numbers, never code.

The prediction restates scikit-learn's rule (1.5 and later, where a leaf's ``value``
holds the class fractions of its training rows):

* ``StandardScaler.transform``: ``(x - mean_) / scale_`` in float64;
* ``RandomForestClassifier`` casts the scaled rows to float32, and each tree walks
  left while ``x[feature] <= threshold`` (the float32 value against a float64
  threshold) until a leaf (``children_left == -1``);
* ``predict_proba`` adds the leaves' fractions tree by tree, in order, and divides by
  the number of trees; ``predict`` takes ``classes_`` at the argmax.

tests/test_fastewq.py checks it equals scikit-learn's ``predict_proba`` exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ewq.errors import EwqError

__all__ = ["Forest"]

_INTS = ("classes", "offsets", "left", "right", "feature")
_FLOATS = ("mean", "scale", "threshold", "value")


@dataclass(frozen=True, eq=False)
class Forest:
    mean: np.ndarray  # (n_features,) float64
    scale: np.ndarray  # (n_features,) float64
    classes: np.ndarray  # (n_classes,) int64
    offsets: np.ndarray  # (n_trees + 1,): tree t holds nodes offsets[t]:offsets[t+1]
    left: np.ndarray  # (n_nodes,) int64, within its tree; -1 at a leaf
    right: np.ndarray
    feature: np.ndarray  # (n_nodes,) int64
    threshold: np.ndarray  # (n_nodes,) float64
    value: np.ndarray  # (n_nodes, n_classes) float64: class fractions

    @classmethod
    def from_pipeline(cls, pipe: Any) -> Forest:
        """From a fitted scikit-learn Pipeline([StandardScaler, RandomForestClassifier])."""
        scaler, forest = pipe.steps[0][1], pipe.steps[-1][1]
        n = int(forest.n_features_in_)
        trees = [e.tree_ for e in forest.estimators_]
        if forest.n_outputs_ != 1:
            raise EwqError("a FastEWQ forest predicts one output")
        sizes = [t.node_count for t in trees]
        mean = scaler.mean_ if scaler.with_mean else None
        scale = scaler.scale_ if scaler.with_std else None
        return cls(
            mean=np.zeros(n) if mean is None else np.asarray(mean, np.float64),
            scale=np.ones(n) if scale is None else np.asarray(scale, np.float64),
            classes=np.asarray(forest.classes_, np.int64),
            offsets=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
            left=np.concatenate([t.children_left for t in trees]).astype(np.int64),
            right=np.concatenate([t.children_right for t in trees]).astype(np.int64),
            feature=np.concatenate([t.feature for t in trees]).astype(np.int64),
            threshold=np.concatenate([t.threshold for t in trees]).astype(np.float64),
            value=np.concatenate(
                [t.value[:, 0, : len(forest.classes_)] for t in trees]
            ).astype(np.float64),
        )

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}.{k}": getattr(self, k) for k in (*_INTS, *_FLOATS)}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], prefix: str) -> Forest:
        """Read back :meth:`arrays`, refusing any inconsistency a crafted file could
        hold (a child before its parent would loop forever; an index out of range
        would read another tree)."""
        try:
            got = {k: np.asarray(arrays[f"{prefix}.{k}"]) for k in (*_INTS, *_FLOATS)}
        except KeyError as exc:
            raise EwqError(f"the classifier has no array {exc.args[0]}") from None
        for k in _INTS:
            if got[k].dtype.kind not in "iu":
                raise EwqError(f"{prefix}.{k}: integers expected, not {got[k].dtype}")
            got[k] = got[k].astype(np.int64)
        for k in _FLOATS:
            if got[k].dtype.kind != "f" or not np.isfinite(got[k]).all():
                raise EwqError(f"{prefix}.{k}: finite floats expected")
            got[k] = got[k].astype(np.float64)
        f = cls(**got)
        f._check(prefix)
        return f

    def _check(self, prefix: str) -> None:
        n_feat, off = self.mean.shape, self.offsets
        nodes = self.left.shape
        ok = (
            self.mean.ndim == 1
            and self.scale.shape == n_feat
            and (self.scale != 0).all()
            and self.classes.ndim == 1
            and self.classes.size >= 1
            and off.ndim == 1
            and off.size >= 2
            and off[0] == 0
            and (np.diff(off) >= 1).all()
            and self.left.ndim == 1
            and off[-1] == nodes[0]
            and self.right.shape == nodes
            and self.feature.shape == nodes
            and self.threshold.shape == nodes
            and self.value.shape == (nodes[0], self.classes.size)
            and (self.value >= 0).all()
        )
        if ok:
            size = np.repeat(np.diff(off), np.diff(off))
            local = np.arange(nodes[0]) - np.repeat(off[:-1], np.diff(off))
            leaf = self.left == -1
            inner = ~leaf
            ok = bool(
                (self.right[leaf] == -1).all()
                # children after their parent, inside their tree: every walk ends
                and (self.left[inner] > local[inner]).all()
                and (self.right[inner] > local[inner]).all()
                and (self.left[inner] < size[inner]).all()
                and (self.right[inner] < size[inner]).all()
                and (self.feature[inner] >= 0).all()
                and (self.feature[inner] < n_feat[0]).all()
            )
        if not ok:
            raise EwqError(f"{prefix}: not a consistent random forest")

    @property
    def n_features(self) -> int:
        return int(self.mean.size)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float64)
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise EwqError(f"expected rows of {self.n_features} features")
        if not np.isfinite(x).all():
            raise EwqError("a FastEWQ feature is not a finite number")
        xs = ((x - self.mean) / self.scale).astype(np.float32)
        rows = np.arange(len(xs))
        base = self.offsets[:-1, None]  # (n_trees, 1)
        node = np.repeat(base, len(xs), axis=1)  # (n_trees, n_rows), absolute
        while True:
            inner = self.left[node] >= 0
            if not inner.any():
                break
            f = np.where(inner, self.feature[node], 0)
            go_left = xs[rows[None, :], f] <= self.threshold[node]
            child = np.where(go_left, self.left[node], self.right[node])
            node = np.where(inner, base + child, node)
        proba = np.zeros((len(xs), self.classes.size))
        for t in range(len(base)):  # in order, as scikit-learn adds them
            proba += self.value[node[t]]
        proba /= len(base)
        return proba

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.classes.take(np.argmax(self.predict_proba(x), axis=1))
