"""Training image augmentation for a tuned vision tower, on whole batches already on the device.

The reference design passes each training image through an optional ``data_augmentation(image)`` layer; here
``Augmenter`` does the same to a batch (``--augment light|strong``, on by default with ``--tune image`` or ``all``):

- a random resized crop (a fraction of the area, aspect ratio 3/4 to 4/3) scaled back to the tower's size, and a
  horizontal flip half the time (``--no-hflip`` for data where left and right matter), as one batched affine
  resampling (``F.affine_grid`` + ``F.grid_sample``, bilinear): a kernel for the batch, not a loop over images;
- brightness, contrast and saturation jitter, as batched arithmetic.

It works on uint8 pixels before the tower normalises them, and gives uint8 back, so the fast path stays one gather and
a normalise on the device: the pixel cache's (``sources.PixelSource``), and those of batches decoded every epoch
(``sources.ImageFileSource``) for a tower with a ``PixelSpec``, which are the same. Only a tower whose image processor
crops or pads gives float batches, already normalised: they are taken back to pixel values with the processor's
normalisation, augmented the same way, and normalised again. Only ``train.train_step`` calls it: validation and
prediction never see it. Its random numbers come from its own generator on the device, seeded for each batch from the
run's seed, the epoch and the step (``reseed``), so a run repeats itself, resumed or not.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mmfuse.models.towers.base import processor_normalisation

log = logging.getLogger(__name__)
# ITU-R 601 luma, the grey that contrast and saturation blend towards (as PIL's and torchvision's).
LUMA = (0.299, 0.587, 0.114)
ASPECT = (3 / 4, 4 / 3)


@dataclass(frozen=True)
class Strength:
    """How far an ``--augment`` level goes."""

    area: tuple[float, float]
    """The crop's share of the image's area, drawn uniformly in this range."""
    jitter: float
    """Brightness, contrast and saturation factors are drawn uniformly in [1 - jitter, 1 + jitter]."""
    aspect: tuple[float, float] = ASPECT
    """The crop's width over height, drawn log-uniformly in this range."""


STRENGTHS = {"light": Strength((0.7, 1.0), 0.1), "strong": Strength((0.35, 1.0), 0.25)}


