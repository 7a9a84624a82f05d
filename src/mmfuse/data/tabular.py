"""Tabular columns (``--tabular-columns``): each column's kind, inferred from the training rows or forced (``name:num``,
``name:cat``), and the statistics fitted on them that turn cells into the model's inputs:

- a number is standardised by the training mean and standard deviation, and a second input says whether it was
  missing (an empty cell, or one that is not a number: it then reads as the mean, 0);
- a category is its index in the training vocabulary (most frequent first); 0 is empty or unseen.

The statistics are data the model owns: a run keeps them in ``tabular.json`` (``TabularSpec.to_json``), so predict
and serve on new rows use the training ones. No torch: ``models.tabular.TabularEncoder`` embeds what ``encode`` gives.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

from mmfuse.config import tabular_kind
from mmfuse.data.records import Record
from mmfuse.errors import MmfuseError

log = logging.getLogger(__name__)
TABULAR_FILE = "tabular.json"
MAX_CATEGORIES = 1000
"""A categorical column keeps its most frequent categories up to this many; rarer ones read as unseen."""


@dataclass
class TabularColumn:
    name: str
    kind: str
    """num or cat."""
    mean: float = 0.0
    sd: float = 1.0
    vocab: list[str] = field(default_factory=list)
    """A categorical column's categories, index 1 onwards (0: empty or unseen)."""


@dataclass
class TabularSpec:
    """The tabular columns of a run, in order, with their training statistics."""

    columns: list[TabularColumn]

    @property
    def numeric(self) -> list[TabularColumn]:
        return [c for c in self.columns if c.kind == "num"]

    @property
    def categorical(self) -> list[TabularColumn]:
        return [c for c in self.columns if c.kind == "cat"]

    def to_json(self) -> dict:
        return {"columns": [asdict(c) for c in self.columns]}

    @classmethod
    def from_json(cls, raw: dict, where: str = "tabular.json") -> TabularSpec:
        try:
            return cls([TabularColumn(**c) for c in raw["columns"]])
        except (KeyError, TypeError) as e:
            raise MmfuseError(f"{where} is damaged ({e}); train the run again.") from None

    def encode(self, records: list[Record]) -> tuple[np.ndarray, np.ndarray]:
        """(N, 2 x numeric columns) float32: standardised values, then their missing indicators; and (N, categorical
        columns) int64 category indices."""
        num, cat = self.numeric, self.categorical
        values = np.zeros((len(records), 2 * len(num)), dtype=np.float32)
        codes = np.zeros((len(records), len(cat)), dtype=np.int64)
        index = [{v: i for i, v in enumerate(c.vocab, 1)} for c in cat]
        bad = Counter()
        for i, r in enumerate(records):
            cells = r.cells or {}
            for j, c in enumerate(num):
                x = _number(cells.get(c.name))
                if x is None:
                    values[i, len(num) + j] = 1.0
                    bad[c.name] += bool(str(cells.get(c.name) or "").strip())
                else:
                    values[i, j] = (x - c.mean) / c.sd
            for j, c in enumerate(cat):
                codes[i, j] = index[j].get(_category(cells.get(c.name)), 0)
        for name, n in bad.items():
            if n:
                log.warning("%d cell(s) of the numeric column %s are not numbers: read as missing", n, name)
        return values, codes


def _number(cell) -> float | None:
    if isinstance(cell, (int, float)) and not isinstance(cell, bool):
        x = float(cell)
    else:
        text = str(cell if cell is not None else "").strip()
        if not text:
            return None
        try:
            x = float(text)
        except ValueError:
            return None
    return x if math.isfinite(x) else None


def _category(cell) -> str:
    return str(cell if cell is not None else "").strip()


def fit_tabular(records: list[Record], specs: list[str]) -> TabularSpec:
    """Each column of ``specs`` (``--tabular-columns`` entries) with its kind and statistics from ``records`` (the
    training rows): numeric when every non-empty cell is a finite number, unless forced."""
    columns = []
    for spec in specs:
        name, kind = tabular_kind(spec)
        cells = [(r.cells or {}).get(name) for r in records]
        given = [c for c in cells if _category(c)]
        numbers = [_number(c) for c in given]
        if kind is None:
            kind = "num" if given and all(x is not None for x in numbers) else "cat"
        if kind == "num":
            xs = np.array([x for x in numbers if x is not None], dtype=np.float64)
            if given and not len(xs):
                raise MmfuseError(f"--tabular-columns {spec}: none of the column's cells is a number")
            mean = float(xs.mean()) if len(xs) else 0.0
            sd = float(xs.std()) if len(xs) > 1 else 0.0
            columns.append(TabularColumn(name, "num", mean, sd if sd > 0 else 1.0))
        else:
            counts = Counter(_category(c) for c in given)
            vocab = [v for v, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:MAX_CATEGORIES]]
            columns.append(TabularColumn(name, "cat", vocab=vocab))
    log.info(
        "tabular columns: %s",
        ", ".join(f"{c.name} ({'number' if c.kind == 'num' else f'{len(c.vocab)} categories'})" for c in columns),
    )
    return TabularSpec(columns)
