"""torch.compile for the classifier: the towers' repeated transformer blocks one by one, or the whole model.

    model = compile_model(model)                  # regional: each encoder layer of the tuned towers
    model = compile_model(model, "model")         # the whole forward as one graph
    model = compile_model(model, backend="aot_eager")  # trace without code generation (CPU tests)

Regional compilation is what PyTorch's and Hugging Face's docs recommend for models built from repeated blocks: all
the blocks of a tower share one code object, so the first one's compiled graph serves the rest and compiling costs
one block instead of the whole model. The blocks are compiled in place (``Module.compile``), so parameter names and
``state_dict`` keys stay as they were and a checkpoint needs no unwrapping. The code between blocks (embeddings,
pooling, the fusion head) stays eager: a few percent of the FLOPs.
"""

from __future__ import annotations

import torch
from torch import nn

from mmfuse.models.towers import repeated_blocks

COMPILE_MODES = ("regional", "model")


def compile_model(model: nn.Module, mode: str = "regional", **compile_kwargs) -> nn.Module:
    """Compiles ``model`` for training or inference; returns the module to call.

    Args:
        model: a ``MultimodalClassifier`` (or any module; its ``towers`` are searched where it has them).
        mode: ``regional``: each repeated block of the towers that are not frozen, in place; where there are none
            (frozen towers, whose features come from the cache), the whole model. ``model``: ``torch.compile(model)``.
        compile_kwargs: passed to ``torch.compile`` (``mode``, ``backend``, ``dynamic``...).
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r}")
    if mode == "regional":
        towers = getattr(model, "towers", {"model": model})
        blocks = [b for t in towers.values() if not getattr(t, "frozen", False) for b in _layer_groups(t)]
        if blocks:
            for block in blocks:
                block.compile(**compile_kwargs)
            return model
    return torch.compile(model, **compile_kwargs)


def _layer_groups(module: nn.Module) -> list[nn.Module]:
    """A tower's ``layer_groups`` (the blocks ``--tune-layers`` counts); for another module, its repeated blocks."""
    return module.layer_groups() if hasattr(module, "layer_groups") else repeated_blocks(module)