class Augmenter:
    """Augments (N, 3, H, W) image batches: uint8 pixels, or float pixels normalised as ``(x * scale - mean) / std``.

    Args:
        strength: ``light``, ``strong`` (``STRENGTHS``) or a ``Strength`` of one's own.
        hflip: flip left-right half the time.
        seed: the run's seed; each epoch's numbers follow from it (``reseed``).
        device: where the batches are (the generator lives there).
        normalisation: (scale, mean, std) of the float batches a tower's own preprocessing makes, to take them back
            to pixel values for the colour jitter; None where unknown (float batches then get only the crop and
            flip, which commute with a per-channel normalisation).
        rank: this process's index in a distributed run, so processes augment their batches differently.
    """

    def __init__(
        self,
        strength: str | Strength,
        hflip: bool = True,
        seed: int = 0,
        device: torch.device | str = "cpu",
        normalisation: tuple[float, tuple, tuple] | None = None,
        rank: int = 0,
    ):
        if isinstance(strength, str) and strength not in STRENGTHS:
            raise ValueError(f"augmentation strength must be one of {list(STRENGTHS)}, got {strength!r}")
        self.strength = STRENGTHS[strength] if isinstance(strength, str) else strength
        self.hflip, self.seed, self.rank = hflip, seed, rank
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        self.normalisation = normalisation
        self._warned = False
        self.reseed(0)

    def reseed(self, epoch: int, step: int = 0) -> None:
        """A batch's numbers depend on the seed, the epoch, the step and the process alone: a run resumed in the
        middle of an epoch augments its remaining batches as the uninterrupted run did."""
        state = np.random.SeedSequence([self.seed, epoch, step, self.rank]).generate_state(2, np.uint32)
        self.generator.manual_seed(int(state[0]) << 32 | int(state[1]))

    def _uniform(self, n: int, low: float, high: float) -> torch.Tensor:
        u = torch.rand(n, generator=self.generator, device=self.device)
        return low + (high - low) * u

    def geometry(self, pixels: torch.Tensor) -> torch.Tensor:
        """A random resized crop and flip per image, resampled bilinearly back to the same size (float in, out)."""
        n = pixels.shape[0]
        area = self._uniform(n, *self.strength.area)
        low, high = self.strength.aspect
        aspect = torch.exp(self._uniform(n, math.log(low), math.log(high)))
        # Half-widths in grid units ([-1, 1] spans the image). A crop that would overhang is clipped to the image
        # (a little less area, a little less stretch) where torchvision draws again.
        w = torch.sqrt(area * aspect).clamp(max=1.0)
        h = torch.sqrt(area / aspect).clamp(max=1.0)
        cx = (1 - w) * self._uniform(n, -1.0, 1.0)
        cy = (1 - h) * self._uniform(n, -1.0, 1.0)
        sign = torch.ones(n, device=self.device)
        if self.hflip:
            flip = torch.rand(n, generator=self.generator, device=self.device) < 0.5
            sign = torch.where(flip, -sign, sign)
        zero = torch.zeros(n, device=self.device)
        theta = torch.stack([torch.stack([w * sign, zero, cx], 1), torch.stack([zero, h, cy], 1)], 1)
        grid = F.affine_grid(theta, list(pixels.shape), align_corners=False)
        return F.grid_sample(pixels, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def colour(self, pixels: torch.Tensor, top: float) -> torch.Tensor:
        """Brightness, contrast and saturation jitter of float pixels in [0, ``top``], clamped back to that range.

        Each is linear in the colour of a pixel, so the three make one 3x3 matrix and an offset per image, applied in
        one batched product (torchvision also clamps between them, which changes only pixels pushed out of range).
        """
        n, j = pixels.shape[0], self.strength.jitter
        if j == 0:
            return pixels
        b, c, s = (self._uniform(n, 1 - j, 1 + j).view(n, 1, 1) for _ in range(3))
        luma = torch.tensor(LUMA, device=pixels.device, dtype=pixels.dtype)
        grey = (pixels.mean((2, 3)) @ luma).view(n, 1, 1)  # each image's mean grey, what contrast scales about
        eye = torch.eye(3, device=pixels.device, dtype=pixels.dtype)
        # saturation: each channel s * itself + (1 - s) * grey; brightness and contrast scale that by b * c
        matrix = b * c * (s * eye + (1 - s) * luma.expand(3, 3))
        offset = ((1 - c) * b * grey).view(n, 1, 1, 1)
        out = torch.bmm(matrix, pixels.flatten(2)).view_as(pixels) + offset
        return out.clamp_(0, top)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """The batch augmented, in its own dtype and value range."""
        if pixels.dtype == torch.uint8:
            x = self.colour(self.geometry(pixels.float()), 255.0)
            return x.round_().to(torch.uint8)
        if self.normalisation is None:
            if not self._warned:
                log.warning("augmenting images with the crop and flip only: this tower's normalisation is unknown")
                self._warned = True
            return self.geometry(pixels.float()).to(pixels.dtype)
        scale, mean, std = self.normalisation
        to_pixels = torch.tensor(std, device=pixels.device).view(1, 3, 1, 1) / scale
        offset = torch.tensor(mean, device=pixels.device).view(1, 3, 1, 1) / scale
        x = self.colour(self.geometry(pixels.float() * to_pixels + offset), 255.0)  # in uint8's units meanwhile
        return ((x - offset) / to_pixels).to(pixels.dtype)

    def batch(self, batch: dict) -> dict:
        """A model batch with its images augmented (the rest untouched)."""
        if "image" not in batch:
            return batch
        image = dict(batch["image"])
        image["pixel_values"] = self(image["pixel_values"])
        return {**batch, "image": image}


def tower_normalisation(tower) -> tuple[float, tuple, tuple] | None:
    """(scale, mean, std) of a vision tower's float preprocessing: its pixel spec, else its HF image processor's."""
    spec = getattr(tower, "pixel_spec", None)
    if spec is not None:
        return spec.scale, tuple(spec.mean), tuple(spec.std)
    p = getattr(tower, "processor", None)
    if p is None or not hasattr(p, "image_mean"):
        return None
    return processor_normalisation(p)


def make_augmenter(
    augment: str, hflip: bool, seed: int, tower, device: torch.device | str, rank: int = 0
) -> Augmenter | None:
    """The run's augmenter (None for ``--augment none``), for batches of ``tower`` on ``device``."""
    if augment in (None, "none"):
        return None
    return Augmenter(augment, hflip, seed, device, tower_normalisation(tower), rank)
