"""Which predictor ``mmfuse predict`` runs (``--backend``): the torch model of a run, or the ONNX graph ``mmfuse
export`` wrote from it. Chosen here so that ``predictor`` never imports the export, which imports it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mmfuse.errors import MmfuseError
from mmfuse.inference.export.runtime import OnnxPredictor, find_export
from mmfuse.inference.predictor import Predictor

BACKENDS = ("torch", "onnx")


def loader(
    run_dir: str | Path,
    backend: str = "torch",
    onnx_dir: str | Path | None = None,
    dtype: str = "auto",
    compile: bool = False,
) -> Callable[[str | None], Predictor | OnnxPredictor]:
    """``predict_file``'s ``load``: a function of the device that loads the predictor ``backend`` names.

    Args:
        onnx_dir: with ``backend="onnx"``, the export to run (default RUN/export).
        dtype, compile: the torch model's (``Predictor``); an ONNX graph computes as it was exported.
    """
    if backend not in BACKENDS:
        raise MmfuseError(f"backend must be torch or onnx, got {backend!r}")
    if backend == "onnx":
        return lambda device: OnnxPredictor(find_export(run_dir, onnx_dir), run_dir)
    return lambda device: Predictor(run_dir, device=device, dtype=dtype, compile=compile)
