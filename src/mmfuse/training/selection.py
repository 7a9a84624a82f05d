"""Ensemble selection (Caruana et al., 2004, as AutoGluon's weighted ensemble does it), on out-of-fold probabilities.

Greedy forward selection with replacement: start from the best single member; at each of up to ``steps`` steps add
the member (again, if it is already in) whose addition scores best; the weights are the times each was picked over
the picks. The ensemble kept is the best of all steps, so its out-of-fold score is never below its best member's.
Scores compare weighted F1 first and log loss second; a tie goes to the member listed earlier (the portfolio lists
them cheapest first). Pure numpy: no training, no torch.

    from mmfuse.training.selection import select, blend
    chosen = select([oof_a, oof_b, oof_c], y)       # each (rows, classes) out-of-fold probabilities
    probs = blend([p_a, p_b, p_c], chosen.weights)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mmfuse import metrics

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
    """Each member's own (weighted F1, log loss) out of fold."""


def log_loss(y: np.ndarray, probs: np.ndarray) -> float:
    """Mean negative log probability of the true class (clipped at 1e-15, as scikit-learn does)."""
    return float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-15, 1.0)).mean())


def score(y: np.ndarray, probs: np.ndarray) -> tuple[float, float]:
    """(weighted F1, log loss) of ``probs`` against the class ids ``y``."""
    return metrics.summary(y, probs.argmax(1))["weighted_f1"], log_loss(y, probs)


def _better(a: tuple[float, float], b: tuple[float, float] | None) -> bool:
    """Whether score ``a`` beats ``b``: higher weighted F1, then lower log loss; a tie is not better."""
    return b is None or a[0] > b[0] or (a[0] == b[0] and a[1] < b[1])


def select(oof: Sequence[np.ndarray], y: np.ndarray, steps: int = STEPS) -> Selection:
    """Weights for ``oof`` (one (rows, classes) array of out-of-fold probabilities per member, in the portfolio's
    order) chosen greedily to score best on ``y``."""
    if not oof:
        raise ValueError("ensemble selection needs at least one member")
    oof = [np.asarray(p, dtype=np.float64) for p in oof]
    y = np.asarray(y)
    own = [score(y, p) for p in oof]
    first = 0
    for i, s in enumerate(own):
        if _better(s, own[first]):
            first = i
    counts = np.zeros(len(oof), dtype=np.int64)
    counts[first] = 1
    total = oof[first].copy()
    best_counts, best = counts.copy(), own[first]
    for _ in range(steps - 1):
        n = counts.sum() + 1
        pick, pick_score = None, None
        for i, p in enumerate(oof):
            s = score(y, (total + p) / n)
            if _better(s, pick_score):
                pick, pick_score = i, s
        counts[pick] += 1
        total += oof[pick]
        if _better(pick_score, best):
            best_counts, best = counts.copy(), pick_score
    return Selection(best_counts / best_counts.sum(), best[0], best[1], own)


def blend(probs: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """The weighted sum of the members' probabilities; members of weight 0 are not read (nor need to exist)."""
    out = None
    for p, w in zip(probs, weights):
        if w > 0:
            out = w * np.asarray(p, dtype=np.float64) if out is None else out + w * np.asarray(p, dtype=np.float64)
    if out is None:
        raise ValueError("every weight is 0: an ensemble needs a member of positive weight")
    return out.astype(np.float32)
