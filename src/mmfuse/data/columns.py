"""A model's named columns (``--image-columns``, ``--text-columns``, ``--tabular-columns``): which manifest columns it
reads (``Columns``), the fusion head's inputs they make (``Slot``, ``input_slots``), and one column of rows seen as rows
of one image or one text (``column_records``), which the feature path reads as it reads any row."""

from __future__ import annotations

from dataclasses import dataclass

from mmfuse.config import MODALITIES, ModelConfig, tabular_kind
from mmfuse.data.records import Record


@dataclass(frozen=True)
class Slot:
    """One input of the fusion head: a column through its modality's tower (or the tabular columns together)."""

    name: str
    """Its key in a batch and in the model's weights: the modality itself for a run of one image and one text;
    image0, image1, text0..., tabular for a run with columns."""
    modality: str
    column: str
    """The manifest column it reads ('' for tabular, which reads all of --tabular-columns)."""


def input_slots(m: ModelConfig) -> list[Slot]:
    """The fusion head's inputs, in order. One per modality for a run without columns (the names and weights of every
    run before columns existed); with columns, one per image and text column (in the order given), then tabular."""
    if not m.columns:
        return [Slot(x, x, x) for x in m.modalities]
    named = {"image": m.image_columns or ["image"], "text": m.text_columns or ["text"]}
    slots = [Slot(f"{x}{i}", x, c) for x in MODALITIES if x in m.modalities for i, c in enumerate(named[x])]
    return slots + [Slot("tabular", "tabular", "")] * ("tabular" in m.modalities)


@dataclass(frozen=True)
class Columns:
    """The manifest columns a model with named columns reads, by modality (``ModelConfig.image_columns``...)."""

    image: tuple[str, ...] = ()
    text: tuple[str, ...] = ()
    tabular: tuple[str, ...] = ()

    @classmethod
    def of(cls, m: ModelConfig) -> Columns | None:
        """The columns of the modalities ``m`` uses; None for a model of one image and one text."""
        if not m.columns:
            return None
        used = set(m.modalities)
        return cls(
            tuple(m.image_columns or ["image"]) if "image" in used else (),
            tuple(m.text_columns or ["text"]) if "text" in used else (),
            tuple(tabular_kind(c)[0] for c in m.tabular_columns) if "tabular" in used else (),
        )

    @property
    def names(self) -> list[str]:
        return [*self.image, *self.text, *self.tabular]


def column_records(records: list[Record], modality: str, column: str) -> list[Record]:
    """One column of rows with named columns as rows of one image or one text, which the feature path (cache keys,
    towers) reads as it reads any row; ``records`` themselves when they have no columns. An empty image is None."""
    if not records or records[0].cells is None:
        return records
    if modality == "image":
        return [Record(r.cells.get(column), "", r.label, r.row, r.source, labels=r.labels) for r in records]
    return [Record(r.image, r.cells.get(column) or "", r.label, r.row, r.source, labels=r.labels) for r in records]


def has_cell(record: Record, modality: str, column: str) -> bool:
    """Whether a row holds this input: an image, or a text with something besides spaces."""
    if record.cells is None:
        return modality == "image" or bool(record.text.strip())
    value = record.cells.get(column)
    return value is not None if modality == "image" else bool((value or "").strip())
