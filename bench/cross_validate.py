"""k-fold cross-validation of `mmfuse train` recipes against the logistic-regression probe of shared/QUALITY.md.

All rows of a set (the emoji of ``mmfuse datasets emoji`` by default, or ``--data DIR`` as bench/datasets/*.py
write them) are split into stratified folds. Each recipe is trained with ``mmfuse.training.fit.fit`` on a fold's train
(no ``--val``: its 15% validation slice comes out of that train, as a user's run would) and scored with
``evaluate_file`` on the fold's test. The probe (C=4, L2-normalised pooled Lite0 and mean-pooled MiniLM features)
trains on the whole fold's train, on each modality alone and on both.

    python bench/cross_validate.py                                   # the defaults and the probe, 5 folds
    python bench/cross_validate.py '{"head": {"train.tune": "head"}}' --no-probe
    python bench/cross_validate.py '{"lr1e-4": {"train.lr": 1e-4}}' --folds 0,1
    python bench/cross_validate.py '{"best": {"preset": "best"}}' --seeds 0,1 --no-probe
    python bench/cross_validate.py '{"fast": {"preset": "fast"}}' --data /tmp/sets/breeze-small

Recipes are JSON objects of ``section.field`` overrides of a default ``RunConfig``, or ``"preset": NAME`` for a
preset's settings (flags given beside it override them, as on the command line). A recipe with ``train.bag`` trains
a bag (``mmfuse.training.bag.fit_bag``), one with ``train.ensemble`` a portfolio
(``mmfuse.training.portfolio.fit_portfolio``); ``"bag_parallel": false`` trains a bag's members one after another
where they would otherwise train at once (frozen towers on a multi-core CPU). Prints mean ± sd over folds and seeds,
and the seconds per fold. ``--scores`` names what to report (any key of evaluate's metrics.json); on two classes
the probe's ``positive_f1`` is at a threshold chosen on its own out-of-fold probabilities within the fold's train
(``binary.choose_threshold``), as a run's ``--threshold auto`` is, with the 0.5 figure beside it.

    python bench/cross_validate.py '{"fast": {"preset": "fast"}}' --data /tmp/sets26/emoji-binary \
        --scores roc_auc,pr_auc,positive_f1

A set with label sets (a ``labels`` column) is cross-validated as multi-label: folds stratified by each row's rarest
label (``data.splits.strata``), the probe one-vs-rest, its sets cut per label at thresholds chosen on its own
out-of-fold probabilities within the fold's train (``multilabel.choose_thresholds``, as a run does) and at 0.5.

    python bench/cross_validate.py '{"fast": {"preset": "fast"}}' --data /tmp/sets26/emoji-multilabel \
        --scores micro_f1,macro_f1,map

A set with named columns (several images or texts, tabular columns: ``--image-columns`` ...) keeps every column in
its fold files (image paths made absolute); recipes name theirs as ``model.image_columns``, ``model.text_columns``,
``model.tabular_columns`` overrides. ``--columns`` names the probe's: each image and text column's features as above,
L2-normalised and concatenated per modality (and each column alone where a modality has several), and the tabular
columns as a run encodes them (numbers standardised on each fold's train, with missing indicators), categories
one-hot where a run embeds them (the probe has no embedding to learn); arms image, text, tabular and all together.

    python bench/cross_validate.py '{"fast, +tabular": {"preset": "fast", "model.image_columns": ["image"],
        "model.text_columns": ["title", "summary"], "model.tabular_columns": ["size_kb", "section"]}}' \
        --data /tmp/sets26/debian-apps-columns --columns '{"image_columns": ["image"],
        "text_columns": ["title", "summary"], "tabular_columns": ["size_kb", "section"]}'
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mmfuse.errors import MmfuseError  # noqa: E402

SPLITS = ("train", "val", "test")
COLUMN_KEYS = ("image_columns", "text_columns", "tabular_columns")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipes", nargs="?", default='{"defaults": {}}', help="JSON: name -> {section.field: value}")
    p.add_argument("--k", type=int, default=5, help="number of folds")
    p.add_argument("--folds", help="run only these folds, e.g. 0,1 (default: all)")
    p.add_argument("--no-probe", action="store_true", help="skip the logistic-regression probe")
    p.add_argument("--out", help="keep the fold manifests and runs here (default: a temporary directory)")
    p.add_argument("--seeds", default="0", help="training seeds, e.g. 0,1 (the folds stay the same)")
    p.add_argument(
        "--data",
        help="a folder holding all.csv, or train/val/test.csv, as bench/datasets/*.py write them (default: the emoji)",
    )
    p.add_argument("--scores", default="weighted_f1", help="what to report, e.g. roc_auc,pr_auc,positive_f1")
    p.add_argument(
        "--columns",
        help="JSON: the named columns the probe reads (image_columns, text_columns, tabular_columns), for a set with "
        "several columns",
    )
    args = p.parse_args(argv)
    keys = args.scores.split(",")

    from sklearn.model_selection import StratifiedKFold

    from mmfuse import multilabel
    from mmfuse.config import PRESETS, ModelConfig, RunConfig, tabular_kind
    from mmfuse.data.checks import load_checked
    from mmfuse.data.columns import Columns
    from mmfuse.data.datasets.emoji import emoji_dataset
    from mmfuse.data.records import label_names
    from mmfuse.data.splits import label_list, strata
    from mmfuse.features.sources import FeatureCache, build_dataset
    from mmfuse.inference.predictor import evaluate_file
    from mmfuse.models.classifier import build_model
    from mmfuse.training.bag import fit_bag
    from mmfuse.training.fit import fit
    from mmfuse.training.portfolio import fit_portfolio

    logging.disable(logging.INFO)
    recipes = json.loads(args.recipes)
    probe_columns = parse_columns(args.columns)
    named = None
    if probe_columns:  # the probe reads exactly these (a model's defaults, image and text, only where named)
        given = [probe_columns.get(key, []) for key in COLUMN_KEYS]
        named = Columns(tuple(given[0]), tuple(given[1]), tuple(tabular_kind(c)[0] for c in given[2]))
    data = Path(args.data) if args.data else emoji_dataset()
    files = [data / "all.csv"] if (data / "all.csv").is_file() else [data / f"{s}.csv" for s in SPLITS]
    recs, raw = [], []
    for file in files:
        header, rows = read_rows(file)
        if named is None and not {"image", "text"} <= set(header):
            raise MmfuseError(
                f"{file} has no image and text columns (it has {', '.join(header)}): name the columns the probe "
                """reads with --columns, e.g. '{"image_columns": ["image"], "text_columns": ["title"]}'"""
            )
        got = load_checked(str(file), named=named)
        recs += got
        raw += [(header, rows[r.row - 1], file.parent) for r in got]  # Record.row: the manifest's 1-based data row
    multi = any(r.labels is not None for r in recs)
    y = np.array([key or "" for key in strata(recs)]) if multi else np.array([r.label for r in recs])
    folds = list(StratifiedKFold(args.k, shuffle=True, random_state=0).split(np.zeros(len(y)), y))
    chosen = [int(k) for k in args.folds.split(",")] if args.folds else list(range(args.k))
    with tempfile.TemporaryDirectory(prefix="mmfuse-cv-") as tmp:
        root = Path(args.out or tmp)
        root.mkdir(parents=True, exist_ok=True)
        # A set of one image and one text keeps the fold files it always had; a set with other columns keeps them all.
        plain = named is None and all(set(h) <= {"image", "text", "label", "labels"} for h, _, _ in raw)
        images = {"image", *(named.image if named else ()), *recipe_image_columns(recipes)}
        header = list(dict.fromkeys(c for h, _, _ in raw for c in h))
        for k in chosen:
            for part, idx in (("train", folds[k][0]), ("test", folds[k][1])):
                with open(root / f"{part}{k}.csv", "w", newline="", encoding="utf-8") as f:
                    w = csv.writer(f)
                    if plain:
                        w.writerow(["image", "text", "labels" if multi else "label"])
                        for i in idx:
                            label = multilabel.joined(label_names(recs[i])) if multi else recs[i].label
                            w.writerow([str(recs[i].image), recs[i].text, label])
                    else:
                        write_all_columns(w, header, [raw[i] for i in idx], images)
        print(f"{data.name}: {len(recs)} rows, {len(set(y))} classes, folds {chosen} of {args.k}", flush=True)
        if not args.no_probe and named is None:
            model = build_model(ModelConfig(text_pooling="mean"), 2)
            model.freeze_towers()
            ds = build_dataset(model, recs, None, [], FeatureCache(), show=False)
            feats = {
                m: torch.nn.functional.normalize(ds.sources[m].feats.float(), dim=1).numpy() for m in model.modalities
            }
        elif not args.no_probe:
            feats = column_features(recs, named, probe_columns, folds, chosen)
        if not args.no_probe:
            if multi:
                probe_multilabel(feats, folds, chosen, multilabel.targets(recs, label_list(recs)), keys)
            else:
                probe_single(feats, folds, chosen, y, keys)
        seeds = [int(x) for x in args.seeds.split(",")]
        for name, overrides in recipes.items():
            per_key: dict[str, list[float]] = {key: [] for key in keys}
            start = time.perf_counter()
            for seed in seeds:
                for k in chosen:
                    changes: dict[str, dict] = {"data": {"train": str(root / f"train{k}.csv")}, "train": {"seed": seed}}
                    for section, values in PRESETS.get(overrides.get("preset", ""), {}).items():
                        changes.setdefault(section, {}).update(values)
                    for key, value in overrides.items():
                        if key not in ("preset", "bag_parallel"):
                            section, field = key.split(".")
                            changes.setdefault(section, {})[field] = value
                    # Applied as flags are, so defaults that depend on them (--tune's epochs and rates) follow.
                    cfg = RunConfig().updated(changes)
                    run = root / "runs" / f"{name}-{seed}-{k}"
                    if cfg.train.ensemble:
                        fit_portfolio(cfg, run)
                    elif cfg.train.bag > 1:
                        fit_bag(cfg, run, parallel=overrides.get("bag_parallel"))
                    else:
                        fit(cfg, run)
                    result = evaluate_file(run, root / f"test{k}.csv", run / "test")
                    for key in keys:
                        per_key[key].append(result[key])
            seconds = (time.perf_counter() - start) / (len(seeds) * len(chosen))
            for key, values in per_key.items():
                report(name, values, seconds, key)
    return 0


def parse_columns(text: str | None) -> dict | None:
    """--columns: the probe's named columns, as ModelConfig fields."""
    if not text:
        return None
    try:
        columns = json.loads(text)
    except json.JSONDecodeError as e:
        raise MmfuseError(f"--columns is not JSON ({e})") from None
    if (
        not isinstance(columns, dict)
        or not columns
        or set(columns) - set(COLUMN_KEYS)
        or not all(isinstance(v, list) and all(isinstance(c, str) for c in v) for v in columns.values())
    ):
        raise MmfuseError(
            f"--columns takes a JSON object of {', '.join(COLUMN_KEYS)}, each a list of column names; got {text}"
        )
    return columns


