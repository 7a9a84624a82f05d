"""Feeding fine-tuning from image files at GPU speed: decode each image once into a uint8 cache, normalise on device.

At 2,000+ samples/s, decoding JPEGs with PIL in a handful of CPU processes cannot keep a GPU busy (shared/PERF.md:
about 1,480 images/s on 16 processes for 640x480 JPEGs). Fine-tuning sees every image once per epoch at the same
size, so this module decodes and resizes each image once, exactly as the vision tower's processor would, and keeps
the result as uint8 (3 x H x W, 150 kB at 224 px):

- on disk, one file of bare uint8 bytes per image under ``$MMFUSE_HOME/pixels/<spec fingerprint>/``, keyed by
  the file's content hash, so reruns, other splits and prediction reuse it;
- in memory, as one (N, 3, H, W) uint8 tensor that a ``PixelDataset`` indexes.

A batch then travels to the device as uint8 (a quarter of float32's bytes) and ``normalize`` turns it into the
tower's ``pixel_values`` there. The result equals the tower's own ``preprocess`` up to float rounding, because the
resize is the same PIL call on the same uint8 image.

Optionally, ``decode_jpegs_gpu`` decodes JPEG files on the GPU with torchvision's nvJPEG. torchvision is never
required: it is imported only inside that function, and ``nvjpeg_available`` says whether it can run. Its resize
(bilinear with antialiasing in torch) differs from PIL's by about one grey level, so its pixels are close to, not
identical with, the processor's.

    pixels = load_pixels([r.image for r in records], PixelSpec.from_tower(model.vision))   # decode once, cached
    ds = PixelDataset(records, model.modalities, labels, pixels)
    dl = DataLoader(ds, 256, collate_fn=pixel_collate(model), pin_memory=True, drop_last=True)
    for batch in dl:
        batch = to_device(batch, "cuda", spec)        # uint8 -> normalised float pixel_values on the GPU
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .data import Record
from .errors import MmfuseError
from .features import FeatureCache, present_mask
from .images import load_image
from .paths import mmfuse_home

# PIL releases the GIL while decoding and resizing, so threads scale on the cores there are.
DECODE_WORKERS = max(1, min(32, os.cpu_count() or 1))


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
    def from_tower(cls, tower) -> PixelSpec:
        """The spec of an mmfuse vision tower (a Hugging Face one with a resize-rescale-normalise processor, or a
        packaged EfficientNet-Lite).

        Raises:
            MmfuseError: the tower's preprocessing does more than a fixed-size resize (e.g. crops or pads), which
                the uint8 cache does not reproduce; such towers use the default data path.
        """
        if hasattr(tower, "image_size") and hasattr(tower, "MEAN"):  # packaged EfficientNet-Lite
            s = tower.image_size
            return cls(s, s, Image.BICUBIC, 1 / 255, (tower.MEAN,) * 3, (tower.STD,) * 3)
        p = getattr(tower, "processor", None)
        if p is None:
            raise MmfuseError(f"{type(tower).__name__} has no image processor to read a PixelSpec from")
        size = p.size if isinstance(p.size, dict) else {k: v for k, v in vars(p.size).items() if v is not None}
        extra = [name for name in ("do_center_crop", "do_pad", "do_reduce_labels") if getattr(p, name, False)]
        if not getattr(p, "do_resize", True) or set(size) != {"height", "width"} or extra:
            raise MmfuseError(
                f"the uint8 pixel cache reproduces only a fixed-size resize; {type(p).__name__} has size {size}"
                f"{' and ' + ', '.join(extra) if extra else ''}. Use the default data path for this tower."
            )

        def per_channel(v, default: float) -> tuple[float, float, float]:
            v = default if v is None else v
            return tuple(float(x) for x in v) if isinstance(v, list | tuple) else (float(v),) * 3

        normalize = getattr(p, "do_normalize", True)
        return cls(
            height=int(size["height"]),
            width=int(size["width"]),
            resample=int(p.resample if p.resample is not None else Image.BILINEAR),
            scale=float(p.rescale_factor) if getattr(p, "do_rescale", True) else 1.0,
            mean=per_channel(p.image_mean, 0.0) if normalize else (0.0, 0.0, 0.0),
            std=per_channel(p.image_std, 1.0) if normalize else (1.0, 1.0, 1.0),
        )

    @property
    def fingerprint(self) -> str:
        """Names the cache folder: only the size, the filter and how JPEGs are decoded (at a reduced scale first:
        ``images.load_image``'s ``at_least``) change the stored uint8 values."""
        ident = {
            "height": self.height,
            "width": self.width,
            "resample": self.resample,
            "layout": "uint8-chw-bare",
            "decode": "jpeg-draft",
        }
        return "px-" + hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return asdict(self)


def decode_resized(image: str | Path | Image.Image, spec: PixelSpec) -> np.ndarray:
    """One image as (3, height, width) uint8, resized exactly as the tower's processor resizes it."""
    if isinstance(image, Image.Image):
        img = image.convert("RGB")
    else:
        img = load_image(image, at_least=max(spec.height, spec.width))
    if img.size != (spec.width, spec.height):
        img = img.resize((spec.width, spec.height), spec.resample)
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


def file_key(path: str | Path) -> str:
    """The content hash the feature cache uses, so a changed file misses and a moved one hits."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class PixelCache(FeatureCache):
    """Decoded images as bare uint8 bytes, their shape known from the spec: reading one skips the .npy header,
    whose parsing was most of a read's 0.33 ms (0.06 ms bare, on the development VM), and that part holds the
    GIL that the decoding threads share."""

    suffix = ".u8"

    def _read(self, path: Path) -> np.ndarray:
        return np.fromfile(path, dtype=np.uint8)

    def _write(self, f, value: np.ndarray) -> None:
        f.write(np.ascontiguousarray(value, dtype=np.uint8).data)


def pixel_cache() -> PixelCache:
    return PixelCache(mmfuse_home() / "pixels")


def cached_pixels(path: str | Path, spec: PixelSpec, cache: FeatureCache | None) -> np.ndarray:
    """One image as (3, height, width) uint8, from ``cache`` when it holds this file's content at this spec."""
    if cache is None:
        return decode_resized(path, spec)
    fp, key, shape = spec.fingerprint, file_key(path), (3, spec.height, spec.width)
    hit = cache.get(fp, key)
    if hit is None or hit.dtype != np.uint8 or hit.size != math.prod(shape):  # absent, truncated or foreign
        hit = decode_resized(path, spec)
        cache.put(fp, key, hit)
        cache.misses += 1
    else:
        hit = hit.reshape(shape)
        cache.hits += 1
    return hit


def available_memory() -> int | None:
    """Bytes of memory the system can still give without swapping (Linux's MemAvailable); None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def load_pixels(
    paths: Sequence[str | Path],
    spec: PixelSpec,
    cache: FeatureCache | None = None,
    workers: int = DECODE_WORKERS,
    use_cache: bool = True,
) -> torch.Tensor:
    """Every image as uint8, stacked to (N, 3, height, width), from the on-disk cache where possible.

    Args:
        paths: image files.
        spec: the tower's preprocessing (``PixelSpec.from_tower``).
        cache: where decoded images live (default ``$MMFUSE_HOME/pixels``).
        workers: decoding threads for images not cached yet.
        use_cache: False decodes everything and writes nothing (for timing the decode itself).
    """
    cache = (cache or pixel_cache()) if use_cache else None
    out = torch.empty((len(paths), 3, spec.height, spec.width), dtype=torch.uint8)

    def one(i: int) -> None:
        out[i] = torch.from_numpy(cached_pixels(paths[i], spec, cache))

    with ThreadPoolExecutor(max(1, workers)) as pool:
        list(pool.map(one, range(len(paths))))  # list() re-raises the first worker error here
    return out


def normalize(pixels: torch.Tensor, spec: PixelSpec, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> the tower's ``pixel_values``, on whatever device ``pixels`` is on."""
    scale = torch.tensor([spec.scale / s for s in spec.std], device=pixels.device, dtype=torch.float32)
    shift = torch.tensor([m / s for m, s in zip(spec.mean, spec.std)], device=pixels.device, dtype=torch.float32)
    # One fused multiply-add per pixel: (x * scale - mean) / std == x * (scale / std) - mean / std.
    return torch.addcmul(-shift.view(1, 3, 1, 1), pixels.float(), scale.view(1, 3, 1, 1)).to(dtype)


class PixelDataset(Dataset):
    """Raw texts plus images already decoded to uint8: what ``RawDataset`` gives, without decoding per epoch."""

    def __init__(
        self, records: list[Record], modalities: list[str], labels: torch.Tensor | None, pixels: torch.Tensor | None
    ):
        if "image" in modalities and (pixels is None or len(pixels) != len(records)):
            raise MmfuseError("PixelDataset needs one decoded image per record (load_pixels)")
        self.records, self.modalities, self.labels, self.pixels = records, modalities, labels, pixels
        self.present = present_mask(records, modalities)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        item = {"present": self.present[i]}
        if "image" in self.modalities:
            item["image"] = self.pixels[i]
        if "text" in self.modalities:
            item["text"] = self.records[i].text
        if self.labels is not None:
            item["labels"] = self.labels[i]
        return item

    def __getitems__(self, indices: list[int]) -> dict:
        """A whole batch, gathered with one indexing per tensor rather than stacked from one view per row."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        batch = {"present": self.present[idx]}
        if "image" in self.modalities:
            batch["image"] = self.pixels[idx]
        if "text" in self.modalities:
            batch["text"] = [self.records[i].text for i in indices]
        if self.labels is not None:
            batch["labels"] = self.labels[idx]
        return batch


def pixel_collate(
    model, modalities: Collection[str] | None = None, texts: Sequence[str] = (), pad_to: int = 1
) -> Callable[[list[dict]], dict]:
    """Stacks uint8 images as ``image.pixel_values`` (still uint8) and pads the texts' token ids, tokenizing each
    distinct text once (``texts`` up front; ``pad_to``: see ``HFTextTower.pad``)."""
    from .towers import TokenizedTexts

    towers = {m: t for m, t in model.towers.items() if modalities is None or m in modalities}
    tokens = TokenizedTexts(towers["text"], texts, pad_to) if "text" in towers else None

    def collate(items: list[dict] | dict) -> dict:
        if not isinstance(items, dict):  # single items, not a batch that PixelDataset.__getitems__ gathered
            items = {
                k: [it[k] for it in items] if k == "text" else torch.stack([it[k] for it in items]) for k in items[0]
            }
        batch = {"present": items["present"]}
        if "image" in towers:
            batch["image"] = {"pixel_values": items["image"]}
        if tokens is not None:
            batch["text"] = tokens(items["text"])
        if "labels" in items:
            batch["labels"] = items["labels"]
        return batch

    return collate


def to_device(batch: dict, device: torch.device | str, spec: PixelSpec, dtype: torch.dtype = torch.float32) -> dict:
    """Moves a ``pixel_collate`` batch to ``device`` and normalises its uint8 images there."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, dict):
            out[k] = {kk: vv.to(device, non_blocking=True) for kk, vv in v.items()}
        else:
            out[k] = v.to(device, non_blocking=True)
    if "image" in out and out["image"]["pixel_values"].dtype == torch.uint8:
        out["image"]["pixel_values"] = normalize(out["image"]["pixel_values"], spec, dtype)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Optional: JPEG decoding on the GPU (nvJPEG through torchvision)


def nvjpeg_available(device: torch.device | str = "cuda") -> bool:
    """True when torchvision imports and can decode JPEGs on ``device``; never raises."""
    if not torch.cuda.is_available() or torch.device(device).type != "cuda":
        return False
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except Exception:  # a missing or broken torchvision (ABI mismatch with torch) is the same answer: no
        return False
    return True


def decode_jpegs_gpu(
    paths: Sequence[str | Path], spec: PixelSpec, device: torch.device | str = "cuda", batch: int = 256
) -> torch.Tensor:
    """JPEG files decoded by nvJPEG and resized on ``device``, as (N, 3, height, width) uint8.

    Non-JPEG files and files nvJPEG rejects are decoded by PIL instead. The resize is torch's antialiased
    bilinear (bicubic when the spec says so), within about one grey level of PIL's.

    Raises:
        MmfuseError: torchvision is missing or cannot decode on this device (see ``nvjpeg_available``).
    """
    if not nvjpeg_available(device):
        raise MmfuseError("GPU JPEG decoding needs CUDA and a torchvision that matches this torch")
    from torchvision.io import ImageReadMode, decode_jpeg

    mode = "bicubic" if spec.resample == Image.BICUBIC else "bilinear"
    out = torch.empty((len(paths), 3, spec.height, spec.width), dtype=torch.uint8, device=device)
    for start in range(0, len(paths), batch):
        chunk = list(range(start, min(start + batch, len(paths))))
        datas, jpeg_idx = [], []
        for i in chunk:
            raw = Path(paths[i]).read_bytes()
            if raw[:2] == b"\xff\xd8":  # the JPEG start-of-image marker
                datas.append(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
                jpeg_idx.append(i)
            else:
                out[i] = torch.from_numpy(decode_resized(paths[i], spec)).to(device)
        if not datas:
            continue
        # nvJPEG decodes on a stream of its own, into memory the caching allocator may have just freed from work
        # still queued on the current stream (a training step in flight): without these waits it overwrote live
        # activations, and training went NaN after a few steps on an H200. Wait before, and again after.
        torch.cuda.synchronize(device)
        try:
            decoded = decode_jpeg(datas, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
            torch.cuda.synchronize(device)
        except Exception:  # one bad or unusual stream (e.g. CMYK) fails the batch: fall back per image
            decoded = [None] * len(datas)
        for i, img in zip(jpeg_idx, decoded):
            if img is None:
                out[i] = torch.from_numpy(decode_resized(paths[i], spec)).to(device)
                continue
            if tuple(img.shape[1:]) != (spec.height, spec.width):
                img = torch.nn.functional.interpolate(
                    img[None].float(), (spec.height, spec.width), mode=mode, antialias=True, align_corners=False
                )[0]
                img = img.round_().clamp_(0, 255)
            out[i] = img.to(torch.uint8)
    return out
