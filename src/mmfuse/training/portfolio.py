"""A portfolio of bagged members on shared cached features, and the weighted ensemble chosen on their out-of-fold
predictions (``--preset ensemble``): AutoGluon's recipe, on frozen towers.

    mmfuse train DATA --out RUN                                      # the default: --preset ensemble, 5 folds
    mmfuse train DATA --out RUN --preset best                        # plus fine-tuned MiniLM and mpnet's heads
    mmfuse train DATA --out RUN --preset ensemble --bag 3 --time-limit 5m

Every member is a k-fold bag (``training.bag``) on the same folds, so every training row gets one out-of-fold
probability vector from each member, all comparable. The members, cheapest first (``portfolio``):

- ``probe-image``, ``probe-text``, ``probe-both``: scikit-learn logistic regression on L2-normalised pooled features
  (shared/QUALITY.md's probe), stored as a ``linear`` fusion head so the run predicts, evaluates and serves as any;
- ``head-image``, ``head-text``: a head on one frozen tower (``--tune head``);
- ``fusion-concat``, ``fusion-gated``, ``fusion-attention``: the fusion heads on both frozen towers (a packaged
  text tower's token states pooled by a learned attention, as its default);
- ``mpnet-fusion-*``: the same on mpnet, when the mmfuse[mpnet] extra is installed and the text tower is MiniLM;
- ``tuned-text-concat`` (``--tune text``, as ``--preset best`` sets): the text tower fine-tuned beside cached image
  features, a concat head, bagged on the same folds.

Members share one in-memory feature cache, so each tower embeds each row once. ``training.selection`` then weighs
them (greedy forward selection with replacement on weighted F1, log loss breaking ties); members of weight 0 are
listed in ``leaderboard.csv`` but not kept. ``--time-limit`` stops starting members once the next one's expected time
(the mean of finished members of its kind, else the slowest finished one) would pass it; the probes always run.
``rundir`` says what the run directory holds.
"""

from __future__ import annotations

import csv
import logging
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mmfuse import binary, metrics, multilabel
from mmfuse.calibration import calibrate
from mmfuse.config import BINARY_METRICS, RunConfig, parse_duration, parse_threshold, resolve
from mmfuse.data.records import Record
from mmfuse.data.splits import label_list
from mmfuse.data.tabular import fit_tabular
from mmfuse.errors import MmfuseError
from mmfuse.features.sources import FeatureCache, build_dataset
from mmfuse.models.classifier import MultimodalClassifier, build_model
from mmfuse.models.mpnet import find_parts
from mmfuse.models.towers.onnx_engine import int8_refusal
from mmfuse.rundir.layout import ENSEMBLE_FILE, FROZEN_FILE
from mmfuse.rundir.weights import write_ensemble, write_run
from mmfuse.training import selection
from mmfuse.training.bag import _write as write_bag_files  # the bag's own files, written the one way
from mmfuse.training.bag import fit_bag, folds, read_groups, spread
from mmfuse.training.fit import TrainingInterrupted, run_lock
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
PROBE_C = 4.0  # shared/QUALITY.md's probe: LogisticRegression(C=4) on L2-normalised features
KINDS = ("probe", "head", "fusion", "tuned")


@dataclass
class Member:
    name: str
    """Its folder under RUN/members/ and its row in leaderboard.csv."""
    kind: str
    """probe (logistic regression), head (one modality) or fusion (both)."""
    cfg: RunConfig
    """The bag it trains: the user's config with this member's towers, head and modalities."""

    @property
    def modalities(self) -> str:
        return "+".join(self.cfg.model.modalities)


def mpnet_installed() -> bool:
    try:
        find_parts()
    except MmfuseError:
        return False
    return True


