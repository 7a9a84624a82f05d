"""mmfuse computes its scores in numpy (importing scikit-learn cost 2 s of every run); they must be sklearn's."""

import json

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from mmfuse import metrics


@pytest.mark.parametrize("seed", range(6))
def test_scores_match_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    n_classes = int(rng.integers(2, 9))
    labels = [f"c{i}" for i in range(n_classes)]
    y = rng.integers(0, n_classes, size=int(rng.integers(1, 60)))
    pred = np.where(rng.random(len(y)) < 0.6, y, rng.integers(0, n_classes, size=len(y)))
    if seed % 2:  # a class never predicted, and one absent from both: sklearn's macro F1 leaves the latter out
        pred[pred == 0] = 1
        y, pred = y[y != n_classes - 1], pred[y != n_classes - 1]
        pred[pred == n_classes - 1] = 0
    if not len(y):
        return

    got = metrics.full_report(y, pred, labels)
    assert json.loads(json.dumps(got)) == got  # plain floats and ints only: JSON-ready
    assert got["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert got["weighted_f1"] == pytest.approx(f1_score(y, pred, average="weighted", zero_division=0))
    assert got["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro", zero_division=0))
    assert metrics.summary(y, pred) == pytest.approx({k: got[k] for k in ("accuracy", "weighted_f1", "macro_f1")})
    idx = list(range(n_classes))
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=idx, zero_division=0)
    for i, name in enumerate(labels):
        assert got["per_class"][name] == pytest.approx({"precision": p[i], "recall": r[i], "f1": f[i], "support": s[i]})
    assert got["confusion_matrix"] == confusion_matrix(y, pred, labels=idx).tolist()


def test_perfect_and_hopeless_predictions():
    y = np.array([0, 1, 2, 2])
    assert metrics.summary(y, y) == {"accuracy": 1.0, "weighted_f1": 1.0, "macro_f1": 1.0}
    assert metrics.summary(y, (y + 1) % 3) == {"accuracy": 0.0, "weighted_f1": 0.0, "macro_f1": 0.0}
