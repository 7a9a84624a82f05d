"""A row of user data as every layer sees it (``Record``), a bad row's reason (``Problem``), and image hashes.

Reading folders and manifests into records is ``data.read``; checking them is ``data.checks``; splitting them is
``data.splits``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from mmfuse.config import ModelConfig, tabular_kind
from mmfuse.data.filestats import default_workers, file_index
from mmfuse.errors import DataError


@dataclass(slots=True)  # no per-row __dict__: a million rows are held at once
class Record:
    image: Path
    text: str
    label: str | None
    row: int
    """Where the row came from: the manifest's 1-based data row, or the file's position in a folder listing."""
    source: str
    """The image as the user wrote it (relative path), for reports and predictions."""
    cells: dict | None = None
    """For a model with named columns (``Columns``): each column's cell by name, an image as its path (or a PIL image
    given to the Python API; None when empty), a text or tabular cell as text ('' when empty). ``image`` and ``text``
    then hold the first image and text column's, for reports. None for a row of one image and one text."""


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
        return [Record(r.cells.get(column), "", r.label, r.row, r.source) for r in records]
    return [Record(r.image, r.cells.get(column) or "", r.label, r.row, r.source) for r in records]


def has_cell(record: Record, modality: str, column: str) -> bool:
    """Whether a row holds this input: an image, or a text with something besides spaces."""
    if record.cells is None:
        return modality == "image" or bool(record.text.strip())
    value = record.cells.get(column)
    return value is not None if modality == "image" else bool((value or "").strip())


@dataclass
class Problem:
    row: int
    image: str
    reason: str


def data_error(problems: list[Problem], source) -> DataError:
    return DataError([(p.row, p.image, p.reason) for p in problems], str(source))


def _sha256(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except (OSError, ValueError):
        return None


def image_hashes(records: list[Record], workers: int | None = None) -> list[str | None]:
    """The SHA-256 of each record's image file (None where it cannot be read), remembered across runs under the
    same key as the feature cache's, so images a run embedded are not read again."""
    return file_index().values("sha256", [str(r.image) for r in records], _sha256, workers or default_workers())
