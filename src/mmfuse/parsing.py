"""The text forms of flag values that are more than one number or name: durations, class weights, thresholds,
tabular columns' kinds; and a config.yaml value's type against its field's annotation (``check_type``).

Below ``config`` (which checks flags with them); standard library only.
"""

from __future__ import annotations

import math
import re

from mmfuse.errors import MmfuseError

TABULAR_KINDS = ("num", "cat")  # --tabular-columns size:num section:cat forces a column's kind


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


def tabular_kind(spec: str) -> tuple[str, str | None]:
    """A --tabular-columns entry as (column, kind): size:num is (size, num); a plain name's kind is inferred (None)."""
    name, _, kind = spec.rpartition(":")
    return (name, kind) if name and kind in TABULAR_KINDS else (spec, None)


def check_type(path, key: str, value, kind: str) -> None:
    """A YAML value against its field's annotation (``int | None``, ``list[str]``...): a wrong type would otherwise
    fail later inside torch, with no word of which setting it was."""
    if value is None:
        ok = "None" in kind
    elif kind.startswith("list"):
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    else:
        base = kind.split(" |")[0]
        ok = {
            "bool": isinstance(value, bool),
            "int": isinstance(value, int) and not isinstance(value, bool),
            "float": isinstance(value, (int, float)) and not isinstance(value, bool),
            "str": isinstance(value, str),
        }.get(base, True)
    if not ok:
        hint = ""
        if isinstance(value, str) and "float" in kind:
            hint = " (YAML reads 1e-3 as text: write 0.001 or 1.0e-3)"
        names = {"bool": "true or false", "int": "a whole number", "float": "a number", "str": "text"}
        want = "a list of names, as [a, b]" if kind.startswith("list") else names.get(kind.split(" |")[0], kind)
        want += " (or null)" * ("None" in kind)
        raise MmfuseError(f"{path}: a value has the wrong type: {key} must be {want}, got {value!r}{hint}")
