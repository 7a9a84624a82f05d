"""Data preparation for training: the rows of the training and validation data, checked and split, and the
DataLoaders over them (cached features, decoded pixels or image files, as the towers need)."""

from __future__ import annotations

import copy
import logging
from collections import Counter
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, WeightedRandomSampler

from mmfuse import binary, multilabel
from mmfuse.calibration import Calibration
from mmfuse.captioning.pipeline import fill_missing_captions
from mmfuse.config import BINARY_METRICS, MULTILABEL_METRICS, RunConfig, parse_class_weight, parse_threshold
from mmfuse.data.checks import CHARS_PER_TOKEN, load_checked
from mmfuse.data.columns import Columns, column_records
from mmfuse.data.read import read_data
from mmfuse.data.records import Record, label_names
from mmfuse.data.splits import label_list, stratified_split
from mmfuse.errors import MmfuseError
from mmfuse.features.sources import FeatureCache, batch_collate, build_dataset, embed, present_mask
from mmfuse.models.classifier import MultimodalClassifier

log = logging.getLogger(__name__)


def check_out_dir(out: Path, data: str | None) -> None:
    """Stops before any work when the run directory cannot be written where asked."""
    if out.exists() and not out.is_dir():
        raise MmfuseError(f"--out {out} is a file; the run directory must be a new or existing directory.")
    if data and Path(data).is_dir() and out.resolve().is_relative_to(Path(data).resolve()):
        raise MmfuseError(
            f"--out {out} is inside the data folder {data}, where it would be read as a class; put it elsewhere."
        )


def load_records(
    cfg: RunConfig, out: Path, path: str | None = None, labels=None, multi_label: bool | None = None
) -> list[Record]:
    """The rows of ``path`` (default: the training data), checked; bad rows stop here, or are skipped into
    RUN/skipped.csv. ``multi_label``: read label sets (default: as ``--multi-label`` says, else as the data says)."""
    d = cfg.data
    named = Columns.of(cfg.model)
    need_text = cfg.model.modality_dropout == 0 and "text" in cfg.model.modalities and not d.caption_missing
    need_text = need_text and named is None  # a column's empty cells are masked
    captions = (d.val_captions or d.captions) if path is not None else d.captions
    return load_checked(
        path or d.train,
        captions=captions,
        labels=labels,
        need_text=need_text,
        skip_bad=d.skip_bad,
        skipped_csv=out / "skipped.csv",
        max_chars=cfg.model.max_length * CHARS_PER_TOKEN,
        multi_label=multi_label or forced_multilabel(cfg),
        label_sep=d.label_sep,
        named=named,
    )


def is_multilabel(records: list[Record]) -> bool:
    """Whether ``records`` hold label sets (a labels column, --label-sep or --multi-label)."""
    return any(r.labels is not None for r in records)


def forced_multilabel(cfg: RunConfig) -> bool | None:
    """True when --multi-label was asked, else None (the data decides): a run's config.yaml records the task its own
    data gave, which a config reused on other data must not impose."""
    return True if cfg.data.multi_label and "multi_label" in cfg.asked.get("data", ()) else None


def data_is_multilabel(cfg: RunConfig) -> bool:
    """Whether ``cfg``'s training data holds label sets, from the file alone (rows not checked): for what must know
    the task before any training reads the data (a search's objective)."""
    if forced_multilabel(cfg) or cfg.data.label_sep:
        return True
    named = Columns.of(cfg.model)
    return is_multilabel(read_data(cfg.data.train, cfg.data.captions, need_label=False, named=named)[0])


def refuse_multilabel(cfg: RunConfig, records: list[Record], what: str, instead: str) -> None:
    """Stops ``what`` (a way of training that does not handle label sets yet) on multi-label data, saying ``instead``.

    Raises:
        MmfuseError: the data or the config is multi-label.
    """
    if cfg.data.multi_label or is_multilabel(records):
        raise MmfuseError(f"{what} does not train multi-label data (each row a set of labels) yet: {instead}")


