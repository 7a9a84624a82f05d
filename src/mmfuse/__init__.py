"""mmfuse: image+text classifiers built by fusing pretrained foundation models.

import mmfuse
predictor = mmfuse.load("runs/quickstart")
result = predictor.predict(["cat.png"], ["a grinning cat face"])
result.labels, result.probs
"""

from .errors import DataError, MmfuseError
from .predict import Prediction, Predictor, load

__all__ = ["DataError", "MmfuseError", "Prediction", "Predictor", "load"]
__version__ = "0.1.0"
