"""The tabular input of the fusion head: standardised numbers with their missing indicators (``data.tabular``), and
one learned embedding per categorical column, concatenated into one vector."""

from __future__ import annotations

import torch
from torch import nn

from mmfuse.data.tabular import TabularSpec


def embedding_dim(categories: int) -> int:
    """fastai's rule of thumb for a category's embedding width, capped small: these heads see thousands of rows."""
    return max(2, min(16, round(1.6 * categories**0.56)))


class TabularEncoder(nn.Module):
    """(numbers, missing indicators) and category indices to one vector of ``dim``."""

    def __init__(self, spec: TabularSpec):
        super().__init__()
        self.embeds = nn.ModuleList(
            nn.Embedding(len(c.vocab) + 1, embedding_dim(len(c.vocab) + 1)) for c in spec.categorical
        )
        self.dim = 2 * len(spec.numeric) + sum(e.embedding_dim for e in self.embeds)

    def forward(self, numeric: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        parts = [numeric] + [e(codes[:, j]).to(numeric.dtype) for j, e in enumerate(self.embeds)]
        return torch.cat(parts, dim=-1)
