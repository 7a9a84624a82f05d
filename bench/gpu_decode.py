"""JPEG decoding on the GPU (nvJPEG through torchvision), for the throughput benchmark's files rows.

Not part of mmfuse: the library's GPU path decodes each image once into the uint8 pixel cache
(``mmfuse.features.sources.load_pixels``), which a benchmark on an H200 found fast enough (files vs synthetic 0.98x);
nvJPEG is measured here beside it. torchvision is never required: it is imported only inside these functions, and
``nvjpeg_available`` says whether it can run.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from mmfuse.errors import MmfuseError
from mmfuse.features.sources import decode_resized
from mmfuse.models.towers import PixelSpec


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
