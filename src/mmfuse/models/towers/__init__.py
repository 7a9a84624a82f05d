"""Vision and text towers: thin wrappers that turn images or strings into one pooled vector each.

A tower is either a packaged offline model (``efficientnet-lite0``, ``efficientnet-lite2``, ``minilm``, ``mpnet``),
found in the registry (``packaged.py``), or any Hugging Face ``AutoModel`` named by hub id or local directory
(``hf.py``). Every tower is built by one factory, ``build_tower(spec, assets)`` (``factory.py``): from a config
(``requested_spec``) with pretrained weights, or from a run directory's ``towers.json`` and assets.

The contract (``base.py``), in the manner of timm's ``forward_features`` / ``forward_head``:

- ``preprocess(items)`` turns raw images or texts into the batch ``forward`` takes; the preprocessing itself is data
  the tower owns (``pixel_spec`` for a vision tower whose processor is a fixed-size resize, applied by
  ``tower_pixels``; the tokenizer for text);
- ``forward_features(**batch)`` gives the unpooled output (feature maps or token states);
- ``forward(**batch)`` gives what the head reads and what a frozen tower's cache holds: one pooled vector per item,
  or token states (``sequence``) for a pooling learned with the head;
- ``card``: what the rest of mmfuse needs without the weights (dimension, spec, cache fingerprint), which a packaged
  frozen tower gives without being built (``packaged_card``);
- ``layer_groups()``: its repeated blocks, which ``--tune-layers`` freezing and regional compile both use;
- ``freeze()`` / ``freeze_below(n)``.
"""

from mmfuse.models.towers.base import (
    PixelSpec,
    Tower,
    TowerCard,
    image_pixels,
    normalize,
    packaged_towers,
    register_tower,
    repeated_blocks,
    tower_pixels,
)
from mmfuse.models.towers.factory import build_text, build_tower, build_vision, packaged_card, requested_spec
from mmfuse.models.towers.hf import (
    HFTextTower,
    HFVisionTower,
    _hf_load,
    capped_length,
    position_limit,
    quiet_loading,
    skipped_init,
)
from mmfuse.models.towers.packaged import EfficientNetLiteTower, MiniLMTower, MPNetTower, PackagedTextTower, minilm_path

__all__ = [
    "EfficientNetLiteTower",
    "HFTextTower",
    "HFVisionTower",
    "MPNetTower",
    "MiniLMTower",
    "PackagedTextTower",
    "PixelSpec",
    "Tower",
    "TowerCard",
    "_hf_load",
    "build_text",
    "build_tower",
    "build_vision",
    "capped_length",
    "image_pixels",
    "minilm_path",
    "normalize",
    "packaged_card",
    "packaged_towers",
    "position_limit",
    "quiet_loading",
    "register_tower",
    "repeated_blocks",
    "requested_spec",
    "skipped_init",
    "tower_pixels",
]
