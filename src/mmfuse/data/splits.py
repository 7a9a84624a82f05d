"""Splitting records: the label list (the classes, sorted) and a stratified train/validation split."""

from __future__ import annotations

import numpy as np

from mmfuse.data.records import Record


def label_list(records: list[Record]) -> list[str]:
    return sorted({r.label for r in records if r.label})


def stratified_split(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Holds out about ``fraction`` of each class; classes with a single row stay in train."""
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[Record]] = {}
    for r in records:
        by_label.setdefault(r.label, []).append(r)
    train, val = [], []
    for label in sorted(by_label):
        group = by_label[label]
        order = rng.permutation(len(group))
        n_val = 0 if len(group) < 2 else max(1, int(round(len(group) * fraction)))
        val += [group[i] for i in order[:n_val]]
        train += [group[i] for i in order[n_val:]]
    return sorted(train, key=lambda r: r.row), sorted(val, key=lambda r: r.row)
