"""Errors mmfuse raises for problems the user can fix; the CLI prints them without a traceback."""


class MmfuseError(Exception):
    """A problem with the user's input, models or environment, with a message that says what to do."""


class DataError(MmfuseError):
    """Bad input rows, found in one pass and reported together."""

    def __init__(self, problems: list[tuple[int, str, str]], source: str, limit: int = 20):
        self.problems, self.source, self.limit = problems, source, limit
        lines = [f"{len(problems)} bad row(s) in {source}:"]
        for row, image, reason in problems[:limit]:
            lines.append(f"  row {row}: {image}: {reason}")
        if len(problems) > limit:
            lines.append(f"  ... and {len(problems) - limit} more")
        lines.append("Fix these rows, or pass --skip-bad to skip them (each skipped row is listed in a skipped.csv).")
        super().__init__("\n".join(lines))

    def __reduce__(self):  # rebuilt from its parts, so it survives the trip back from a worker process
        return type(self), (self.problems, self.source, self.limit)
