"""Hyperparameter search on Optuna: one config trained many times, each trial a full run directory.

    mmfuse search DATA --val VAL --out DIR --trials 50 --tune head         # heads on cached features: minutes on a CPU
    mmfuse search DATA --out DIR --trials 20 --tune text --space space.yaml  # a space of your own
    mmfuse train --config DIR/best.yaml --out RUN                            # the best trial's config, trained again

``DIR`` holds ``study.sqlite`` (the Optuna study: the same command run again continues it), ``trials/NNN/`` (one run
directory per trial), ``leaderboard.csv`` and ``best.yaml``. A trial trains through the loop's ``setup``,
``run_epochs`` and ``save``, so each epoch's validation ``--metric`` (weighted F1 unless asked) reaches the pruner, and
the kept epoch's is the objective; frozen towers' features are embedded once for all trials (one ``FeatureCache`` in
memory).

A space maps config fields to ranges, ``key: {low: 0.0001, high: 0.01, log: true}``, or to choices, ``key: [a, b]``;
``SPACES`` holds the default per ``--tune`` mode. Optuna is the ``mmfuse[search]`` extra, imported only here.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Collection
from dataclasses import MISSING, asdict, fields
from pathlib import Path

from mmfuse import metrics
from mmfuse.config import ModelConfig, RunConfig, TrainConfig
from mmfuse.errors import MmfuseError
from mmfuse.features.sources import FeatureCache
from mmfuse.recipes.space import SPACES, Param, default_values, search_space
from mmfuse.training.loop import run_epochs, save, setup
from mmfuse.training.prep import check_out_dir, data_is_multilabel

log = logging.getLogger(__name__)

STUDY = "mmfuse"
SCORES = ("weighted_f1", "macro_f1", "accuracy")  # the kept epoch's validation scores every leaderboard row holds


def columns(metric: str) -> tuple[str, ...]:
    """The leaderboard's score columns: the validation scores, the objective's if it is another, and the cost."""
    scores = SCORES if metric in SCORES else (*SCORES, metric)
    return (*(f"val_{k}" for k in scores), "best_epoch", "seconds")


class SearchInterrupted(KeyboardInterrupt):
    """Ctrl-C during a search, raised once the leaderboard holds the trials that finished."""

    def __init__(self, rows: list[dict]):
        super().__init__()
        self.rows = rows


def _optuna():
    try:
        import optuna
    except ImportError:
        raise MmfuseError(
            "mmfuse search needs Optuna, an optional extra: pip install 'mmfuse[search]' (or pip install optuna)."
        ) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # a line per trial comes from here instead
    return optuna


def trial_dir(out: Path, number: int) -> Path:
    return out / "trials" / f"{number:03d}"


def search(
    cfg: RunConfig,
    out: str | Path,
    trials: int,
    space: dict | None = None,
    space_source: str | None = None,
    timeout: float | None = None,
    fixed: Collection[str] = (),
    overwrite: bool = False,
) -> list[dict]:
    """Searches ``space`` (default: ``SPACES[cfg.train.tune]``) around ``cfg`` until ``trials`` trials have completed
    or been pruned in the study of ``out``, counting those of earlier runs; returns the leaderboard, best first.

    Args:
        fixed: the keys the user set with flags: left out of the default space, refused in a given one.
        timeout: seconds after which no new trial starts (the one running finishes).
        overwrite: start afresh, deleting an earlier search in ``out``.

    Raises:
        SearchInterrupted: on Ctrl-C, once the leaderboard holds what finished; the trial that was running is
            queued again for the next run.
    """
    from filelock import FileLock, Timeout

    optuna = _optuna()
    out = Path(out)
    check_out_dir(out, cfg.data.train)
    cfg = absolute_paths(cfg)
    if "metric" not in cfg.asked.get("train", ()) and data_is_multilabel(cfg):
        cfg = cfg.updated({"train": {"metric": "micro_f1"}})  # the study's objective for label sets
    source = f"--space {space_source}" if space_source else "the default space"
    params = search_space(space if space is not None else SPACES[cfg.train.tune], cfg, fixed, source)
    out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(out / "study.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise MmfuseError(f"Another search is running in {out}; wait for it, or give another --out.") from None
    try:  # with the lock held, a trial left RUNNING in the study belongs to a process that is gone
        if overwrite:
            for name in ("study.sqlite", "leaderboard.csv", "best.yaml"):
                (out / name).unlink(missing_ok=True)
            shutil.rmtree(out / "trials", ignore_errors=True)
        storage = optuna.storages.RDBStorage(f"sqlite:///{(out / 'study.sqlite').resolve()}")
        dead = fail_dead(optuna, storage, out)
        study = open_study(optuna, storage, out, cfg, params)
        for t in dead:
            _requeue(study, t.number, t.params, t.user_attrs)
        if not study.trials:
            study.enqueue_trial(default_values(cfg, params), user_attrs={"default": True})
        return _run(optuna, study, cfg, params, out, trials, timeout)
    finally:
        lock.release()


def _run(optuna, study, cfg: RunConfig, params: list[Param], out: Path, trials: int, timeout: float | None):

    done_states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    # One cache for every trial, holding what it reads: features are embedded (or read from disk) once.
    cache = FeatureCache(memory=True)
    start, failures = time.monotonic(), []
    try:
        while (done := len(study.get_trials(deepcopy=False, states=done_states))) < trials:
            if timeout is not None and time.monotonic() - start > timeout:
                log.warning("--timeout %ss reached after %d of %d trials: no new trial starts", timeout, done, trials)
                break
            error = run_trial(optuna, study, cfg, params, out, cache)
            failures = failures + [error] if error else []
            if len(failures) >= 3:  # the space leads nowhere (every rate diverges): stop rather than spin
                raise MmfuseError(f"Three trials in a row failed; the last: {failures[-1]}")
    except KeyboardInterrupt:
        raise SearchInterrupted(write_results(optuna, study, params, out, cfg.train.metric)) from None
    return write_results(optuna, study, params, out, cfg.train.metric)


def open_study(optuna, storage, out: Path, cfg: RunConfig, params: list[Param]):
    """The study in ``out/study.sqlite``, created or continued; a study made with other settings is refused."""
    study = optuna.create_study(
        study_name=STUDY,
        storage=storage,
        direction="maximize" if metrics.metric(cfg.train.metric).higher_is_better else "minimize",
        load_if_exists=True,
        # Median pruning past the first epochs: a trial whose kept F1 so far is below the median of earlier trials at
        # the same epoch stops there. n_startup_trials: the median of fewer trials says too little.
        pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=2),
    )
    # Seeded by the config's seed, offset by the trials already run: a continued study would otherwise draw the
    # points its first run drew again (TPE samples at random for its first 10 trials).
    study.sampler = optuna.samplers.TPESampler(seed=cfg.train.seed + len(study.trials))
    # What the trials depend on: continuing a study with other data, flags or space would mix incomparable trials.
    config = {s: asdict(getattr(cfg, s)) for s in ("data", "model", "train")}
    settings = json.loads(json.dumps({"config": config, "space": [asdict(p) for p in params]}))  # as stored: JSON
    stored = study.user_attrs.get("settings")
    if stored is not None:  # a study begun before a setting existed ran with its default
        for section, cls in (("model", ModelConfig), ("train", TrainConfig)):
            for f in fields(cls):
                if f.name not in stored["config"].get(section, {}) and f.default is not MISSING:
                    stored["config"].setdefault(section, {})[f.name] = f.default
    if stored is None:
        study.set_user_attr("settings", settings)
    elif stored != settings:
        changed = sorted(
            f"{s}.{k}"
            for s in ("data", "model", "train")
            for k in settings["config"][s]
            if settings["config"][s][k] != stored["config"].get(s, {}).get(k)
        ) + (["the search space"] if stored["space"] != settings["space"] else [])
        raise MmfuseError(
            f"{out} holds a search made with other settings ({', '.join(changed)}); rerun it with the same ones to "
            "continue it, give another --out, or pass --overwrite to start afresh."
        )
    return study


def fail_dead(optuna, storage, out: Path) -> list:
    """Marks the trials a killed search left running as failed (and ``requeued``), deleting their half-written run
    directories (nothing could load them); returns them, for their parameters to be queued again.

    Done on the storage itself, before the study is loaded, which would cache them as still running."""
    try:
        study_id = storage.get_study_id_from_name(STUDY)
    except KeyError:  # a new study
        return []
    dead = storage.get_all_trials(study_id, deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for t in dead:
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
        storage.set_trial_user_attr(trial_id, "requeued", True)
        storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL)
        shutil.rmtree(trial_dir(out, t.number), ignore_errors=True)
    return dead


def _requeue(study, number: int, params: dict, user_attrs: dict) -> None:
    log.warning("trial %d did not finish: queued again", number)
    keep = {k: v for k, v in user_attrs.items() if k == "default"}
    study.enqueue_trial(params, user_attrs={**keep, "retry_of": number})


def absolute_paths(cfg: RunConfig) -> RunConfig:
    """The data paths made absolute, so best.yaml trains from anywhere."""
    cfg = copy.deepcopy(cfg)
    for name in ("train", "val", "captions", "val_captions"):
        if path := getattr(cfg.data, name):
            # Not through updated(): a path made absolute is not a setting the user asked for.
            setattr(cfg.data, name, os.path.abspath(path))
    return cfg


# ---------------------------------------------------------------------------------------------------------------------
# A trial


def run_trial(optuna, study, base: RunConfig, params: list[Param], out: Path, cache) -> str | None:
    """Trains one trial into ``out/trials/NNN``, reporting each epoch's kept F1 for pruning; returns the error of a
    trial that failed in training (a diverged loss), None otherwise."""

    trial = study.ask()
    changes: dict[str, dict] = {}
    for p in params:
        changes.setdefault(p.section, {})[p.key] = p.suggest(trial)
    run = trial_dir(out, trial.number)
    shutil.rmtree(run, ignore_errors=True)  # numbers are not reused within a study: this is an --overwrite leftover
    start = time.perf_counter()
    try:
        # With --track, the trials are runs side by side under DIR/tracking/ (TensorBoard shows them as one study).
        # The study's --metric, as asked or not: a binary run's own default (roc_auc) would score trials by another.
        changes["train"] = {**changes.get("train", {}), "metric": base.train.metric}
        tr = setup(base.updated(changes), run, cache, tracking=(out / "tracking", f"trial-{run.name}"))
    except BaseException:  # not this trial's doing (the data, a tower, Ctrl-C): the next run retries it
        _retry_later(optuna, study, trial, run)
        raise

    metric = base.train.metric

    def prune(epoch: int, row: dict) -> bool:
        # The kept epoch's score so far (the best, or with --keep last the last): the trial's result if stopped.
        trial.report(tr.best[f"val_{metric}"], epoch)
        return trial.should_prune()

    try:
        if not run_epochs(tr, prune):
            epoch = len(tr.history)
            _finish(trial, tr.best, metric, time.perf_counter() - start)
            (run / "pruned.json").write_text(json.dumps({"pruned_after_epoch": epoch, "history": tr.history}))
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            log.info("trial %d pruned after epoch %d (%s)", trial.number, epoch, _scores(tr.best, metric))
            return None
        result = save(tr, False, time.perf_counter() - start)
    except MmfuseError as e:  # a diverged loss: this trial's parameters fail
        trial.set_user_attr("error", str(e))
        (run / "failed.json").write_text(json.dumps({"error": str(e), "history": tr.history}))
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        log.warning("trial %d failed: %s", trial.number, e)
        return str(e)
    except BaseException:  # Ctrl-C or a crash: the trial is not this search's result; the next run retries it
        _retry_later(optuna, study, trial, run)
        raise
    best = {
        "epoch": result["best_epoch"],
        **{f"val_{k}": v for k, v in result["val"].items() if k in {*SCORES, metric}},
    }
    _finish(trial, best, metric, result["train_seconds"])
    study.tell(trial, result["metric"]["value"])
    log.info("trial %d: %s in %.1f s", trial.number, _scores(best, metric), result["train_seconds"])
    return None


def _scores(row: dict, metric: str) -> str:
    """A trial's line: its validation weighted and macro F1, and the objective if it is another."""
    shown = (
        ("weighted_f1", "macro_f1") if metric in ("weighted_f1", "macro_f1") else ("weighted_f1", "macro_f1", metric)
    )
    return "val " + ", ".join(f"{metrics.metric(k).title} {row[f'val_{k}']:.4f}" for k in shown)


