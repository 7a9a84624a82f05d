"""Errors mmfuse raises for problems the user can fix; the CLI prints them without a traceback."""

import re
from collections import Counter

GROUP_AT = 5
"""Rows that share a reason this often are reported as one group: 303 rows of unknown labels were 20 lines alike."""
_VALUE = re.compile(r"'[^']*'")
_SLOT = "\0"


class MmfuseError(Exception):
    """A problem with the user's input, models or environment, with a message that says what to do."""


class DataError(MmfuseError):
    """Bad input rows, found in one pass and reported together."""

    def __init__(self, problems: list[tuple[int, str, str]], source: str, limit: int = 20):
        self.problems, self.source, self.limit = problems, source, limit
        super().__init__("\n".join(bad_rows_report(problems, source, limit)))

    def __reduce__(self):  # rebuilt from its parts, so it survives the trip back from a worker process
        return type(self), (self.problems, self.source, self.limit)


def _kind(reason: str) -> tuple[str, str]:
    """A reason's kind and its value: the first quoted value is what varies between rows of one kind (unknown label
    'x', unknown label 'y'); a reason without one is its own kind."""
    found = _VALUE.search(reason)
    if found is None:
        return reason, ""
    return reason[: found.start()] + _SLOT + reason[found.end() :], found.group()


def bad_rows_report(problems: list[tuple[int, str, str]], source: str, limit: int = 20) -> list[str]:
    """The lines of a bad-input report: the count of bad rows, each kind of problem that ``GROUP_AT`` or more rows
    share said once (one line counting each value of a kind with one, such as unknown labels; otherwise the rows under
    it), then the other rows one line each (all of a row's other reasons on its line); at most ``limit`` rows listed
    in any one place."""
    kinds: dict[str, list[tuple[int, str, str]]] = {}
    for row, image, reason in problems:
        kind, value = _kind(reason)
        kinds.setdefault(kind, []).append((row, image, value))
    grouped = [kind for kind, rows in kinds.items() if len(rows) >= GROUP_AT]  # in the order first met
    by_row: dict[tuple[int, str], list[str]] = {}
    for row, image, reason in problems:
        reasons = by_row.setdefault((row, image), [])
        if _kind(reason)[0] not in grouped:
            reasons.append(reason)
    lines = [f"{len(by_row)} bad row(s) in {source}:"]
    for kind in grouped:
        rows = kinds[kind]
        values = Counter(value for _, _, value in rows)
        if _SLOT in kind:  # a kind with a value (a label): the values counted on one line, the most frequent first
            counted = len(values) < len(rows)  # "(1)" after every value says nothing
            shown = [f"{value} ({n})" if counted else value for value, n in values.most_common(10)]
            if len(values) > 10:
                shown.append(f"and {len(values) - 10} other(s)")
            lines.append(f"  {len(rows)} rows: {kind.replace(_SLOT, ', '.join(shown))}")
            continue
        lines.append(f"  {len(rows)} rows: {kind}:")  # the same reason word for word: the rows it names under it
        lines += [f"    {_where(row, image)}" for row, image, _ in rows[:limit]]
        if len(rows) > limit:
            lines.append(f"    ... and {len(rows) - limit} more row(s)")
    rest = [(where, reasons) for where, reasons in by_row.items() if reasons]
    for (row, image), reasons in rest[:limit]:
        lines.append(f"  {_where(row, image, reasons)}")
    if len(rest) > limit:
        lines.append(f"  ... and {len(rest) - limit} more row(s)")
    lines.append("Fix these rows, or pass --skip-bad to skip them (each skipped row is listed in a skipped.csv).")
    return lines


def _where(row: int, image: str, reasons: list[str] = ()) -> str:
    # A row with no image path names none; a problem of the whole file (row 0) names no row.
    return ": ".join([f"row {row}"] * bool(row) + [image] * bool(image) + ["; ".join(reasons)] * bool(reasons))
