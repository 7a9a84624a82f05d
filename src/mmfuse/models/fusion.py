"""Fusion heads: turn one pooled vector per modality into class logits.

Every head normalises each modality on its own first (LayerNorm). Raw concatenation lets the wider or larger-valued
modality swamp the other: on the emoji data, 1280-d image features drowned 384-d text features (shared/QUALITY.md).
"""

from __future__ import annotations

import torch
from torch import nn

from mmfuse.config import FUSION_HEADS

_HEADS: dict[str, type[nn.Module]] = {}


def register_head(name: str):
    """Registers a fusion head class under a name from ``config.FUSION_HEADS`` (where the CLI's choices live)."""

    def wrap(cls):
        if name not in FUSION_HEADS:
            raise ValueError(f"{name} is not in config.FUSION_HEADS")
        _HEADS[name] = cls
        return cls

    return wrap


def head_names() -> list[str]:
    return sorted(_HEADS)


def build_head(
    name: str, dims: list[int], num_classes: int, hidden: int = 256, dropout: float = 0.5, input_dropout: float = 0.0
) -> nn.Module:
    return _HEADS[name](dims, num_classes, hidden, dropout, input_dropout)


class Dropout(nn.Dropout):
    """``nn.Dropout`` whose CPU mask is drawn as random bytes, so p is rounded to a multiple of 1/256.

    torch's CPU dropout draws through ``bernoulli_`` at about 14 ns an element: 15% of a fusion head's training step
    on cached features (1.9 ms of 13 for a 64 x 2048 batch; random bytes take 0.7 ms). GPUs keep torch's own.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu" or self.inplace:
            return super().forward(x)
        cut = round(self.p * 256)
        keep = torch.empty(x.shape, dtype=torch.uint8).random_() >= cut  # kept with probability 1 - cut / 256
        return x * keep * (256 / max(256 - cut, 1))


def normaliser(dim: int, input_dropout: float) -> nn.Sequential:
    """One modality's LayerNorm, then dropout on the normalised features (a regulariser for small heads)."""
    return nn.Sequential(nn.LayerNorm(dim), Dropout(input_dropout))


def normalisers(dims: list[int], input_dropout: float) -> nn.ModuleList:
    return nn.ModuleList(normaliser(d, input_dropout) for d in dims)


@register_head("concat")
class ConcatHead(nn.Module):
    """The reference design: concatenate, Linear(hidden), ReLU, Dropout, Linear(classes)."""

    def __init__(self, dims: list[int], num_classes: int, hidden: int, dropout: float, input_dropout: float = 0.0):
        super().__init__()
        self.norms = normalisers(dims, input_dropout)
        self.mlp = nn.Sequential(
            nn.Linear(sum(dims), hidden), nn.ReLU(), Dropout(dropout), nn.Linear(hidden, num_classes)
        )

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return self.mlp(torch.cat([n(f) for n, f in zip(self.norms, feats)], dim=-1))


@register_head("gated")
class GatedHead(nn.Module):
    """A gated multimodal unit: each modality is projected, and a learned per-sample gate mixes them."""

    def __init__(self, dims: list[int], num_classes: int, hidden: int, dropout: float, input_dropout: float = 0.0):
        super().__init__()
        self.norms = normalisers(dims, input_dropout)
        self.projs = nn.ModuleList(nn.Linear(d, hidden) for d in dims)
        self.gate = nn.Linear(sum(dims), len(dims) * hidden)
        self.out = nn.Sequential(Dropout(dropout), nn.Linear(hidden, num_classes))
        self.n, self.hidden = len(dims), hidden

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        normed = [n(f) for n, f in zip(self.norms, feats)]
        h = torch.stack([torch.tanh(p(f)) for p, f in zip(self.projs, normed)], dim=1)  # B, M, H
        g = self.gate(torch.cat(normed, dim=-1)).view(-1, self.n, self.hidden).softmax(dim=1)
        return self.out((g * h).sum(1))


@register_head("attention")
class AttentionHead(nn.Module):
    """A small transformer over one projected token per modality, so each modality can attend to the other.

    The encoded tokens are concatenated for the classifier rather than read from a CLS token: a lone CLS readout
    learned a simple two-modality task to only 70% where the concatenation reached 100%.
    """

    def __init__(
        self, dims: list[int], num_classes: int, hidden: int, dropout: float, input_dropout: float = 0.0, heads: int = 4
    ):
        super().__init__()
        self.projs = nn.ModuleList(nn.Sequential(*normaliser(d, input_dropout), nn.Linear(d, hidden)) for d in dims)
        self.modality = nn.Parameter(torch.zeros(len(dims), hidden))
        nn.init.normal_(self.modality, std=0.02)
        layer = nn.TransformerEncoderLayer(
            hidden, heads, dim_feedforward=2 * hidden, dropout=0.1, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.out = nn.Sequential(
            nn.LayerNorm(len(dims) * hidden), Dropout(dropout), nn.Linear(len(dims) * hidden, num_classes)
        )

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        tokens = torch.stack([p(f) for p, f in zip(self.projs, feats)], dim=1) + self.modality
        return self.out(self.encoder(tokens).flatten(1))


@register_head("linear")
class LinearHead(nn.Module):
    """Logistic regression: one linear layer on each modality's L2-normalised features, concatenated.

    It trains by gradient like any head, but its use is the ensemble's probes (``training.portfolio``), whose weights
    come from scikit-learn's fit (``set_weights``): stored as a head, a probe predicts, evaluates and serves as every
    run does. No LayerNorm, unlike the other heads: the probe it reproduces is fitted on L2-normalised features. They
    enter the layer scaled by the square root of their width (each coordinate about unit size, as after a LayerNorm),
    so that gradient training moves at the other heads' learning rates; ``set_weights`` divides the scale back out.
    """

    def __init__(self, dims: list[int], num_classes: int, hidden: int, dropout: float, input_dropout: float = 0.0):
        super().__init__()
        self.drop = Dropout(input_dropout)
        self.linear = nn.Linear(sum(dims), num_classes)
        self.dims = list(dims)
        self.register_buffer("scale", torch.tensor([float(d) ** 0.5 for d in dims]), persistent=False)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = [nn.functional.normalize(f, dim=-1) * s.to(f.dtype) for f, s in zip(feats, self.scale)]
        return self.linear(self.drop(torch.cat(x, dim=-1)))

    @torch.no_grad()
    def set_weights(self, coef, intercept, classes) -> None:
        """Takes a fitted scikit-learn ``LogisticRegression``'s ``coef_``, ``intercept_`` and ``classes_`` (column
        indices into this head's outputs), fitted on the L2-normalised features concatenated, so that softmax of the
        output is its ``predict_proba``.

        A binary fit has one row: softmax over (0, z) is the sigmoid of z. A class the fit never saw (absent from a
        fold's training rows) gets a bias far below the others: a probability near 0, as the fit gave it.
        """
        coef, intercept = torch.as_tensor(coef, dtype=torch.float32), torch.as_tensor(intercept, dtype=torch.float32)
        if coef.shape[0] == 1:
            coef, intercept = torch.cat([torch.zeros_like(coef), coef]), torch.cat([torch.zeros(1), intercept])
        coef = coef / torch.cat([torch.full((d,), float(d) ** 0.5) for d in self.dims])
        weight = torch.zeros_like(self.linear.weight)
        bias = torch.full_like(self.linear.bias, float(intercept.min()) - 1e4)
        index = torch.as_tensor(list(classes), dtype=torch.long)
        weight[index], bias[index] = coef, intercept
        self.linear.weight.copy_(weight)
        self.linear.bias.copy_(bias)