def _retry_later(optuna, study, trial, run: Path) -> None:
    """A trial stopped by something other than its parameters: failed, its directory deleted, queued again."""
    trial.set_user_attr("requeued", True)
    _requeue(study, trial.number, dict(trial.params), trial.user_attrs)
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    shutil.rmtree(run, ignore_errors=True)


def _finish(trial, best: dict, metric: str, seconds: float) -> None:
    for key in columns(metric)[:-2]:
        trial.set_user_attr(key, best[key])
    trial.set_user_attr("best_epoch", best["epoch"])
    trial.set_user_attr("seconds", round(seconds, 2))


# ---------------------------------------------------------------------------------------------------------------------
# Results


def leaderboard(optuna, study, params: list[Param], metric: str = "weighted_f1") -> list[dict]:
    """One row per finished trial (completed, pruned, or failed in training), best first: completed trials by
    validation ``metric``, then pruned ones, then failures."""
    S = optuna.trial.TrialState
    order = {S.COMPLETE: 0, S.PRUNED: 1, S.FAIL: 2}
    trials = [t for t in study.get_trials(deepcopy=False) if t.state in order and not t.user_attrs.get("requeued")]
    keys = [p.key for p in params]
    keys += sorted({k for t in trials for k in t.params} - set(keys))
    rows = []

    def rank(t) -> tuple:
        value = t.user_attrs.get(f"val_{metric}")
        return order[t.state], -metrics.ranked(metric, value) if value is not None else math.inf, t.number

    for t in sorted(trials, key=rank):
        row = {"trial": t.number, "state": t.state.name.lower(), "default": bool(t.user_attrs.get("default"))}
        row.update({k: t.params.get(k) for k in keys})
        row.update({k: t.user_attrs.get(k) for k in columns(metric)})
        rows.append(row)
    return rows


def write_results(optuna, study, params: list[Param], out: Path, metric: str = "weighted_f1") -> list[dict]:
    """Writes ``leaderboard.csv`` and, once a trial has completed, ``best.yaml``; returns the leaderboard."""
    rows = leaderboard(optuna, study, params, metric)
    if rows:
        with open(out / "leaderboard.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    if rows and rows[0]["state"] == "complete":
        best = rows[0]
        config = (trial_dir(out, best["trial"]) / "config.yaml").read_text(encoding="utf-8")
        header = (
            f"# mmfuse search {out}: trial {best['trial']}, validation {metrics.metric(metric).title} "
            f"{best[f'val_{metric}']:.4f}\n"
            f"# train it again: mmfuse train --config {out}/best.yaml --out RUN\n"
        )
        (out / "best.yaml").write_text(header + config, encoding="utf-8")
    return rows
