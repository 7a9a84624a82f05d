"""Metrics as pure functions over arrays, and the files and plots made from them.

The scores are scikit-learn's definitions (``zero_division=0``), computed from one confusion matrix in numpy:
importing sklearn.metrics (with the SciPy and pandas it pulls in) took 2 s, a tenth of the warm quickstart, for
a few sums. tests/test_metrics.py checks every number against scikit-learn itself.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n: int) -> np.ndarray:
    """(n, n) counts: rows are true classes, columns predicted ones (sklearn's confusion_matrix)."""
    return np.bincount(n * np.asarray(y_true) + np.asarray(y_pred), minlength=n * n).reshape(n, n)


def _per_class(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    tp, support, predicted = np.diag(cm).astype(float), cm.sum(1), cm.sum(0)
    zeros = np.zeros(len(cm))
    precision = np.divide(tp, predicted, out=zeros.copy(), where=predicted > 0)
    recall = np.divide(tp, support, out=zeros.copy(), where=support > 0)
    f1 = np.divide(2 * tp, support + predicted, out=zeros.copy(), where=support + predicted > 0)
    return precision, recall, f1, support


def _summary(cm: np.ndarray) -> dict[str, float]:
    _, _, f1, support = _per_class(cm)
    seen = (support + cm.sum(0)) > 0  # like sklearn, macro F1 averages the classes in y_true or y_pred only
    return {
        "accuracy": float(np.trace(cm) / max(cm.sum(), 1)),
        "weighted_f1": float((f1 * support).sum() / max(support.sum(), 1)),
        "macro_f1": float(f1[seen].mean()) if seen.any() else 0.0,
    }


def summary(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Accuracy, weighted F1 and macro F1 of integer class ids: the numbers compared everywhere."""
    n = int(max(np.max(y_true, initial=0), np.max(y_pred, initial=0))) + 1
    return _summary(confusion(y_true, y_pred, n))


def log_loss(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Mean negative log probability of the true class (clipped at 1e-15, as scikit-learn does); for multi-label
    targets ((rows, labels) of 0/1), the binary cross-entropy averaged over every row and label."""
    if np.ndim(y_true) == 2:
        p, y = np.clip(np.asarray(probs, dtype=np.float64), 1e-15, 1 - 1e-15), np.asarray(y_true, dtype=bool)
        return float(-np.where(y, np.log(p), np.log1p(-p)).mean())
    return float(-np.log(np.clip(probs[np.arange(len(y_true)), y_true], 1e-15, 1.0)).mean())


# ---------------------------------------------------------------------------------------------------------------------
# Multi-label: targets and predictions are (rows, labels) arrays of 0/1; scikit-learn's definitions, zero_division=0


def multilabel_per_label(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per label: precision, recall, F1, support, and the true positives and predicted counts behind them."""
    y, p = np.asarray(y_true, dtype=bool), np.asarray(y_pred, dtype=bool)
    tp, support, called = (y & p).sum(0).astype(float), y.sum(0), p.sum(0)
    zeros = np.zeros(y.shape[1])
    precision = np.divide(tp, called, out=zeros.copy(), where=called > 0)
    recall = np.divide(tp, support, out=zeros.copy(), where=support > 0)
    f1 = np.divide(2 * tp, support + called, out=zeros.copy(), where=support + called > 0)
    return precision, recall, f1, support, tp, called


def multilabel_summary(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """micro, macro (every label the same), weighted (by support) and samples (per row) F1, and accuracy (the whole
    set right) of 0/1 multi-label predictions."""
    y, p = np.asarray(y_true, dtype=bool), np.asarray(y_pred, dtype=bool)
    _, _, f1, support, tp, called = multilabel_per_label(y, p)
    row_tp, row_n = (y & p).sum(1), y.sum(1) + p.sum(1)
    return {
        "micro_f1": float(2 * tp.sum() / max(support.sum() + called.sum(), 1)),
        "macro_f1": float(f1.mean()) if len(f1) else 0.0,
        "weighted_f1": float((f1 * support).sum() / max(support.sum(), 1)),
        "samples_f1": float(np.divide(2 * row_tp, row_n, out=np.zeros(len(y)), where=row_n > 0).mean())
        if len(y)
        else 0.0,
        "accuracy": float((y == p).all(1).mean()) if len(y) else 0.0,
    }


def average_precision(hit: np.ndarray, score: np.ndarray) -> float:
    """scikit-learn's average_precision_score of one label (0 without a positive): precision at each distinct score,
    weighted by the recall it adds."""
    hit, score = np.asarray(hit, dtype=bool), np.asarray(score, dtype=np.float64)
    if not hit.any():
        return 0.0
    order = np.argsort(-score, kind="stable")
    hit, score = hit[order], score[order]
    last = np.r_[score[1:] != score[:-1], True]  # a threshold takes every row of equal score at once
    tp, k = np.cumsum(hit)[last], np.arange(1, len(hit) + 1)[last]
    recall_gain = np.diff(np.r_[0, tp]) / hit.sum()
    return float((recall_gain * tp / k).sum())


def mean_average_precision(y_true: np.ndarray, probs: np.ndarray) -> float:
    """The mean over labels with at least one positive row of each label's average precision (0 without any)."""
    y, probs = np.asarray(y_true, dtype=bool), np.asarray(probs)
    aps = [average_precision(y[:, j], probs[:, j]) for j in range(y.shape[1]) if y[:, j].any()]
    return float(np.mean(aps)) if aps else 0.0


def multilabel_report(y_true: np.ndarray, y_pred: np.ndarray, probs: np.ndarray, labels: list[str]) -> dict:
    """``multilabel_summary``, map, and per label its precision, recall, F1, support and average precision."""
    y = np.asarray(y_true, dtype=bool)
    precision, recall, f1, support, _, _ = multilabel_per_label(y, y_pred)
    report = multilabel_summary(y, y_pred)
    report["map"] = mean_average_precision(y, probs)
    report["n"] = int(len(y))
    report["per_label"] = {
        name: {
            "precision": float(precision[j]),
            "recall": float(recall[j]),
            "f1": float(f1[j]),
            "support": int(support[j]),
            "average_precision": average_precision(y[:, j], np.asarray(probs)[:, j]),
        }
        for j, name in enumerate(labels)
    }
    report["labels"] = labels
    return report


def write_multilabel_report(report: dict, out_dir: Path) -> None:
    """metrics.json and per_label.csv (precision, recall, F1, support, average precision, threshold per label)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(report, indent=2))
    thresholds = report.get("thresholds", {})
    with open(out_dir / "per_label.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["label", "precision", "recall", "f1", "support", "average_precision", "threshold"])
        for name, r in report["per_label"].items():
            cells = [r["precision"], r["recall"], r["f1"], r["support"], r["average_precision"]]
            w.writerow([name, *cells, thresholds.get(name, "")])


def _half(y_true: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """A multi-label summary at the fixed threshold 0.5: what --metric compares across epochs and members, before
    the per-label thresholds are chosen."""
    return multilabel_summary(y_true, np.asarray(probs) >= 0.5)


@dataclass(frozen=True)
class Metric:
    """A score --metric can optimise: what selection, best-epoch choice and search compare."""

    fn: Callable[[np.ndarray, np.ndarray], float]
    """(class ids, (rows, classes) probabilities) -> the score."""
    higher_is_better: bool
    title: str
    """How printed lines name it."""


_METRICS: dict[str, Metric] = {}


def register_metric(name: str, higher_is_better: bool, title: str):
    """Registers ``fn(y_true, probs) -> float`` under ``name``, a name in ``config.METRICS`` (which --metric accepts;
    this base module may not import config: tests/test_imbalance_metric.py checks the two agree)."""

    def add(fn):
        _METRICS[name] = Metric(fn, higher_is_better, title)
        return fn

    return add


# Multi-label targets ((rows, labels) of 0/1) are scored at a threshold of 0.5 on each label's probability.
@register_metric("weighted_f1", True, "weighted F1")
def weighted_f1(y_true: np.ndarray, probs: np.ndarray) -> float:
    if np.ndim(y_true) == 2:
        return _half(y_true, probs)["weighted_f1"]
    return summary(y_true, probs.argmax(1))["weighted_f1"]


@register_metric("macro_f1", True, "macro F1")
def macro_f1(y_true: np.ndarray, probs: np.ndarray) -> float:
    if np.ndim(y_true) == 2:
        return _half(y_true, probs)["macro_f1"]
    return summary(y_true, probs.argmax(1))["macro_f1"]


@register_metric("accuracy", True, "accuracy")
def accuracy(y_true: np.ndarray, probs: np.ndarray) -> float:
    if np.ndim(y_true) == 2:
        return _half(y_true, probs)["accuracy"]
    return summary(y_true, probs.argmax(1))["accuracy"]


@register_metric("micro_f1", True, "micro F1")
def micro_f1(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Multi-label: F1 over every (row, label) decision at once, at a threshold of 0.5."""
    if np.ndim(y_true) != 2:
        raise ValueError("micro_f1 scores multi-label targets, (rows, labels) of 0/1")
    return _half(y_true, probs)["micro_f1"]


@register_metric("map", True, "mAP")
def map_score(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Multi-label: the mean over labels of their average precision (``mean_average_precision``)."""
    if np.ndim(y_true) != 2:
        raise ValueError("map scores multi-label targets, (rows, labels) of 0/1")
    return mean_average_precision(y_true, probs)


register_metric("log_loss", False, "log loss")(log_loss)


def minority(y_true: np.ndarray) -> int:
    """The class id (0 or 1) with fewer rows in ``y_true``; on a tie, 1 (the second label in sorted order)."""
    counts = np.bincount(np.asarray(y_true), minlength=2)
    return 0 if counts[0] < counts[1] else 1


def _positive_scores(y_true: np.ndarray, probs: np.ndarray, positive: int | None) -> tuple[np.ndarray, np.ndarray]:
    if probs.shape[1] != 2:
        raise ValueError(f"roc_auc and pr_auc score two classes, not {probs.shape[1]}")
    positive = minority(y_true) if positive is None else positive
    return (np.asarray(y_true) == positive).astype(int), probs[:, positive]


@register_metric("roc_auc", True, "ROC AUC")
def roc_auc(y_true: np.ndarray, probs: np.ndarray, positive: int | None = None) -> float:
    """Area under the ROC curve of the positive class's probability (0.5, chance, when only one class is present)."""
    from sklearn.metrics import roc_auc_score  # deferred: sklearn.metrics costs 2 s to import (module docstring)

    hit, p = _positive_scores(y_true, probs, positive)
    return float(roc_auc_score(hit, p)) if 0 < hit.sum() < len(hit) else 0.5


@register_metric("pr_auc", True, "PR AUC")
def pr_auc(y_true: np.ndarray, probs: np.ndarray, positive: int | None = None) -> float:
    """Average precision of the positive class (default: the minority class of ``y_true``); 0 without a positive."""
    from sklearn.metrics import average_precision_score  # deferred: as in roc_auc

    hit, p = _positive_scores(y_true, probs, positive)
    return float(average_precision_score(hit, p)) if hit.any() else 0.0


def metric(name: str) -> Metric:
    """The registered metric ``name`` (``config.TrainConfig`` checks --metric against ``config.METRICS``)."""
    return _METRICS[name]


def score(name: str, y_true: np.ndarray, probs: np.ndarray, positive: int | None = None) -> float:
    """The metric ``name`` of ``probs`` against the class ids ``y_true``; ``positive``: a binary run's positive class
    id, for the metrics of one class (roc_auc, pr_auc; default: the minority class of ``y_true``)."""
    if name in ("roc_auc", "pr_auc"):
        return float(_METRICS[name].fn(np.asarray(y_true), np.asarray(probs), positive))
    return float(_METRICS[name].fn(np.asarray(y_true), np.asarray(probs)))


def ranked(name: str, value: float) -> float:
    """``value`` of the metric ``name`` turned so that higher is always better (a loss negated), for comparisons."""
    return value if _METRICS[name].higher_is_better else -value


def bootstrap_interval(
    y_true: np.ndarray, y_pred: np.ndarray, n: int = 1000, level: float = 0.95, seed: int = 0
) -> dict[str, float]:
    """A percentile bootstrap interval of weighted F1 over the rows: how far the score of another sample of this
    size could fall. On 79 validation rows it spans about ±0.05, which a single score hides."""
    rng = np.random.default_rng(seed)
    k = int(max(np.max(y_true, initial=0), np.max(y_pred, initial=0))) + 1
    scores = []
    for _ in range(n):
        idx = rng.integers(0, len(y_true), len(y_true))
        scores.append(_summary(confusion(y_true[idx], y_pred[idx], k))["weighted_f1"])
    low, high = np.quantile(scores, [(1 - level) / 2, (1 + level) / 2])
    return {"weighted_f1_low": float(low), "weighted_f1_high": float(high), "level": level, "n": int(len(y_true))}


def full_report(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str]) -> dict:
    """The summary plus per-class precision/recall/F1/support and the confusion matrix (rows: true)."""
    cm = confusion(y_true, y_pred, len(labels))
    p, r, f, s = _per_class(cm)
    report = _summary(cm)
    report["n"] = int(len(y_true))
    report["per_class"] = {
        name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
        for i, name in enumerate(labels)
    }
    report["confusion_matrix"] = cm.tolist()
    report["labels"] = labels
    return report


ECE_BINS = 15  # Guo et al. (2017), "On Calibration of Modern Neural Networks": 15 equal-width bins


def reliability(
    probs: np.ndarray, y_true: np.ndarray, bins: int = ECE_BINS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width bin of the top-1 confidence (bin i holds (i/bins, (i+1)/bins]): the mean confidence, the
    accuracy and the row count (empty bins hold 0, 0, 0).

    For multi-label targets ((rows, labels) of 0/1) every (row, label) pair is one binary prediction: binned by the
    label's probability, its "accuracy" the share of the bin's pairs whose label is in the row's set. Pooled over the
    labels rather than averaged per label: a rare label's few held-out positives would leave its own bins nearly
    empty, and its ECE noise."""
    probs, y_true = np.asarray(probs, dtype=np.float64), np.asarray(y_true)
    if y_true.ndim == 2:
        confidence, correct = probs.ravel(), y_true.ravel().astype(np.float64)
    else:
        confidence, correct = probs.max(1), (probs.argmax(1) == y_true).astype(np.float64)
    which = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    mean_conf = np.bincount(which, confidence, minlength=bins) / np.maximum(count, 1)
    accuracy = np.bincount(which, correct, minlength=bins) / np.maximum(count, 1)
    return mean_conf, accuracy, count


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE: the row-weighted mean gap between accuracy and confidence over equal-width bins of the top-1
    probability (0: a confidence of 0.8 is right 80% of the time)."""
    mean_conf, accuracy, count = reliability(probs, y_true, bins)
    return float((count * np.abs(accuracy - mean_conf)).sum() / max(count.sum(), 1))


def plot_reliability(curves: dict[str, np.ndarray], y_true: np.ndarray, path: Path, bins: int = ECE_BINS) -> None:
    """A reliability diagram: accuracy against confidence per bin for each of ``curves`` (name: probabilities),
    with the diagonal a calibrated model would follow."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="calibrated")
    for name, probs in curves.items():
        mean_conf, accuracy, count = reliability(probs, y_true, bins)
        seen = count > 0  # an empty bin has no accuracy to draw
        ece = expected_calibration_error(probs, y_true, bins)
        ax.plot(mean_conf[seen], accuracy[seen], marker="o", label=f"{name} (ECE {ece:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    if np.ndim(y_true) == 2:  # multi-label: every (row, label) pair, by the label's probability
        ax.set_xlabel("a label's probability")
        ax.set_ylabel("share of (row, label) pairs with the label")
        ax.set_title(f"{len(y_true)} rows x {np.shape(y_true)[1]} labels, {bins} bins of probability", fontsize=9)
    else:
        ax.set_xlabel("confidence (top-1 probability)")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{len(y_true)} rows, {bins} bins of confidence", fontsize=9)
    ax.legend(loc="best", fontsize=8)  # away from the curves: over-confident ones run low right, unsure ones high left
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.11, top=0.93)
    _save(fig, path)


def write_report(report: dict, out_dir: Path) -> None:
    """metrics.json, confusion_matrix.csv and confusion_matrix.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(report, indent=2))
    labels, cm = report["labels"], report["confusion_matrix"]
    with open(out_dir / "confusion_matrix.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["true \\ predicted", *labels])
        w.writerows([labels[i], *row] for i, row in enumerate(cm))
    plot_confusion(np.array(cm), labels, out_dir / "confusion_matrix.png")


def _plt():
    # deferred: matplotlib takes a second to import, and only plots need it
    import matplotlib

    matplotlib.use("Agg")  # files only: never open a window, never need a display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    # Fast zlib: PNG compression was a tenth of each plot's time, and the files stay small.
    fig.savefig(path, dpi=110, pil_kwargs={"compress_level": 1})
    _plt().close(fig)


def plot_confusion(cm: np.ndarray, labels: list[str], path: Path) -> None:
    plt = _plt()
    size = max(4.0, 0.45 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    if len(labels) <= 30:
        for i in range(len(labels)):
            for j in range(len(labels)):
                if cm[i, j]:
                    ax.text(
                        j,
                        i,
                        int(cm[i, j]),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black",
                    )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of true class")
    fig.tight_layout()
    _save(fig, path)


def plot_history(history: list[dict], path: Path) -> None:
    plt = _plt()
    from matplotlib.ticker import MaxNLocator  # deferred with matplotlib itself (_plt)

    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(epochs, [h["train_loss"] for h in history], label="train")
    validated = "val_loss" in history[0]  # a refit on every row has no validation
    if validated:
        a.plot(epochs, [h["val_loss"] for h in history], label="validation")
    a.set_xlabel("epoch")
    a.set_ylabel("cross-entropy")
    a.legend()
    if validated:
        b.plot(epochs, [h["val_weighted_f1"] for h in history], label="weighted F1")
        if "val_macro_f1" in history[0]:  # a history given by hand may hold only the two above
            b.plot(epochs, [h["val_macro_f1"] for h in history], label="macro F1")
        b.plot(epochs, [h["val_accuracy"] for h in history], label="accuracy")
    b.set_xlabel("epoch")
    b.set_ylim(0, 1)
    for ax in (a, b):  # an epoch is a whole number: 1, 2, 3, never the 1.25 and 1.5 matplotlib picks for few epochs
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if validated:
        b.legend()
    # Fixed margins (the labels are fixed): tight_layout draws the figure once more, a third of this plot's time.
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.13, top=0.96, wspace=0.22)
    _save(fig, path)


def plot_bars(results: dict[str, dict], path: Path, title: str = "modality ablation") -> None:
    plt = _plt()
    names = list(results)
    fig, ax = plt.subplots(figsize=(2.0 * len(names) + 2, 4))
    x = np.arange(len(names))
    for k, metric in enumerate(("accuracy", "weighted_f1", "macro_f1")):
        vals = [results[n][metric] for n in names]
        bars = ax.bar(x + (k - 1) * 0.27, vals, 0.27, label=metric.replace("_", " "))
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set_xticks(x, names)
    ax.set_ylim(0, 1.08)
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    _save(fig, path)


def plot_roc(hit: np.ndarray, p: np.ndarray, path: Path, positive: str) -> None:
    """The ROC curve of the positive class's probability ``p`` against whether each row is positive (``hit``)."""
    from sklearn.metrics import roc_curve  # deferred: as in roc_auc

    fpr, tpr, _ = roc_curve(hit, p)
    _curve(
        fpr,
        tpr,
        path,
        "false positive rate",
        "true positive rate",
        f"ROC of {positive} (AUC {roc_auc(hit, np.stack([1 - p, p], 1), 1):.3f})",
        diagonal=True,
    )


def plot_pr(hit: np.ndarray, p: np.ndarray, path: Path, positive: str) -> None:
    """The precision-recall curve of the positive class; the dotted line is the positive rate (a random ranking)."""
    from sklearn.metrics import precision_recall_curve  # deferred: as in roc_auc

    precision, recall, _ = precision_recall_curve(hit, p)
    ap = pr_auc(hit, np.stack([1 - p, p], 1), 1)
    _curve(
        recall,
        precision,
        path,
        "recall",
        "precision",
        f"precision-recall of {positive} (AP {ap:.3f})",
        base=float(np.mean(hit)),
    )


def _curve(x, y, path: Path, xlabel: str, ylabel: str, title: str, diagonal=False, base=None) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 5))
    if diagonal:
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    if base is not None:
        ax.axhline(base, color="grey", linestyle=":")
    ax.plot(x, y)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.11, top=0.93)
    _save(fig, path)
