"""``fit``: one training run into a run directory, as a process to control: one training per directory (a lock),
checkpoints after every epoch and ``--resume`` from them, SIGTERM and Ctrl-C.

    mmfuse train DATA --out RUN                 # mmfuse.training.loop says how to run it on one or many GPUs
    mmfuse train DATA --out RUN --resume        # after a kill, SIGTERM or Ctrl-C: continue where it stopped

The steps themselves (``setup``, ``run_epochs``, ``save``) are ``mmfuse.training.loop``'s, shared with a bag's
members and a search's trials.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import signal
import threading
import time
from pathlib import Path

from mmfuse.config import RunConfig
from mmfuse.distributed import main_process
from mmfuse.errors import MmfuseError
from mmfuse.features.sources import FeatureCache
from mmfuse.training.checkpoint import CHECKPOINTS, checkpoints, load_checkpoint, save_checkpoint
from mmfuse.training.loop import Preempted, Trainer, run_epochs, save, setup
from mmfuse.training.prep import check_out_dir

CONSOLE_LOG = "train.log"

__all__ = [
    "Preempted",
    "TrainingInterrupted",
    "console_log",
    "fit",
    "run_lock",
]  # Preempted: the CLI catches both from here
log = logging.getLogger(__name__)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training, raised once the best epoch so far is saved: callers stop too (an ablation must not go
    on to its next run) and can say what was kept."""

    def __init__(self, result: dict):
        super().__init__()
        self.result = result

    def __reduce__(self):  # rebuilt from its result, so it survives the trip back from an ablation's worker process
        return type(self), (self.result,)


def fit(
    cfg: RunConfig,
    out: str | Path,
    cache: FeatureCache | None = None,
    towers: dict | None = None,
    resume: bool = False,
) -> dict:
    """Trains a model on ``cfg.data`` into the run directory ``out``; returns the kept epoch's validation metrics.

    Checkpoints go to ``out/checkpoints`` (``mmfuse.training.checkpoint``) and ``resume`` continues from the latest.
    SIGTERM writes one at the next optimizer step and raises ``Preempted``; Ctrl-C after the first epoch saves the
    kept epoch so far, then raises ``TrainingInterrupted`` (with the result). ``towers`` shares already built towers
    between runs of the same config (only sensible with frozen towers).
    """
    start = time.perf_counter()
    check_out_dir(Path(out), cfg.data.train)  # before the lock makes the directory
    with run_lock(Path(out)):
        if not resume and main_process():
            # A new run replaces an earlier one's checkpoints (the CLI asked for --overwrite to get here), under the
            # lock: never while another training is writing them.
            shutil.rmtree(Path(out) / CHECKPOINTS, ignore_errors=True)
        tr = setup(cfg, out, cache, towers, checkpointing=True)
        first = 1
        if resume:
            found = checkpoints(tr.out)
            if not found:
                raise MmfuseError(f"--resume: {tr.out} holds no checkpoint to continue from; train without --resume.")
            first, done, generator_state, totals = load_checkpoint(tr, found[-1])
            if tr.acc.is_main_process:  # the epochs the checkpoint holds, no more (a kill may have left a line after)
                (tr.out / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in tr.history))
            tr.resume_at = (generator_state, done, totals) if done else None
            if not done:
                tr.generator.set_state(generator_state)
        interrupted = False
        previous = _on_sigterm(tr)
        try:
            run_epochs(tr, functools.partial(_checkpoint, tr), first)
        except KeyboardInterrupt:
            if tr.best_state is None:
                raise
            interrupted = True
            log.warning("interrupted: saving the best epoch so far (%d) to %s", tr.best["epoch"], tr.out)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        result = save(tr, interrupted, time.perf_counter() - start)
        if interrupted:
            raise TrainingInterrupted(result)
        if tr.acc.is_main_process and not tr.cfg.train.keep_checkpoints:
            shutil.rmtree(tr.out / CHECKPOINTS, ignore_errors=True)
    return result


def _checkpoint(tr: Trainer, epoch: int, row: dict) -> bool:
    """The checkpoint after each epoch but the last (``save`` writes the run then); raises ``Preempted`` once it is
    written if SIGTERM asked to stop. Steps within an epoch are checkpointed by ``loop.train_epoch``."""
    if epoch < tr.cfg.train.epochs:
        path = save_checkpoint(tr, epoch + 1, 0, tr.generator.get_state(), (0.0, 0))
        tr.last_checkpoint = time.monotonic()
        if tr.stop:
            raise Preempted(path)
    return False


def _on_sigterm(tr: Trainer):
    """SIGTERM (what schedulers, spot instances and ``timeout`` send) asks the loop to checkpoint and stop; returns
    the handler it replaced (None off the main thread, where no handler can be set)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(signum, frame) -> None:
        tr.stop = True

    return signal.signal(signal.SIGTERM, stop)


@contextlib.contextmanager
def run_lock(out: Path):
    """Refuses a second training into the same directory while one runs (it would replace the first's files as
    they are written); an advisory lock on the directory itself, so nothing is left behind. Taken by the main
    process of a launch only: its other processes belong to the same run."""
    out.mkdir(parents=True, exist_ok=True)
    if os.name != "posix" or not main_process():
        yield
        return
    import fcntl  # here, not at the top: POSIX only

    fd = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MmfuseError(
                f"--out {out}: another mmfuse train is writing into this directory now; wait for it, or choose "
                "another --out."
            ) from None
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def console_log(out: str | Path):
    """What training logs while the block runs (the banner, each epoch, warnings, what was saved) is also appended
    to ``out/train.log``, plain lines with a time each: the console scrolls away, and a job's stderr may be lost.

    A FileHandler on the ``mmfuse`` logger, added for the block and removed after. The file is opened at the first
    line, so a run that fails before it logs anything (a data path mistyped) leaves no folder made for the log
    alone. Progress bars never reach it: on a terminal they are tqdm's, and plain progress lines hold no ``\\r``.
    Only the main process of a launch writes it. Yields a logger whose lines go to the file alone: for what the
    caller prints itself (the final summary), so the file holds it too.
    """
    file_only = logging.getLogger("mmfuse.console_log")
    file_only.propagate = False
    if not main_process():
        yield file_only
        return
    handler = _RunLog(Path(out) / CONSOLE_LOG, mode="a", encoding="utf-8", delay=True)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger("mmfuse")
    level = root.level
    if root.getEffectiveLevel() > logging.INFO:  # the file holds the run's INFO lines whatever the console shows
        root.setLevel(logging.INFO)
    root.addHandler(handler)
    file_only.addHandler(handler)
    try:
        yield file_only
    finally:
        root.removeHandler(handler)
        file_only.removeHandler(handler)
        root.setLevel(level)
        handler.close()


class _RunLog(logging.FileHandler):
    def _open(self):
        # A line logged before the run directory exists (the lock makes it) would otherwise be a logging error.
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()