def portfolio(cfg: RunConfig) -> list[Member]:
    """The members for ``cfg`` (its towers, data, folds and modalities), cheapest first."""
    base = cfg.updated(
        {
            # --calibrate is the ensemble's: its weights are chosen on the members' own out-of-fold probabilities.
            "train": {"ensemble": False, "time_limit": None, "tune": "head", "refit_full": False, "calibrate": False},
            "data": {"val": None, "val_captions": None},  # the ensemble folds the --val rows into its own
        }
    )
    text_pooling = resolve(base).model.text_pooling
    probe = {"fusion": "linear"}
    if text_pooling == "attention":  # a probe fits pooled features: the sentence embedding, mean of the last layer
        probe |= {"text_pooling": "mean", "text_layer_mean": 1}
    # With --tabular-columns, "both" (every member that fuses) reads the tabular columns too, and each of its inputs
    # gets a head of its own.
    both = ["image", "text"] + ["tabular"] * bool(cfg.model.tabular_columns)
    members = [
        Member(f"probe-{name}", "probe", base.updated({"model": {**probe, "modalities": mods}}))
        for name, mods in (("image", ["image"]), ("text", ["text"]), ("both", both))
    ]
    members += [
        Member(f"head-{m}", "head", base.updated({"model": {"fusion": "concat", "modalities": [m]}})) for m in both
    ]
    members += [
        Member(f"fusion-{head}", "fusion", base.updated({"model": {"fusion": head, "modalities": both}}))
        for head in ("concat", "gated", "attention")
    ]
    int8_off = int8_refusal("mpnet") if cfg.model.quantize != "none" else None
    if base.model.text == "minilm" and int8_off:
        log.info("ensemble: skipping the mpnet members: --quantize int8 is refused for mpnet (%s)", int8_off)
    elif base.model.text == "minilm":
        if mpnet_installed():
            mpnet = {"text": "mpnet", "text_pooling": "attention", "modalities": both}
            members += [
                Member(f"mpnet-fusion-{head}", "fusion", base.updated({"model": {**mpnet, "fusion": head}}))
                for head in ("concat", "gated", "attention")
            ]
        elif cfg.train.tune == "text":
            raise MmfuseError(
                "--preset best includes mpnet's heads, and the mpnet tower is not installed: pip install "
                "'mmfuse[mpnet]' (or use the default ensemble, which goes without them)."
            )
        else:
            log.info("ensemble: skipping the mpnet members (pip install 'mmfuse[mpnet]' adds them)")
    if cfg.train.tune == "text":
        # --preset best: the text tower fine-tuned beside cached image features, itself bagged on the same folds. The
        # costliest member by far (each fold fine-tunes the tower), so it comes last, where --time-limit can drop it.
        members.append(
            Member(
                "tuned-text-concat",
                "tuned",
                # --quantize runs frozen text towers in int8; this member tunes its own, in float32.
                base.updated(
                    {"train": {"tune": "text"}, "model": {"fusion": "concat", "modalities": both, "quantize": "none"}}
                ),
            )
        )
    # --modalities text (or image) asks for a model of that modality alone: members that read the other are left out.
    return [m for m in members if set(m.cfg.model.modalities) <= set(cfg.model.modalities)]


def fit_portfolio(cfg: RunConfig, out: str | Path, cache: FeatureCache | None = None) -> dict:
    """Trains the portfolio into ``out/members/`` and writes the weighted ensemble of them into ``out``.

    Ctrl-C keeps the members already finished as a usable ensemble, then raises ``TrainingInterrupted``.
    """
    out = Path(out)
    check_out_dir(out, cfg.data.train)
    cfg = resolve(cfg)
    if not cfg.train.ensemble:
        raise MmfuseError("fit_portfolio trains --preset ensemble (train.ensemble: true).")
    if cfg.data.val and cfg.train.bag_groups:
        raise MmfuseError(
            "--bag-groups reads its groups from DATA, and the ensemble would fold the --val rows in beside them: put "
            "the --val rows into DATA."
        )
    if cfg.train.refit_full:
        raise MmfuseError("--refit-full goes with a single bag; an ensemble predicts with its members' fold models.")
    if cfg.train.tune not in ("head", "text"):
        raise MmfuseError(
            f"an ensemble's members keep the towers frozen, or fine-tune MiniLM (--tune text, as --preset best "
            f"does): --tune {cfg.train.tune} trains one model, so pass it without --preset ensemble."
        )
    with run_lock(out):
        return _fit_portfolio(cfg, out, cache if cache is not None else FeatureCache(memory=True))