def multilabel_task(cfg: RunConfig, train: list[Record]) -> RunConfig:
    """``cfg`` with the task the data gives recorded: ``data.multi_label`` (config.yaml then says so) and, for
    multi-label data, ``--metric`` micro_f1 unless asked; a single-label run's metric left over from a multi-label
    config goes back to weighted_f1.

    Raises:
        MmfuseError: a setting that has no meaning for the task (--metric roc_auc with label sets, micro_f1 with
            one label a row; --positive, --balanced-sampling, --label-smoothing with label sets).
    """
    t, asked = cfg.train, set(cfg.asked.get("train", ()))
    multi = is_multilabel(train)
    metric = t.metric
    if multi:
        if metric in BINARY_METRICS and "metric" in asked:
            raise MmfuseError(
                f"--metric {metric} scores a binary task; this data is multi-label: choose micro_f1, map, macro_f1, "
                "weighted_f1, accuracy (the whole set right) or log_loss."
            )
        unsupported = {
            "positive": "--positive (a binary task's class)",
            "balanced_sampling": "--balanced-sampling",
        }
        used = [flag for key, flag in unsupported.items() if key in asked and getattr(t, key)]
        used += ["--label-smoothing"] * (t.label_smoothing > 0)
        if used:
            raise MmfuseError(
                f"{', '.join(used)}: not available for multi-label data (each row a set of labels) yet; leave "
                f"{'it' if len(used) == 1 else 'them'} out."
            )
        metric = metric if "metric" in asked else "micro_f1"
    elif metric in MULTILABEL_METRICS:
        if "metric" in asked:
            raise MmfuseError(
                f"--metric {metric} scores multi-label data (a labels column, or --label-sep); this data has one "
                "label a row: choose weighted_f1, macro_f1, accuracy or log_loss (roc_auc or pr_auc for two classes)."
            )
        metric = "weighted_f1"
    if (multi, metric) == (cfg.data.multi_label, t.metric):
        return cfg
    cfg = copy.deepcopy(cfg)  # derived from the data, not asked: ``asked`` stays as it was
    cfg.data.multi_label, cfg.train.metric = multi, metric
    return cfg


def check_labels(labels: list[str], data) -> list[str]:
    if len(labels) < 2:
        raise MmfuseError(f"Training needs at least 2 classes; found {labels} in {data}.")
    return labels


def binary_task(cfg: RunConfig, labels: list[str], train: list[Record]) -> RunConfig:
    """``cfg`` with what depends on the number of classes, known once the data is read, filled in: with two classes
    the positive class (``--positive``, else the minority one) and ``--metric`` roc_auc unless asked; with more, no
    positive class and weighted_f1 in place of a binary metric left over from a binary run's config.

    Raises:
        MmfuseError: ``--positive`` not a class, or given for more than two; ``--metric roc_auc/pr_auc`` for more.
    """
    cfg = multilabel_task(cfg, train)
    if cfg.data.multi_label:
        return cfg
    t, asked = cfg.train, set(cfg.asked.get("train", ()))
    positive = binary.resolve_positive(
        labels, Counter(r.label for r in train), t.positive if "positive" in asked else None
    )
    metric = t.metric
    if "metric" not in asked:
        metric = "roc_auc" if positive is not None else ("weighted_f1" if metric in BINARY_METRICS else metric)
    elif metric in BINARY_METRICS and positive is None:
        raise MmfuseError(
            f"--metric {metric} scores a binary task; this data has {len(labels)} classes: choose "
            "weighted_f1, macro_f1, accuracy or log_loss."
        )
    if (positive, metric) == (t.positive, t.metric):
        return cfg
    cfg = copy.deepcopy(cfg)  # a derived default, not a setting the user asked for: ``asked`` stays as it was
    cfg.train.positive, cfg.train.metric = positive, metric
    return cfg


def positive_index(cfg: RunConfig, labels: list[str]) -> int | None:
    """The positive class's id in ``labels`` (None: not a binary run), for the metrics of one class."""
    return labels.index(cfg.train.positive) if cfg.train.positive is not None else None


