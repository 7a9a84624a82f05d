"""Progress of long passes over rows: a tqdm bar on a terminal, a plain log line now and then anywhere else.

A bar's carriage-return updates written to a log file make lines thousands of characters long, so where stderr is
not a terminal (a job's log, CI) the pass logs ``what: done/total rows, rows/s, s left`` (in its own unit) every
``PLAIN_EVERY`` seconds instead, as training's epochs do.
"""

from __future__ import annotations

import logging
import time

from mmfuse.distributed import main_process

log = logging.getLogger(__name__)
PLAIN_EVERY = 30.0  # seconds between progress lines when stderr is not a terminal (as train.PLAIN_EVERY)


class Progress:
    """``update(n)`` after each ``n`` rows done; ``close()`` at the end (or use it as a context manager)."""

    def __init__(self, total: int, desc: str, unit: str = "row", show: bool = True):
        from tqdm.auto import tqdm  # deferred: tqdm.auto costs a tenth of a second, and a warm check needs no bar

        self.total, self.desc, self.unit, self.done = total, desc, unit, 0
        show = show and main_process()  # one bar for a launch of many processes, not one each
        # disable=None: tqdm decides, showing a bar only when stderr is a terminal.
        self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False, disable=None if show and total else True)
        self.plain = show and bool(total) and self.bar.disable
        self.start = self.last = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.done += n
        self.bar.update(n)
        now = time.perf_counter()
        if self.plain and now - self.last > PLAIN_EVERY:
            self.last, rate = now, self.done / (now - self.start)
            left = (self.total - self.done) / rate if rate else float("inf")
            units = f"{self.unit}s"
            log.info("%s: %d/%d %s, %.0f %s/s, %.0f s left", self.desc, self.done, self.total, units, rate, units, left)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