def _fit_portfolio(cfg: RunConfig, out: Path, cache: FeatureCache) -> dict:
    start = time.perf_counter()
    limit = parse_duration(cfg.train.time_limit) if cfg.train.time_limit else None
    for name in (ENSEMBLE_FILE, "leaderboard.csv", "skipped.csv"):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "members", ignore_errors=True)  # an earlier run's members (the CLI asked before --overwrite)
    records = load_records(cfg, out)
    if cfg.data.val:
        # Every member validates out of fold, so held-out rows would only go unused: they join the folds.
        extra = load_records(cfg, out, cfg.data.val)
        log.info(
            "the ensemble validates out of fold: the %d --val rows join the %d training rows",
            len(extra),
            len(records),
        )
        records = records + extra
    labels = check_labels(label_list(records), cfg.data.train)
    cfg = binary_task(cfg, labels, records)
    positive = positive_index(cfg, labels)
    records = caption_missing(cfg, records, out)
    groups = read_groups(cfg.data.train, cfg.train.bag_groups, records) if cfg.train.bag_groups else None
    held_out = folds(records, cfg.train.bag, cfg.train.seed, groups)
    y = targets(records, labels, cfg.data.multi_label)
    cut = _cut(cfg)
    fold_of = np.empty(len(records), dtype=np.int64)
    for i, rows in enumerate(held_out):
        fold_of[rows] = i
    done: list[dict] = []
    skipped, interrupted = [], False
    for member in portfolio(cfg):
        if member.kind != "probe" and limit is not None:
            expected = _expected(member, done)
            if time.perf_counter() - start + expected > limit:
                skipped.append(member.name)
                continue
        log.info("ensemble member %s: %s, %s, --bag %d", member.name, member.kind, member.modalities, cfg.train.bag)
        t0 = time.perf_counter()
        folder = out / "members" / member.name
        try:
            if member.kind == "probe":
                _fit_probes(member.cfg, folder, records, labels, held_out, cache)
            else:
                fit_bag(member.cfg, folder, cache, records=records)
        except KeyboardInterrupt:  # TrainingInterrupted too: a member cut short is not comparable with the rest
            shutil.rmtree(folder, ignore_errors=True)
            if not done:
                raise
            interrupted = True
            log.warning("interrupted: keeping the %d finished member(s)", len(done))
            break
        oof = _read_oof(folder, member.name, records, fold_of, len(labels))
        scores = _member_scores(y, oof, positive, cut)
        seconds = time.perf_counter() - t0
        done.append({"member": member, "oof": oof, **scores, "seconds": seconds})
        log.info(
            "ensemble member %s: out-of-fold weighted F1 %.4f, macro F1 %.4f (%.0f s)",
            member.name,
            scores["weighted_f1"],
            scores["macro_f1"],
            seconds,
        )
    if skipped:
        log.warning(
            "--time-limit %s: did not start %d member(s) (%s), whose expected time would pass it",
            cfg.train.time_limit,
            len(skipped),
            ", ".join(skipped),
        )
    chosen = selection.select([d["oof"] for d in done], y, metric=cfg.train.metric, positive=positive, cut=cut)
    result = _write(out, cfg, labels, records, y, held_out, done, chosen, skipped, interrupted, start)
    log.info("ensemble: %s", result["modalities"])
    if interrupted:
        raise TrainingInterrupted(result)
    return result


def _cut(cfg: RunConfig) -> str | float | None:
    """How a multi-label member or blend becomes sets when it is scored, as the ensemble will turn its own blend into
    sets: per-label thresholds chosen on its out-of-fold probabilities ("auto"), or the fixed --threshold; None for a
    single-label run."""
    if not cfg.data.multi_label:
        return None
    fixed = parse_threshold(cfg.train.threshold)
    return "auto" if fixed is None else fixed


def _member_scores(y: np.ndarray, oof: np.ndarray, positive: int | None, cut: str | float | None) -> dict:
    """Every score --metric may name of a member's out-of-fold probabilities, a multi-label member's at ``cut``."""
    loss = selection.log_loss(y, oof)
    if cut is not None:
        sets = selection.label_sets(y, oof, cut)
        return {**metrics.multilabel_summary(y, sets), "log_loss": loss, "map": metrics.mean_average_precision(y, oof)}
    scores = {**metrics.summary(y, oof.argmax(1)), "log_loss": loss}
    if positive is not None:
        scores |= {m: metrics.score(m, y, oof, positive) for m in BINARY_METRICS}
    return scores


