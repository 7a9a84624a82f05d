"""mmfuse: image+text classifiers built by fusing pretrained foundation models.

import mmfuse
predictor = mmfuse.load("runs/quickstart")
result = predictor.predict(["cat.png"], ["a grinning cat face"])
result.labels, result.probs
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import DataError, MmfuseError

if TYPE_CHECKING:
    from .predict import Prediction, Predictor, load

__all__ = ["DataError", "MmfuseError", "Prediction", "Predictor", "load"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The API's names import torch; deferred so that `import mmfuse.config` (and the CLI's --help) stay light.
    if name in ("Prediction", "Predictor", "load"):
        from . import predict

        return getattr(predict, name)
    raise AttributeError(f"module 'mmfuse' has no attribute {name!r}")
