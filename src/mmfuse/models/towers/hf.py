"""Towers over Hugging Face ``AutoModel``: any vision or text model named by hub id or local directory, loaded with
errors that say how to get it offline (``_hf_load``), or rebuilt from a run directory's assets.

A vision tower whose image processor is a fixed-size resize and normalisation takes its pixels from
``base.tower_pixels`` (its ``pixel_spec``); one that crops or pads keeps its processor.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import inspect
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from mmfuse.config import TEXT_POOLINGS
from mmfuse.errors import MmfuseError
from mmfuse.models.towers.base import PixelSpec, Tower, packaged_towers, tower_pixels

log = logging.getLogger(__name__)


def _pool(hidden: torch.Tensor, pooling: str, mask: torch.Tensor | None = None, pooled: torch.Tensor | None = None):
    if hidden.ndim == 4:  # convolutional maps (B, C, H, W) have no CLS token: use the model's own pooler, or mean
        return pooled.flatten(1) if pooling == "cls" and pooled is not None else hidden.mean((2, 3))
    if pooling == "cls":
        return hidden[:, 0]
    if mask is None:
        return hidden.mean(1)
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


HUB_PROBE_SECONDS = 3.0
"""How long ``hub_offline`` waits for the hub's answer before going offline, unless ``HF_HUB_ETAG_TIMEOUT`` is set."""


@functools.cache
def hub_offline() -> str | None:
    """Why the Hugging Face Hub is not to be asked (``HF_HUB_OFFLINE`` is set, or it did not answer one HEAD request
    within ``HUB_PROBE_SECONDS``, or within ``HF_HUB_ETAG_TIMEOUT`` where the user set it, sent through
    huggingface_hub's own session: its endpoint, proxies and headers), or None when it answers. Asked once per process.

    Without network, each ``from_pretrained`` would otherwise retry with back-off for about a minute before failing;
    once the hub is found unreachable, huggingface_hub is put in offline mode for the rest of the process (and its
    children), so models load from the local hub cache at once.
    """
    from huggingface_hub import constants  # deferred: imported with transformers, which a tower load brings anyway
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    wait = constants.HF_HUB_ETAG_TIMEOUT if os.environ.get("HF_HUB_ETAG_TIMEOUT") else HUB_PROBE_SECONDS
    try:
        get_session().head(constants.ENDPOINT, timeout=wait)
    # Any answer, even an error status, means the hub is reachable. The HTTP client (httpx, httpx2) and so its
    # exception types differ between huggingface_hub versions: any failure to get an answer means it is not.
    except Exception as e:
        log.info("the Hugging Face Hub (%s) cannot be reached (%s): using only its local cache", constants.ENDPOINT, e)
        # transformers asks huggingface_hub's is_offline_mode(), which reads this; local_files_only alone is not
        # passed on to every lookup (the PEFT adapter check of transformers 5 still retries for a minute).
        constants.HF_HUB_OFFLINE = True
        os.environ["HF_HUB_OFFLINE"] = "1"
        return (
            f"the Hugging Face Hub ({constants.ENDPOINT}) could not be reached within {wait:g} s ({e}; on a slow "
            "network, set HF_HUB_ETAG_TIMEOUT to wait longer)"
        )
    return None


def _hf_load(loader, name: str, what: str, flag: str | None = None, **kwargs):
    """Calls ``loader.from_pretrained`` with an error that names both ways of getting the model; ``flag`` is the
    option the name came from (--vision, --text). A hub name is looked up on the hub only when it answers in seconds
    (``hub_offline``); otherwise only in the local hub cache, so that no network fails fast."""
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
    local = Path(name).exists()
    offline = None if local else hub_offline()
    try:
        return loader.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:
        where = "a local directory that exists" if local else "no local directory"
        hub = (
            f"{offline}, and the local hub cache did not provide it: {str(e).splitlines()[0]}"
            if offline
            else f"the Hugging Face Hub did not provide it: {str(e).splitlines()[0]}"
        )
        # A packaged name mistyped (MiniLM, efficientnet-lite1) is otherwise looked up on the hub.
        close = [] if local else difflib.get_close_matches(name.lower(), packaged_towers(), cutoff=0.8)
        mean = f"Did you mean the packaged {' or '.join(close)}? " if close else ""
        # A hub id is owner/name (microsoft/resnet-50); a bare name is one only for a few legacy models.
        hub_id = name if "/" in name and not local else "OWNER/NAME"
        shape = (
            "A hub id looks like owner/name (e.g. microsoft/resnet-50, google/vit-base-patch16-224). "
            if "/" not in name and not local
            else ""
        )
        as_flag = f" as {flag} DIR (offline, each hub tower needs one: --vision DIR and --text DIR)" * bool(flag)
        raise MmfuseError(
            f"Could not load the {what} '{name}' ({where}; {hub}).\n{mean}{shape}"
            f"Either pass a local directory holding the model (config.json, weights, tokenizer or preprocessor "
            f"files){as_flag}, e.g. one made on a machine with network by "
            f"`hf download {hub_id} --local-dir DIR`, or run where the hub is reachable so it is cached. "
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

    def preprocess(self, images: Sequence[str | Path | Image.Image]) -> dict[str, torch.Tensor]:
        """uint8 pixels where the processor is a plain resize (``pixel_spec``), so every path gives the same ones;
        else the processor's float pixels (images opened by the caller)."""
        if self.pixel_spec is not None:
            return {"pixel_values": tower_pixels(images, self.pixel_spec)}
        return {"pixel_values": self.processor(list(images), return_tensors="pt")["pixel_values"]}

    def forward_features(self, pixel_values: torch.Tensor):
        """The model's whole output (a ``ModelOutput``), not only its last hidden state: ``forward`` may pool with
        the model's own ``pooler_output``."""
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
    quantize: str | None = None
    """int8 where --quantize asked for it: the CPU engine runs its frozen forward quantised (``onnx_engine``)."""

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
        if self.quantize:
            spec["quantize"] = self.quantize
        return {**spec, "lora": self.lora} if self.lora else spec

    def save_assets(self, directory: Path) -> None:
        self._full_config.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