def decide(
    cfg: RunConfig, labels: list[str], probs, y, calibration: Calibration | None, fitted_on: str
) -> tuple[binary.Decision | None, dict]:
    """A binary run's decision on its held-out ``probs`` (calibrated first when ``calibration``: predict applies the
    threshold to calibrated probabilities) and what metrics.json adds for it: roc_auc, pr_auc, positive_f1, positive,
    threshold (and ``decision``: how and where it was chosen). (None, {}) for other runs."""
    if cfg.train.positive is None or probs is None:
        return None, {}
    probs = calibration.calibrated if calibration is not None else probs
    fixed = parse_threshold(cfg.train.threshold)
    decision = binary.decide(probs, y, labels, cfg.train.positive, fixed)
    how = {"chosen": "auto" if fixed is None else "fixed", "fitted_on": fitted_on}
    return decision, {**binary.report(y, probs, labels, decision), "decision": how}


def caption_missing(cfg: RunConfig, records: list[Record], out: Path) -> list[Record]:
    """Rows without text get a generated caption (``--caption-missing``), cached in RUN/captions.csv."""
    if not cfg.data.caption_missing or "text" not in cfg.model.modalities:
        return records
    return fill_missing_captions(records, cfg.data.caption_missing, out / "captions.csv")


FEW_VAL_ROWS, FEW_PER_CLASS = 30, 3


def warn_few(val: list[Record]) -> None:
    """Too few validation rows make the best-epoch choice and the validation score chance: say so."""
    counts = Counter(x for r in val for x in label_names(r))
    if len(val) < FEW_VAL_ROWS or min(counts.values()) < FEW_PER_CLASS:
        log.warning(
            "only %d validation rows (%d for the rarest class): the best-epoch choice and the validation score are "
            "unreliable. Pass --val with more rows, --keep last, or --bag 5 (every row validated once).",
            len(val),
            min(counts.values()),
        )


def load_splits(cfg: RunConfig, out: Path) -> tuple[list[Record], list[Record], list[str]]:
    """Train and validation records, checked: ``--val``, or a stratified slice of the training data."""
    d = cfg.data
    records = load_records(cfg, out)
    if d.val:
        val = load_records(cfg, out, d.val, labels=label_list(records), multi_label=is_multilabel(records) or None)
        train = records
    else:
        train, val = stratified_split(records, d.val_split, cfg.train.seed)
        if not val:
            raise MmfuseError(
                f"No validation rows could be held out of {d.train}: every class has a single row. "
                "Pass --val with validation data, or add rows."
            )
    labels = check_labels(label_list(train), d.train)
    warn_few(val)
    filled = caption_missing(cfg, train + val, out)
    return filled[: len(train)], filled[len(train) :], labels


MAX_POS_WEIGHT = 100.0
"""The most a balanced multi-label run weighs a label's positives: a label on 1 row of 2,000 would otherwise weigh
its one row 1,999 times, and the steps that hold it would swing the shared head as far as a whole epoch of others."""


def class_weights(
    spec: str | None, labels: list[str], train: list[Record], multi_label: bool = False
) -> dict[str, float] | None:
    """Each class's weight in the loss, by ``--class-weight``: ``balanced`` is scikit-learn's n / (classes * count)
    over the training rows; named weights leave the classes not named at 1. None without the flag.

    With ``multi_label`` (rows of label sets) each label's weight is the ``pos_weight`` of its binary cross-entropy,
    how much a row holding the label counts against one without it: ``balanced`` is negatives / positives on the
    training rows (at most ``MAX_POS_WEIGHT``; 1 for a label no row or every row holds), a named weight is that
    label's pos_weight.

    Raises:
        MmfuseError: a class named that the data does not hold.
    """
    if spec is None:
        return None
    asked = parse_class_weight(spec)
    if asked == "balanced" and multi_label:
        counts = Counter(x for r in train for x in label_names(r))
        n = len(train)
        return {c: min((n - counts[c]) / counts[c], MAX_POS_WEIGHT) if 0 < counts[c] < n else 1.0 for c in labels}
    if asked == "balanced":
        counts = Counter(r.label for r in train)
        # A class with no training row (a bag's fold can miss a rare one) gets no gradient either way: weight 1.
        return {c: len(train) / (len(labels) * counts[c]) if counts[c] else 1.0 for c in labels}
    unknown = [c for c in asked if c not in labels]
    if unknown:
        raise MmfuseError(
            f"--class-weight names {', '.join(map(repr, unknown))}, not a class of the data; the classes are "
            f"{', '.join(labels)}"
        )
    return {c: asked.get(c, 1.0) for c in labels}


