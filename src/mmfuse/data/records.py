"""A row of user data as every layer sees it (``Record``), a bad row's reason (``Problem``), and image hashes.

Reading folders and manifests into records is ``data.read``; checking them is ``data.checks``; splitting them is
``data.splits``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

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
    cells: dict | None = field(default=None, kw_only=True)
    """For a model with named columns (``data.columns.Columns``): each column's cell by name, an image as its path
    (or a PIL image given to the Python API; None when empty), a text or tabular cell as text ('' when empty).
    ``image`` and ``text`` then hold the first image and text column's, for reports. None for one image and one text."""
    labels: tuple[str, ...] | None = field(default=None, kw_only=True)
    """A multi-label row's label set, sorted (``label`` then holds it joined by ``LABEL_SEP``); None: single-label."""


LABEL_SEP = "|"
"""How a label set is written as one string: in manifests' labels cells, predictions and reports."""


def label_names(record: Record) -> tuple[str, ...]:
    """The labels a row names: its set (multi-label), or its one label; () when it has none."""
    if record.labels is not None:
        return record.labels
    return (record.label,) if record.label else ()


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
