"""Progress of long passes over rows: a tqdm bar on a terminal, a plain log line now and then anywhere else.

A bar's carriage-return updates written to a log file make lines thousands of characters long, so where stderr is
not a terminal (a job's log, CI) the pass logs ``what: done/total rows, rows/s, s left`` every ``PLAIN_EVERY``
seconds instead, as training's epochs do.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from mmfuse.distributed import main_process

log = logging.getLogger(__name__)
PLAIN_EVERY = 30.0  # seconds between progress lines when stderr is not a terminal


class Progress:
    """``update(n)`` after each ``n`` rows (or steps) done; ``close()`` at the end (or use it as a context manager).

    Args:
        initial: how many were done before (a resumed pass): the bar starts there.
        line: what a plain line says after ``desc:``, called only when one is due, so it may read what costs a device
            sync (training's loss); default ``done/total rows, rows/s, s left``.
        logger: where plain lines go (default this module's): a caller's own, to be quieted with its other lines.
    """

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str = "row",
        show: bool = True,
        initial: int = 0,
        line: Callable[[], str] | None = None,
        logger: logging.Logger | None = None,
    ):
        from tqdm.auto import tqdm  # deferred: tqdm.auto costs a tenth of a second, and a warm check needs no bar

        self.total, self.desc, self.unit, self.done, self.line, self.log = (
            total,
            desc,
            unit,
            initial,
            line,
            logger or log,
        )
        show = show and main_process()  # one bar for a launch of many processes, not one each
        # disable=None: tqdm decides, showing a bar only when stderr is a terminal.
        self.bar = tqdm(
            total=total, desc=desc, unit=unit, leave=False, initial=initial, disable=None if show and total else True
        )
        self.terminal = not self.bar.disable
        """A bar shows: ``postfix`` figures appear beside it."""
        self.plain = show and bool(total) and self.bar.disable
        self.start = self.last = time.perf_counter()
        self.first = initial

    def update(self, n: int = 1) -> None:
        self.done += n
        self.bar.update(n)
        now = time.perf_counter()
        if self.plain and now - self.last > PLAIN_EVERY:
            self.last = now
            self.log.info("%s: %s", self.desc, self.line() if self.line is not None else self._counts(now))

    def _counts(self, now: float) -> str:
        rate = (self.done - self.first) / (now - self.start)
        left = (self.total - self.done) / rate if rate else float("inf")
        units = f"{self.unit}s"
        return f"{self.done}/{self.total} {units}, {rate:.0f} {units}/s, {left:.0f} s left"

    def postfix(self, **figures) -> None:
        """Figures beside the bar, on a terminal (a plain line says what ``line`` gives)."""
        if self.terminal:
            self.bar.set_postfix(**figures)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
