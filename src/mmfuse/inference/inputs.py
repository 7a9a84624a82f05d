"""The inputs of ``Predictor.predict`` checked one by one: lists, texts, images (paths, PIL images, arrays), and the
rows of a model with named columns."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mmfuse.data.checks import text_problem
from mmfuse.data.columns import Columns
from mmfuse.data.images import load_image, to_rgb
from mmfuse.data.records import Record
from mmfuse.errors import MmfuseError


def as_list(items, name: str, one: str) -> list:
    """The inputs of ``predict`` as a list. A lone path or image is refused rather than iterated: a str is a
    Sequence of characters, and would have been read as one image (or one text) per character."""
    if isinstance(items, np.ndarray) and items.ndim in (1, 4):
        return list(items)  # an array of paths or texts, or a batch of HxWxC images
    if hasattr(items, "columns"):  # a DataFrame iterates over its column names
        raise MmfuseError(f"{name} is a table; pass one of its columns, e.g. df[{one!r}]")
    if isinstance(items, (str, bytes, Path, Image.Image, np.ndarray, torch.Tensor, dict)):
        raise MmfuseError(
            f"{name} must be a list with one {one} per input, got a {type(items).__name__}; "
            f"wrap it in a list: predict([image], [text])."
        )
    try:
        return list(items)  # a generator or any other iterable, read once
    except TypeError:
        raise MmfuseError(f"{name} must be a list, got {type(items).__name__}") from None


def check_text(text, i: int) -> str:
    """A text as str: None and NaN (a missing value in a pandas column) are no text; other types, and text a
    tokenizer cannot take (a lone surrogate), are refused."""
    if text is None or (isinstance(text, float) and np.isnan(text)):
        return ""
    if not isinstance(text, str):
        raise MmfuseError(f"text #{i} is {text!r} ({type(text).__name__}), not a str")
    problem = text_problem(text)
    if problem:
        raise MmfuseError(f"text #{i}: {problem}")
    return text


def check_image(image, i: int) -> str | Path | Image.Image:
    """A path or PIL image; an HxW or HxWx3/4 uint8 numpy array becomes a PIL image."""
    if isinstance(image, (str, Path, Image.Image)):
        return image
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))):
            raise MmfuseError(
                f"image #{i} is a {image.dtype} array of shape {image.shape}; give an HxW or HxWx3 (RGB) uint8 "
                "array, a PIL image or a file path."
            )
        return Image.fromarray(image)
    hint = " (convert it with torchvision.transforms.functional.to_pil_image)" * isinstance(image, torch.Tensor)
    raise MmfuseError(
        f"image #{i} is of type {type(image).__name__}; give a file path, a PIL image or an HxWx3 uint8 numpy "
        f"array{hint}."
    )


def open_input(image: str | Path | Image.Image, i: int) -> Image.Image:
    try:
        img = to_rgb(image) if isinstance(image, Image.Image) else load_image(image)
    except (OSError, ValueError) as e:
        raise MmfuseError(f"image #{i} ({image}) cannot be read: {e}") from None
    if 0 in img.size:  # an empty image would be resized into a made-up one and classified
        raise MmfuseError(f"image #{i} is empty ({img.size[0]}x{img.size[1]} pixels)")
    return img


def row_record(row, i: int, named: Columns, clip: Callable[[list[str]], list[str]]) -> Record:
    """One row of ``predict(rows=...)`` as a record: each named column's cell checked (an image file must exist)."""
    if not isinstance(row, dict):
        raise MmfuseError(f"row #{i} is a {type(row).__name__}; give a dict of column: value")
    absent = [c for c in named.names if c not in row]
    if absent:
        raise MmfuseError(f"row #{i} has no value for column(s) {absent}; give None for an empty cell")
    cells = {}
    for c in named.image:
        v = row[c]
        empty = v is None or (isinstance(v, float) and np.isnan(v)) or (isinstance(v, str) and not v.strip())
        cells[c] = None if empty else check_image(v, i)
        if isinstance(cells[c], (str, Path)) and not Path(cells[c]).is_file():
            raise MmfuseError(f"row #{i}: the {c} image file {cells[c]} is not found")
    for c in named.text:
        cells[c] = clip([check_text(row[c], i)])[0]
    for c in named.tabular:
        v = row[c]
        cells[c] = "" if v is None or (isinstance(v, float) and np.isnan(v)) else v
    first = next((cells[c] for c in named.image if cells[c] is not None), None)
    return Record(first, cells[named.text[0]] if named.text else "", None, i, str(i), cells=cells)
