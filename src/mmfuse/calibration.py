"""Temperature scaling (Guo et al., 2017): one scalar T > 0 that makes a run's probabilities mean what they say.

    mmfuse train DATA --out RUN --tune head --calibrate    # T fitted on the validation rows
    mmfuse train DATA --out RUN --bag 5 --calibrate        # on the out-of-fold rows (an ensemble's too)
    mmfuse train items.csv --out RUN --calibrate           # multi-label: sigmoid(logit p / T), one T for every label

``fit_temperature`` finds the T minimising the negative log-likelihood of softmax(log p / T) on held-out rows;
``scale`` applies it. On a single model's probabilities, log p is its logits less a per-row constant, so the result
is softmax(logits / T) exactly; on a bag's average or an ensemble's blend it is the temperature on their
log-probabilities, p ** (1 / T) renormalised. T changes no argmax: only the confidence moves.

A multi-label run's probabilities are a sigmoid per label (``y`` its (rows, labels) of 0/1): ``scale_sigmoids``
gives sigmoid(logit p / T), exactly sigmoid(logits / T) for a single model, and T minimises the binary cross-entropy
averaged over every row and label. One T serves every label: a per-label T would rest on a label's few held-out
positives (a handful for a rare label), where one shared T is fitted on all of them. T moves a label's probabilities
monotonically, so its ranking (mAP) stays, but the per-label thresholds are chosen after it, on the calibrated
probabilities. Pure numpy (and SciPy's scalar minimiser): no torch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmfuse import metrics

log = logging.getLogger(__name__)

TEMPERATURES = (0.05, 20.0)  # the search's bounds: beyond them the held-out rows are too few or too easy to tell
TINY = 1e-30  # a probability that underflowed to 0 in float32 still has a finite log


def _log_probs(probs: np.ndarray) -> np.ndarray:
    return np.log(np.clip(np.asarray(probs, dtype=np.float64), TINY, None))


def scale(probs: np.ndarray, temperature: float) -> np.ndarray:
    """``probs`` (N, classes) at ``temperature``: softmax(log probs / T), in float32; T = 1 returns them untouched."""
    if temperature == 1.0:
        return probs
    z = _log_probs(probs) / temperature
    z -= z.max(1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(1, keepdims=True)).astype(np.float32)


def scale_sigmoids(probs: np.ndarray, temperature: float) -> np.ndarray:
    """A multi-label run's ``probs`` (N, labels), each a sigmoid, at ``temperature``: sigmoid(logit p / T), in
    float32; T = 1 returns them untouched."""
    if temperature == 1.0:
        return probs
    # A sigmoid that reached 1.0 in float32 had a logit past about 16.6: taken as the largest float32 below 1.
    p = np.clip(np.asarray(probs, dtype=np.float64), TINY, float(np.nextafter(np.float32(1), np.float32(0))))
    z = (np.log(p) - np.log1p(-p)) / temperature
    return (1 / (1 + np.exp(-z))).astype(np.float32)


def scaled(probs: np.ndarray, temperature: float, multi_label: bool) -> np.ndarray:
    """``probs`` at ``temperature``: ``scale_sigmoids`` for a multi-label run's, else ``scale``."""
    return scale_sigmoids(probs, temperature) if multi_label else scale(probs, temperature)


def nll(probs: np.ndarray, y: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of the classes ``y`` under ``probs`` at ``temperature``; for multi-label targets
    ((rows, labels) of 0/1), the binary cross-entropy averaged over every row and label."""
    if np.ndim(y) == 2:
        return metrics.log_loss(y, scale_sigmoids(probs, temperature))
    z = _log_probs(probs) / temperature
    top = z.max(1, keepdims=True)
    log_norm = (top + np.log(np.exp(z - top).sum(1, keepdims=True)))[:, 0]
    return float((log_norm - z[np.arange(len(y)), y]).mean())


def fit_temperature(probs: np.ndarray, y: np.ndarray) -> float:
    """The T in ``TEMPERATURES`` minimising ``nll`` on held-out ``probs`` and their classes ``y`` (or multi-label
    0/1 targets).

    A bounded Brent search on log T: the NLL is convex in 1/T (a log-sum-exp of terms linear in it, less a linear
    term; for sigmoids, a sum of softplus terms linear in it), so it has one minimum along log T, which the search
    finds without a gradient or a starting guess."""
    from scipy.optimize import minimize_scalar  # deferred: SciPy takes a third of a second, and only training fits

    y = np.asarray(y)
    lo, hi = np.log(TEMPERATURES)
    found = minimize_scalar(lambda u: nll(probs, y, float(np.exp(u))), bounds=(lo, hi), method="bounded")
    temperature = float(np.exp(found.x))
    if not lo + 1e-3 < found.x < hi - 1e-3:
        log.warning(
            "calibration: the temperature reached its bound (%.3g): the %d held-out rows are too few, or all "
            "classified with the same confidence, to calibrate on well",
            temperature,
            len(y),
        )
    return temperature


@dataclass
class Calibration:
    """A fitted temperature and what it did on the rows it was fitted on."""

    temperature: float
    """T: probabilities are softmax(log p / T)."""
    fitted_on: str
    """validation (a single run's validation rows) or out-of-fold (a bag's or an ensemble's)."""
    probs: np.ndarray
    """The uncalibrated probabilities it was fitted on."""
    y: np.ndarray
    """Their true classes, or a multi-label run's (rows, labels) of 0/1."""

    @property
    def multi_label(self) -> bool:
        return np.ndim(self.y) == 2

    @property
    def calibrated(self) -> np.ndarray:
        return scaled(self.probs, self.temperature, self.multi_label)

    def report(self) -> dict:
        """What metrics.json holds under ``calibration`` and calibration.json holds whole. A multi-label run's ECE is
        over every (row, label) pair, each a binary prediction (``metrics.reliability``)."""
        extra = {"ece_over": "every (row, label) pair"} if self.multi_label else {}
        return {
            "temperature": self.temperature,
            "ece_before": metrics.expected_calibration_error(self.probs, self.y),
            "ece_after": metrics.expected_calibration_error(self.calibrated, self.y),
            "nll_before": nll(self.probs, self.y, 1.0),
            "nll_after": nll(self.probs, self.y, self.temperature),
            "fitted_on": self.fitted_on,
            "n": int(len(self.y)),
            "bins": metrics.ECE_BINS,
            **extra,
        }

    def plot(self, path: Path) -> None:
        """The reliability diagram before and after (reliability.png)."""
        curves = {"before (T = 1)": self.probs, f"after (T = {self.temperature:.2f})": self.calibrated}
        metrics.plot_reliability(curves, self.y, path)


def calibrate(probs: np.ndarray, y: np.ndarray, fitted_on: str) -> Calibration:
    """Fits the temperature on held-out ``probs`` (N, classes) and their classes ``y`` (or, for a multi-label run's
    sigmoids, their (N, labels) 0/1 targets)."""
    probs, y = np.asarray(probs, dtype=np.float32), np.asarray(y)
    return Calibration(fit_temperature(probs, y), fitted_on, probs, y)
