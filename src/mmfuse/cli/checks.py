"""Checks on --out made before a verb writes anything there: earlier work is kept unless replacing it was asked for,
and a directory of runs is not a file."""

from __future__ import annotations

from collections.abc import Collection
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


def out_dir(out: str) -> None:
    """--out of ablate and quickstart is a directory of runs: a file there would fail only when the first is saved."""
    if Path(out).exists() and not Path(out).is_dir():
        raise MmfuseError(f"--out {out} is a file; give a directory for the runs.")
