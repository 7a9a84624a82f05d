"""The factory: every tower, packaged or from Hugging Face, new or from a run directory, is built here.

``requested_spec(modality, cfg)`` is the spec a config asks for; ``build_tower(spec, assets)`` builds it, with
pretrained weights or as the architecture a run's weights are loaded into; ``packaged_card`` gives a packaged frozen
tower's card without building it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from mmfuse.config import PACKAGED_TOWERS, ModelConfig
from mmfuse.errors import MmfuseError
from mmfuse.models.lora import add_adapters
from mmfuse.models.towers.base import _TOWERS, Tower, TowerCard, packaged_towers
from mmfuse.models.towers.hf import HFTextTower, HFVisionTower, quiet_loading
from mmfuse.models.towers.onnx_engine import int8_refusal
from mmfuse.models.towers.packaged import EfficientNetLiteTower  # noqa: F401 (registers the packaged towers)


def _expand(name: str) -> str:
    # A shell expands ~ in a flag, but not in a --config file; from_pretrained would take "~/vit" for a hub id.
    return str(Path(name).expanduser()) if name.startswith("~") else name


def requested_spec(modality: str, cfg: ModelConfig) -> dict:
    """The spec of the tower ``cfg`` asks for (resolved by ``config.resolve``). A packaged tower's is complete
    without building it; a Hugging Face tower's gains its dimension when built."""
    name = _expand(cfg.vision if modality == "image" else cfg.text)
    flag, other_flag = {"image": ("--vision", "--text"), "text": ("--text", "--vision")}[modality]
    refused = int8_refusal(name) if modality == "text" and cfg.quantize != "none" else None
    if refused:  # before anything is built, embedded or exported, and before a packaged tower's weights are looked for
        raise MmfuseError(f"--quantize int8 is refused for the text tower {name}: {refused}. Leave it out.")
    if name in _TOWERS:
        if PACKAGED_TOWERS[name]["modality"] != modality:
            raise MmfuseError(
                f"'{name}' is a {PACKAGED_TOWERS[name]['modality'].replace('image', 'vision')} tower; pass it with "
                f"{other_flag}, not {flag}."
            )
        return _quantized(_TOWERS[name].spec_for(name, cfg), modality, cfg)
    if modality == "image":
        if cfg.image_size is not None:
            cnns = [n for n in packaged_towers() if n.startswith("efficientnet")]
            raise MmfuseError(
                f"--image-size applies to the packaged vision towers ({', '.join(cnns)}); '{name}' resizes as its "
                "image processor says."
            )
        return {"type": "hf-vision", "name": name, "pooling": cfg.vision_pooling}
    spec = {
        "type": "hf-text",
        "name": name,
        "pooling": cfg.text_pooling or "cls",
        "max_length": cfg.max_length,
        "layers": cfg.text_layers,
        "layer_mean": cfg.text_layer_mean or 1,
    }
    return _quantized(spec, modality, cfg)


def _quantized(spec: dict, modality: str, cfg: ModelConfig) -> dict:
    """A text tower's spec with --quantize in it: int8 features differ from float32 ones, so the spec, which the
    feature cache's key hashes, must differ too. Without --quantize the spec (and every existing key) is unchanged."""
    if modality != "text" or cfg.quantize == "none":
        return spec
    return {**spec, "quantize": cfg.quantize}


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
    if spec.get("quantize"):  # run in int8 by the CPU engine (onnx_engine.engine), which reads it from the tower
        tower.quantize = spec["quantize"]
    if spec.get("lora"):  # a LoRA run's adapters, into which its weights are loaded next (PEFT imported only then)
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
