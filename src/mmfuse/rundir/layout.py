"""What a run directory holds, recognising one, and ``staged``: the atomic way every run is written. No torch."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Collection, Iterator
from pathlib import Path

from mmfuse.errors import MmfuseError

# What mmfuse train writes into a run directory; predict and evaluate must never write over them.
RUN_FILES = {
    "bag.json",
    "ensemble.json",
    "calibration.json",
    "reliability.png",
    "threshold.json",
    "thresholds.json",
    "leaderboard.csv",
    "oof_predictions.csv",
    "frozen_towers.safetensors",
    "config.yaml",
    "labels.json",
    "model.safetensors",
    "towers.json",
    "tabular.json",
    "metrics.json",
    "metrics.jsonl",
    "history.csv",
    "skipped.csv",
    "captions.csv",
    "training_curves.png",
    "val_confusion_matrix.png",
}
FINISHED = "metrics.json"  # written last: a directory without it holds no finished run
BAG_FILE = "bag.json"
ENSEMBLE_FILE = "ensemble.json"
FROZEN_FILE = "frozen_towers.safetensors"
CALIBRATION_FILE = "calibration.json"  # optional (--calibrate): without it, probabilities are the model's own
CALIBRATION_FILES = (CALIBRATION_FILE, "reliability.png")
STAGING = ".staging"  # where a run's files are written before they are moved into place
_SINGLE = ("config.yaml", "labels.json", "towers.json", "model.safetensors")
_BAGGED = ("config.yaml", "labels.json", BAG_FILE)
_ENSEMBLE = ("config.yaml", "labels.json", ENSEMBLE_FILE)


# ---------------------------------------------------------------------------------------------------------------------
# Recognising one


def present(folder: str | Path, names: Collection[str]) -> list[str]:
    """The files (or folders) of ``names`` that ``folder`` holds, sorted."""
    return sorted(name for name in names if (Path(folder) / name).exists())


def is_run(folder: str | Path) -> bool:
    """Whether ``folder`` holds a run mmfuse train wrote (or is writing): nothing else may write its files there."""
    return any((Path(folder) / name).is_file() for name in ("model.safetensors", "labels.json"))


def check_run(folder: str | Path) -> Path:
    """``folder`` if it holds a run that can be opened: a single run, a bag or an ensemble; otherwise an error that
    says why.

    Raises:
        MmfuseError: a file, no such directory, or a file the run needs missing (with the runs an ablation's folder
            holds, when it is one).
    """
    folder = Path(folder)
    if folder.is_file():
        raise MmfuseError(f"{folder} is a file; give the run directory that mmfuse train --out wrote.")
    if not folder.is_dir():
        raise MmfuseError(f"Run directory not found: {folder} (make one with mmfuse train DATA --out {folder}).")
    if (folder / ENSEMBLE_FILE).is_file():
        needed = _ENSEMBLE
    else:
        needed = _BAGGED if (folder / BAG_FILE).is_file() else _SINGLE
    for name in needed:
        if not (folder / name).is_file():
            # mmfuse ablate --out holds three runs, one per subfolder.
            inner = [m for m in ("fusion", "image", "text") if (folder / m / "config.yaml").exists()]
            hint = f" It holds the runs {', '.join(inner)}: pass one, e.g. {folder / inner[0]}." if inner else ""
            raise MmfuseError(f"{folder} is not an mmfuse run directory: {name} is missing.{hint}")
    return folder


def ensemble_members(folder: str | Path) -> list[tuple[str, Path, float]]:
    """An ensemble's members that predict: (name, run directory, weight), weights summing to 1 (``ensemble.json``).

    Raises:
        MmfuseError: a damaged ``ensemble.json``, or a member's directory missing or not a run.
    """
    path = Path(folder) / ENSEMBLE_FILE
    try:
        members = json.loads(path.read_text())["members"]
        out = [(str(m["name"]), Path(folder) / m["dir"], float(m["weight"])) for m in members]
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise MmfuseError(f"{path} is damaged ({e!r}); train the ensemble again.") from None
    if not out or any(not 0 < w <= 1 for _, _, w in out) or abs(sum(w for _, _, w in out) - 1) > 1e-6:
        raise MmfuseError(f"{path} is damaged: its members' weights must be positive and sum to 1.")
    for name, member, _ in out:
        if not member.is_dir():
            raise MmfuseError(
                f"{folder}: the ensemble's member {name} ({member}) is missing; train the ensemble again."
            )
        check_run(member)
    return out


def temperature(folder: str | Path) -> float:
    """The temperature a run's probabilities are scaled by (``calibration.json``); 1.0 for a run without one, whose
    probabilities are then exactly as the model gives them.

    Raises:
        MmfuseError: a damaged ``calibration.json``.
    """
    path = Path(folder) / CALIBRATION_FILE
    if not path.is_file():
        return 1.0
    try:
        value = float(json.loads(path.read_text())["temperature"])
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise MmfuseError(f"{path} is damaged ({e!r}); train the run again with --calibrate, or delete it.") from None
    if not 0 < value < float("inf"):
        raise MmfuseError(f"{path} is damaged: its temperature must be a finite number > 0, got {value}.")
    return value


# ---------------------------------------------------------------------------------------------------------------------
# Writing one


@contextlib.contextmanager
def staged(out: Path, marks: tuple[str, ...] = (FINISHED,)) -> Iterator[Path]:
    """Yields ``out/.staging`` to write a run's files into; once the block ends, moves them into ``out``, ``marks``
    removed first and moved last, in their order. An error in the block leaves ``out`` as it was."""
    stage = out / STAGING
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    yield stage
    for name in marks:
        (out / name).unlink(missing_ok=True)
    order = {name: i + 1 for i, name in enumerate(marks)}
    for item in sorted(stage.iterdir(), key=lambda p: order.get(p.name, 0)):
        target = out / item.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(item, target)
    stage.rmdir()