def _expected(member: Member, done: list[dict]) -> float:
    """Seconds the next member should take: the mean of the finished members of its kind, else the slowest one."""
    same = [d["seconds"] for d in done if d["member"].kind == member.kind]
    if same:
        return statistics.mean(same)
    return max((d["seconds"] for d in done), default=0.0)


def _fit_probes(
    cfg: RunConfig,
    out: Path,
    records: list[Record],
    labels: list[str],
    held_out: list[np.ndarray],
    cache: FeatureCache,
) -> dict:
    """A bag of logistic-regression probes on the folds ``held_out``, written as ``fit_bag`` writes a bag: each fold's
    probe a single run whose ``linear`` head holds the fitted weights."""
    from sklearn.linear_model import LogisticRegression  # deferred: sklearn takes 0.5 s to import

    start = time.perf_counter()
    check_out_dir(out, cfg.data.train)
    out.mkdir(parents=True, exist_ok=True)
    cfg = resolve(cfg)
    towers: dict = {}
    tabular = fit_tabular(records, cfg.model.tabular_columns) if "tabular" in cfg.model.modalities else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)  # the categories' embeddings the probe fits on, the same every run
        template = build_model(cfg.model, len(labels), towers, build=(), tabular=tabular)
    template.freeze_towers()
    ds = build_dataset(template, records, None, [], cache)
    feats = {}
    for slot in template.slots:
        source = ds.sources[slot.name]
        if slot.modality == "tabular":  # the probe fits on the encoded columns (numbers, indicators, embeddings)
            with torch.no_grad():
                feats[slot.name] = template.tabular(source.numeric, source.codes)
        else:
            feats[slot.name] = source.feats
    x = probe_features([feats[slot.name].numpy() for slot in template.slots])
    index = {c: i for i, c in enumerate(labels)}
    multi = cfg.data.multi_label
    y = targets(records, labels, multi)
    oof = np.full((len(records), len(labels)), np.nan, dtype=np.float32)
    members = []
    for i, rows in enumerate(held_out):
        t0 = time.perf_counter()
        train = np.setdiff1d(np.arange(len(records)), rows)
        weights = class_weights(cfg.train.class_weight, labels, [records[j] for j in train], multi)
        # Per label: scikit-learn's own balanced weights (uncapped: a convex fit has no steps for one row to swing),
        # or the label's named weight on its positives.
        if multi:
            weights = per_label_weights(cfg.train.class_weight, labels, weights)
        else:
            weights = {index[c]: w for c, w in weights.items()} if weights else None
        fold_cfg = cfg.updated({"train": {"seed": cfg.train.seed + i, "bag": 1, "bag_groups": None}})
        model = MultimodalClassifier(template.cards, len(labels), fold_cfg.model, towers, tabular)
        if model.tabular is not None:
            model.tabular.load_state_dict(template.tabular.state_dict())
        if multi:  # one-vs-rest: a logistic regression per label, whose sigmoid the head's logit then gives
            coef, intercept, iterations = one_vs_rest(x[train], y[train], weights)
            model.head.set_weights(coef, intercept, range(len(labels)))
        else:
            fit = LogisticRegression(C=PROBE_C, max_iter=2000, class_weight=weights).fit(x[train], y[train])
            model.head.set_weights(fit.coef_, fit.intercept_, fit.classes_)
            iterations = int(np.max(fit.n_iter_))
        model.eval()
        oof[rows] = probabilities(model, {m: f[rows] for m, f in feats.items()}, ds.present[rows], multi)
        train_probs = probabilities(model, {m: f[train] for m, f in feats.items()}, ds.present[train], multi)
        if multi:  # at 0.5: a member of an ensemble keeps no thresholds of its own
            val = metrics.multilabel_report(y[rows], oof[rows] >= 0.5, oof[rows], labels)
        else:
            val = metrics.full_report(y[rows], oof[rows].argmax(1), labels)
        history = [
            {
                "epoch": 1,
                "train_loss": selection.log_loss(y[train], train_probs),
                "val_loss": selection.log_loss(y[rows], oof[rows]),
                **{f"val_{k}": val[k] for k in ("accuracy", "weighted_f1", "macro_f1")},
            }
        ]
        result = {
            "best_epoch": 1,
            "epochs_run": 1,
            "interrupted": False,
            "n_train": len(train),
            "n_val": len(rows),
            "train_seconds": time.perf_counter() - t0,
            "num_processes": 1,
            "val": val,
            "probe": {"C": PROBE_C, "iterations": iterations},
        }
        if not multi:
            result["val_interval"] = metrics.bootstrap_interval(y[rows], oof[rows].argmax(1), seed=fold_cfg.train.seed)
        write_run(out / "members" / str(i), fold_cfg, labels, model, history, result, out / FROZEN_FILE)
        brief = {"best_epoch": 1, "train_seconds": round(result["train_seconds"], 2)}
        members.append(
            {"dir": f"members/{i}", "fold": i, "rows": len(rows), **brief, "val_weighted_f1": val["weighted_f1"]}
        )
    return write_bag_files(out, cfg, labels, records, oof, held_out, members, None, False, time.perf_counter() - start)


