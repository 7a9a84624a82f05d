"""Opening user images of any format and mode as plain RGB, and checking them before training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# Anything larger is treated as a decompression bomb rather than a photo (~ 16k x 11k pixels).
MAX_PIXELS = 178_956_970
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}

# PIL's own bomb guard warns and then raises at 2x its limit; we check the size ourselves instead.
Image.MAX_IMAGE_PIXELS = None


def to_rgb(img: Image.Image) -> Image.Image:
    """Converts any PIL mode to RGB: alpha is composited on white, 16-bit is scaled down, EXIF is honoured."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: convert("RGB") would clip at 255, so rescale to the 8-bit range first.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def load_image(path: str | Path, max_pixels: int = MAX_PIXELS, at_least: int | None = None) -> Image.Image:
    """Opens an image file as RGB (first frame of animations).

    ``at_least``: the image is about to be resized to fit this many pixels a side, so a JPEG may be decoded at a
    reduced scale (1/2, 1/4 or 1/8, in the DCT) as long as both sides stay at least this long: a 640x480 photo bound
    for 224 px decodes at 320x240, several times faster. Only for pictures people look at (report thumbnails): a
    tower's pixels are always decoded in full (``towers.image_pixels``), since serving receives images already
    decoded and must see the pixels training saw.

    Raises:
        ValueError: the image is larger than ``max_pixels``.
        OSError: the file is missing, truncated or not an image.
    """
    with Image.open(path) as img:
        check_size(img, max_pixels)
        if at_least and img.format == "JPEG":
            img.draft(img.mode, (at_least, at_least))
        img.load()
        return to_rgb(img)


def check_size(img: Image.Image, max_pixels: int = MAX_PIXELS) -> None:
    w, h = img.size
    if w * h > max_pixels:
        raise ValueError(f"image is {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,} (decompression bomb?)")


def check_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> str | None:
    """Returns why an image can't be used, or None when it decodes cleanly.

    JPEGs are decoded in draft mode (reduced scale), which still reads the whole stream and so still finds
    truncated files, at a fraction of the cost of a full decode.
    """
    path = Path(path)
    if not path.exists():
        return "image file not found"
    if not path.is_file():
        return "image path is not a file"
    try:
        with Image.open(path) as img:
            check_size(img, max_pixels)
            if img.format == "JPEG":
                img.draft("RGB", (img.size[0] // 8 or 1, img.size[1] // 8 or 1))
            img.load()
    except ValueError as e:
        return str(e)
    except Exception as e:  # PIL raises a zoo of types for corrupt files; all mean the same thing here
        return f"unreadable image ({type(e).__name__}: {e})"
    return None
