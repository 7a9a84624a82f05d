"""mmfuse: image+text classifiers built by fusing pretrained foundation models.

import mmfuse
predictor = mmfuse.load("runs/quickstart")
result = predictor.predict(["cat.png"], ["a grinning cat face"])
result.labels, result.probs
"""

from __future__ import annotations

import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

from mmfuse.errors import DataError, MmfuseError

if TYPE_CHECKING:
    from mmfuse.inference.predictor import Prediction, Predictor, load

__all__ = ["DataError", "MmfuseError", "Prediction", "Predictor", "load"]


def _version() -> str:
    """The installed package's version, so it is written once (pyproject.toml); a source tree that was never
    installed reads it from its pyproject.toml."""
    try:
        return version("mmfuse")
    except PackageNotFoundError:
        try:
            with open(Path(__file__).resolve().parents[2] / "pyproject.toml", "rb") as f:
                return tomllib.load(f)["project"]["version"]
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "0+unknown"


__version__ = _version()


def __getattr__(name: str):
    # The API's names import torch; deferred so that `import mmfuse.config` (and the CLI's --help) stay light.
    if name in ("Prediction", "Predictor", "load"):
        from mmfuse.inference import predictor as predict  # deferred: imports torch

        return getattr(predict, name)
    raise AttributeError(f"module 'mmfuse' has no attribute {name!r}")
