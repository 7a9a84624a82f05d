"""Multi-label tasks: each row a set of labels, a sigmoid per label, and per-label thresholds that turn probabilities
into sets.

    mmfuse train items.csv --out RUN --tune text          # a labels column (cells such as cat|dog) makes it multi-label
    mmfuse train items.csv --out RUN --label-sep ';'      # or the label column, split on ;
    mmfuse predict RUN new.csv --out preds.csv            # labels (the set, joined by |) and p_<label> per label

The head's logits are trained with a binary cross-entropy per label. A label's probability rarely suits a cut at 0.5
(rare labels want lower ones), so ``choose_thresholds`` picks one per label, maximising that label's F1 on held-out
probabilities (a single run's validation rows, a bag's out-of-fold rows), and RUN/thresholds.json
(``write_thresholds``) records them; ``read_thresholds`` and ``predicted`` apply them wherever probabilities become
sets (predict, evaluate, serve, the ONNX backend). Pure numpy: no torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmfuse import metrics
from mmfuse.binary import choose_threshold
from mmfuse.data.records import LABEL_SEP, Record, label_names
from mmfuse.errors import MmfuseError

THRESHOLDS_FILE = "thresholds.json"  # in a multi-label run's directory (rundir.layout.RUN_FILES lists it)
DEFAULT_THRESHOLD = 0.5


@dataclass(frozen=True)
class Thresholds:
    """How a multi-label run turns its per-label probabilities into a set."""

    values: tuple[float, ...]
    """One per label, in the run's label order: a label is in the set when its probability reaches its threshold."""

    @classmethod
    def half(cls, n: int) -> Thresholds:
        return cls((DEFAULT_THRESHOLD,) * n)


def targets(records: list[Record], labels: list[str]) -> np.ndarray:
    """(rows, labels) float32 of 0/1: which of ``labels`` each record's set holds."""
    index = {name: j for j, name in enumerate(labels)}
    y = np.zeros((len(records), len(labels)), dtype=np.float32)
    for i, r in enumerate(records):
        for name in label_names(r):
            y[i, index[name]] = 1.0
    return y


def choose_thresholds(probs: np.ndarray, y: np.ndarray) -> Thresholds:
    """Per label, the threshold maximising its F1 on the held-out ``probs`` against the 0/1 targets ``y``
    (``binary.choose_threshold``; 0.5 for a label without a positive row)."""
    probs, y = np.asarray(probs), np.asarray(y, dtype=bool)
    return Thresholds(tuple(choose_threshold(probs[:, j], y[:, j]) for j in range(probs.shape[1])))


def thresholds_at(probs: np.ndarray, y: np.ndarray, cut: str | float) -> Thresholds:
    """The thresholds a --threshold value ``cut`` gives: chosen on ``probs`` against ``y`` ("auto"), or one fixed
    probability for every label."""
    if cut == "auto":
        return choose_thresholds(probs, y)
    return Thresholds((float(cut),) * np.shape(probs)[1])


def predicted(probs: np.ndarray, thresholds: Thresholds | None) -> np.ndarray:
    """(rows, labels) bool: each label's probability against its threshold (0.5 without thresholds)."""
    probs = np.asarray(probs)
    cut = np.full(probs.shape[1], DEFAULT_THRESHOLD) if thresholds is None else np.asarray(thresholds.values)
    return probs >= cut


def label_sets(probs: np.ndarray, classes: list[str], thresholds: Thresholds | None) -> list[list[str]]:
    """The predicted set of each row, in label order (possibly empty)."""
    return [[classes[j] for j in np.flatnonzero(row)] for row in predicted(probs, thresholds)]


def joined(names) -> str:
    """A set as one string, as predictions and reports write it."""
    return LABEL_SEP.join(names)


def report(y: np.ndarray, probs: np.ndarray, labels: list[str], thresholds: Thresholds) -> dict:
    """``metrics.multilabel_report`` at the thresholds, which it lists by label."""
    out = metrics.multilabel_report(y, predicted(probs, thresholds), probs, labels)
    out["thresholds"] = dict(zip(labels, thresholds.values))
    return out


def write_thresholds(path: Path, labels: list[str], thresholds: Thresholds, chosen: str, fitted_on: str) -> None:
    """RUN/thresholds.json: each label's threshold, how they were chosen and on which rows."""
    record = {"thresholds": dict(zip(labels, thresholds.values)), "chosen": chosen, "fitted_on": fitted_on}
    Path(path).write_text(json.dumps(record, indent=2, ensure_ascii=False))


def read_thresholds(folder: str | Path, classes: list[str]) -> Thresholds:
    """The thresholds in the run ``folder``'s thresholds.json; 0.5 for each label without one.

    Raises:
        MmfuseError: a damaged thresholds.json, or one naming labels the run does not predict.
    """
    path = Path(folder) / THRESHOLDS_FILE
    if not path.is_file():
        return Thresholds.half(len(classes))
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))["thresholds"]
        values = {str(k): float(v) for k, v in raw.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise MmfuseError(f"{path} is damaged ({e!r}); train the run again, or delete it to cut at 0.5.") from None
    unknown = sorted(set(values) - set(classes))
    if unknown:
        raise MmfuseError(f"{path} names label(s) {unknown} that the run does not predict (its labels.json)")
    return Thresholds(tuple(values.get(c, DEFAULT_THRESHOLD) for c in classes))
