"""Errors mmfuse raises for problems the user can fix; the CLI prints them without a traceback."""


class MmfuseError(Exception):
    """A problem with the user's input, models or environment, with a message that says what to do."""


class DataError(MmfuseError):
    """Bad input rows, found in one pass and reported together."""

    def __init__(self, problems: list[tuple[int, str, str]], source: str, limit: int = 20):
        self.problems, self.source, self.limit = problems, source, limit
        # One line a row, with all of its reasons: the count and the cap are of rows, as --skip-bad counts them.
        by_row: dict[tuple[int, str], list[str]] = {}
        for row, image, reason in problems:
            by_row.setdefault((row, image), []).append(reason)
        lines = [f"{len(by_row)} bad row(s) in {source}:"]
        for (row, image), reasons in list(by_row.items())[:limit]:
            where = [f"row {row}"] * bool(row) + [image] * bool(image)  # a row with no image path names none
            lines.append(f"  {': '.join(where + ['; '.join(reasons)])}")
        if len(by_row) > limit:
            lines.append(f"  ... and {len(by_row) - limit} more row(s)")
        lines.append("Fix these rows, or pass --skip-bad to skip them (each skipped row is listed in a skipped.csv).")
        super().__init__("\n".join(lines))

    def __reduce__(self):  # rebuilt from its parts, so it survives the trip back from a worker process
        return type(self), (self.problems, self.source, self.limit)
