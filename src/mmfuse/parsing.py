"""The text forms of flag values that are more than one number or name: durations, class weights, thresholds.

Below ``config`` (which checks flags with them); standard library only.
"""

from __future__ import annotations

import math
import re

from mmfuse.errors import MmfuseError


def parse_class_weight(text: str) -> str | dict[str, float]:
    """``balanced``, or ``cat=2,dog=0.5`` as ``{"cat": 2.0, "dog": 0.5}``; whether the classes exist is checked
    against the data (``training.prep.class_weights``).

    Raises:
        MmfuseError: anything else, or a weight that is not a finite number > 0.
    """
    if text.strip() == "balanced":
        return "balanced"
    weights = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        try:
            weight = float(value) if sep and name.strip() else math.nan
        except ValueError:
            weight = math.nan
        if not 0 < weight < math.inf:  # NaN fails too
            raise MmfuseError(
                f"--class-weight must be balanced or per class as cat=2,dog=0.5 (weights > 0), got {text!r}"
            )
        if name.strip() in weights:
            raise MmfuseError(f"--class-weight names the class {name.strip()!r} twice")
        weights[name.strip()] = weight
    return weights


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(h|m|s)", re.IGNORECASE)


def parse_duration(text: str) -> float:
    """Seconds in a duration such as ``90``, ``90s``, ``5m``, ``1.5h`` or ``1h30m``.

    Raises:
        MmfuseError: text that is not a positive duration in that form.
    """
    text = str(text).strip()
    try:
        seconds = float(text)  # a bare number is seconds
    except ValueError:
        parts = _DURATION.findall(text)
        if not parts or _DURATION.sub("", text).strip():
            raise MmfuseError(
                f"--time-limit {text!r} is not a duration: write it as 90s, 5m, 1h30m or a number of seconds."
            ) from None
        seconds = sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u.lower()] for n, u in parts)
    if not 0 < seconds < math.inf:
        raise MmfuseError(f"--time-limit must be a positive duration (e.g. 90s, 5m), got {text!r}")
    return seconds


def parse_threshold(text: str) -> float | None:
    """``auto`` as None (chosen on held-out probabilities), or a probability strictly between 0 and 1.

    Raises:
        MmfuseError: anything else.
    """
    if str(text).strip() == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 < value < 1.0:  # NaN fails too
        raise MmfuseError(f"--threshold must be auto or a probability between 0 and 1 (exclusive), got {text!r}")
    return value
