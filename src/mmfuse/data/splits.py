"""Splitting records: the label list (the classes, sorted) and a stratified train/validation split."""

from __future__ import annotations

import numpy as np

from mmfuse.data.records import Record, label_names


def label_list(records: list[Record]) -> list[str]:
    """The classes, sorted; for multi-label rows, every label of their sets."""
    return sorted({x for r in records for x in label_names(r)})


def strata(records: list[Record]) -> list[str | None]:
    """What a stratified split groups each row by: its label, or for a multi-label row its rarest label (ties to the
    first in sorted order), so that every label, rare ones first, lands on both sides."""
    if not any(r.labels is not None for r in records):
        return [r.label for r in records]
    counts: dict[str, int] = {}
    for r in records:
        for x in label_names(r):
            counts[x] = counts.get(x, 0) + 1
    return [min(label_names(r), key=lambda x: (counts[x], x)) if label_names(r) else None for r in records]


def stratified_split(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Holds out about ``fraction`` of each class (of multi-label rows, by their rarest label: ``strata``); classes
    with a single row stay in train."""
    rng = np.random.default_rng(seed)
    by_label: dict[str | None, list[Record]] = {}
    for r, key in zip(records, strata(records)):
        by_label.setdefault(key, []).append(r)
    train, val = [], []
    for label in sorted(by_label, key=lambda k: (k is None, k or "")):
        group = by_label[label]
        order = rng.permutation(len(group))
        n_val = 0 if len(group) < 2 else max(1, int(round(len(group) * fraction)))
        val += [group[i] for i in order[:n_val]]
        train += [group[i] for i in order[n_val:]]
    return sorted(train, key=lambda r: r.row), sorted(val, key=lambda r: r.row)
