"""Which predictor ``mmfuse predict`` runs (``--backend``): the torch model of a run, its frozen towers in onnxruntime
on a CPU (auto) or in torch (torch), or the ONNX graph ``mmfuse export`` wrote from the whole run (onnx). Chosen here
so that ``predictor`` never imports the export, which imports it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from mmfuse.errors import MmfuseError
from mmfuse.inference.export.runtime import OnnxPredictor, find_export
from mmfuse.inference.predictor import Predictor

BACKENDS = ("auto", "torch", "onnx")


def loader(
    run_dir: str | Path,
    backend: str = "auto",
    onnx_dir: str | Path | None = None,
    dtype: str = "auto",
    compile: bool = False,
) -> Callable[[str | None], Predictor | OnnxPredictor]:
    """``predict_file``'s ``load``: a function of the device that loads the predictor ``backend`` names.

    Args:
        backend: auto or torch: the run's torch model (``Predictor``), its frozen towers run as ``run_towers``
            says; onnx: the export.
        onnx_dir: with ``backend="onnx"``, the export to run (default RUN/export).
        dtype, compile: the torch model's (``Predictor``); an ONNX graph computes as it was exported.
    """
    if backend not in BACKENDS:
        raise MmfuseError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if backend == "onnx":
        return lambda device: OnnxPredictor(find_export(run_dir, onnx_dir), run_dir)
    return lambda device: run_towers(Predictor(run_dir, device=device, dtype=dtype, compile=compile), backend)


def run_towers(predictor: Predictor, backend: str) -> Predictor:
    """``predictor`` with its frozen towers run where ``backend`` says (``ModelConfig.backend``: auto, torch or
    onnx; ``models.towers.onnx_engine``), whatever the run was trained with; an ensemble's members' too."""
    for model in predictor.models:
        model.cfg = replace(model.cfg, backend=backend)
    return predictor
