"""Ensemble selection (Caruana et al., 2004, as AutoGluon's weighted ensemble does it), on out-of-fold probabilities.

Greedy forward selection with replacement: start from the best single member; at each of up to ``steps`` steps add
the member (again, if it is already in) whose addition scores best; the weights are the times each was picked over
the picks. The ensemble kept is the best of all steps, so its out-of-fold score is never below its best member's.
Scores compare the metric (``--metric``, a name in ``metrics``' registry; weighted F1 by default) first and log loss
second; a tie goes to the member listed earlier (the portfolio lists them cheapest first). Pure numpy: no training, no
torch.

Multi-label (``cut``): a blend's per-label probabilities are turned into sets the way the finished ensemble will turn
them, at per-label thresholds chosen on the blend itself ("auto") or at a fixed one, before its F1 is scored. Scored at
0.5 instead, selection favoured the blends whose probabilities happened to suit 0.5, not the ones that rank best, and
the ensemble lost to the logistic-regression probe on the visible multi-label set (bench/RESULTS.md).

    from mmfuse.training.selection import select, blend
    chosen = select([oof_a, oof_b, oof_c], y)       # each (rows, classes) out-of-fold probabilities
    chosen = select([oof_a, oof_b, oof_c], y, metric="macro_f1")
    probs = blend([p_a, p_b, p_c], chosen.weights)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mmfuse import metrics, multilabel
from mmfuse.metrics import log_loss

STEPS = 50  # AutoGluon's default ensemble size; the best step is kept, so more only costs time


@dataclass
class Selection:
    weights: np.ndarray
    """One weight per member, summing to 1 (0: not chosen)."""
    weighted_f1: float
    """The ensemble's out-of-fold weighted F1."""
    log_loss: float
    """The ensemble's out-of-fold log loss (the tie-break)."""
    member_scores: list[tuple[float, float]]
    """Each member's own (metric, log loss) out of fold."""
    metric: str = "weighted_f1"
    """What the selection maximised (then the lower log loss)."""
    score: float = 0.0
    """The ensemble's out-of-fold ``metric``."""


# Multi-label metrics of the predicted sets, which a cut decides; map and log_loss read the probabilities alone.
SET_METRICS = ("micro_f1", "macro_f1", "weighted_f1", "accuracy")


def score(
    y: np.ndarray,
    probs: np.ndarray,
    metric: str = "weighted_f1",
    positive: int | None = None,
    cut: str | float | None = None,
) -> tuple[float, float]:
    """(``metric``, log loss) of ``probs`` against the class ids ``y`` (``positive``: a binary run's positive id).

    ``cut``, multi-label only: the sets are the labels whose probability reaches per-label thresholds chosen on
    ``probs`` against ``y`` ("auto") or a fixed threshold (a float); None scores at 0.5."""
    if cut is None or metric not in SET_METRICS:
        return metrics.score(metric, y, probs, positive), log_loss(y, probs)
    return metrics.multilabel_summary(y, label_sets(y, probs, cut))[metric], log_loss(y, probs)


def label_sets(y: np.ndarray, probs: np.ndarray, cut: str | float) -> np.ndarray:
    """(rows, labels) bool: multi-label ``probs`` as sets at ``cut`` (``score``), thresholds chosen against ``y``."""
    return multilabel.predicted(probs, multilabel.thresholds_at(probs, y, cut))


def _better(a: tuple[float, float], b: tuple[float, float] | None, metric: str = "weighted_f1") -> bool:
    """Whether score ``a`` beats ``b``: a better ``metric``, then lower log loss; a tie is not better."""
    if b is None:
        return True
    x, z = metrics.ranked(metric, a[0]), metrics.ranked(metric, b[0])
    return x > z or (x == z and a[1] < b[1])


def select(
    oof: Sequence[np.ndarray],
    y: np.ndarray,
    steps: int = STEPS,
    metric: str = "weighted_f1",
    positive: int | None = None,
    cut: str | float | None = None,
) -> Selection:
    """Weights for ``oof`` (one (rows, classes) array of out-of-fold probabilities per member, in the portfolio's
    order) chosen greedily to score best on ``y`` by ``metric`` (a name in ``metrics``' registry), then log loss;
    ``cut``: how a multi-label blend becomes sets before it is scored (``score``)."""
    if not oof:
        raise ValueError("ensemble selection needs at least one member")
    oof = [np.asarray(p, dtype=np.float64) for p in oof]
    y = np.asarray(y)
    own = [score(y, p, metric, positive, cut) for p in oof]
    first = 0
    for i, s in enumerate(own):
        if _better(s, own[first], metric):
            first = i
    counts = np.zeros(len(oof), dtype=np.int64)
    counts[first] = 1
    total = oof[first].copy()
    best_counts, best = counts.copy(), own[first]
    for _ in range(steps - 1):
        n = counts.sum() + 1
        pick, pick_score = None, None
        for i, p in enumerate(oof):
            s = score(y, (total + p) / n, metric, positive, cut)
            if _better(s, pick_score, metric):
                pick, pick_score = i, s
        counts[pick] += 1
        total += oof[pick]
        if _better(pick_score, best, metric):
            best_counts, best = counts.copy(), pick_score
    weights = best_counts / best_counts.sum()
    f1 = best[0] if metric == "weighted_f1" else score(y, blend(oof, weights), "weighted_f1", positive, cut)[0]
    return Selection(weights, f1, best[1], own, metric, best[0])


def blend(probs: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """The weighted sum of the members' probabilities; members of weight 0 are not read (nor need to exist)."""
    out = None
    for p, w in zip(probs, weights):
        if w > 0:
            out = w * np.asarray(p, dtype=np.float64) if out is None else out + w * np.asarray(p, dtype=np.float64)
    if out is None:
        raise ValueError("every weight is 0: an ensemble needs a member of positive weight")
    return out.astype(np.float32)
