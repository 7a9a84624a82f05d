"""Whether evaluated data is what a run was trained on: scores on training rows flatter the model, so evaluate warns."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from mmfuse.data.columns import Columns
from mmfuse.data.read import read_data
from mmfuse.data.records import Record, image_hashes
from mmfuse.errors import MmfuseError

log = logging.getLogger(__name__)

SAME_DATA_SAMPLE = 500  # rows of the evaluated data whose images are looked for among the training images


def warn_if_trained_on(data_cfg, run_dir: Path, data, records: list[Record], named: Columns | None = None) -> bool:
    """Warns when ``data`` is what the run was trained on: the same file as its config's data.train, or over half
    of its images (by content) among the training images. Scores on training data flatter the model.

    Only training files of the same size as an evaluated image are hashed, so a large training set costs a stat
    per file, not a read. ``named``: the model's named columns, as its training data is read (its rows' ``image``
    is then their first image column's).
    """
    train = getattr(data_cfg, "train", None)
    if not train or not records:
        return False
    # A config may hold the path as given at training time (relative to where train ran) or relative to the run.
    places = [Path(train), run_dir / train]
    where = next((p for p in places if p.exists()), None)
    if where is not None and where.resolve() == Path(data).resolve():
        log.warning(
            "%s is the data this run was trained on (data.train in %s): the scores will flatter the model; "
            "evaluate on held-out data.",
            data,
            run_dir / "config.yaml",
        )
        return True
    if where is None:
        return False
    try:
        trained, _ = read_data(where, getattr(data_cfg, "captions", None), need_label=False, named=named)
    except (MmfuseError, OSError):
        return False  # the training data changed or moved since: nothing to compare with
    step = max(1, len(records) // SAME_DATA_SAMPLE)
    sample = records[::step][:SAME_DATA_SAMPLE]
    sizes = {_size(r.image) for r in sample if r.image != Path()} - {None}  # Path(): a row of no image
    candidates = [r for r in trained if r.image != Path() and _size(r.image) in sizes]
    if not candidates:
        return False
    seen = set(image_hashes(candidates)) - {None}
    same = sum(h in seen for h in image_hashes(sample))
    if same * 2 > len(sample):
        log.warning(
            "%d of %d image(s) checked in %s are images this run was trained on (%s, by content): the scores "
            "will flatter the model; evaluate on held-out data.",
            same,
            len(sample),
            data,
            where,
        )
        return True
    return False


def _size(path: Path) -> int | None:
    try:
        return os.stat(path).st_size
    except (OSError, ValueError):
        return None
