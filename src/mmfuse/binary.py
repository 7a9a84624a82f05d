"""Binary tasks: a positive class, and the threshold on its probability that turns probabilities into labels.

    mmfuse train DATA --out RUN                          # two classes: the minority one is positive, threshold auto
    mmfuse train DATA --out RUN --positive fraud --threshold 0.3

With two classes the threshold that maximises the positive class's F1 is rarely 0.5 (argmax): on rare positives it
is lower. ``choose_threshold`` picks it on held-out probabilities (a single run's validation rows, a bag's or an
ensemble's out-of-fold rows), after calibration when there is one, and RUN/threshold.json (``write_decision``)
records it with the positive label; ``read_decision`` and ``predicted`` apply it wherever probabilities become
labels (predict, evaluate, serve, the ONNX backend). A run without threshold.json (multiclass, or trained before)
predicts the argmax. Pure numpy: no torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmfuse import metrics
from mmfuse.errors import MmfuseError

THRESHOLD_FILE = "threshold.json"  # in a binary run's directory (rundir.layout.RUN_FILES lists it)


@dataclass(frozen=True)
class Decision:
    """How a binary run turns probabilities into labels."""

    positive: str
    """The positive class's label."""
    threshold: float
    """Predict ``positive`` when its probability is at least this."""


def choose_threshold(p: np.ndarray, hit: np.ndarray) -> float:
    """The threshold on the positive probabilities ``p`` that maximises F1 on the rows whose truth is ``hit``
    (True: positive), predicting positive where ``p >= t``. Each cut between two distinct probabilities is a
    candidate, placed halfway between them so that new rows near either side fall as the held-out ones did; ties go
    to the cut that calls fewest rows positive. 0.5 when there is no positive row to find."""
    p, hit = np.asarray(p, dtype=np.float64), np.asarray(hit, dtype=bool)
    if not hit.any():
        return 0.5
    order = np.argsort(-p, kind="stable")
    p, hit = p[order], hit[order]
    tp = np.cumsum(hit)
    last = np.r_[p[1:] != p[:-1], True]  # a cut falls only after the last of equal probabilities
    k = np.arange(1, len(p) + 1)
    f1 = np.where(last, 2 * tp / (k + hit.sum()), -1.0)
    cut = int(np.argmax(f1))
    return float((p[cut] + p[cut + 1]) / 2) if cut + 1 < len(p) else float(p[cut])


def predicted(probs: np.ndarray, classes: list[str], decision: Decision | None) -> np.ndarray:
    """Class ids of ``probs`` (N, classes): the positive class where its probability reaches the threshold, the
    other elsewhere; the argmax without a decision."""
    probs = np.asarray(probs)
    if decision is None:
        return probs.argmax(1)
    pos = classes.index(decision.positive)
    return np.where(probs[:, pos] >= decision.threshold, pos, 1 - pos)


def labels(probs: np.ndarray, classes: list[str], decision: Decision | None) -> list[str]:
    """The predicted label of each row of ``probs`` (``predicted``'s ids as names)."""
    return [classes[i] for i in predicted(probs, classes, decision)]


def resolve_positive(labels: list[str], counts: dict[str, int], asked: str | None) -> str | None:
    """The positive class of data with ``labels`` (sorted) and ``counts`` rows each: ``asked`` (``--positive``), or
    the minority class (a tie: the second label); None for more than two classes.

    Raises:
        MmfuseError: ``asked`` not a label of the data, or given for more than two classes.
    """
    if len(labels) != 2:
        if asked is not None:
            raise MmfuseError(
                f"--positive names the positive class of a binary task; this data has {len(labels)} classes "
                f"({', '.join(labels[:5])}{', ...' if len(labels) > 5 else ''}): leave --positive out."
            )
        return None
    if asked is not None and asked not in labels:
        raise MmfuseError(
            f"--positive {asked!r} is not a class of the data; the two classes are {labels[0]!r} and {labels[1]!r}"
        )
    if asked is not None:
        return asked
    return labels[0] if counts.get(labels[0], 0) < counts.get(labels[1], 0) else labels[1]


def decide(probs: np.ndarray, y: np.ndarray, labels: list[str], positive: str, threshold: float | None) -> Decision:
    """The decision of a binary run from its held-out ``probs`` and class ids ``y``: the fixed ``threshold``, or
    (None: ``--threshold auto``) the one ``choose_threshold`` finds."""
    pos = labels.index(positive)
    if threshold is None:
        threshold = choose_threshold(np.asarray(probs)[:, pos], np.asarray(y) == pos)
    return Decision(positive, float(threshold))


def report(y: np.ndarray, probs: np.ndarray, labels: list[str], decision: Decision) -> dict:
    """roc_auc, pr_auc and the positive class's F1 at the threshold, with the positive label and the threshold."""
    pos = labels.index(decision.positive)
    pred = predicted(probs, labels, decision)
    hit, called = np.asarray(y) == pos, pred == pos
    f1 = 2 * (hit & called).sum() / max(hit.sum() + called.sum(), 1)
    return {
        "roc_auc": metrics.roc_auc(np.asarray(y), np.asarray(probs), pos),
        "pr_auc": metrics.pr_auc(np.asarray(y), np.asarray(probs), pos),
        "positive_f1": float(f1),
        "positive": decision.positive,
        "threshold": decision.threshold,
    }


def plot(y: np.ndarray, probs: np.ndarray, labels: list[str], decision: Decision, out_dir: Path) -> None:
    """roc.png and pr.png of the positive class into ``out_dir``."""
    pos = labels.index(decision.positive)
    hit, p = (np.asarray(y) == pos).astype(int), np.asarray(probs)[:, pos]
    if 0 < hit.sum() < len(hit):  # a curve needs rows of both classes
        metrics.plot_roc(hit, p, out_dir / "roc.png", decision.positive)
        metrics.plot_pr(hit, p, out_dir / "pr.png", decision.positive)


def evaluate(
    y: np.ndarray, probs: np.ndarray, labels: list[str], decision: Decision | None, out_dir: Path | None
) -> dict:
    """What evaluate adds for a binary run: ``report``'s numbers, and roc.png and pr.png in ``out_dir`` (None: no
    plots, another process writes them); {} for a run without a decision."""
    if decision is None:
        return {}
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        plot(y, probs, labels, decision, Path(out_dir))
    return report(y, probs, labels, decision)


def write_decision(path: Path, decision: Decision, chosen: str, fitted_on: str) -> None:
    """RUN/threshold.json: the positive label, the threshold, how it was chosen (auto or fixed) and on which rows."""
    record = {"positive": decision.positive, "threshold": decision.threshold, "chosen": chosen, "fitted_on": fitted_on}
    Path(path).write_text(json.dumps(record, indent=2, ensure_ascii=False))


def read_decision(folder: str | Path, classes: list[str]) -> Decision | None:
    """The decision in the run ``folder``'s threshold.json; None without one (multiclass, or trained before).

    Raises:
        MmfuseError: a damaged threshold.json, or one naming a class the run does not predict.
    """
    path = Path(folder) / THRESHOLD_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        decision = Decision(str(raw["positive"]), float(raw["threshold"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MmfuseError(
            f"{path} is damaged ({e!r}); train the run again, or delete it to predict the argmax."
        ) from None
    if len(classes) != 2 or decision.positive not in classes:
        raise MmfuseError(f"{path} names the positive class {decision.positive!r}, not one of the run's two classes")
    return decision
