"""Checks on --out made before a verb writes anything there: earlier work is kept unless replacing it was asked for,
a directory of runs is not a file, and a verb that fails leaves no empty folder behind. Also the command line that
continues an interrupted verb, for its message."""

from __future__ import annotations

import contextlib
import os
import shlex
from collections.abc import Collection, Iterator
from pathlib import Path

from mmfuse.errors import MmfuseError
from mmfuse.rundir.layout import present


def keep_earlier_work(out: str, overwrite: bool, finished: tuple[str, ...], replaced: Collection[str] = ()) -> None:
    """A finished run is work that took time: training into its directory again must be asked for, not happen
    because a name was reused (fit rewrites the weights, config and metrics there). Files a run writes, found in an
    --out that holds no finished run (--out . in a project with its own config.yaml), are someone's: also replaced
    only when asked."""
    if overwrite:
        return
    done = present(out, finished)
    if done:
        raise MmfuseError(
            f"--out {out} already holds a finished run ({done[0]}); choose another --out, or pass --overwrite to "
            "replace it."
        )
    theirs = present(out, replaced)
    if theirs:
        raise MmfuseError(
            f"--out {out} already holds {', '.join(theirs)}, which training would replace; choose another "
            "--out (a new directory), or pass --overwrite."
        )


def refuse_existing(out: str | Path, held: str, overwrite: bool, resume: str = "") -> None:
    """The one rule of the verbs that write files: what --out already holds is replaced only with --overwrite.
    ``held`` says what is there; ``resume``, where the verb can continue it, how (its --resume)."""
    if overwrite:
        return
    ways = "choose another --out, or pass --overwrite to replace it"
    if resume:
        ways = f"{resume}; or {ways}"
    raise MmfuseError(f"--out {out} already holds {held}: {ways}.")


def out_dir(out: str) -> None:
    """--out of ablate and quickstart is a directory of runs: a file there would fail only when the first is saved."""
    if Path(out).exists() and not Path(out).is_dir():
        raise MmfuseError(f"--out {out} is a file; give a directory for the runs.")


@contextlib.contextmanager
def no_empty_folders(*paths: str | Path) -> Iterator[None]:
    """Folders among ``paths`` (and their parents) that this block creates are removed again if it fails while they
    hold no file: a mistyped data path must not leave an empty run directory behind for every try. Only empty
    folders go; a file in them (a checkpoint, a skipped.csv the error names) keeps them."""
    made = []
    for path in paths:
        folder = Path(path).absolute()
        while not folder.exists() and folder != folder.parent:
            made.append(folder)
            folder = folder.parent
    try:
        yield
    except BaseException:
        for folder in sorted(set(made), key=lambda p: len(p.parts), reverse=True):
            _remove_if_empty(folder)
        raise


def _remove_if_empty(folder: Path) -> None:
    if not folder.is_dir() or folder.is_symlink():
        return
    for root, _, _ in sorted(os.walk(folder), key=lambda w: len(w[0]), reverse=True):  # the deepest first
        with contextlib.suppress(OSError):  # not empty: something was written there, and is kept
            os.rmdir(root)


def continue_command(args, flag: str = "--resume") -> str:
    """The command line that continues an interrupted verb: the one given (``main`` keeps it), with ``flag`` added
    and --overwrite dropped (continuing replaces nothing); under ``accelerate launch``, launched the same way (the
    launcher's own options, beyond the number of processes, are not known here)."""
    argv = [str(a) for a in getattr(args, "argv", None) or [] if str(a) != "--overwrite"]
    if flag and flag not in argv:
        argv.append(flag)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # A launch is continued by a launch of as many processes (train and predict refuse another number).
    head = ["accelerate", "launch", "--num_processes", str(world), "-m", "mmfuse"] if world > 1 else ["mmfuse"]
    return shlex.join([*head, *argv])