def balanced_sampler(y: torch.Tensor, n_classes: int, generator: torch.Generator) -> WeightedRandomSampler:
    """Draws ``len(y)`` rows an epoch with replacement, each with probability inverse to its class's count, from
    ``generator``: the loader's own, whose state a checkpoint saves, so a resumed epoch draws the same rows."""
    counts = torch.bincount(y, minlength=n_classes).double()
    return WeightedRandomSampler(1.0 / counts[y], len(y), replacement=True, generator=generator)


def loaders(model, train, val, labels, cfg: RunConfig, acc: Accelerator, cache: FeatureCache | None):
    tuned = cfg.tuned
    index = {name: i for i, name in enumerate(labels)}
    if cfg.data.multi_label:  # (rows, labels) of 0/1, for a binary cross-entropy per label
        y = [torch.from_numpy(multilabel.targets(recs, labels)) for recs in (train, val)]
    else:
        y = [torch.tensor([index[r.label] for r in recs]) for recs in (train, val)]
    if acc.num_processes > 1 and cache is not None:
        embed_frozen(model, train + val, tuned, cache, acc)
    with acc.main_process_first():  # the main process fills the caches; the others then read them
        px = not cfg.data.decode_each_epoch
        train_ds = build_dataset(model, train, y[0], tuned, cache, acc.device, acc.is_main_process, px)
        val_ds = build_dataset(model, val, y[1], tuned, cache, acc.device, acc.is_main_process, px) if val else None
    generator = torch.Generator().manual_seed(cfg.train.seed)
    # Only decoding image files is worth worker processes: cached features and uint8 images need indexing alone, which
    # workers would only copy between processes (a worker on an H200 did not make the seed job faster:
    # bench/RESULTS.md).
    workers = cfg.data.num_workers if train_ds.decodes else 0
    common = {
        "collate_fn": batch_collate,
        "num_workers": workers,
        "pin_memory": torch.cuda.is_available(),
        "persistent_workers": workers > 0,
    }
    # drop_last keeps shapes static (no recompiles); only when that loses little of an epoch.
    drop_last = len(train_ds) >= 8 * cfg.train.batch_size * acc.num_processes
    if len(train_ds) % (cfg.train.batch_size * acc.num_processes) == 1 and tuned_batch_norm(model, tuned):
        # Batch norm cannot train on a last batch of one row (EfficientNet's 1x1 maps at --image-size 32 fail):
        # that row sits the epoch out instead, a different one each epoch as batches are shuffled.
        log.info("the last batch would hold one row, which batch norm cannot train on: it is left out each epoch")
        drop_last = True
    # The loader draws its workers' base seed from ``generator`` too: without it, from the global RNG, whose state a
    # checkpoint saves mid-epoch, so a resumed epoch's dropout would be one draw off.
    order = {"shuffle": True}
    if cfg.train.balanced_sampling:
        order = {"sampler": balanced_sampler(y[0], len(labels), generator)}
    train_dl = DataLoader(train_ds, cfg.train.batch_size, drop_last=drop_last, generator=generator, **order, **common)
    val_dl = DataLoader(val_ds, max(cfg.train.batch_size, 64), **common) if val_ds is not None else None
    return train_dl, val_dl, generator


def embed_frozen(model, records: list[Record], tuned, cache: FeatureCache | None, acc: Accelerator) -> None:
    """Under a launch, each process embeds a contiguous share of the frozen towers' cache misses (every item once
    across processes) into the feature cache, from which every process's datasets then read all of them."""
    present = present_mask(records, model.slots)
    for col, s in enumerate(model.slots):
        rows = column_records(records, s.modality, s.column)
        have = [r for r, p in zip(rows, present[:, col].tolist()) if p]
        if s.modality in model.cards and s.modality not in tuned and have:
            embed(model, s.modality, have, cache, device=acc.device, show=acc.is_main_process, shard=True)


def tuned_batch_norm(model: MultimodalClassifier, tuned: list[str]) -> list[str]:
    """The tuned towers with batch norm layers, which need two or more rows a batch to train."""
    norms = torch.nn.modules.batchnorm._BatchNorm
    return [t for t in tuned if any(isinstance(m, norms) for m in model.towers[t].modules())]