def probe_features(parts: list[np.ndarray]) -> np.ndarray:
    """Each modality's features L2-normalised, concatenated: what the probe fits, as the ``linear`` head sees them."""
    return np.concatenate([p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12) for p in parts], axis=1)


def targets(records: list[Record], labels: list[str], multi_label: bool) -> np.ndarray:
    """What the members are scored against: class ids, or a multi-label run's (rows, labels) of 0/1."""
    if multi_label:
        return multilabel.targets(records, labels)
    index = {c: i for i, c in enumerate(labels)}
    return np.array([index[r.label] for r in records])


def per_label_weights(spec: str | None, labels: list[str], weights: dict[str, float] | None) -> list | None:
    """A multi-label probe's scikit-learn ``class_weight`` for each label's logistic regression: "balanced" for
    ``--class-weight balanced``, else {0: 1, 1: the label's pos_weight} (``prep.class_weights``); None without it."""
    if weights is None:
        return None
    if spec is not None and spec.strip() == "balanced":
        return ["balanced"] * len(labels)
    return [{0: 1.0, 1: weights[c]} for c in labels]


def one_vs_rest(x: np.ndarray, y: np.ndarray, weights: list | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """The probe for multi-label targets ``y`` ((rows, labels) of 0/1): a logistic regression per label (with
    ``weights[j]`` its scikit-learn ``class_weight``), as (coef (labels, dim), intercept (labels,), most iterations).
    A label all or none of the rows hold gets no slope and the log-odds of its (clipped) rate."""
    from sklearn.linear_model import LogisticRegression  # deferred: sklearn takes 0.5 s to import

    coef, intercept, iterations = np.zeros((y.shape[1], x.shape[1])), np.zeros(y.shape[1]), 0
    for j in range(y.shape[1]):
        if 0 < y[:, j].sum() < len(y):
            weight = weights[j] if weights is not None else None
            fit = LogisticRegression(C=PROBE_C, max_iter=2000, class_weight=weight).fit(x, y[:, j])
            coef[j], intercept[j], iterations = fit.coef_[0], fit.intercept_[0], max(iterations, int(fit.n_iter_[0]))
        else:
            rate = np.clip(y[:, j].mean(), 1e-3, 1 - 1e-3)
            intercept[j] = np.log(rate / (1 - rate))
    return coef, intercept, iterations


@torch.no_grad()
def probabilities(
    model: MultimodalClassifier, feats: dict[str, torch.Tensor], present: torch.Tensor, multi_label: bool = False
) -> np.ndarray:
    """The model's softmax probabilities on cached pooled features (a sigmoid per label for a multi-label run)."""
    logits = model(**{f"{m}_feats": f for m, f in feats.items()}, present=present).float()
    return (logits.sigmoid() if multi_label else logits.softmax(-1)).numpy()


def _read_oof(folder: Path, name: str, records: list[Record], fold_of: np.ndarray, n_classes: int) -> np.ndarray:
    """A member's out-of-fold probabilities, in ``records`` order, checked to come from the ensemble's folds."""
    with open(folder / "oof_predictions.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if [r["row"] for r in rows] != [str(r.row) for r in records]:
        raise MmfuseError(
            f"ensemble member {name} read other rows of the data than the ensemble did ({len(rows)} of "
            f"{len(records)}): a modality's check skipped different rows. Fix or drop the bad rows (see skipped.csv)."
        )
    if any(int(r["fold"]) != fold for r, fold in zip(rows, fold_of)):
        raise RuntimeError(f"ensemble member {name} was bagged on other folds than the ensemble's")
    probs = np.array([[float(v) for k, v in r.items() if k.startswith("p_")] for r in rows], dtype=np.float32)
    if probs.shape[1] != n_classes:
        raise RuntimeError(f"ensemble member {name} has {probs.shape[1]} classes, the ensemble {n_classes}")
    return probs


def _write(out: Path, cfg, labels, records, y, held_out, done, chosen, skipped, interrupted, start) -> dict:
    weights = chosen.weights
    probs = selection.blend([d["oof"] for d in done], weights)
    # An ensemble blends probabilities, not logits: its temperature acts on the blend's log-probabilities,
    # probs ** (1 / T) renormalised (a multi-label blend's: sigmoid(logit p / T)), fitted on the blended out-of-fold
    # rows (Predictor applies it after blending).
    calibration = calibrate(probs, y, "out-of-fold") if cfg.train.calibrate else None
    served = calibration.calibrated if calibration is not None else probs
    decision, scores = decide(cfg, labels, probs, y, calibration, "out-of-fold")
    # The labels predict gives: a binary ensemble's at its threshold (on the calibrated blend), else the argmax.
    pred = None if cfg.data.multi_label else binary.predicted(served, labels, decision)
    name = cfg.train.metric
    if cfg.data.multi_label:  # per-label thresholds chosen on the blended (and calibrated) out-of-fold probabilities
        cut = multilabel.thresholds_at(served, y, _cut(cfg))
        sets = multilabel.predicted(served, cut)
        fold_f1 = [metrics.multilabel_summary(y[rows], sets[rows])["weighted_f1"] for rows in held_out]
        fold_scores = [
            metrics.multilabel_summary(y[rows], sets[rows])[name]
            if name in selection.SET_METRICS
            else metrics.score(name, y[rows], probs[rows])
            for rows in held_out
        ]
    else:
        fold_f1 = [metrics.score("weighted_f1", y[rows], probs[rows]) for rows in held_out]
        fold_scores = [metrics.score(name, y[rows], probs[rows], positive_index(cfg, labels)) for rows in held_out]
    # The column of what selection maximised, when it is not one of the three every leaderboard has.
    extra = f"oof_{name}" if name not in ("weighted_f1", "macro_f1", "log_loss") else None
    board = [
        {
            "name": d["member"].name,
            "kind": d["member"].kind,
            "modalities": d["member"].modalities,
            "text_tower": d["member"].cfg.model.text if "text" in d["member"].cfg.model.modalities else "",
            "oof_weighted_f1": round(d["weighted_f1"], 6),
            "oof_macro_f1": round(d["macro_f1"], 6),
            "oof_log_loss": round(d["log_loss"], 6),
            **({extra: round(d[name], 6)} if extra else {}),
            "weight": round(float(w), 6),
            "seconds": round(d["seconds"], 2),
        }
        for d, w in zip(done, weights)
    ]
    if cfg.data.multi_label:
        report = multilabel.report(y, served, labels, cut)
        report["decision"] = {"chosen": "auto" if _cut(cfg) == "auto" else "fixed", "fitted_on": "out-of-fold"}
    else:
        report = metrics.full_report(y, pred, labels)
    board.append(
        {
            "name": "ensemble",
            "kind": "ensemble",
            "modalities": "+".join(
                sorted({m for d, w in zip(done, weights) if w > 0 for m in d["member"].cfg.model.modalities})
            ),
            "text_tower": "",
            "oof_weighted_f1": round(report["weighted_f1"], 6),
            "oof_macro_f1": round(report["macro_f1"], 6),
            "oof_log_loss": round(chosen.log_loss, 6),
            **({extra: round(chosen.score, 6)} if extra else {}),
            "weight": 1.0,
            "seconds": round(time.perf_counter() - start, 2),
        }
    )
    result = {
        "ensemble": True,
        "bag": cfg.train.bag,
        "members_finished": len(done),
        "interrupted": interrupted,
        "n_rows": len(records),
        "n_out_of_fold": len(records),
        "val": {**report, "log_loss": chosen.log_loss},
        "val_log_loss": chosen.log_loss,
        "metric": {"name": name, "value": chosen.score, **spread(fold_scores)},
        "fold_weighted_f1": fold_f1,
        "fold_weighted_f1_mean": float(np.mean(fold_f1)),
        "fold_weighted_f1_sd": float(np.std(fold_f1)),
        "members": board[:-1],
        "weights": {row["name"]: row["weight"] for row in board[:-1]},
        "not_started": skipped,
        "modalities": modality_summary(board[:-1], name),
        "predict_uses": "ensemble",
        "train_seconds": time.perf_counter() - start,
    }
    if not cfg.data.multi_label:
        result["val_interval"] = metrics.bootstrap_interval(y, pred, seed=cfg.train.seed)
    if cfg.train.class_weight is not None:  # over all the rows; each member's own, on its folds, is in its metrics.json
        result["class_weight"] = class_weights(cfg.train.class_weight, labels, records, cfg.data.multi_label)
    if calibration is not None:
        result["calibration"] = calibration.report()
    if decision is not None:
        result["val"] |= scores
        result |= {"positive": decision.positive, "threshold": decision.threshold}
    fold_of = {int(j): i for i, rows in enumerate(held_out) for j in rows}
    if cfg.data.multi_label:  # the set at the ensemble's thresholds, and every label's probability
        header = ["row", "image", "labels", "predicted", "fold", *(f"p_{c}" for c in labels)]
        sets = multilabel.label_sets(served, labels, cut)
        rows = [
            [r.row, r.source, r.label, multilabel.joined(sets[j]), fold_of[j], *(f"{x:.6f}" for x in probs[j])]
            for j, r in enumerate(records)
        ]
    else:
        header = ["row", "image", "label", "predicted", "confidence", "fold", *(f"p_{c}" for c in labels)]
        rows = [
            [r.row, r.source, r.label, labels[int(pred[j])], f"{probs[j].max():.6f}", fold_of[j]]
            + [f"{x:.6f}" for x in probs[j]]
            for j, r in enumerate(records)
        ]
    ensemble = {
        "metric": name,
        "tie_break": "log_loss",
        "oof_weighted_f1": report["weighted_f1"],
        **({f"oof_{name}": chosen.score} if name != "weighted_f1" else {}),
        "bag": cfg.train.bag,
        "members": [
            {"name": d["member"].name, "dir": f"members/{d['member'].name}", "weight": float(w)}
            for d, w in zip(done, weights)
            if w > 0
        ],
        "dropped": [d["member"].name for d, w in zip(done, weights) if w == 0],
    }
    write_ensemble(out, cfg, labels, result, (header, rows), board, ensemble, calibration)
    for name in ensemble["dropped"]:  # listed in the leaderboard; a weight of 0 takes no part in predictions
        shutil.rmtree(out / "members" / name, ignore_errors=True)
    return result


def modality_summary(board: list[dict], metric: str = "weighted_f1") -> str:
    """Which modality carries the signal, in plain words, from the best out-of-fold member of each kind by the run's
    ``metric`` (its leaderboard column; lower is better for log_loss): e.g. "text alone 0.947, image alone 0.590,
    both 0.930 (out-of-fold weighted F1): the image adds little here"."""
    column = f"oof_{metric}"
    higher = metrics.metric(metric).higher_is_better
    best = {}
    for row in board:
        key = {"image": "image alone", "text": "text alone"}.get(row["modalities"], "both")
        value = row[column]
        best[key] = value if key not in best else (max if higher else min)(best[key], value)
    figures = ", ".join(f"{k} {best[k]:.3f}" for k in ("text alone", "image alone", "both") if k in best)
    title = f"out-of-fold {metrics.metric(metric).title}"
    single = {k.split()[0]: v for k, v in best.items() if k != "both"}
    if not single or "both" not in best:
        return f"{figures} ({title})"
    top = (max if higher else min)(single, key=single.get)
    other = "image" if top == "text" else "text"
    gain = (best["both"] - single[top]) * (1 if higher else -1)  # > 0: fusing does better, whichever way is better
    if gain > 0.005:
        verdict = f"fusing both adds {gain:.3f} over the {top} alone: both modalities carry signal"
    elif other in single:
        verdict = f"the {other} adds little here: the {top} alone does as well as both"
    else:
        verdict = f"adding the {other} to the {top} gains {gain:.3f}"
    return f"{figures} ({title}): {verdict}"
