"""mmfuse: image+text classifiers built by fusing pretrained foundation models.

import mmfuse
predictor = mmfuse.load("runs/quickstart")
result = predictor.predict(["cat.png"], ["a grinning cat face"])
result.labels, result.probs
"""

from .errors import DataError, MmfuseError
from .predict import Prediction, Predictor, load

__all__ = ["DataError", "MmfuseError", "Prediction", "Predictor", "load"]


def _version() -> str:
    """The installed package's version, so it is written once (pyproject.toml); a source tree that was never
    installed reads it from its pyproject.toml."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mmfuse")
    except PackageNotFoundError:
        import tomllib
        from pathlib import Path

        try:
            with open(Path(__file__).resolve().parents[2] / "pyproject.toml", "rb") as f:
                return tomllib.load(f)["project"]["version"]
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "0+unknown"


__version__ = _version()