def read_rows(file: Path) -> tuple[list[str], list[dict]]:
    """A manifest's header and its data rows as written (the fold files copy them)."""
    if not file.is_file():
        raise MmfuseError(f"{file} is missing: --data takes a folder holding all.csv, or train.csv, val.csv, test.csv")
    with open(file, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    return list(reader.fieldnames or []), rows


def recipe_image_columns(recipes: dict) -> set[str]:
    """The image columns any recipe names: their cells become absolute paths in the fold files."""
    return {c for overrides in recipes.values() for c in overrides.get("model.image_columns", [])}


def write_all_columns(w, header: list[str], rows: list[tuple[list[str], dict, Path]], images: set[str]) -> None:
    """Rows with every column of the set, image cells made absolute (the fold files lie elsewhere)."""
    w.writerow(header)
    for _, row, folder in rows:
        cells = []
        for c in header:
            cell = row.get(c) or ""
            if c in images and cell.strip() and not os.path.isabs(cell.strip()):
                cell = str(folder / cell.strip())
            cells.append(cell)
        w.writerow(cells)


def column_features(recs: list, named, columns: dict, folds: list, chosen: list[int]) -> dict:
    """The probe's arms for a set with named columns: each image and text column's frozen features (pooled Lite0,
    mean-pooled MiniLM), L2-normalised, concatenated per modality (and each column alone where a modality has
    several); the tabular columns as a run encodes them (standardised numbers with missing indicators, fitted on each
    fold's train), its categories one-hot (a run embeds them; the probe has no embedding to learn)."""
    from mmfuse.config import ModelConfig
    from mmfuse.data.tabular import fit_tabular
    from mmfuse.features.sources import FeatureCache, build_dataset
    from mmfuse.models.classifier import build_model

    feats: dict = {}
    towers = [m for m, c in (("image", named.image), ("text", named.text)) if c]
    if towers:
        cfg = ModelConfig(
            text_pooling="mean",
            modalities=towers,
            image_columns=list(named.image),
            text_columns=list(named.text),
        )
        model = build_model(cfg, 2)
        model.freeze_towers()
        ds = build_dataset(model, recs, None, [], FeatureCache(), show=False)
        for m in towers:
            each = {
                s.column: torch.nn.functional.normalize(ds.sources[s.name].feats.float(), dim=1).numpy()
                for s in model.slots
                if s.modality == m
            }
            feats[m] = np.hstack(list(each.values()))
            if len(each) > 1:
                feats.update((f"{m}: {c}", x) for c, x in each.items())
    if columns.get("tabular_columns"):
        tabular = {}
        for k in chosen:
            spec = fit_tabular([recs[i] for i in folds[k][0]], columns["tabular_columns"])
            values, codes = spec.encode(recs)
            onehot = [
                np.eye(len(c.vocab) + 1, dtype=np.float32)[codes[:, j], 1:] for j, c in enumerate(spec.categorical)
            ]
            tabular[k] = np.hstack([values, *onehot])
        feats["tabular"] = tabular
    return feats


def at(x, k: int) -> np.ndarray:
    """An arm's features in fold k: one array for every fold, or {fold: array} where they are fitted on its train."""
    return x[k] if isinstance(x, dict) else x


def with_concat(feats: dict) -> list:
    """The arms, then all modalities together (a column's own arm is already inside its modality's)."""
    parts = [x for name, x in feats.items() if ": " not in name]
    per_fold = next((x for x in parts if isinstance(x, dict)), None)
    both = np.hstack(parts) if per_fold is None else {k: np.hstack([at(x, k) for x in parts]) for k in per_fold}
    return [*feats.items(), ("concat", both)]


def probe_single(feats: dict, folds: list, chosen: list[int], y: np.ndarray, keys: list[str]) -> None:
    """Logistic regression (C=4) per modality and on both; on two classes, positive F1 at a threshold chosen on its
    own out-of-fold probabilities within each fold's train (as --threshold auto does), and at 0.5."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.model_selection import cross_val_predict

    from mmfuse import metrics
    from mmfuse.binary import choose_threshold

    classes = sorted(set(y))
    ids = np.array([classes.index(c) for c in y])
    positive = metrics.minority(ids) if len(classes) == 2 else None
    for name, arm in with_concat(feats):
        scores: dict[str, list[float]] = {}
        for k in chosen:
            train, test = folds[k]
            x = at(arm, k)
            clf = LogisticRegression(C=4, max_iter=3000)
            probs = clf.fit(x[train], ids[train]).predict_proba(x[test])
            for key in keys:
                if key == "positive_f1" and positive is not None:
                    inner = cross_val_predict(clf, x[train], ids[train], cv=5, method="predict_proba")
                    cut = choose_threshold(inner[:, positive], ids[train] == positive)
                    hit = ids[test] == positive
                    for label, t in (("positive_f1", cut), ("positive_f1 at 0.5", 0.5)):
                        scores.setdefault(label, []).append(f1_score(hit, probs[:, positive] >= t))
                elif key == "weighted_f1":
                    scores.setdefault(key, []).append(f1_score(ids[test], probs.argmax(1), average="weighted"))
                else:
                    scores.setdefault(key, []).append(metrics.score(key, ids[test], probs, positive))
        for key, values in scores.items():  # one fit, no seed: the probe is deterministic
            report(f"probe (LR C=4, {name})", values, 0.0, key)


def probe_multilabel(feats: dict, folds: list, chosen: list[int], y: np.ndarray, keys: list[str]) -> None:
    """One-vs-rest logistic regression (C=4) per modality and on both, scored at per-label thresholds chosen on its
    own out-of-fold probabilities within each fold's train, and at 0.5."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import KFold, cross_val_predict
    from sklearn.multiclass import OneVsRestClassifier

    from mmfuse import multilabel

    for name, arm in with_concat(feats):
        scores: dict[str, list[float]] = {}
        for k in chosen:
            train, test = folds[k]
            x = at(arm, k)
            clf = OneVsRestClassifier(LogisticRegression(C=4, max_iter=3000))
            probs = clf.fit(x[train], y[train]).predict_proba(x[test])
            inner = cross_val_predict(
                clf, x[train], y[train], cv=KFold(5, shuffle=True, random_state=0), method="predict_proba"
            )
            cuts = multilabel.choose_thresholds(inner, y[train])
            for suffix, t in (("", cuts), (" at 0.5", multilabel.Thresholds.half(y.shape[1]))):
                result = multilabel.report(y[test], probs, [str(j) for j in range(y.shape[1])], t)
                for key in keys:
                    if key == "map" and suffix:
                        continue  # mean average precision does not depend on the thresholds
                    scores.setdefault(key + suffix, []).append(result[key])
        for key, values in scores.items():
            report(f"probe (one-vs-rest LR C=4, {name})", values, 0.0, key)


def report(name: str, scores: list[float], seconds: float, key: str = "weighted_f1") -> None:
    folds = ", ".join(f"{s:.3f}" for s in scores)
    mean, sd = np.mean(scores), np.std(scores)
    title = "weighted F1" if key == "weighted_f1" else key
    print(f"{name:<28} {title} {mean:.4f} ± {sd:.4f}  [{folds}]  {seconds:.0f} s/fold", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
